"""Benchmark: exact spectra and operator norms of convolution layers.

(a) all singular values of a 16->16, 3x3, 16x16 circular layer: FFT method vs dense SVD;
(b) the operator norm of a 64->64, 3x3, 32x32 zero-padded layer: operator_norm (Lanczos on the
    matrix-free operator, certified interval) vs scipy's svds on the CSR matrix;
(c) the operator norms of every convolution of a ResNet-18-shaped network at 224x224.

Run: python benchmarks/spectral.py [--skip-dense] [--check] [--sections abc] [--layers N]
(--check also runs scipy's svds (ARPACK, tol 1e-10) on each ResNet layer's matrix-free operator
and reports the relative difference; it takes several minutes more. --sections picks the parts
to run, --layers N runs only the first N convolutions of (c), for a smoke run.)
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.linalg import svds

from convmat import ConvOperator, conv_matrix, operator_norm, singular_values

# (name, C_in, C_out, kernel, stride, padding, input size) of the convolutions of ResNet-18.
RESNET18 = [("conv1", 3, 64, 7, 2, 3, 224)]
RESNET18 += [(f"layer1.{b}.conv{c}", 64, 64, 3, 1, 1, 56) for b in range(2) for c in (1, 2)]
for stage, (cin, cout, size) in enumerate([(64, 128, 56), (128, 256, 28), (256, 512, 14)], start=2):
    RESNET18 += [
        (f"layer{stage}.0.conv1", cin, cout, 3, 2, 1, size),
        (f"layer{stage}.0.conv2", cout, cout, 3, 1, 1, size // 2),
        (f"layer{stage}.0.downsample", cin, cout, 1, 2, 0, size),
        (f"layer{stage}.1.conv1", cout, cout, 3, 1, 1, size // 2),
        (f"layer{stage}.1.conv2", cout, cout, 3, 1, 1, size // 2),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-dense", action="store_true", help="skip the dense SVD of (a)")
    parser.add_argument("--check", action="store_true", help="compare (c) with svds")
    parser.add_argument("--sections", default="abc", help="which of a, b, c to run")
    parser.add_argument("--layers", type=int, default=len(RESNET18), help="(c): first N only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, 2 threads, float64\n")

    if "a" in args.sections:
        section_a(args, gen)
    if "b" in args.sections:
        section_b(gen)
    if "c" in args.sections:
        section_c(args, gen)


def section_a(args: argparse.Namespace, gen: torch.Generator) -> None:
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64, generator=gen) / 12
    t_fft = math.inf
    for _ in range(5):  # the first call also loads torch's FFT and LAPACK code: best of five
        t0 = time.perf_counter()
        fft = singular_values(w, (16, 16), padding=1, padding_mode="circular", method="fft")
        t_fft = min(t_fft, time.perf_counter() - t0)
    print("(a) all singular values, 16->16 3x3 16x16 circular (W 4096 x 4096)")
    print("| method | time | max difference |\n|---|---|---|")
    print(f"| FFT (convmat), best of 5 | {t_fft * 1e3:.1f} ms | |")
    if not args.skip_dense:
        W = conv_matrix(w, (16, 16), padding=1, padding_mode="circular")
        t0 = time.perf_counter()
        dense = torch.linalg.svdvals(W)
        t_dense = time.perf_counter() - t0
        diff = (dense - fft).abs().max().item()
        print(f"| dense SVD | {t_dense:.2f} s | {diff:.1e} |")
        print(f"\nspeed-up {t_dense / t_fft:.0f}x\n")


def section_b(gen: torch.Generator) -> None:
    w = torch.randn(64, 64, 3, 3, dtype=torch.float64, generator=gen) / 24
    t0 = time.perf_counter()
    r = operator_norm(w, (32, 32), padding=1, method="lanczos")
    t_ours = time.perf_counter() - t0
    csr = conv_matrix(w, (32, 32), padding=1, layout=torch.sparse_csr)
    A = csr_matrix(
        (csr.values().numpy(), csr.col_indices().numpy(), csr.crow_indices().numpy()),
        shape=csr.shape,
    )
    t0 = time.perf_counter()
    ref = svds(A, k=1, return_singular_vectors=False, tol=1e-10)[0]
    t_svds = time.perf_counter() - t0
    print("(b) operator norm, 64->64 3x3 32x32 zero padding (W 65536 x 65536)")
    print(
        "| method | time | norm | relative difference to svds | certified interval |\n|---|---|---|---|---|"
    )
    print(
        f"| operator_norm (convmat), default tol=1e-7 | {t_ours:.2f} s | {r.value:.10f} | {abs(r.value - ref) / ref:.1e} | [{r.lower:.10f}, {r.upper:.6f}] |"
    )
    t0 = time.perf_counter()
    tight = operator_norm(w, (32, 32), padding=1, tol=1e-10, method="lanczos")
    t_tight = time.perf_counter() - t0
    print(
        f"| operator_norm, tol=1e-10 | {t_tight:.2f} s | {tight.value:.10f} | {abs(tight.value - ref) / ref:.1e} | [{tight.lower:.10f}, {tight.upper:.6f}] |"
    )
    print(f"| scipy svds on CSR, tol=1e-10 (the reference) | {t_svds:.2f} s | {ref:.10f} | | |")
    t0 = time.perf_counter()
    loose = svds(A, k=1, return_singular_vectors=False, tol=1e-6)[0]
    t_loose = time.perf_counter() - t0
    print(
        f"| scipy svds on CSR, tol=1e-6 | {t_loose:.2f} s | {loose:.10f} | {abs(loose - ref) / ref:.1e} | |"
    )
    print(
        f"\nspeed-up {t_svds / t_ours:.1f}x at the default tol against svds at 1e-10, "
        f"{t_loose / t_ours:.1f}x against svds at 1e-6\n"
    )


def section_c(args: argparse.Namespace, gen: torch.Generator) -> None:
    print("(c) every convolution of a ResNet-18-shaped network at 224x224 (random weights)")
    check = " | svds time | relative difference to svds" if args.check else ""
    print(f"| layer | W | norm | certified interval | method | error estimate | time{check} |")
    print("|---" * (9 if args.check else 7) + "|")
    total, worst = 0.0, 0.0
    layers = RESNET18[: args.layers]
    for name, cin, cout, k, s, p, size in layers:
        w = torch.randn(cout, cin, k, k, dtype=torch.float64, generator=gen) / np.sqrt(cin * k * k)
        t0 = time.perf_counter()
        r = operator_norm(w, (size, size), stride=s, padding=p)
        dt = time.perf_counter() - t0
        total += dt
        rows = cout * ((size + 2 * p - k) // s + 1) ** 2
        line = f"| {name} | {rows} x {cin * size * size} | {r.value:.10f} | [{r.lower:.10f}, {r.upper:.6f}] | {r.method} | {getattr(r, 'error', math.nan):.1e} | {dt:.2f} s |"
        if args.check:
            t0 = time.perf_counter()
            op = ConvOperator(w, (size, size), stride=s, padding=p)
            ref = svds(op.to_scipy(), k=1, return_singular_vectors=False, tol=1e-10)[0]
            diff = abs(r.value - ref) / ref
            worst = max(worst, diff)
            line += f" {time.perf_counter() - t0:.1f} s | {diff:.1e} |"
        print(line, flush=True)
    print(f"\ntotal {total:.1f} s for {len(layers)} convolutions")
    if args.check:
        print(f"largest relative difference to svds: {worst:.1e}")


if __name__ == "__main__":
    main()
