"""Benchmark: peak memory and time of ``to_mlp`` against the bytes of its result.

Every case runs in a fresh process: the baseline is the resident memory after importing torch
and convmat and building the model; the peak is ``ru_maxrss`` after the first call (cold: the
conv's index pattern is computed). The time of a second call (warm: the pattern cached) follows.
The result's bytes are those of its matrices and biases (values and index tensors).

Before this version, the first case peaked at 5.37 GB (BatchNorm folded through a dense
``(C*P)^2`` diagonal) and the 224x224 stem asked for 41 TB.

Run: python benchmarks/to_mlp.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch import nn

#: name -> (channels out, input shape, sparse)
CASES = {
    "Conv2d(3,8,3,p1)+BN+ReLU 3x64x64": (8, (3, 64, 64), True),
    "Conv2d(3,8,3,p1)+BN+ReLU 3x32x32": (8, (3, 32, 32), False),
    "stem Conv2d(3,16,3,p1)+BN+ReLU 3x224x224": (16, (3, 224, 224), True),
}
QUICK = {
    "Conv2d(3,8,3,p1)+BN+ReLU 3x16x16": (8, (3, 16, 16), True),
    "Conv2d(3,8,3,p1)+BN+ReLU 3x8x8": (8, (3, 8, 8), False),
}


def _model(channels: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
    bn = model[1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _result_bytes(mlp: nn.Module) -> tuple[int, int]:
    """Bytes and stored values of the matrices and biases of ``mlp``."""
    total = values = 0
    for m in mlp:
        W = getattr(m, "weight", None)
        if W is None:
            continue
        parts = [W.crow_indices(), W.col_indices(), W.values()] if W.is_sparse_csr else [W]
        values += parts[-1].numel()
        if getattr(m, "bias", None) is not None:
            parts.append(m.bias)
        total += sum(t.numel() * t.element_size() for t in parts)
    return total, values


def run_one(channels: int, shape: tuple[int, ...], sparse: bool, repeat: int) -> dict:
    """Measure one case in this (fresh) process."""
    from convmat import to_mlp

    model = _model(channels)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    mlp = to_mlp(model, shape, sparse=sparse)
    cold = time.perf_counter() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    nbytes, values = _result_bytes(mlp)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        error = (mlp(x) - model(x).flatten(1)).abs().max().item()
    del mlp
    warm = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        to_mlp(model, shape, sparse=sparse)
        warm = min(warm, time.perf_counter() - t0)
    return dict(peak=peak, result=nbytes, values=values, cold=cold, warm=warm, error=error)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--repeat", type=int, default=3, help="warm calls (best is shown)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        channels, shape, sparse = json.loads(args.one)
        print(json.dumps(run_one(channels, tuple(shape), sparse, args.repeat)))
        return
    cases = QUICK if args.quick else CASES
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    print(f"torch {torch.__version__}, {threads} thread(s), float32; every case in a fresh process")
    print()
    print(
        "| case | layout | stored values | result | peak above baseline | peak / result "
        "| cold | warm | max error |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (channels, shape, sparse) in cases.items():
        spec = json.dumps([channels, list(shape), sparse])
        done = subprocess.run(
            [sys.executable, __file__, "--one", spec, "--repeat", str(args.repeat)],
            capture_output=True,
            text=True,
            check=False,
        )
        layout = "sparse (CSR)" if sparse else "dense"
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {name} | {layout} | failed: {last} |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {name} | {layout} | {r['values']:,} | {_size(r['result'])} | "
            f"{_size(r['peak'])} | {r['peak'] / r['result']:.2f} | {r['cold'] * 1e3:.1f} ms | "
            f"{r['warm'] * 1e3:.1f} ms | {r['error']:.1e} |"
        )


if __name__ == "__main__":
    main()
