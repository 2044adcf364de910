"""The ``convmat`` command: a thin layer over the public API.

convmat show --input 10 --kernel 3 --stride 2
convmat shape --input 32,32 --kernel 3 --stride 2 --same
convmat plot --input 4,5 --kernel 3 -o W.png
convmat animate --input 8 --kernel 3 -o conv.gif
convmat norm --model torchvision.models:resnet18 --input 3,224,224
convmat tour
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import pickle
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._errors import ConvMatError
from ..engine import conv_output_size, ntuple, same_padding
from .symbolic import symbolic

__all__ = ["main"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _padding(text: str) -> Any:
    """``1``, ``1,2``, ``same``, ``valid``, or ``before:after`` per dimension (``1:2,0``)."""
    if text in ("same", "valid"):
        return text
    try:
        parts = [
            tuple(int(v) for v in p.split(":")) if ":" in p else int(p) for p in text.split(",")
        ]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an int, comma-separated ints, before:after pairs, 'same' or 'valid', got "
            f"{text!r}"
        ) from None
    return parts[0] if len(parts) == 1 and isinstance(parts[0], int) else tuple(parts)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    n = len(args.input)
    one = lambda v: v if len(v) > 1 else v[0]  # noqa: E731 - a single value applies to every dim
    padding = args.padding
    if isinstance(padding, tuple) and len(padding) == 1:
        padding = (padding[0],) * n
    config: dict[str, Any] = dict(
        input_size=args.input, kernel_size=ntuple(one(args.kernel), n, "kernel"),
        stride=one(args.stride), padding=padding, dilation=one(args.dilation),
        in_channels=args.in_channels, out_channels=args.out_channels, groups=args.groups,
        transposed=args.transposed,
    )  # fmt: skip
    if args.transposed:
        config["output_padding"] = one(args.output_padding)
        if args.padding_mode != "zeros":
            raise ConvMatError(
                f"--padding-mode must be 'zeros' for a transposed convolution, got "
                f"{args.padding_mode!r}"
            )
    else:
        config["padding_mode"] = args.padding_mode
    return config


def _size_lines(config: dict[str, Any]) -> list[str]:
    """The output size per dimension, with the formula and the numbers plugged in."""
    sym = symbolic(**config)
    geo = sym.geometry
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


def _cmd_show(args: argparse.Namespace) -> None:
    config = _config(args)
    print("\n".join(_size_lines(config)))
    print()
    print(symbolic(**config))


def _cmd_shape(args: argparse.Namespace) -> None:
    config = _config(args)
    print("\n".join(_size_lines(config)))
    if args.same:
        pads = same_padding(config["input_size"], config["kernel_size"], config["stride"],
                            config["dilation"])  # fmt: skip
        out = conv_output_size(config["input_size"], config["kernel_size"], config["stride"],
                               pads, config["dilation"])  # fmt: skip
        print(f"same padding (out = ceil(in / stride)): {pads} -> out {out}")


def _cmd_plot(args: argparse.Namespace) -> None:
    from .plotting import plot_matrix

    config = _config(args)
    fig = plot_matrix(**config)
    fig.savefig(args.output, bbox_inches="tight")
    print(f"wrote {args.output}")


def _cmd_animate(args: argparse.Namespace) -> None:
    from .plotting import animate

    config = _config(args)
    frames = animate(args.output, max_frames=args.max_frames, **config)
    print(f"wrote {args.output} ({frames} frames)")


def _safe_classes() -> list[Any]:
    """Module classes that a weights_only load may rebuild: torch.nn's and convmat's."""
    import torch.nn

    from ..layers import linear, nn

    found = [*vars(torch.nn).values(), *vars(nn).values(), *vars(linear).values()]
    return [c for c in found if inspect.isclass(c) and issubclass(c, torch.nn.Module)]


def _load_file(path: Path, trust: bool) -> Any:
    import torch

    try:
        with torch.serialization.safe_globals(_safe_classes()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            name = found.group(1) if found else "a class outside torch.nn"
            raise ConvMatError(
                f"--model {str(path)!r} needs {name}, which a weights_only load refuses; pass "
                f"--trust-pickle if you trust the file (loading it runs code it names)"
            ) from None
    except (RuntimeError, EOFError) as err:
        raise ConvMatError(
            f"--model {str(path)!r} is not a file torch.load can read: {err}"
        ) from None
    sys.path.insert(0, os.getcwd())  # the pickled classes are imported by name
    return torch.load(path, map_location="cpu", weights_only=False)


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
        raise ConvMatError(f"--model: cannot import {module_name!r}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConvMatError(f"--model: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _load_model(spec: str, weights: str | None, trust: bool) -> Any:
    """An ``nn.Module`` from ``MODULE:FACTORY`` (or a module instance) or a torch.save'd file."""
    import torch
    from torch import nn

    path = Path(spec)
    if path.is_file() or (":" not in spec and path.suffix in (".pt", ".pth")):
        if not path.is_file():
            raise ConvMatError(f"--model file {spec!r} does not exist")
        model = _load_file(path, trust)
    else:
        model = _import_factory(spec)
        if not isinstance(model, nn.Module) and callable(model):
            try:
                inspect.signature(model).bind()
            except TypeError:
                raise ConvMatError(f"--model {spec!r} must be callable without arguments") from None
            except ValueError:
                pass  # no signature to check (a builtin)
            model = model()
    if isinstance(model, dict):
        raise ConvMatError(
            f"--model {spec!r} holds a state_dict, not a model: give the factory as "
            f"--model MODULE:FACTORY and the file as --weights"
        )
    if not isinstance(model, nn.Module):
        raise ConvMatError(f"--model {spec!r} must give an nn.Module, got {type(model).__name__}")
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (OSError, RuntimeError, pickle.UnpicklingError) as err:
            first = str(err).strip().splitlines()[0]
            raise ConvMatError(f"--weights {weights!r} cannot be loaded: {first}") from None
    return model


