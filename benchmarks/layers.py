"""Benchmark: matrix layers against their torch twins (batch 64, float32, 2 threads).

Columns: forward and forward+backward time of the torch layer and of the matrix twin (W cached),
their ratio; the time of one W rebuild after the weight changed (pattern cached, values
gathered) against one matrix forward; and one training step (zero_grad, forward, backward,
SGD step) of each layer: for the matrix twin the step changes the weight, so every forward
rebuilds W, which is what training pays.

Every time is the best of --repeat runs, the two layers measured alternately. A ratio is printed
only where its denominator is at least 1 ms ("-" otherwise: the raw times stand).

Run: python benchmarks/layers.py [--quick] [--repeat N] [--batch B]
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
#: Below this a denominator is too close to the timer's noise for a ratio.
RATIO_FLOOR = 1e-3  # seconds


def ratio(t: float, ref: float, suffix: str = "x") -> str:
    """``t / ref``, or ``-`` where ``ref`` is under a millisecond."""
    return f"{t / ref:.2f}{suffix}" if ref >= RATIO_FLOOR else "-"


def ms(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t >= 1e-2 else f"{t * 1e3:.3f} ms"


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
    parser.add_argument("--repeat", type=int, default=10, help="timing repeats (best is kept)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    parser.add_argument(
        "--quick", action="store_true", help="only the first configuration (a smoke run)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, 2 threads, float32, batch {args.batch}, best of "
        f"{args.repeat}; ratios where the denominator is >= 1 ms, '-' otherwise\n"
    )
    print(
        "| configuration | torch fwd | matrix fwd | fwd ratio | torch fwd+bwd | matrix fwd+bwd "
        "| fwd+bwd ratio | rebuild | rebuild / matrix fwd | torch train step "
        "| matrix train step | train step ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, base, cls, kwargs, size in CONFIGS[:1] if args.quick else CONFIGS:
        ref = base(**kwargs)
        twin = cls.from_module(ref)
        x = torch.randn(args.batch, kwargs["in_channels"], *size)
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
                twin.weight.neg_()  # new values in place, as an optimizer step writes them
            twin._layer_matrix(geo)

        builds = twin.matrix_builds
        t_rebuild = best(rebuild, args.repeat)
        assert twin.matrix_builds == builds + args.repeat + 1  # every rebuild was real
        t_ref_step, t_mat_step = train_steps(ref, twin, x, args.repeat)
        print(
            f"| {name} | {ms(t_ref)} | {ms(t_mat)} | {ratio(t_mat, t_ref)} | {ms(tb_ref)} | "
            f"{ms(tb_mat)} | {ratio(tb_mat, tb_ref)} | {ms(t_rebuild)} | "
            f"{ratio(t_rebuild, t_mat, '')} | {ms(t_ref_step)} | {ms(t_mat_step)} | "
            f"{ratio(t_mat_step, t_ref_step)} |",
            flush=True,
        )


def train_steps(ref: nn.Module, twin: nn.Module, x: torch.Tensor, repeat: int):
    """Best times of one SGD training step of each layer, from the same weights.

    The twin's forward after each step rebuilds W (its weight changed), as in training; the
    two layers take the same steps, so their weights stay equal (checked)."""
    twin.load_state_dict(ref.state_dict())
    optimizers = {
        layer: torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9) for layer in (ref, twin)
    }

    steps = {ref: 0, twin: 0}

    def step(layer):
        steps[layer] += 1
        opt = optimizers[layer]
        opt.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        opt.step()

    builds = twin.matrix_builds
    times = best_pair(lambda: step(ref), lambda: step(twin), repeat)
    assert steps[ref] == steps[twin]
    assert twin.matrix_builds == builds + steps[twin]  # a new W at every step
    diff = (ref.weight - twin.weight).abs().max().item()
    assert diff < 1e-4 * max(1.0, ref.weight.abs().max().item()), diff
    return times


if __name__ == "__main__":
    main()
