"""The ``convmat`` command: a thin layer over the public API.

convmat show --input 10 --kernel 3 --stride 2
convmat show --input 6 --kernel 3 --flip
convmat shape --input 32,32 --kernel 3 --stride 2 --same
convmat plot --input 4,5 --kernel 3 -o W.png
convmat animate --input 8 --kernel 3 -o conv.gif
convmat norm --model torchvision.models:resnet18 --input 3,224,224
convmat tour
convmat explore --input 4,4 --kernel 3 --stride 2 --padding 1 --transposed --output-padding 1

``convmat`` alone prints the help and exits with 0. A mistake in the arguments, the model or
the files prints one line on stderr and exits with 2; anything else that goes wrong is a bug in
convmat and prints one line and exits with 1 (``CONVMAT_DEBUG=1`` shows its traceback).
``shape`` reads only the :class:`~convmat.engine.Geometry`; ``show`` computes the labels of the
rows and columns it prints, so both answer at once at any size. Files are written whole or
not at all (by :func:`convmat.presentation.plotting.save_figure` and :func:`convmat.animate`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._errors import ConvMatError
from ..engine import (
    PADDING_MODES,
    Geometry,
    conv_output_size,
    same_padding,
)

__all__ = ["main"]

#: The largest value any size option takes: torch indexes with 64-bit integers.
_MAX = 2**63 - 1

#: File types each writing command can make.
_PLOT_SUFFIXES = (".png", ".svg", ".pdf")
_ANIMATE_SUFFIXES = (".gif",)

#: A torch.save file of the legacy format starts with a pickled magic number.
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(text: object) -> str:
    """``text`` on one line: ANSI colours dropped, lines joined."""
    lines = (line.strip() for line in _ANSI.sub("", str(text)).splitlines())
    return " ".join(line for line in lines if line)


def _what(err: BaseException) -> str:
    """``"KeyError: 'x'"`` on one line."""
    message = _one_line(err)
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


# -- argument types (argparse reports their ArgumentTypeError on one line) --------------------


class _TooLarge(argparse.ArgumentTypeError):
    pass


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text!r}")
    if value > _MAX:
        raise _TooLarge(f"{text!r} is too large (at most 2**63 - 1, the largest index torch holds)")
    return value


def _positive(text: str) -> int:
    return _int(text, 1)


def _ints(text: str, minimum: int) -> tuple[int, ...]:
    """Comma-separated ints >= ``minimum``."""
    try:
        return tuple(_int(p.strip(), minimum) for p in text.split(","))
    except _TooLarge:
        raise
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints >= {minimum}, got {text!r}"
        ) from None


def _sizes(text: str) -> tuple[int, ...]:
    """Comma-separated ints >= 1: one per spatial dimension (or one for all)."""
    return _ints(text, 1)


def _sizes_or_zero(text: str) -> tuple[int, ...]:
    """Comma-separated ints >= 0 (an output padding)."""
    return _ints(text, 0)


def _padding(text: str) -> Any:
    """``1``, ``1,2``, ``same``, ``valid``, or ``before:after`` per dimension (``1:2,0``)."""
    if text in ("same", "valid"):
        return text
    try:
        parts = [
            tuple(_int(v.strip(), 0) for v in p.split(":")) if ":" in p else _int(p.strip(), 0)
            for p in text.split(",")
        ]
    except _TooLarge:
        raise
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected an int >= 0, comma-separated ints, before:after pairs, 'same' or 'valid', "
            f"got {text!r}"
        ) from None
    if any(isinstance(p, tuple) and len(p) != 2 for p in parts):
        raise argparse.ArgumentTypeError(f"a pair is before:after, got {text!r}")
    return parts[0] if len(parts) == 1 and isinstance(parts[0], int) else tuple(parts)


def _tol(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _width(text: str) -> float:
    value = _tol(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"must be a number with 0 < W < 1, got {text!r}")
    return value


# -- the configuration -------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`convmat.symbolic` from the options, checked in the
    options' own names."""
    n = len(args.input)
    if n > 3:
        raise ConvMatError(
            f"--input must have 1, 2 or 3 values (a 1-D, 2-D or 3-D convolution), got {n}"
        )
    for option, value in (("--kernel", args.kernel), ("--stride", args.stride),
                          ("--dilation", args.dilation),
                          ("--output-padding", args.output_padding)):  # fmt: skip
        if value is not None and len(value) not in (1, n):
            raise ConvMatError(
                f"{option} must have one value or one per dimension of --input ({n}), got "
                f"{','.join(map(str, value))!r}"
            )
    if isinstance(args.padding, tuple) and len(args.padding) not in (1, n):
        raise ConvMatError(
            f"--padding must have one value or one per dimension of --input ({n}), got "
            f"{len(args.padding)} values"
        )
    for option, value in (("--in-channels", args.in_channels),
                          ("--out-channels", args.out_channels)):  # fmt: skip
        if value % args.groups:
            raise ConvMatError(f"{option} ({value}) must be divisible by --groups ({args.groups})")
    if args.output_padding is not None and not args.transposed:
        raise ConvMatError(
            "--output-padding applies to a transposed convolution only: add --transposed or "
            "drop --output-padding"
        )
    if args.transposed and args.padding_mode != "zeros":
        raise ConvMatError(
            f"--padding-mode must be 'zeros' for a transposed convolution, got "
            f"{args.padding_mode!r}"
        )

    def each(v: Sequence[int]) -> tuple[int, ...]:  # one value for all, or one per dimension
        return tuple(v) * n if len(v) == 1 else tuple(v)

    padding = args.padding
    if isinstance(padding, tuple) and len(padding) == 1:
        padding = (padding[0],) * n
    config: dict[str, Any] = dict(
        input_size=args.input, kernel_size=each(args.kernel), stride=each(args.stride),
        padding=padding, dilation=each(args.dilation), in_channels=args.in_channels,
        out_channels=args.out_channels, groups=args.groups, transposed=args.transposed,
        flip=args.flip,
    )  # fmt: skip
    if args.transposed:
        config["output_padding"] = each(args.output_padding or (0,))
    else:
        config["padding_mode"] = args.padding_mode
    return config


