"""``convmat explore``: one self-contained page that draws a convolution as its matrix.

The page (``explorer.html`` beside this module: HTML, CSS and JavaScript in one file, no
network) computes W itself with convmat's rules and messages, shows the padded input, the output
and W side by side with hover links between them, the output-size formula with the numbers put
in, the refusal torch would give, and the one line of PyTorch that builds the layer. It
steps and plays the kernel over the input (a transposed layer's inputs scattering it), pins a
cell on click, spells the hovered output's formula, fills x and the kernel with small integers and
computes y, and plots W's singular values beside the number torch's ``spectral_norm`` divides by
and the enclosing circular convolution's norm. Its configuration lives in the URL's fragment, so
a link reproduces it. With ``--model`` it lists every convolution a model runs (found by forward
pre-hooks), each with its W a click away. The test suite drives it in headless Chromium and checks
it against :func:`convmat.symbolic`, dense SVD and torch.

convmat explore --input 4,4 --kernel 3 --stride 2 --padding 1 --transposed --output-padding 1
convmat explore -o page.html --no-open
convmat explore --model torchvision.models:resnet18 --input 3,32,32
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
from typing import Any, cast
from urllib.parse import quote

from .._errors import ConvMatError
from .._typing import PaddingArg
from ..engine import PADDING_MODES

__all__ = [
    "FIELDS", "add_parser", "model_layers", "open_page", "page_html", "page_url", "run",
    "write_page",
]  # fmt: skip

#: The page's settings, in the order of its form and its URL.
FIELDS = (
    "input", "kernel", "stride", "dilation", "padding", "padding_mode", "in_channels",
    "out_channels", "groups", "transposed", "output_padding", "flip",
)  # fmt: skip
_BOOLEANS = ("transposed", "flip")
_PLACEHOLDER = "/*CONVMAT_CONFIG*/null"
_MODEL_PLACEHOLDER = "/*CONVMAT_MODEL*/null"


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


def page_html(
    config: Mapping[str, Any] | None = None, model: Mapping[str, Any] | None = None
) -> str:
    """The page's HTML, opening on ``config`` (the page's defaults fill the rest).

    Args:
        config: settings by name (see :data:`FIELDS`), as ints, tuples or the form's text
            (``{"input": (6, 6), "padding": "1:2,0", "transposed": True}``).
        model: a model's convolutions for the page to list: ``{"name": ..., "input_shape":
            [...], "layers": model_layers(...)}`` (see :func:`model_layers`).

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
    source = source.replace(_PLACEHOLDER, embedded, 1)
    if model is not None:
        listed = json.dumps(dict(model), allow_nan=False).replace("</", "<\\/")
        source = source.replace(_MODEL_PLACEHOLDER, listed, 1)
    return source


