"""Whole-model Lipschitz bounds of the zoo (random weights, no torchvision): [lower, upper].

For each model of ``tests/models.py`` (ResNet-18/50, MobileNetV2, VGG-11 written out as
torchvision has them; a small U-Net with transposed convolutions and concatenation): the
certified upper end along the traced graph, the empirical lower end (Lanczos on the
Jacobian at random inputs), the time, and beside them the product of the per-layer norms
(an estimate of nothing) and the product of the figures ``torch.nn.utils.spectral_norm``
divides by (the reshaped kernels' norms, which bound nothing either). Each model runs in its
own process, so one that runs out of time or memory leaves the others' rows.

    OMP_NUM_THREADS=2 python benchmarks/lipschitz.py --models resnet18 --size 224
    python benchmarks/lipschitz.py --models unet vgg11 --size 224 --norm-width 1e-3
    python benchmarks/lipschitz.py --size 32 --width 8          # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(name: str, size: int, width: int, probes: int, method: str,
        norm_width: float | None = None) -> dict:  # fmt: skip
    sys.path.insert(0, str(ROOT))
    from convmat import lipschitz_report
    from tests.models import ZOO

    kw = {"base": max(64 // width, 1)} if name == "unet" else {"width": width}
    model = ZOO[name](**kw)
    start = time.perf_counter()
    r = lipschitz_report(model, (3, size, size), progress=False, probes=probes, method=method,
                         width=norm_width)  # fmt: skip
    seconds = time.perf_counter() - start
    return {
        "model": name, "size": size, "width": width, "layers": len(r),
        "lower": r.lower, "upper": r.upper, "seconds": seconds,
        "layer_seconds": sum(x.seconds for x in r),
        "factor_seconds": sum(f.seconds for f in r.factors),
        "product": r.product, "spectral_norm_product": math.prod(x.reshaped for x in r),
        "not_certified": list(r.not_certified),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2",
                                                        "vgg11", "unet"])  # fmt: skip
    parser.add_argument("--size", type=int, default=224, help="input is 3 x size x size")
    parser.add_argument("--width", type=int, default=1, help="divide every channel count")
    parser.add_argument("--probes", type=int, default=3, help="random inputs for the lower end")
    parser.add_argument("--method", default="auto", help="convmat.operator_norm's method")
    parser.add_argument("--norm-width", type=float, default=None,
                        help="each layer's certified interval to this relative width "
                        "(lipschitz_report's width=) instead of the default tol")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.size, args.width, args.probes, args.method,
                             args.norm_width)))  # fmt: skip
        return
    head = (
        f"{'model':<13} {'input':>9} {'layers':>6} {'lower':>11} {'upper':>11} "
        f"{'upper/lower':>11} {'time':>8} {'(layers':>8} {'graph)':>7} {'prod norms':>11} "
        f"{'prod spectral_norm':>18}"
    )
    print(head)
    print("-" * len(head))
    print(
        "time: the whole report; (layers: the per-layer norms, graph: the graph's factors, "
        "folded BatchNorm layers included; the rest is tracing and the lower end)"
    )
    for name in args.models:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--size",
            str(args.size),
            "--width",
            str(args.width),
            "--probes",
            str(args.probes),
            "--method",
            args.method,
        ]
        if args.norm_width is not None:
            cmd += ["--norm-width", str(args.norm_width)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{name:<13} did not finish in {args.timeout:.0f} s", flush=True)
            continue
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{name:<13} failed: {last}", flush=True)
            continue
        d = json.loads(done.stdout.strip().splitlines()[-1])
        ratio = d["upper"] / d["lower"] if d["lower"] else math.inf
        print(
            f"{name:<13} {f'3x{args.size}x{args.size}':>9} {d['layers']:>6} "
            f"{d['lower']:>11.4g} {d['upper']:>11.4g} {ratio:>11.3g} {d['seconds']:>7.1f}s "
            f"{d['layer_seconds']:>7.1f}s {d['factor_seconds']:>6.1f}s "
            f"{d['product']:>11.4g} {d['spectral_norm_product']:>18.4g}",
            flush=True,
        )
        if d["not_certified"]:
            print(f"    not certified: {'; '.join(d['not_certified'])}")


if __name__ == "__main__":
    main()
