"""Checks and timings on an accelerator: W, the matrix layers and the norms on CUDA, against
torch's own convolutions on the same device (float64 for exactness, float32 for time).

Run where CUDA is available: ``python benchmarks/device.py``. Prints one table; exits 1 if any
check fails.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import convmat
from convmat.nn import MatrixConv2d, MatrixConvTranspose2d


def best_of(fn, n: int = 5) -> float:
    best = float("inf")
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    failures = []

    def check(name: str, error: float, tol: float) -> None:
        ok = error <= tol
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max error {error:.2e} (tol {tol:.0e})")
        if not ok:
            failures.append(name)

    gen = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64, device=dev, generator=gen)
    x = torch.randn(3, 4, 12, 12, dtype=torch.float64, device=dev, generator=gen)
    for layout in (torch.strided, torch.sparse_coo, torch.sparse_csr):
        for mode in ("zeros", "reflect", "circular"):
            W = convmat.conv_matrix(w, (12, 12), stride=2, padding=1, padding_mode=mode,
                                    layout=layout)  # fmt: skip
            y = (W @ x.flatten(1).T).T if layout != torch.strided else x.flatten(1) @ W.T
            pad = F.pad(x, (1, 1, 1, 1), mode="constant" if mode == "zeros" else mode)
            ref = F.conv2d(pad, w, stride=2).flatten(1)
            check(f"conv_matrix {layout} {mode}", float((y - ref).abs().max()), 1e-10)

    for cls, ref_cls, kw in (
        (MatrixConv2d, nn.Conv2d, dict(padding=1, padding_mode="reflect")),
        (MatrixConvTranspose2d, nn.ConvTranspose2d, dict(stride=2, output_padding=1)),
    ):
        for layout in (torch.sparse_csr, torch.strided):
            torch.manual_seed(0)
            ref = ref_cls(4, 6, 3, dtype=torch.float64, device=dev, **kw)
            twin = cls.from_module(ref, layout=layout)
            xi = torch.randn(5, 4, 10, 10, dtype=torch.float64, device=dev, requires_grad=True)
            y_ref, y = ref(xi), twin(xi)
            g_ref = torch.autograd.grad(y_ref.square().sum(), (xi, ref.weight))
            g = torch.autograd.grad(y.square().sum(), (xi, twin.weight))
            err = max(float((y - y_ref).abs().max()),
                      *(float((a - b).abs().max()) for a, b in zip(g, g_ref)))  # fmt: skip
            check(f"{cls.__name__} {layout} forward+backward", err, 1e-9)

    conv = nn.Conv2d(16, 16, 3, padding=1, dtype=torch.float64, device=dev)
    r = convmat.operator_norm(conv, (24, 24))
    dense = torch.linalg.matrix_norm(convmat.to_matrix(conv, (24, 24)).detach(), ord=2)
    check("operator_norm 16->16 3x3 24x24", abs(r.value - float(dense)) / float(dense), 1e-6)

    print()
    print("timings (float32, batch 64, best of 5)")
    print(f"{'case':44s} {'torch':>10s} {'convmat':>10s} {'ratio':>7s}")
    for c, size in ((16, 32), (64, 32), (64, 56)):
        ref = nn.Conv2d(c, c, 3, padding=1, device=dev)
        xs = torch.randn(64, c, size, size, device=dev)
        for layout in (torch.sparse_csr, torch.strided):
            twin = MatrixConv2d.from_module(ref, layout=layout)
            rows = c * size * size
            if layout == torch.strided and rows * rows * 4 > 8 * 2**30:
                continue
            twin(xs)
            t_ref = best_of(lambda: ref(xs))
            t = best_of(lambda twin=twin: twin(xs))
            name = f"forward {c}->{c} 3x3 {size}x{size} {layout}"
            print(f"{name:44s} {t_ref * 1e3:8.2f}ms {t * 1e3:8.2f}ms {t / t_ref:7.1f}")
        w32 = ref.weight.detach()
        t_build = best_of(lambda w32=w32, size=size: convmat.conv_matrix(
            w32, (size, size), padding=1, layout=torch.sparse_csr))  # fmt: skip
        print(f"{f'CSR build {c}->{c} 3x3 {size}x{size} (warm)':44s} {'':>10s} "
              f"{t_build * 1e3:8.2f}ms")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
