"""The ``convmat`` command: a thin layer over the public API.

convmat show --input 10 --kernel 3 --stride 2
convmat shape --input 32,32 --kernel 3 --stride 2 --same
convmat plot --input 4,5 --kernel 3 -o W.png
convmat animate --input 8 --kernel 3 -o conv.gif
convmat tour
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ._errors import ConvMatError
from .shapes import conv_output_size, ntuple, same_padding
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
