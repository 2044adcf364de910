"""Benchmark: matrix layers against their torch twins (batch 64, float32, 2 threads).

Columns: forward and forward+backward time of the torch layer and of the matrix twin (W cached),
their ratio, and the time of one W rebuild after an optimizer step (pattern cached, values
gathered) against one matrix forward.

Run: python benchmarks/layers.py [--repeat N]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from convmat.nn import MatrixConv1d, MatrixConv2d, MatrixConvTranspose2d

CONFIGS = [
    (
        "2-D 16->16 3x3 32x32 pad 1",
        nn.Conv2d,
        MatrixConv2d,
        dict(in_channels=16, out_channels=16, kernel_size=3, padding=1),
        (32, 32),
    ),
    (
        "2-D 64->64 3x3 32x32 pad 1",
        nn.Conv2d,
        MatrixConv2d,
        dict(in_channels=64, out_channels=64, kernel_size=3, padding=1),
        (32, 32),
    ),
    (
        "1-D 32->32 k=2 dil 8 L=4096",
        nn.Conv1d,
        MatrixConv1d,
        dict(in_channels=32, out_channels=32, kernel_size=2, dilation=8),
        (4096,),
    ),
    (
        "2-D transposed 64->32 k=2 s2 32x32",
        nn.ConvTranspose2d,
        MatrixConvTranspose2d,
        dict(in_channels=64, out_channels=32, kernel_size=2, stride=2),
        (32, 32),
    ),
]
BATCH = 64


def best(fn, repeat: int) -> float:
    fn()
    out = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def best_pair(f, g, repeat: int) -> tuple[float, float]:
    """Best times of ``f`` and ``g``, measured alternately so that both see the same machine."""
    tf, tg = math.inf, math.inf
    for _ in range(repeat):
        tf = min(tf, best(f, 1))
        tg = min(tg, best(g, 1))
    return tf, tg


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 2 threads, float32, batch {BATCH}, best of {args.repeat}\n")
    print(
        "| configuration | torch fwd | matrix fwd | fwd ratio | torch fwd+bwd | matrix fwd+bwd | fwd+bwd ratio | rebuild | rebuild / matrix fwd |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, base, cls, kwargs, size in CONFIGS:
        ref = base(**kwargs)
        twin = cls.from_module(ref)
        x = torch.randn(BATCH, kwargs["in_channels"], *size)
        xg = x.clone().requires_grad_()
        with torch.no_grad():
            t_ref, t_mat = best_pair(lambda: ref(x), lambda: twin(x), args.repeat)
            diff = (ref(x) - twin(x)).abs().max().item()
        assert diff < 1e-3, diff

        def step(layer):
            layer.zero_grad()
            layer(xg).sum().backward()

        tb_ref, tb_mat = best_pair(lambda: step(ref), lambda: step(twin), args.repeat)
        geo = twin._geometry(size)

        def rebuild():
            with torch.no_grad():
                twin.weight.add_(0.0)  # an in-place update, as an optimizer step makes
            twin._layer_matrix(geo)

        builds = twin.matrix_builds
        t_rebuild = best(rebuild, args.repeat)
        assert twin.matrix_builds == builds + args.repeat + 1  # every rebuild was real
        ms = lambda t: f"{t * 1e3:.1f} ms"  # noqa: E731
        print(
            f"| {name} | {ms(t_ref)} | {ms(t_mat)} | {t_mat / t_ref:.2f}x | {ms(tb_ref)} | {ms(tb_mat)} | "
            f"{tb_mat / tb_ref:.2f}x | {ms(t_rebuild)} | {t_rebuild / t_mat:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
