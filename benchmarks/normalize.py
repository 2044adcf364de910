"""Benchmark: the training-step cost of spectral normalisation.

One training step (zero_grad, forward, mean-square loss, backward, SGD step) of a single
convolution layer, with no normalisation, with ``torch.nn.utils.parametrizations.spectral_norm``
(the reshaped kernel's norm) and with ``convmat.analysis.normalize.spectral_norm`` (the operator
norm at the input size), all with one power iteration per step, timed in the same run. Each figure
is the best over ``--repeat`` blocks of ``--steps`` steps, per step, the blocks of the three
variants alternating. One thread by default: on a shared machine, small operations on several
threads wait for one another and the figures scatter.

Run: python benchmarks/normalize.py [--steps N] [--repeat R] [--batch B] [--size S] [--threads T]
(a smoke run: --steps 2 --repeat 1 --batch 2 --size 8).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrizations

from convmat.analysis.normalize import spectral_norm

# (label, C_in, C_out, kernel, stride, padding, padding_mode)
LAYERS = [
    ("64->64 3x3", 64, 64, 3, 1, 1, "zeros"),
    ("16->16 3x3", 16, 16, 3, 1, 1, "zeros"),
    ("64->64 3x3 s2 reflect", 64, 64, 3, 2, 1, "reflect"),
]


def _stepper(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()

    for _ in range(3):  # warm-up
        step()
    return step


def _best_times(steppers: list[Callable[[], None]], steps: int, repeat: int) -> list[float]:
    """Per-step time of each stepper, best over ``repeat`` blocks; the blocks of the variants
    alternate, so a change in the machine's load falls on all of them alike."""
    best = [float("inf")] * len(steppers)
    for _ in range(repeat):
        for i, step in enumerate(steppers):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best[i] = min(best[i], (time.perf_counter() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeat", type=int, default=5, help="timed blocks (best is kept)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="spatial size (square)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = (args.size, args.size)
    print(f"training step of one layer, batch {args.batch}, input {size}, float32, "
          f"{args.threads} threads, best of {args.repeat} x {args.steps} steps")  # fmt: skip
    header = f"{'layer':<24}{'plain':>11}{'torch SN':>11}{'convmat SN':>12}{'torch +':>9}"
    print(header + f"{'convmat +':>11}")
    for label, cin, cout, k, stride, padding, mode in LAYERS:
        torch.manual_seed(0)

        def make(cin=cin, cout=cout, k=k, stride=stride, padding=padding, mode=mode) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, padding_mode=mode)

        x = torch.randn(args.batch, cin, *size)
        layers = [make(), parametrizations.spectral_norm(make()), spectral_norm(make(), size)]
        steppers = [_stepper(layer, x) for layer in layers]
        plain, theirs, ours = _best_times(steppers, args.steps, args.repeat)
        print(
            f"{label:<24}{plain * 1e3:>9.2f}ms{theirs * 1e3:>9.2f}ms{ours * 1e3:>10.2f}ms"
            f"{(theirs / plain - 1) * 100:>8.1f}%{(ours / plain - 1) * 100:>10.1f}%"
        )


if __name__ == "__main__":
    main()