def _cmd_norm(args: argparse.Namespace) -> None:
    from ..analysis.lipschitz import lipschitz_report

    model = _load_model(args.model, args.weights, args.trust_pickle)
    report = lipschitz_report(model, args.input, tol=args.tol)
    if args.json:
        data = {"input_shape": list(report.input_shape), "layers": report.to_dicts(),
                "bound": report.bound, "certified_bound": report.certified_bound}  # fmt: skip
        print(json.dumps(data, indent=2))
    else:
        print(report)


def _cmd_tour(args: argparse.Namespace) -> None:
    from .tour import tour

    tour()


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2) instead of usage text."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="convmat", description="The exact matrix W of a convolution: conv(x) = W @ x."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    config = _Parser(add_help=False)
    config.add_argument(
        "--input",
        type=_ints,
        required=True,
        help="spatial input size; comma-separated values set the dims (4,5 is 2-D)",
    )
    config.add_argument("--kernel", type=_ints, required=True, help="kernel size")
    config.add_argument("--stride", type=_ints, default=(1,))
    config.add_argument("--dilation", type=_ints, default=(1,))
    config.add_argument(
        "--padding",
        type=_padding,
        default=0,
        help="int, ints per dim, before:after pairs, 'same' or 'valid'",
    )
    config.add_argument(
        "--padding-mode", default="zeros", choices=["zeros", "reflect", "replicate", "circular"]
    )
    config.add_argument("--in-channels", type=int, default=1)
    config.add_argument("--out-channels", type=int, default=1)
    config.add_argument("--groups", type=int, default=1)
    config.add_argument("--transposed", action="store_true", help="a transposed convolution")
    config.add_argument("--output-padding", type=_ints, default=(0,))  # fmt: skip
    show = sub.add_parser("show", parents=[config], help="output size and the symbolic W")
    show.set_defaults(run=_cmd_show)
    shape = sub.add_parser("shape", parents=[config], help="sizes and formulas only")
    shape.add_argument(
        "--same",
        action="store_true",
        help="also print the padding that keeps out = ceil(in / stride)",
    )
    shape.set_defaults(run=_cmd_shape)
    plot = sub.add_parser("plot", parents=[config], help="a heatmap of W (PNG or SVG)")
    plot.add_argument("-o", "--output", required=True)
    plot.set_defaults(run=_cmd_plot)
    anim = sub.add_parser("animate", parents=[config], help="a GIF of the sliding kernel and W")
    anim.add_argument("-o", "--output", required=True)
    anim.add_argument("--max-frames", type=int, default=48)
    anim.set_defaults(run=_cmd_animate)
    norm = sub.add_parser(
        "norm", help="the exact operator norm of every conv and linear layer of a model"
    )
    norm.add_argument(
        "--model",
        required=True,
        help="MODULE:FACTORY (an importable callable returning an nn.Module, or a module "
        "instance; MODULE may be a .py path) or a file saved with torch.save(model)",
    )
    norm.add_argument("--input", type=_ints, required=True, help="shape of one input, e.g. 3,32,32")
    norm.add_argument("--weights", help="a state_dict file to load into the model")
    norm.add_argument("--tol", type=float, default=1e-7, help="relative accuracy (default 1e-7)")
    norm.add_argument("--json", action="store_true", help="print the records as JSON")
    norm.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a saved model that needs classes outside torch.nn (runs code it names)",
    )
    norm.set_defaults(run=_cmd_norm)
    tour = sub.add_parser("tour", help="a guided walk through convolutions as matrices")
    tour.set_defaults(run=_cmd_tour)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; user mistakes print one line and return 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ConvMatError as err:
        print(f"convmat: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"convmat: error: {err}", file=sys.stderr)
        return 2
    return 0
