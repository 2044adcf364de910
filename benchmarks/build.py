"""Benchmark: building W in every layout, against the memory-bandwidth floor and jacrev.

Each (configuration, layout) runs in a fresh subprocess so that its peak memory is its own.
Columns:
  nnz, bytes     non-zeros and bytes of the result (values and indices)
  cold           build from nothing: index pattern computed, then values gathered
  warm           rebuild with the pattern cached (what a layer pays after an optimizer step):
                 only the values are new, the index tensors are shared with the cache
  floor          a plain copy of a tensor of the result's bytes (fresh allocation, like a build)
  values floor   a plain copy of a tensor of the values' bytes only (what a warm rebuild writes)
  cold x floor   cold / floor;  warm x values floor: warm / values floor
  peak/result    peak resident memory during the build / bytes of the result
  jacrev         torch.func.jacrev of the convolution (dense only, where it is reasonable)
  speed-up       jacrev / cold

Every time is the best of --repeat runs, jacrev's included. A ratio is printed only where its
denominator is at least 1 ms ("-" otherwise: below that the raw times say more than a ratio).

Run: python benchmarks/build.py [--quick] [--repeat N] [--configs 0,2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

CONFIGS = [
    # name, weight shape, input size, stride, padding
    ("1-D 1->1 k=3 L=4096", (1, 1, 3), (4096,), 1, 0),
    ("2-D 16->16 3x3 32x32 pad 1", (16, 16, 3, 3), (32, 32), 1, 1),
    ("2-D 64->64 3x3 32x32 pad 1", (64, 64, 3, 3), (32, 32), 1, 1),
    ("2-D 64->128 3x3 56x56 s2 pad 1", (128, 64, 3, 3), (56, 56), 2, 1),
    ("3-D 8->8 3x3x3 16^3 pad 1", (8, 8, 3, 3, 3), (16, 16, 16), 1, 1),
]
LAYOUTS = ["csr", "coo", "dense"]
DENSE_LIMIT = 5 * 2**30  # bytes: larger dense results are not built here
JACREV_LIMIT = 2**28  # entries of W: jacrev above that takes minutes


def _rss_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _best(fn, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        del out
    return best


def run_one(index: int, layout_name: str, repeat: int) -> dict:
    import torch

    import convmat

    torch.set_num_threads(2)
    name, shape, size, stride, padding = CONFIGS[index]
    layout = {"csr": torch.sparse_csr, "coo": torch.sparse_coo, "dense": torch.strided}[layout_name]
    weight = torch.randn(shape)
    # Warm torch's own lazy initialisation of sparse tensors on a tiny case.
    convmat.conv_matrix(torch.randn(1, 1, 3), 5, layout=layout)

    def build():
        return convmat.conv_matrix(weight, size, stride=stride, padding=padding, layout=layout)

    convmat.clear_cache()
    base = _status("VmRSS")
    _rss_peak_reset()
    t0 = time.perf_counter()
    W = build()
    cold = time.perf_counter() - t0
    peak_cold = _status("VmHWM") - base
    if layout == torch.strided:
        result_bytes = W.numel() * W.element_size()
        nnz = int(torch.count_nonzero(W))
    elif layout == torch.sparse_csr:
        nnz = W._nnz()
        result_bytes = sum(
            t.numel() * t.element_size() for t in (W.crow_indices(), W.col_indices(), W.values())
        )
    else:
        nnz = W._nnz()
        result_bytes = sum(t.numel() * t.element_size() for t in (W.indices(), W.values()))
    # What a warm rebuild writes: the values (all of a dense W; the non-zeros of a sparse one).
    values = W if layout == torch.strided else W.values()
    values_bytes = values.numel() * values.element_size()
    del values
    del W
    base = _status("VmRSS")
    _rss_peak_reset()
    W = build()
    peak_warm = _status("VmHWM") - base
    del W
    warm = _best(build, repeat)

    def build_cold():
        convmat.clear_cache()
        return build()

    cold = min(cold, _best(build_cold, repeat))
    src = torch.empty(result_bytes, dtype=torch.uint8)
    floor = _best(src.clone, repeat)
    del src
    src = torch.empty(values_bytes, dtype=torch.uint8)
    values_floor = _best(src.clone, repeat)
    del src
    row = dict(
        name=name,
        layout=layout_name,
        nnz=nnz,
        bytes=result_bytes,
        cold=cold,
        warm=warm,
        floor=floor,
        values_bytes=values_bytes,
        values_floor=values_floor,
        peak_cold=peak_cold / result_bytes,
        peak_warm=peak_warm / result_bytes,
    )
    numel = math.prod(W_shape(shape, size, stride, padding))
    if layout == torch.strided and numel <= JACREV_LIMIT:
        conv = {
            3: torch.nn.functional.conv1d,
            4: torch.nn.functional.conv2d,
            5: torch.nn.functional.conv3d,
        }[len(shape)]
        x = torch.randn(1, shape[1], *size)

        def jac():
            return torch.func.jacrev(
                lambda v: conv(v, weight, stride=stride, padding=padding).flatten()
            )(x)

        row["jacrev"] = _best(jac, repeat)  # best of n, as convmat's times
        J = jac().reshape(-1, x.numel())
        row["jacrev_max_diff"] = float((J - build()).abs().max())
    return row


def W_shape(shape, size, stride, padding):
    import convmat

    out = convmat.conv_output_size(size, shape[2:], stride, padding)
    return shape[0] * math.prod(out), shape[1] * math.prod(size)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


#: Below this a denominator is too close to the timer's and the allocator's noise for a ratio.
RATIO_FLOOR = 1e-3  # seconds


def _ratio(t: float, floor: float, fmt: str = "{:.2f}") -> str:
    """``t / floor``, or ``-`` where ``floor`` is under a millisecond (the raw times stand)."""
    return fmt.format(t / floor) if floor >= RATIO_FLOOR else "-"


def _ms(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t >= 1e-2 else f"{t * 1e3:.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--one", nargs=2, metavar=("INDEX", "LAYOUT"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=5, help="timing repeats (best is kept)")
    parser.add_argument(
        "--quick", action="store_true", help="only the smallest configuration (a smoke run)"
    )
    parser.add_argument(
        "--configs",
        type=lambda text: [int(v) for v in text.split(",")],
        help=f"comma-separated indices into the configuration list (0-{len(CONFIGS) - 1})",
    )
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1], args.repeat)))
        return
    import torch

    print(
        f"torch {torch.__version__}, 2 threads, float32; times are best of {args.repeat} "
        "(cold: pattern cache cleared before each run; jacrev too); ratios shown where the "
        "denominator is >= 1 ms, '-' otherwise\n"
    )
    header = (
        "configuration",
        "layout",
        "nnz",
        "bytes",
        "cold",
        "warm",
        "floor",
        "values floor",
        "cold x floor",
        "warm x values floor",
        "peak/result cold",
        "peak/result warm",
        "jacrev",
        "speed-up",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    chosen = [0] if args.quick else (args.configs or range(len(CONFIGS)))
    configs = [(i, CONFIGS[i]) for i in chosen]
    # Every allocation over 1 MB is fresh memory from the kernel, for the copy and the build
    # alike (glibc would otherwise reuse some sizes and not others, making floors incomparable).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    for index, (name, shape, size, stride, padding) in configs:
        rows, cols = W_shape(shape, size, stride, padding)
        for layout in LAYOUTS:
            if layout == "dense" and rows * cols * 4 > DENSE_LIMIT:
                print(
                    f"| {name} | dense | | {_fmt_bytes(rows * cols * 4)} | not built (over {_fmt_bytes(DENSE_LIMIT)}) |"
                    + " |" * 9
                )
                continue
            cmd = [
                sys.executable,
                __file__,
                "--one",
                str(index),
                layout,
                "--repeat",
                str(args.repeat),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            r = json.loads(out)
            jac = f"{r['jacrev']:.2f} s" if "jacrev" in r else "-"
            speed = _ratio(r["jacrev"], r["cold"], "{:.0f}x") if "jacrev" in r else "-"
            print(
                f"| {name} | {layout} | {r['nnz']:,} | {_fmt_bytes(r['bytes'])} | "
                f"{_ms(r['cold'])} | {_ms(r['warm'])} | {_ms(r['floor'])} | "
                f"{_ms(r['values_floor'])} | {_ratio(r['cold'], r['floor'])} | "
                f"{_ratio(r['warm'], r['values_floor'])} | "
                f"{r['peak_cold']:.2f} | {r['peak_warm']:.2f} | {jac} | {speed} |",
                flush=True,
            )
            if "jacrev_max_diff" in r:
                assert r["jacrev_max_diff"] < 1e-4, r


if __name__ == "__main__":
    main()