def _geometry(config: dict[str, Any]) -> Geometry:
    """The geometry alone: no pattern, no W."""
    return Geometry.from_channels(**{k: v for k, v in config.items() if k != "flip"})


def _size_lines(geo: Geometry) -> list[str]:
    """The output size per dimension, with the formula and the numbers plugged in."""
    lines = []
    for dim in range(geo.ndim):
        i, k, s, d = (geo.input_size[dim], geo.kernel_size[dim], geo.stride[dim],
                      geo.dilation[dim])  # fmt: skip
        b, a = geo.padding[dim]
        o = geo.output_size[dim]
        if geo.transposed:
            op = geo.output_padding[dim]
            lines.append(
                f"dim {dim}: out = (in - 1)*stride - pad_before - pad_after + dilation*(kernel - 1)"
                f" + output_padding + 1 = ({i} - 1)*{s} - {b} - {a} + {d}*({k} - 1) + {op} + 1"
                f" = {o}"
            )
        else:
            lines.append(
                f"dim {dim}: out = floor((in + pad_before + pad_after - dilation*(kernel - 1) - 1)"
                f" / stride) + 1 = floor(({i} + {b} + {a} - {d}*({k} - 1) - 1) / {s}) + 1 = {o}"
            )
    rows, cols = geo.matrix_shape
    out_sizes, in_sizes = (" x ".join(map(str, v)) for v in (geo.output_size, geo.input_size))
    lines.append(
        f"W: {rows} x {cols} = ({geo.out_channels} channels x {out_sizes}) x "
        f"({geo.in_channels} channels x {in_sizes})"
    )
    return lines


# -- output files ------------------------------------------------------------------------------


def _output(text: str, suffixes: tuple[str, ...]) -> Path:
    """The ``-o`` path, checked before anything is computed."""
    allowed = ", ".join(suffixes[:-1]) + (" or " if len(suffixes) > 1 else "") + suffixes[-1]
    if not text:
        raise ConvMatError(f"-o must name a file ending in {allowed}")
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise ConvMatError(f"-o {text!r} is a directory; give a file name ending in {allowed}")
    if path.suffix.lower() not in suffixes:
        found = f"ends in {path.suffix!r}" if path.suffix else "has no extension"
        raise ConvMatError(f"-o {text!r} {found}; the file name must end in {allowed}")
    parent = path.parent
    if not parent.is_dir():
        raise ConvMatError(f"-o {text!r}: the directory {str(parent)!r} does not exist")
    return path


