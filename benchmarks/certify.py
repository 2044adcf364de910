"""The tight certificate on every convolution of a ResNet-18 (random weights, no torchvision).

For each of the 20 convolutions at 224x224: the Lanczos value (``convmat.operator_norm``), then
``certify_upper`` with ``theta = value^2``; printed: the Gram side and its order n, the
factor's stored entries, the rounding margin, the times (Lanczos, certificate), the peak memory of
the process that ran the layer, and the relative width ``upper / lower - 1`` (target <= 1e-6).
Each layer runs in its own process so that its peak memory is its own.

    OMP_NUM_THREADS=2 python benchmarks/certify.py             # all 20 layers
    python benchmarks/certify.py --size 32 --layers 0 1 5       # a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def convolutions(size: int) -> list[tuple[str, nn.Conv2d, tuple[int, int]]]:
    """Every convolution of a seeded ResNet-18 (``tests/models.py``) with the spatial size of
    its input."""
    sys.path.insert(0, str(ROOT))
    from tests.models import resnet18

    model = resnet18(seed=0).eval()
    found: list[tuple[str, nn.Conv2d, tuple[int, int]]] = []
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, name=name: found.append((name, mod, tuple(inp[0].shape[2:])))
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return found


def run_layer(index: int, size: int) -> dict:
    import convmat
    from convmat.analysis.certify import certify_upper
    from convmat.engine import Geometry

    name, module, input_size = convolutions(size)[index]
    geo = Geometry.from_module(module, input_size)
    weight = module.weight.detach().double()
    start = time.perf_counter()
    norm = convmat.operator_norm(module.double(), input_size)
    lanczos_s = time.perf_counter() - start
    start = time.perf_counter()
    upper, certified, info = certify_upper(weight, geo, norm.value**2)
    cert_s = time.perf_counter() - start
    return {
        "layer": name, "shape": list(weight.shape), "input": list(input_size),
        "stride": geo.stride[0], "side": info["side"], "n": info["n"],
        "factor_nnz": info.get("factor_nnz") or info.get("factor_nnz_bound"),
        "margin": info["margin"],
        "lower": norm.lower, "value": norm.value, "upper": upper, "certified": certified,
        "width": upper / norm.lower - 1, "old_width": norm.upper / norm.lower - 1,
        "lanczos_s": lanczos_s, "certify_s": cert_s, "times": info["times"],
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "reason": info["reason"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="append one JSON line per layer here")
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_layer(args.one, args.size)))
        return
    layers = args.layers if args.layers else range(len(convolutions(args.size)))
    print(
        f"{'layer':26} {'shape':>16} {'in':>5} {'side':>6} {'n':>8} {'L nnz':>8} "
        f"{'margin':>8} {'lanczos':>8} {'certify':>8} {'peak':>7} {'width':>9} {'before':>8}"
    )
    total = 0.0
    for i in layers:
        proc = subprocess.run(
            [sys.executable, __file__, "--size", str(args.size), "--one", str(i)],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            print(f"layer {i}: failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        total += r["certify_s"]
        shape = "x".join(map(str, r["shape"]))
        width = f"{r['width']:.2e}" if r["certified"] else "FAILED"
        print(
            f"{r['layer']:26} {shape:>16} {r['input'][0]:>5} {r['side']:>6} {r['n']:>8} "
            f"{r['factor_nnz'] / 1e6:>7.0f}M {r['margin']:>8.1e} {r['lanczos_s']:>7.1f}s "
            f"{r['certify_s']:>7.1f}s {r['peak_gb']:>6.1f}G {width:>9} {r['old_width']:>8.1e}",
            flush=True,
        )
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(f"certificates in all: {total:.1f} s")


if __name__ == "__main__":
    main()