def write_page(
    path: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
) -> Path:
    """Write the page to ``path`` (atomically: a reader never sees half a file).

    Args:
        path: where to write, usually ``*.html``.
        config: the settings it opens on (see :func:`page_html`).
        model: a model's convolutions to list (see :func:`page_html`).

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
    text = page_html(config, model)
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


# A model's convolutions --------------------------------------------------------------------


def _layer_record(path: str, module: Any, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> dict[str, Any]:  # fmt: skip
    """What the page lists about one call of a convolution module (see :func:`model_layers`)."""
    from torch import nn

    from ..engine import conv_geometry, conv_transpose_geometry
    from .cli import _size_lines

    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    spatial_in, spatial_out = in_shape[1:], out_shape[1:]
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    common = dict(stride=tuple(module.stride), dilation=tuple(module.dilation),
                  groups=module.groups)  # fmt: skip
    config: dict[str, Any] = {
        "input": spatial_in, "kernel": tuple(module.kernel_size), "padding": padding,
        "in_channels": module.in_channels, "out_channels": module.out_channels,
        "transposed": transposed, **common,
    }  # fmt: skip
    shape = tuple(module.weight.shape)
    if transposed:
        # The size the call produced (forward(x, output_size=...) may choose the padding).
        output_padding = tuple(
            o - ((i - 1) * s - 2 * p + d * (k - 1) + 1)
            for o, i, s, p, d, k in zip(spatial_out, spatial_in, module.stride, padding,
                                        module.dilation, module.kernel_size)
        )  # fmt: skip
        config["output_padding"] = output_padding
        geo = conv_transpose_geometry(shape, spatial_in, padding=cast(PaddingArg, padding),
                                      output_padding=output_padding, **common)  # fmt: skip
    else:
        config["padding_mode"] = module.padding_mode
        # torch checked a string padding: "valid" or "same"
        geo = conv_geometry(shape, spatial_in, padding=cast(PaddingArg, padding),
                            padding_mode=module.padding_mode, **common)  # fmt: skip
    drawable = len(spatial_in) <= 2
    return {
        "path": path,
        "module": f"{type(module).__name__}({module.extra_repr()})",
        "input_shape": list(in_shape),
        "output_shape": list(out_shape),
        "weight_shape": list(shape),
        "matrix_shape": list(geo.matrix_shape),
        "formula": _size_lines(geo),
        "config": _checked(config) if drawable else None,
        "why": "" if drawable else f"a {len(spatial_in)}-D layer (the page draws 1-D and 2-D)",
    }


def model_layers(model: Any, input_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Every call of a convolution module (``nn.ConvNd``, ``nn.ConvTransposeNd``) that ``model``
    makes on one input, in order, with the input size it sees (found by forward pre-hooks on one
    forward pass of zeros, in eval mode, without gradients).

    Args:
        model: an ``nn.Module``.
        input_shape: one input's shape without the batch, e.g. ``(3, 32, 32)``.

    Returns:
        One dict per call: ``path`` (``"features.0"``; ``" (call 2)"`` when a module runs
        again), ``module`` (its repr), ``input_shape`` and ``output_shape`` (without the batch),
        ``weight_shape``, ``matrix_shape`` (W's), ``formula`` (the output size per dim and W's
        shape, as ``convmat shape`` prints them), ``config`` (the page's settings for it; None
        for 3-D layers, which the page does not draw) and ``why`` (why not, or ``""``).

    Raises:
        ConvMatError: if the model does not run on such an input, or one input would take more
            than a quarter of the free memory.

    Shape:
        ``matrix_shape = (C_out * prod(output spatial), C_in * prod(input spatial))``.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> [(l["path"], l["input_shape"], l["matrix_shape"]) for l in model_layers(net, (3, 8, 8))]
    [('0', [3, 8, 8], [128, 192]), ('2', [8, 4, 4], [64, 128])]
    """
    from torch import nn

    from ..analysis import layer_calls

    shape = tuple(int(v) for v in input_shape)
    calls = layer_calls(model, shape, (nn.modules.conv._ConvNd,))
    # The model itself (path "") is named on the page.
    return [_layer_record(p if p and not p.startswith(" ") else "(the model)" + p, m, i, o)
            for p, m, i, o in calls]  # fmt: skip


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
        "starts. With --model MODULE:FACTORY --input C,N[,N...] the page lists every convolution "
        "of your model with the input size it sees, each W a click away.",
    )
    parser.add_argument("-o", "--output", help="write the page to this file (one HTML file)")
    parser.add_argument("--no-open", action="store_true", help="do not open a browser")
    parser.add_argument("--input", type=_ints,
                        help="spatial input size: 8 (1-D) or 6,7 (2-D); with --model, one "
                        "input's shape without the batch: 3,32,32")  # fmt: skip
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
    parser.add_argument("--model", metavar="SPEC",
                        help="list this model's convolutions: MODULE:FACTORY (an importable "
                        "callable returning an nn.Module, or a module instance; MODULE may be a "
                        ".py path) or a file saved with torch.save(model), as for convmat "
                        "norm")  # fmt: skip
    parser.add_argument("--weights", metavar="FILE",
                        help="with --model: a state_dict file to load into the model")  # fmt: skip
    parser.add_argument("--trust-pickle", action="store_true",
                        help="with --model: load a saved model that needs classes outside "
                        "torch.nn (runs code it names)")  # fmt: skip
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
    model = _model_listing(args, config) if getattr(args, "model", None) else None
    if model is None and getattr(args, "weights", None):
        raise ConvMatError("--weights needs --model (the model to load them into)")
    if model is not None:
        config = {}
    if args.output:
        path = write_page(args.output, config, model)
    else:
        path = write_page(Path(tempfile.mkdtemp(prefix="convmat-explore-")) / "explorer.html",
                          config, model)  # fmt: skip
    url = page_url(path, config)
    if model is not None:
        print(f"{len(model['layers'])} convolution call(s) in {args.model}")
    print(f"wrote {path}")
    if not args.no_open:
        if webbrowser.open(url):
            print(f"opened {url}")
        else:
            print(f"no browser found; open {url}")


def _model_listing(args: argparse.Namespace, config: Mapping[str, Any]) -> dict[str, Any]:
    """``--model`` and ``--input C,N[,N...]``: the model's convolutions for the page."""
    from .cli import _load_model

    others = sorted(k for k in config if k != "input")
    if others:
        names = ", ".join("--" + k.replace("_", "-") for k in others)
        raise ConvMatError(
            f"{names} set one layer; with --model the page takes every layer's settings from "
            f"the model (drop {names})"
        )
    if args.input is None:
        raise ConvMatError("--model needs --input: one input's shape without the batch, e.g. "
                           "3,32,32")  # fmt: skip
    shape = tuple(int(v) for v in args.input.split(","))
    if len(shape) < 2 or min(shape) < 1:
        raise ConvMatError(
            f"--input must be C,N[,N...] with --model (channels, then the spatial size; every "
            f"value >= 1), got {args.input!r}"
        )
    model = _load_model(args.model, args.weights, args.trust_pickle)
    layers = model_layers(model, shape)
    if not layers:
        raise ConvMatError(
            f"--model {args.model!r} runs no convolution (nn.ConvNd or nn.ConvTransposeNd) on an "
            f"input of shape {shape!r}: nothing to explore"
        )
    return {"name": args.model, "input_shape": list(shape), "layers": layers}