# -- the commands ------------------------------------------------------------------------------


def _cmd_show(args: argparse.Namespace) -> None:
    from .symbolic import symbolic

    config = _config(args)
    lines = _size_lines(_geometry(config))
    text = str(symbolic(**config))  # before printing anything: all or nothing
    print("\n".join(lines), "", text, sep="\n")


def _cmd_shape(args: argparse.Namespace) -> None:
    config = _config(args)
    if args.same and args.transposed:
        raise ConvMatError(
            "--same is the padding of an ordinary convolution (out = ceil(in / stride)); a "
            "transposed convolution has none: drop --same or --transposed"
        )
    print("\n".join(_size_lines(_geometry(config))))
    if args.same:
        pads = same_padding(config["input_size"], config["kernel_size"], config["stride"],
                            config["dilation"])  # fmt: skip
        out = conv_output_size(config["input_size"], config["kernel_size"], config["stride"],
                               pads, config["dilation"])  # fmt: skip
        print(f"same padding (out = ceil(in / stride)): {pads} -> out {out}")


def _cmd_plot(args: argparse.Namespace) -> None:
    path = _output(args.output, _PLOT_SUFFIXES)
    config = _config(args)
    _geometry(config)
    from .plotting import plot_matrix, save_figure

    save_figure(plot_matrix(**config), path)  # written whole or not at all
    print(f"wrote {path}")


def _cmd_animate(args: argparse.Namespace) -> None:
    path = _output(args.output, _ANIMATE_SUFFIXES)
    config = _config(args)
    _geometry(config)
    from .plotting import animate

    frames = animate(path, max_frames=args.max_frames, **config).frames  # written atomically
    print(f"wrote {path} ({frames} frames)")


def _safe_classes() -> list[Any]:
    """Module classes that a weights_only load may rebuild: torch.nn's and convmat's."""
    import torch.nn

    from .. import layers

    found = [*vars(torch.nn).values(), *(getattr(layers, name) for name in layers.__all__)]
    return [c for c in found if inspect.isclass(c) and issubclass(c, torch.nn.Module)]


def _check_torch_file(path: Path, option: str) -> None:
    """Refuse, in one line, a path that is not a file ``torch.save`` wrote."""
    if not path.exists():
        raise ConvMatError(f"{option} file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConvMatError(f"{option} {str(path)!r} is not a file")
    with open(path, "rb") as f:
        head = f.read(32)
    if not head:
        raise ConvMatError(f"{option} {str(path)!r} is empty")
    if not (zipfile.is_zipfile(path) or (head.startswith(b"\x80") and _LEGACY_MAGIC in head)):
        raise ConvMatError(
            f"{option} {str(path)!r} is not a file saved with torch.save (neither torch's zip "
            f"format nor its legacy pickle format)"
        )


def _torch_load(path: Path, weights_only: bool) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about legacy files and source changes
        if not weights_only:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_safe_classes()):
            return torch.load(path, map_location="cpu", weights_only=True)


def _load_file(path: Path, trust: bool) -> Any:
    _check_torch_file(path, "--model")
    try:
        return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            if found:
                why = f"needs {found.group(1)}, which a weights_only load refuses"
            elif not zipfile.is_zipfile(path):
                why = "is a model in torch's legacy format, which a weights_only load cannot read"
            else:
                why = "holds objects that a weights_only load refuses"
            raise ConvMatError(
                f"--model {str(path)!r} {why}; pass --trust-pickle if you trust the file "
                f"(loading it runs code it names)"
            ) from None
    except Exception as err:
        raise ConvMatError(f"--model {str(path)!r} is a damaged torch file: {_what(err)}") from None
    sys.path.insert(0, os.getcwd())  # the pickled classes are imported by name
    try:
        return _torch_load(path, weights_only=False)
    except Exception as err:
        raise ConvMatError(f"--model {str(path)!r} cannot be loaded: {_what(err)}") from None


