"""``convmat explore``: one self-contained page that draws a convolution as its matrix.

The page (``explorer.html`` beside this module: HTML, CSS and JavaScript in one file, no
network) computes W itself with convmat's rules and messages, shows the padded input, the output
and W side by side with hover links between them, the output-size formula with the numbers put
in, the refusal torch would give, and the one line of PyTorch that builds the layer. Its
configuration lives in the URL's fragment, so a link reproduces it. The test suite drives it in
headless Chromium and checks its W against :func:`convmat.symbolic` and torch.

convmat explore --input 4,4 --kernel 3 --stride 2 --padding 1 --transposed --output-padding 1
convmat explore -o page.html --no-open
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import webbrowser
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .._errors import ConvMatError
from ..engine import PADDING_MODES

__all__ = ["FIELDS", "add_parser", "open_page", "page_html", "page_url", "run", "write_page"]

#: The page's settings, in the order of its form and its URL.
FIELDS = (
    "input", "kernel", "stride", "dilation", "padding", "padding_mode", "in_channels",
    "out_channels", "groups", "transposed", "output_padding", "flip",
)  # fmt: skip
_BOOLEANS = ("transposed", "flip")
_PLACEHOLDER = "/*CONVMAT_CONFIG*/null"


def _text(value: Any) -> str:
    """A setting as the page's form writes it: ``(1, (2, 0))`` -> ``"1,2:0"``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple):
        return ",".join(":".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
                        for v in value)  # fmt: skip
    return str(value)


def _checked(config: Mapping[str, Any] | None) -> dict[str, Any]:
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ConvMatError(f"config must be a mapping of settings, got {config!r}")
    unknown = sorted(set(config) - set(FIELDS))
    if unknown:
        raise ConvMatError(f"config has unknown settings {unknown!r}; allowed: {FIELDS!r}")
    return {k: _flag(v) if k in _BOOLEANS else _text(v) for k, v in config.items()}


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def page_html(config: Mapping[str, Any] | None = None) -> str:
    """The page's HTML, opening on ``config`` (the page's defaults fill the rest).

    Args:
        config: settings by name (see :data:`FIELDS`), as ints, tuples or the form's text
            (``{"input": (6, 6), "padding": "1:2,0", "transposed": True}``).

    Returns:
        One self-contained HTML document.

    >>> html = page_html({"input": (6, 6), "stride": 2})
    >>> html.startswith("<!doctype html>") and '"stride": "2"' in html
    True
    """
    settings = _checked(config)
    source = resources.files(__package__).joinpath("explorer.html").read_text(encoding="utf-8")
    if _PLACEHOLDER not in source:  # pragma: no cover - a broken install
        raise ConvMatError("explorer.html has no configuration placeholder; reinstall convmat")
    embedded = json.dumps(settings).replace("</", "<\\/") if settings else "null"
    return source.replace(_PLACEHOLDER, embedded, 1)


def write_page(path: str | os.PathLike[str], config: Mapping[str, Any] | None = None) -> Path:
    """Write the page to ``path`` (atomically: a reader never sees half a file).

    Args:
        path: where to write, usually ``*.html``.
        config: the settings it opens on (see :func:`page_html`).

    Returns:
        The path written.

    Raises:
        ConvMatError: if the file cannot be written (naming the path and why).

    >>> import tempfile, pathlib
    >>> out = write_page(pathlib.Path(tempfile.mkdtemp()) / "page.html", {"input": 8})
    >>> out.read_text(encoding="utf-8").count("<script>")
    1
    """
    target = Path(path)
    text = page_html(config)
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=target.parent if str(target.parent) else ".",
            prefix=f".{target.name}.", suffix=".tmp", delete=False,
        ) as handle:  # fmt: skip
            tmp = handle.name
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise ConvMatError(
            f"cannot write the page to {str(target)!r}: {err.strerror or err}"
        ) from None
    return target


def page_url(path: str | os.PathLike[str], config: Mapping[str, Any] | None = None) -> str:
    """The ``file://`` URL of a written page, with ``config`` in its fragment as the page keeps it.

    >>> page_url("/tmp/p.html", {"input": (4, 4), "transposed": True})
    'file:///tmp/p.html#input=4,4&transposed=1'
    """
    settings = _checked(config)
    parts = [
        f"{k.replace('_', '-')}={'1' if v is True else '0' if v is False else quote(v, safe=',:')}"
        for k, v in ((k, settings[k]) for k in FIELDS if k in settings)
    ]
    url = Path(path).absolute().as_uri()
    return url + ("#" + "&".join(parts) if parts else "")


