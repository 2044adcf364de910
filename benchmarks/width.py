"""Benchmark: certified norms to a requested width as the grid grows.

One 64->64 3x3 layer, padding 1, random weights (scaled like a trained layer's, 1/sqrt(fan-in)),
at N x N for N in --sizes: ``operator_norm(..., width=w)`` for each width in --widths, and the
value to ``tol=1e-7`` (the default) for sizes up to --tol-up-to; for each: the time, the
certified interval's width, how it was reached, and where the time went (the enclosing circular
convolution's certificate, the windowed lower end, Lanczos). The growth column is the time's
ratio to the size before (an FFT's N^2 log N grows ~4.3x per doubling).

    OMP_NUM_THREADS=2 python benchmarks/width.py --sizes 56 112 224 448 --widths 1e-3
    python benchmarks/width.py --sizes 28 56 --widths 1e-2 1e-3 --tol-up-to 56   # smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

from convmat import ConvOperator, operator_norm
from convmat.analysis import torus


def parts(op: ConvOperator, width: float) -> tuple[float, float]:
    """Seconds of the enclosing circular convolution's certificate and of the windowed lower
    end alone (the rest of a width run is Lanczos)."""
    geo = op.geometry.matching_conv
    start = time.perf_counter()
    enclosing = torus.enclosing_norm(op.weight, geo, 0.5 * width)
    middle = time.perf_counter()
    X = torus.windowed_vector(enclosing, geo, True)
    (op @ X).norm()
    return middle - start, time.perf_counter() - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[56, 112, 224, 448])
    parser.add_argument("--widths", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--tol-up-to", type=int, default=112, help="largest N timed at tol=1e-7")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    c = args.channels
    print(f"torch {torch.__version__}, {args.threads} threads, {c}->{c} 3x3 padding 1\n")
    print(
        "| N | asked | time | growth | interval width | reached | how | torus | window | Lanczos |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    before: dict[str, float] = {}
    for n in args.sizes:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(c, c, 3, 3, dtype=torch.float64, generator=gen) / (3 * c**0.5)
        op = ConvOperator(w, (n, n), padding=1)
        runs: list[tuple[str, dict]] = [(f"width {x:g}", {"width": x}) for x in args.widths]
        if n <= args.tol_up_to:
            runs.append(("tol 1e-7", {}))
        for label, kw in runs:
            start = time.perf_counter()
            r = operator_norm(op, method="lanczos", **kw)
            seconds = time.perf_counter() - start
            growth = f"{seconds / before[label]:.1f}x" if label in before else ""
            before[label] = seconds
            split = "| | |"
            if "width" in kw:
                t_torus, t_window = parts(op, kw["width"])
                rest = max(seconds - t_torus - t_window, 0.0) if r.method == "lanczos" else 0.0
                split = f"{t_torus:.2f} s | {t_window:.2f} s | {rest:.2f} s"
            print(f"| {n} | {label} | {seconds:.2f} s | {growth} | {r.upper / r.lower - 1:.1e} | "
                  f"{r.reached} | {r.method} | {split} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
