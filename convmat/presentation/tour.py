"""The guided tour: convolutions as matrices, step by step, each matrix checked against torch.

The steps follow the tutorial the project grew from: a convolution as a linear map; sparse
connection and parameter sharing; stride; dilation; padding; channels; a 2-D convolution as a
1-D one with rows as channels; the transposed convolution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..engine import conv_transpose_output_size
from ..matrix import conv2d_as_conv1d, conv_matrix, conv_transpose_matrix
from .symbolic import symbolic

__all__ = ["steps", "tour"]

_CONV = {1: F.conv1d, 2: F.conv2d}


def _check_conv(config: dict[str, Any]) -> str:
    """Build W with a random kernel and compare ``W @ x`` with torch's convolution."""
    gen = torch.Generator().manual_seed(0)
    size = config["input_size"]
    size = size if isinstance(size, tuple) else (size,)
    n = len(size)
    k = config["kernel_size"]
    k = k if isinstance(k, tuple) else (k,) * n
    cin, cout = config.get("in_channels", 1), config.get("out_channels", 1)
    w = torch.randn(cout, cin, *k, dtype=torch.float64, generator=gen)
    x = torch.randn(2, cin, *size, dtype=torch.float64, generator=gen)
    kw = {key: config[key] for key in ("stride", "dilation") if key in config}
    pads = config.get("padding", 0)
    W = conv_matrix(w, size, padding=pads, **kw)
    if isinstance(pads, tuple) and isinstance(pads[0], tuple):
        flat = [v for pair in reversed(pads) for v in pair]
        y = _CONV[n](F.pad(x, flat), w, **kw)
        what = f"F.pad + F.conv{n}d"
    else:
        y = _CONV[n](x, w, padding=pads, **kw)
        what = f"F.conv{n}d"
    diff = (x.flatten(1) @ W.T - y.flatten(1)).abs().max().item()
    assert diff < 1e-10, diff
    return f"checked: x @ W.T equals torch's {what} (max difference {diff:.1e})"


def _rounded(y: torch.Tensor) -> list[list[float]]:
    return [[round(v, 6) for v in row] for row in y.tolist()]


def steps() -> list[tuple[str, str, str]]:
    """``(title, explanation, body)`` of every step, bodies computed and checked live."""
    out: list[tuple[str, str, str]] = []

    def step(title: str, text: str, config: dict[str, Any]) -> None:
        body = f"{symbolic(**config)}\n{_check_conv(config)}"
        out.append((title, text, body))

    step(
        "1. A convolution is a linear map",
        "Cross-correlation y[n] = sum_m x[n + m] w[m] is linear in x, so it is a matrix W:\n"
        "y = W x. Input 10, kernel 3: eight outputs, one row each.",
        dict(input_size=10, kernel_size=3),
    )
    step(
        "2. Sparse connection and parameter sharing",
        "Each output reads only its window (zeros elsewhere: sparse connection), and every row\n"
        "holds the same w1, w2, w3 (parameter sharing): 3 parameters instead of 8 x 10.",
        dict(input_size=6, kernel_size=3),
    )
    step(
        "3. Stride",
        "Stride 2 keeps every second window: every second row of the stride-1 matrix.",
        dict(input_size=10, kernel_size=3, stride=2),
    )
    step(
        "4. Dilation",
        "Dilation 2 spreads the taps two apart: the band gets gaps; y[n] = sum_m x[n + 2m] w[m].",
        dict(input_size=10, kernel_size=3, dilation=2),
    )
    step(
        "5. Padding",
        "Padding adds zeros around the input; in W they are columns that are dropped, so the\n"
        "border rows are shorter. Symmetric padding 1 keeps the size ('same'):",
        dict(input_size=6, kernel_size=3, padding=1),
    )
    step(
        "   ... asymmetric, left only (causal)",
        "Two zeros before and none after: every output sees only its past.",
        dict(input_size=6, kernel_size=3, padding=((2, 0),)),
    )
    step(
        "   ... right only",
        "Two zeros after and none before.",
        dict(input_size=6, kernel_size=3, padding=((0, 2),)),
    )
    step(
        "6. Channels",
        "With channels W is a grid of blocks, one banded block per (output, input) channel\n"
        "pair, labelled w[out, in, tap].",
        dict(input_size=4, kernel_size=2, in_channels=2, out_channels=2),
    )
    # 7: a 2-D convolution as a 1-D one with rows as channels.
    x = torch.arange(1.0, 21.0, dtype=torch.float64).view(1, 1, 4, 5)
    w = torch.arange(1, 10, dtype=torch.float64).view(1, 1, 3, 3) / 10
    w1 = conv2d_as_conv1d(w, 4)
    y2 = F.conv2d(x, w).view(2, 3)
    y1 = F.conv1d(x.view(1, 4, 5), w1).view(2, 3)
    assert torch.allclose(y1, y2, rtol=0, atol=1e-12)
    out.append(
        (
            "7. A 2-D convolution is a 1-D one with rows as channels",
            "Treat the 4 image rows as 4 input channels and slide along the width: the 3x3 kernel\n"
            "becomes a (2 output rows, 4 input rows, 3) Conv1d kernel holding each kernel row\n"
            "where that output row reads it. Image 1..20 (4x5), kernel 0.1..0.9 (3x3):",
            f"F.conv2d: {_rounded(y2)}\nF.conv1d: {_rounded(y1)}\n"
            f"checked: the same numbers (Conv1d weight shape {tuple(w1.shape)})",
        )
    )
    # 8: transposed convolution.
    wt = torch.randn(1, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    WT = conv_transpose_matrix(wt, 4, stride=2)
    (size,) = conv_transpose_output_size(4, 3, stride=2)
    Wc = conv_matrix(wt, size, stride=2)
    xt = torch.randn(2, 1, 4, dtype=torch.float64)
    diff = (xt.flatten(1) @ WT.T - F.conv_transpose1d(xt, wt, stride=2).flatten(1)).abs().max()
    assert torch.equal(WT, Wc.T) and diff < 1e-12
    out.append(
        (
            "8. The transposed convolution is W transposed",
            "conv_transpose(stride 2) on 4 inputs has the matrix W.T of the stride-2\n"
            "convolution on its output size (i-1)*s - 2p + d*(k-1) + output_padding + 1\n"
            "= 3*2 - 0 + 2 + 0 + 1 = 9:",
            f"{symbolic(4, 3, stride=2, transposed=True)}\n"
            f"checked: equals conv_matrix(w, 9, stride=2).T exactly, and x @ W.T equals torch's "
            f"F.conv_transpose1d (max difference {float(diff):.1e})",
        )
    )
    return out


def tour() -> None:
    """Print the tour."""
    for title, text, body in steps():
        print(f"{title}\n{'-' * len(title)}\n{text}\n\n{body}\n")