def open_page(config: Mapping[str, Any] | None = None) -> str:
    """Write the page to a new temporary file and open it in the default browser.

    Args:
        config: the settings it opens on (see :func:`page_html`).

    Returns:
        The page's URL (the page stays in a new folder under the system's temporary folder).
    """
    folder = tempfile.mkdtemp(prefix="convmat-explore-")
    url = page_url(write_page(Path(folder) / "explorer.html", config), config)
    webbrowser.open(url)
    return url


# The command ----------------------------------------------------------------------------------

_INTS = re.compile(r"^\s*[+-]?\d+\s*(,\s*[+-]?\d+\s*)*$")
_PADDING = re.compile(r"^\s*[+-]?\d+\s*(:\s*[+-]?\d+\s*)?(,\s*[+-]?\d+\s*(:\s*[+-]?\d+\s*)?)*$")


def _ints(text: str) -> str:
    if not _INTS.match(text):
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}")
    return text.replace(" ", "")


def _padding(text: str) -> str:
    if text not in ("same", "valid") and not _PADDING.match(text):
        raise argparse.ArgumentTypeError(
            f"expected an int, comma-separated ints, before:after pairs, 'same' or 'valid', got "
            f"{text!r}"
        )
    return text.replace(" ", "")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``explore`` subcommand to the command's subparsers (its ``run`` is :func:`run`).

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The subcommand's parser.

    >>> parser = argparse.ArgumentParser(prog="convmat")
    >>> _ = add_parser(parser.add_subparsers())
    >>> args = parser.parse_args(["explore", "--input", "6,6", "--padding", "1:0,2", "--no-open"])
    >>> args.input, args.padding, args.run is run
    ('6,6', '1:0,2', True)
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "explore",
        help="an interactive page: the input, the output and W, linked by hover",
        description="Open (or write with -o) a self-contained page that draws a convolution "
        "as its matrix W. Every setting can be changed on the page; these options set where it "
        "starts.",
    )
    parser.add_argument("-o", "--output", help="write the page to this file (one HTML file)")
    parser.add_argument("--no-open", action="store_true", help="do not open a browser")
    parser.add_argument("--input", type=_ints, help="spatial input size: 8 (1-D) or 6,7 (2-D)")
    parser.add_argument("--kernel", type=_ints, help="kernel size")
    parser.add_argument("--stride", type=_ints, help="step between windows")
    parser.add_argument("--dilation", type=_ints, help="spacing between kernel taps")
    parser.add_argument(
        "--padding", type=_padding, help="int, ints per dim, before:after pairs, 'same' or 'valid'"
    )
    parser.add_argument("--padding-mode", choices=list(PADDING_MODES), default=None,
                        help="how the padded border is filled")  # fmt: skip
    parser.add_argument("--in-channels", type=int, help="input channels")
    parser.add_argument("--out-channels", type=int, help="output channels")
    parser.add_argument("--groups", type=int, help="blocked connections (depthwise: = channels)")
    parser.add_argument("--transposed", action="store_true", default=None,
                        help="a transposed convolution")  # fmt: skip
    parser.add_argument("--output-padding", type=_ints,
                        help="added to a transposed convolution's output size")  # fmt: skip
    parser.add_argument(
        "--flip", action="store_true", default=None, help="true convolution (flipped kernel)"
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> None:
    """Write the page (to ``-o`` or a temporary file), print where, and open it unless
    ``--no-open``. The settings given open the page; the rest take convmat's defaults.

    Args:
        args: the parsed command line of :func:`add_parser`'s subcommand.

    Raises:
        ConvMatError: if the page cannot be written.

    >>> import tempfile, pathlib
    >>> parser = argparse.ArgumentParser(prog="convmat")
    >>> _ = add_parser(parser.add_subparsers())
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "page.html"
    >>> run(parser.parse_args(["explore", "-o", str(out), "--stride", "2", "--no-open"]))
    ... # doctest: +ELLIPSIS
    wrote .../page.html
    """
    config = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    if args.output:
        path = write_page(args.output, config)
    else:
        path = write_page(Path(tempfile.mkdtemp(prefix="convmat-explore-")) / "explorer.html",
                          config)  # fmt: skip
    url = page_url(path, config)
    print(f"wrote {path}")
    if not args.no_open:
        if webbrowser.open(url):
            print(f"opened {url}")
        else:
            print(f"no browser found; open {url}")