def _import_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConvMatError(
            f"--model must be MODULE:FACTORY or a file saved with torch.save, got {spec!r}"
        )
    try:
        if module_name.endswith(".py"):
            where = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if where is None or where.loader is None or not Path(module_name).is_file():
                raise ImportError(f"no file {module_name!r}")
            module = importlib.util.module_from_spec(where)
            where.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConvMatError(f"--model: cannot import {module_name!r}: {_one_line(err)}") from None
    except SystemExit as err:
        raise ConvMatError(
            f"--model: importing {module_name!r} called sys.exit({err.code!r})"
        ) from None
    except Exception as err:
        raise ConvMatError(f"--model: importing {module_name!r} failed: {_what(err)}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConvMatError(f"--model: {module_name!r} has no attribute {attr!r}") from None
        except Exception as err:
            raise ConvMatError(f"--model: reading {spec!r} failed: {_what(err)}") from None
    return obj


def _call_factory(factory: Any, spec: str) -> Any:
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise ConvMatError(f"--model {spec!r} must be callable without arguments") from None
    except ValueError:
        pass  # no signature to check (a builtin)
    try:
        return factory()
    except SystemExit as err:
        raise ConvMatError(
            f"--model {spec!r} called sys.exit({err.code!r}) instead of returning a model"
        ) from None
    except Exception as err:
        raise ConvMatError(f"--model {spec!r} raised {_what(err)}") from None


def _load_weights(model: Any, weights: str) -> None:
    import torch
    from torch import nn

    path = Path(weights)
    _check_torch_file(path, "--weights")
    try:
        state = _torch_load(path, weights_only=True)
    except Exception as err:
        raise ConvMatError(f"--weights {weights!r} cannot be loaded: {_what(err)}") from None
    if isinstance(state, nn.Module):
        raise ConvMatError(
            f"--weights {weights!r} holds a model, not a state_dict: pass it as --model"
        )
    if not isinstance(state, Mapping):
        raise ConvMatError(
            f"--weights {weights!r} holds a {type(state).__name__}, not a state_dict (a dict "
            f"of parameter names to tensors, as model.state_dict() gives)"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConvMatError(
                f"--weights {weights!r} is not a state_dict: its entry {key!r} is a "
                f"{type(value).__name__}, not a tensor"
            )
    try:
        model.load_state_dict(state)
    except Exception as err:
        raise ConvMatError(f"--weights {weights!r} does not fit the model: {_what(err)}") from None


def _load_model(spec: str, weights: str | None, trust: bool) -> Any:
    """An ``nn.Module`` from ``MODULE:FACTORY`` (or a module instance) or a torch.save'd file."""
    from torch import nn

    path = Path(spec)
    if path.is_file() or (":" not in spec and path.suffix in (".pt", ".pth")):
        model = _load_file(path, trust)
    else:
        model = _import_factory(spec)
        if not isinstance(model, nn.Module) and callable(model):
            model = _call_factory(model, spec)
    if isinstance(model, Mapping):
        raise ConvMatError(
            f"--model {spec!r} holds a state_dict, not a model: give the factory as "
            f"--model MODULE:FACTORY and the file as --weights"
        )
    if not isinstance(model, nn.Module):
        raise ConvMatError(f"--model {spec!r} must give an nn.Module, got {type(model).__name__}")
    if weights is not None:
        _load_weights(model, weights)
    return model


def _finite_or_null(data: Any) -> Any:
    """``data`` with every non-finite float replaced by None (JSON's null)."""
    if isinstance(data, dict):
        return {k: _finite_or_null(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite_or_null(v) for v in data]
    return None if isinstance(data, float) and not math.isfinite(data) else data


def _cmd_norm(args: argparse.Namespace) -> None:
    from ..analysis import lipschitz_report

    model = _load_model(args.model, args.weights, args.trust_pickle)
    report = lipschitz_report(model, args.input, tol=args.tol, width=args.width,
                              probes=args.probes)  # fmt: skip
    if args.json:
        data = {
            "input_shape": list(args.input),
            "layers": report.to_dicts(),
            "product": report.product,
            "certified_bound": report.certified_bound,
            "model": report.model_dict(),
        }
        # Strict JSON has no infinity: an upper end that nothing certifies is null.
        print(json.dumps(_finite_or_null(data), indent=2, allow_nan=False))
    else:
        print(report)


def _cmd_tour(args: argparse.Namespace) -> None:
    from .tour import tour

    tour()


# -- the parser --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2) instead of usage text."""

    def error(self, message: str) -> Any:
        print(f"{self.prog}: error: {_one_line(message)}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="convmat",
        description="The exact matrix W of a convolution: conv(x) = W @ x.",
        epilog="Exit status: 0 done, 2 a mistake in the arguments, the model or the files "
        "(one line on stderr), 1 a bug in convmat (CONVMAT_DEBUG=1 shows its traceback).",
    )
    parser.add_argument("--version", action="version", version=f"convmat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config = _Parser(add_help=False)
    config.add_argument("--input", type=_sizes, required=True, metavar="N[,N...]",
                        help="spatial input size; comma-separated values set the dims "
                        "(4,5 is 2-D)")  # fmt: skip
    config.add_argument("--kernel", type=_sizes, required=True, metavar="K[,K...]",
                        help="kernel size (one value for every dim, or one per dim)")  # fmt: skip
    config.add_argument("--stride", type=_sizes, default=(1,), metavar="S[,S...]",
                        help="step between windows (default 1)")  # fmt: skip
    config.add_argument("--dilation", type=_sizes, default=(1,), metavar="D[,D...]",
                        help="spacing between kernel taps (default 1)")  # fmt: skip
    config.add_argument("--padding", type=_padding, default=0, metavar="P",
                        help="an int, ints per dim, before:after pairs (1:2,0), 'same' or "
                        "'valid' (default 0)")  # fmt: skip
    config.add_argument("--padding-mode", default="zeros",
                        choices=list(PADDING_MODES),
                        help="how the border is filled (default zeros)")  # fmt: skip
    config.add_argument("--in-channels", type=_positive, default=1, metavar="C",
                        help="input channels (default 1)")  # fmt: skip
    config.add_argument("--out-channels", type=_positive, default=1, metavar="C",
                        help="output channels (default 1)")  # fmt: skip
    config.add_argument("--groups", type=_positive, default=1, metavar="G",
                        help="channel groups; divides both channel counts (default 1)")  # fmt: skip
    config.add_argument("--transposed", action="store_true",
                        help="a transposed convolution (nn.ConvTranspose{N}d)")  # fmt: skip
    config.add_argument("--output-padding", type=_sizes_or_zero, default=None,
                        metavar="P[,P...]",
                        help="extra output size of a transposed convolution (needs "
                        "--transposed; default 0)")  # fmt: skip
    config.add_argument("--flip", action="store_true",
                        help="the true convolution of signal processing (the kernel flipped in "
                        "every spatial dim, as scipy.signal.convolve); default: the "
                        "cross-correlation torch computes. Sizes are the same")  # fmt: skip

    show = sub.add_parser("show", parents=[config], help="output size and the symbolic W",
                          description="The output size and W with kernel entries as labels "
                          "(the corners of a large W).")  # fmt: skip
    show.set_defaults(run=_cmd_show)
    shape = sub.add_parser("shape", parents=[config], help="sizes and formulas only",
                           description="The output size per dimension with its formula, and "
                           "W's shape; nothing is built.")  # fmt: skip
    shape.add_argument("--same", action="store_true",
                       help="also print the padding keeping out = ceil(in / stride)")  # fmt: skip
    shape.set_defaults(run=_cmd_shape)
    plot = sub.add_parser("plot", parents=[config], help="a heatmap of W (PNG, SVG or PDF)",
                          description="A heatmap of W, one colour per kernel entry.")  # fmt: skip
    plot.add_argument("-o", "--output", required=True, metavar="FILE",
                      help="the picture to write: FILE.png, FILE.svg or FILE.pdf")  # fmt: skip
    plot.set_defaults(run=_cmd_plot)
    anim = sub.add_parser("animate", parents=[config], help="a GIF of the sliding kernel and W",
                          description="A GIF: the kernel sliding over the input beside W, one "
                          "frame per output position.")  # fmt: skip
    anim.add_argument("-o", "--output", required=True, metavar="FILE",
                      help="the animation to write: FILE.gif")  # fmt: skip
    anim.add_argument("--max-frames", type=_positive, default=48, metavar="N",
                      help="at most this many frames (default 48)")  # fmt: skip
    anim.set_defaults(run=_cmd_animate)
    norm = sub.add_parser("norm", help="a model's certified Lipschitz bound and its layers' norms",
                          description="A model's Lipschitz constant as [lower, upper]: the upper "
                          "end certified along its graph (sums add, concatenations in "
                          "quadrature, BatchNorm folded), the lower end a local value with its "
                          "witness; and the exact operator norm of every conv and linear layer "
                          "at the input size it sees.")  # fmt: skip
    norm.add_argument("--model", required=True, metavar="SPEC",
                      help="MODULE:FACTORY (an importable callable returning an nn.Module, or a "
                      "module instance; MODULE may be a .py path) or a file saved with "
                      "torch.save(model)")  # fmt: skip
    norm.add_argument("--input", type=_sizes, required=True, metavar="C,N[,N...]",
                      help="shape of one input without the batch, e.g. 3,32,32")  # fmt: skip
    norm.add_argument("--weights", metavar="FILE",
                      help="a state_dict file (torch.save(model.state_dict())) to load into "
                      "the model")  # fmt: skip
    accuracy = norm.add_mutually_exclusive_group()
    accuracy.add_argument("--tol", type=_tol, default=None, metavar="TOL",
                          help="the layers' norms to this relative accuracy, a number > 0 "
                          "(default 1e-7)")  # fmt: skip
    accuracy.add_argument("--width", type=_width, default=None, metavar="W",
                          help="instead of --tol: each layer's certified interval to this "
                          "relative width upper/lower - 1, 0 < W < 1 (far faster on large "
                          "inputs, e.g. 1e-3)")  # fmt: skip
    norm.add_argument("--probes", type=int, default=3, metavar="N",
                      help="random inputs at which the model's lower end is sought, 0 for "
                      "none (default 3)")  # fmt: skip
    norm.add_argument("--json", action="store_true", help="print the records as JSON")
    norm.add_argument("--trust-pickle", action="store_true",
                      help="load a saved model that needs classes outside torch.nn (runs code "
                      "it names)")  # fmt: skip
    norm.set_defaults(run=_cmd_norm)
    tour = sub.add_parser("tour", help="a guided walk through convolutions as matrices",
                          description="A guided walk through convolutions as matrices, each "
                          "step checked against torch.")  # fmt: skip
    tour.set_defaults(run=_cmd_tour)
    from . import explore

    explore.add_parser(sub)
    return parser


# -- running -----------------------------------------------------------------------------------


def _fail(message: str, status: int) -> int:
    print(f"convmat: {message}", file=sys.stderr)
    return status


def _run(argv: list[str]) -> int:
    parser = _parser()
    if not argv:
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or an error already printed
        return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
    try:
        args.run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except ConvMatError as err:
        return _fail(f"error: {_one_line(err)}", 2)
    except OSError as err:
        return _fail(f"error: {_what(err)}", 2)
    except MemoryError:
        return _fail("error: out of memory; try a smaller --input or fewer channels", 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except SystemExit as err:
        return _fail(f"error: code run by the command called sys.exit({err.code!r})", 2)
    except Exception as err:
        if os.environ.get("CONVMAT_DEBUG"):
            raise
        return _fail(
            f"internal error: {_what(err)} (a bug in convmat: please report it with the "
            f"command; CONVMAT_DEBUG=1 shows the traceback)",
            1,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command and return its exit status.

    Args:
        argv: the arguments after ``convmat`` (``sys.argv[1:]`` by default).

    Returns:
        0 done; 2 a mistake in the arguments, the model or the files (one line on stderr);
        1 a bug in convmat (one line; ``CONVMAT_DEBUG=1`` raises it instead); 130 interrupted;
        141 output cut short by a closed pipe (``| head``), quietly, as if killed by SIGPIPE.

    Shape:
        ``shape`` and ``show`` cost the same at any size: the Geometry, and the labels of the
        rows and columns printed.

    >>> main(["shape", "--input", "10", "--kernel", "3", "--stride", "2"])
    dim 0: out = floor((in + pad_before + pad_after - dilation*(kernel - 1) - 1) / stride) + 1 = floor((10 + 0 + 0 - 1*(3 - 1) - 1) / 2) + 1 = 4
    W: 4 x 10 = (1 channels x 4) x (1 channels x 10)
    0
    """  # noqa: E501 - the doctest shows the line as printed
    argv = sys.argv[1:] if argv is None else list(argv)
    showwarning = warnings.showwarning

    def one_line_warning(message: Any, category: Any, *rest: Any, **kw: Any) -> None:
        print(f"convmat: warning: {_one_line(message)}", file=sys.stderr)

    warnings.showwarning = one_line_warning
    try:
        return _run(argv)
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that is quiet too.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        warnings.showwarning = showwarning
