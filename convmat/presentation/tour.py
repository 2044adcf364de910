"""The guided tour: convolutions as matrices, step by step, each matrix checked against torch.

The steps follow the tutorial the project grew from: a convolution as a matrix; sparse
connection and parameter sharing; a ``Conv1D`` layer that builds W; stride; dilation; padding;
channels; a 2-D convolution as a 1-D one with rows as channels; what ``spectral_norm`` of the
reshaped kernel misses of the layer's norm; the transposed convolution as W transposed and as
the input scattering the kernel; the true (flipped) convolution beside the cross-correlation.

This module is the one source of the tour. Each :class:`Step` holds its text (Markdown) and its
code; ``convmat tour`` runs the code and prints the text and what the code shows, and
:func:`write_notebook` writes the same steps as the notebook ``docs/tour.ipynb``, where each
step also draws its picture, run in a fresh Jupyter kernel and stored with its outputs (so it
reads on a code host without a kernel). To change the tour, edit the steps here and run
``python -m convmat.presentation.tour docs/tour.ipynb``; tests/test_notebook.py fails when the
committed notebook's cells or outputs differ from what this writes now.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch

from .._errors import ConvMatError

__all__ = [
    "Step",
    "execute_notebook",
    "notebook",
    "notebook_text",
    "plot_scatter",
    "plot_spectrum",
    "run_step",
    "steps",
    "tour",
    "write_notebook",
]


class Step(NamedTuple):
    """One step of the tour.

    Attributes:
        title: the heading.
        text: the explanation (Markdown; read as plain text in a terminal).
        code: Python run by both the terminal tour and the notebook. It checks its matrix
            against torch (or numpy), prints one line starting ``checked:``, and ends with the
            expression to show (the symbolic W, as HTML in a notebook).
        picture: code that draws the step, run only in the notebook (a terminal shows none).
    """

    title: str
    text: str
    code: str
    picture: str = ""


#: Imports shared by every step: the first code cell of the notebook.
SETUP = """\
import numpy as np
import torch
import torch.nn.functional as F

torch.manual_seed(0)  # the same random numbers on every run, so the outputs below reproduce

from convmat import (animate, conv2d_as_conv1d, conv_matrix, conv_transpose_matrix,
                     operator_norm, plot_matrix, singular_values, symbolic, to_matrix)
from convmat.nn import Conv1D
from convmat.presentation.tour import plot_scatter, plot_spectrum"""

_INTRO = """\
# Convolutions as matrices

A convolution layer is a linear map, so it is a matrix W: `conv(x).flatten() == W @ x.flatten()`.
This tour builds W step by step with convmat for every idea of the classic
tutorial: sparse connection and parameter sharing, stride, dilation, padding, channels, 2-D as
1-D, the transposed convolution and the true (flipped) convolution, and for two it leads to: why
`spectral_norm` of the reshaped kernel is not the layer's norm, and the transposed convolution as
the input scattering the kernel. Every step shows W with its entries named by kernel taps, draws
it, and checks it against torch's own convolution (or numpy, or a dense SVD).

`convmat tour` prints the same steps in a terminal; both come from `convmat/presentation/tour.py`.
`python -m convmat.presentation.tour docs/tour.ipynb` runs this notebook in a fresh kernel and
stores it with its outputs."""

STEPS: tuple[Step, ...] = (
    Step(
        "1. A convolution is a matrix",
        "What deep learning calls a convolution is the cross-correlation "
        "`y[n] = sum_m x[n + m] w[m]`:\nslide the kernel `w` along `x` and take weighted sums. "
        "It is linear in `x`, so it is a matrix,\n`y = W x`. Input 10, kernel 3: 8 outputs, one "
        "row of W each, the kernel on a band.",
        """\
w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
x = torch.arange(1.0, 11.0, dtype=torch.float64)
W = conv_matrix(w.view(1, 1, 3), 10)  # weight (out_channels, in_channels, kernel), input 10
y = F.conv1d(x.view(1, 1, 10), w.view(1, 1, 3)).flatten()
assert torch.equal(W @ x, y)
print(f"W is {tuple(W.shape)}; checked: W @ x equals F.conv1d(x, w) = {y.tolist()}")
symbolic(10, 3)""",
        "plot_matrix(input_size=10, kernel_size=3)",
    ),
    Step(
        "2. Sparse connection and parameter sharing",
        "A dense layer from 4 inputs to 2 outputs has 2 x 4 = 8 weights, and every output reads "
        "every input.\nA convolution with kernel 3 connects `y1` only to `x1, x2, x3` and `y2` "
        "only to `x2, x3, x4`\n(sparse connection), and both rows hold the same `w1, w2, w3` "
        "(parameter sharing): 3 weights.\n`to_matrix` gives W of any torch layer.",
        """\
conv = torch.nn.Conv1d(1, 1, kernel_size=3, bias=False).double()
W = to_matrix(conv, 4)
x = torch.randn(5, 1, 4, dtype=torch.float64)
diff = (conv(x).flatten(1) - x.flatten(1) @ W.T).abs().max().item()
assert diff < 1e-12
nonzero = W.count_nonzero().item()
print(f"{nonzero} of W's {W.numel()} entries are non-zero, made of {conv.weight.numel()} weights")
print("checked: x @ W.T equals nn.Conv1d(x) to 1e-12")
symbolic(4, 3)""",
        "plot_matrix(conv, 4)",
    ),
    Step(
        "3. A Conv1D layer that builds W",
        "The tutorial's `Conv1D` keeps a learnable kernel, builds W from it on every call and "
        "returns\n`x @ W.T`. `convmat.nn.Conv1D` is that layer without the Python loop: W's index "
        "pattern is\ncomputed once and the kernel's values are gathered into it, so gradients "
        "reach the kernel through W.",
        """\
layer = Conv1D(kernel_size=3, input_dim=10).double()
x = torch.randn(4, 10, dtype=torch.float64)  # a batch of 4 signals
y = layer(x)
y.square().sum().backward()
kernel = layer.kernel.detach().clone().requires_grad_()
y_torch = F.conv1d(x.unsqueeze(1), kernel.view(1, 1, 3)).squeeze(1)
y_torch.square().sum().backward()
assert torch.allclose(y, y_torch, rtol=0, atol=1e-12)
assert torch.allclose(layer.kernel.grad, kernel.grad, rtol=0, atol=1e-10)
print(f"{tuple(x.shape)} -> {tuple(y.shape)}; "
      "checked: outputs and kernel gradients equal F.conv1d's")
layer""",
        "plot_matrix(layer.weight_matrix())",
    ),
    Step(
        "4. Stride",
        "Stride 2 moves the window two places at a time: W keeps every second row of the stride-1 "
        "matrix.\nout = (in - k) // stride + 1 = (10 - 3) // 2 + 1 = 4.",
        """\
w = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
x = torch.randint(-9, 10, (2, 1, 10)).double()  # whole numbers: both sides are exact
W = conv_matrix(w, 10, stride=2)
assert torch.equal(W, conv_matrix(w, 10)[::2])
assert torch.equal(x.flatten(1) @ W.T, F.conv1d(x, w, stride=2).flatten(1))
print(f"W is {tuple(W.shape)}, every second row of the stride-1 W; "
      "checked: x @ W.T equals F.conv1d(stride=2) exactly")
symbolic(10, 3, stride=2)""",
        "animate(None, 10, 3, stride=2)  # a path such as 'stride.gif' also writes the file",
    ),
    Step(
        "5. Dilation",
        "Dilation 2 spreads the taps two apart, `y[n] = sum_m x[n + 2m] w[m]`: the band gets "
        "gaps.\nThink of a kernel of size (k - 1) * d + 1 with zeros between the taps; dilate "
        "first, then stride.\nout = 10 - (3 - 1) * 2 = 6.",
        """\
W = conv_matrix(w, 10, dilation=2)
assert torch.equal(x.flatten(1) @ W.T, F.conv1d(x, w, dilation=2).flatten(1))
both = conv_matrix(w, 10, dilation=2, stride=2)
assert torch.equal(both, W[::2])
print(f"W is {tuple(W.shape)}; checked: x @ W.T equals F.conv1d(dilation=2) exactly, "
      "and with stride 2 it keeps every second row")
symbolic(10, 3, dilation=2)""",
        "plot_matrix(input_size=10, kernel_size=3, dilation=2)",
    ),
    Step(
        "6. Padding",
        "Padding adds zeros around the input. In W they would be columns that multiply zeros, "
        "so they are\ndropped and the border rows are shorter. Padding 1 on both sides keeps "
        "the size (`'same'`);\n`((2, 0),)` pads only the start (a causal convolution: every "
        "output sees only its past).\nOther padding modes fold the taps that fall outside back "
        "into W: `'circular'` wraps around.",
        """\
x = torch.randn(2, 1, 6, dtype=torch.float64)
for before, after in [(1, 1), (2, 0), (0, 2), (1, 3)]:
    W = conv_matrix(w, 6, padding=((before, after),))
    y = F.conv1d(F.pad(x, (before, after)), w)
    assert torch.allclose(x.flatten(1) @ W.T, y.flatten(1), rtol=0, atol=1e-12)
W = conv_matrix(w, 6, padding=1, padding_mode="circular")
y = F.conv1d(F.pad(x, (1, 1), mode="circular"), w)
assert torch.allclose(x.flatten(1) @ W.T, y.flatten(1), rtol=0, atol=1e-12)
print("checked: x @ W.T equals F.conv1d(F.pad(x, (before, after)), w) for (1, 1), (2, 0), "
      "(0, 2), (1, 3) and circular (1, 1)")
display(symbolic(6, 3, padding=1))
symbolic(6, 3, padding=((2, 0),))""",
        "plot_matrix(input_size=6, kernel_size=3, padding=1, padding_mode='circular')",
    ),
    Step(
        "7. Channels",
        "With 2 input and 3 output channels there are 2 x 3 = 6 kernels, `w[out, in, tap]`. "
        "Each output\nchannel sums its own convolutions of every input channel, so W is a "
        "3 x 2 grid of banded blocks.",
        """\
w = torch.randint(-5, 6, (3, 2, 3)).double()  # (out_channels, in_channels, kernel)
x = torch.randint(-9, 10, (2, 2, 4)).double()
W = conv_matrix(w, 4)
assert torch.equal(x.flatten(1) @ W.T, F.conv1d(x, w).flatten(1))
assert torch.equal(W[2:4, 4:8], conv_matrix(w[1:2, 1:2], 4))  # block (out 1, in 1)
print(f"W is {tuple(W.shape)}: 3 x 2 blocks of 2 x 4; checked: x @ W.T equals F.conv1d exactly")
symbolic(4, 3, in_channels=2, out_channels=3)""",
        "plot_matrix(input_size=4, kernel_size=3, in_channels=2, out_channels=3)",
    ),
    Step(
        "8. A 2-D convolution is a 1-D one with rows as channels",
        "Treat the 4 rows of a 4 x 5 image as 4 input channels and slide along the width: the "
        "3 x 3 kernel\nbecomes a Conv1d kernel with one output channel per output row, holding "
        "each kernel row where\nthat output row reads it (image 1..20, kernel 0.1..0.9). Both "
        "have the same W. Each row of a\n2-D W reads a window of the flattened image: one run "
        "of taps per image row (below, a 2 x 2\nkernel on a 3 x 3 image).",
        """\
image = torch.arange(1.0, 21.0, dtype=torch.float64).view(1, 1, 4, 5)
w2 = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3) / 10
w1 = conv2d_as_conv1d(w2, 4)  # (2 output rows, 4 input rows, 3)
y2 = F.conv2d(image, w2).view(2, 3)
y1 = F.conv1d(image.view(1, 4, 5), w1).view(2, 3)
assert torch.allclose(y1, y2, rtol=0, atol=1e-12)
W = conv_matrix(w2, (4, 5))
assert torch.equal(W, conv_matrix(w1, 5))
print(f"F.conv2d gives {y2.round(decimals=4).tolist()}")
print(f"checked: F.conv1d with the {tuple(w1.shape)} weight gives the same; "
      f"both have the same {tuple(W.shape)} W")
symbolic((3, 3), 2)""",
        "plot_matrix(input_size=(4, 5), kernel_size=3)",
    ),
    Step(
        "9. What spectral_norm divides by is not the layer's norm",
        "W is a matrix, so the layer's norm (how much it can stretch an input) is W's largest "
        "singular value.\n`torch.nn.utils.parametrizations.spectral_norm` (like the older "
        "`torch.nn.utils.spectral_norm`)\ndivides the weight by another number: the largest "
        "singular value of the kernel reshaped to a\nmatrix, `K = weight.reshape(out_channels, "
        "-1)`, the map from one window of the input to one\noutput pixel. W applies K at every "
        "position and the windows overlap (with a 3 x 3 kernel each\ninput pixel feeds up to 9 "
        "outputs), so W can stretch more than one window does: for the stride-1\ncircular "
        "convolution `||K|| <= ||W_circ|| <= sqrt(9) ||K||`. The zero-padded W is a block of "
        "the\ncircular convolution on the padded input (no window wraps around it), so `||W|| <= "
        "||W_circ||`,\nand `||W||` grows with the input size, which K does not know. "
        "`operator_norm` gives `||W||`,\n`singular_values(..., padding_mode='circular')` the "
        "enclosing circular convolution's. After\ntorch's spectral_norm this layer's norm is "
        "`||W|| / ||K||`, not 1;\n`convmat.spectral_norm(conv, input_size)` divides by `||W||` "
        "instead.",
        """\
conv = torch.nn.Conv2d(2, 3, kernel_size=3, padding=1, bias=False).double()
w = conv.weight.detach().clone()
K = w.reshape(3, -1)  # (out_channels, in_channels * 3 * 3): one window -> one output pixel
k_norm = torch.linalg.matrix_norm(K, ord=2).item()
print(f"{'input':8}{'||K|| (spectral_norm)':>24}{'||W|| (operator_norm)':>24}"
      f"{'||W_circ|| (circular)':>24}")
for n in (4, 8, 16):
    layer = operator_norm(conv, (n, n)).value
    dense = torch.linalg.matrix_norm(to_matrix(conv, (n, n)), ord=2).item()
    assert abs(layer - dense) <= 1e-9 * dense
    torus = (n + 2, n + 2)  # the padded input: no window wraps around it
    circular = singular_values(w, torus, padding=1, padding_mode="circular")
    W_circ = conv_matrix(w, torus, padding=1, padding_mode="circular")
    assert torch.allclose(circular, torch.linalg.svdvals(W_circ), rtol=1e-9, atol=1e-12)
    circ = circular.max().item()
    assert layer <= circ * (1 + 1e-9) and k_norm <= circ * (1 + 1e-9) <= 3 * k_norm
    print(f"{f'{n} x {n}':8}{k_norm:24.4f}{layer:24.4f}{circ:24.4f}")
torch.nn.utils.parametrizations.spectral_norm(conv, n_power_iterations=100)
divisor = conv.parametrizations.weight.original / conv.weight
assert torch.allclose(divisor, torch.full_like(w, k_norm), rtol=1e-9, atol=0)
after = operator_norm(conv, (16, 16)).value
assert abs(after - layer / k_norm) <= 1e-9 * after
print(f"after torch's spectral_norm (it divides by ||K|| = {k_norm:.4f}) the layer's norm at "
      f"16 x 16 is {after:.4f}")
print("checked: operator_norm equals the dense SVD of to_matrix, the circular singular values "
      "the dense SVD of\\nconv_matrix(padding_mode='circular'), and torch's spectral_norm "
      "divides the weight by ||K||")""",
        """\
plot_spectrum(singular_values(w, (16, 16), padding=1),
              {"||K||: what spectral_norm divides by": k_norm,
               "||W_circ||: the enclosing circular convolution": circ},
              title="the singular values of W at input 16 x 16")""",
    ),
    Step(
        "10. The transposed convolution is W transposed",
        "If `y = W x`, then `W.T` maps y's size back to x's: the transposed convolution, used to "
        "upsample in\ndecoders. It is the adjoint, not an inverse (`W.T @ W` is not the "
        "identity). Its output size is\n(in - 1) * stride - 2 * padding + dilation * (k - 1) + "
        "output_padding + 1 = 3 * 2 + 2 + 1 = 9 here.",
        """\
w = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
WT = conv_transpose_matrix(w, 4, stride=2)  # 4 inputs -> 9 outputs
W = conv_matrix(w, 9, stride=2)  # the stride-2 convolution: 9 inputs -> 4 outputs
assert torch.equal(WT, W.T)
x = torch.randint(-9, 10, (2, 1, 4)).double()
assert torch.equal(x.flatten(1) @ WT.T, F.conv_transpose1d(x, w, stride=2).flatten(1))
print("checked: conv_transpose_matrix(w, 4, stride=2) is conv_matrix(w, 9, stride=2).T, and "
      "x @ WT.T equals F.conv_transpose1d exactly")
symbolic(4, 3, stride=2, transposed=True)""",
        "animate(None, 4, 3, stride=2, transposed=True)",
    ),
    Step(
        "11. The transposed convolution scatters the kernel",
        "Read by columns, the transposed convolution is a scatter: input `x_i` drops a copy of "
        "the kernel,\nscaled by `x_i`, into the output, starting `stride` places after the "
        "previous input's copy, and\nthe output adds the copies up. Column i of `W.T` is that "
        "copy for `x_i = 1` (what\n`F.conv_transpose1d` makes of a one-hot input). With stride "
        "2 and kernel 3 neighbouring copies\noverlap in one place: y3, y5 and y7 sum two copies, "
        "the others one. That uneven overlap is\nwhere the checkerboard patterns of upsampling "
        "by transposed convolutions come from.",
        """\
x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)  # one signal of 4
WT = conv_transpose_matrix(w, 4, stride=2)  # w = [1, 2, 3] as above: 4 inputs -> 9 outputs
xs, taps = x.flatten(), w.flatten()
copies = WT.T * xs[:, None]  # row i: x_i times column i of WT
where = torch.arange(4)[:, None] * 2 + torch.arange(3)  # copy i covers outputs 2i .. 2i + 2
scattered = torch.zeros(4, 9, dtype=torch.float64).scatter_(1, where, xs[:, None] * taps)
assert torch.equal(copies, scattered)  # x_i * w from output 2i on, zeros elsewhere
one_hot = torch.eye(4, dtype=torch.float64).view(4, 1, 4)
assert torch.equal(WT.T, F.conv_transpose1d(one_hot, w, stride=2).view(4, 9))
y = F.conv_transpose1d(x, w, stride=2).flatten()
assert torch.equal(copies.sum(0), y)
print("         " + "".join(f"{f'y{j + 1}':>4}" for j in range(9)))
for i, row in enumerate(copies.tolist()):
    print(f"x{i + 1} = {xs[i]:g}   " + "".join(f"{v:4g}" if v else "   ." for v in row))
print("y = sum  " + "".join(f"{v:4g}" for v in y.tolist()))
print("checked: input i adds x_i * w from output 2i on; the copies add up to F.conv_transpose1d(x) "
      "exactly,\\nand WT's columns are F.conv_transpose1d of one-hot inputs")""",
        "plot_scatter(xs, taps, stride=2)",
    ),
    Step(
        "12. True convolution and cross-correlation",
        "Signal processing's convolution flips the kernel, `(x * w)[n] = sum_m x[m] w[n - m]`; "
        "deep learning's\nlayers compute the cross-correlation, without the flip. One line "
        "relates the two matrices:\n`W_conv(w) = W_corr(flip(w))`, that is "
        "`conv_matrix(w, n, flip=True) == conv_matrix(w.flip(-1), n)`.\nWith k - 1 zeros on both "
        "sides the true convolution is numpy's `'full'` convolution; with none, `'valid'`.\n"
        "`symbolic(6, 3, flip=True)` names the taps: each row of the true convolution reads "
        "`w3, w2, w1`\nwhere the cross-correlation's reads `w1, w2, w3`.",
        """\
x = torch.arange(1.0, 7.0, dtype=torch.float64)
W_corr = conv_matrix(w, 6)
W_conv = conv_matrix(w, 6, flip=True)
assert torch.equal(W_conv, conv_matrix(w.flip(-1), 6))
x_np, w_np = x.numpy(), w.flatten().numpy()
assert np.allclose(W_corr @ x, np.correlate(x_np, w_np, "valid"))
assert np.allclose(W_conv @ x, np.convolve(x_np, w_np, "valid"))
full = conv_matrix(w, 6, padding=2, flip=True)  # k - 1 = 2 zeros on both sides
assert np.allclose(full @ x, np.convolve(x_np, w_np, "full"))
S_corr, S_conv = symbolic(6, 3), symbolic(6, 3, flip=True)
assert S_corr.labels([0], [0, 1, 2]) == [["w1", "w2", "w3"]]
assert S_conv.labels([0], [0, 1, 2]) == [["w3", "w2", "w1"]]
print("checked: W_corr @ x equals np.correlate(x, w), W_conv @ x equals np.convolve(x, w) "
      "('valid', and 'full' with padding 2)")
display(W_corr, W_conv)
display(S_corr)
S_conv""",
        """\
for name, flip in [("cross-correlation (torch)", False), ("true convolution", True)]:
    fig = plot_matrix(conv_matrix(w, 6, flip=flip))
    fig.axes[0].set_title(f"{name}: flip={flip}")
    display(fig)""",
    ),
)


def steps() -> list[Step]:
    """The steps of the tour, in order.

    Returns:
        Every :class:`Step` (title, text, code, picture).

    Shape:
        one step per idea of the tutorial.

    >>> [s.title for s in steps()][:2]
    ['1. A convolution is a matrix', '2. Sparse connection and parameter sharing']
    """
    return list(STEPS)


def _display(*objects: Any) -> None:
    """The terminal's stand-in for IPython's ``display``: text, and no pictures."""
    for obj in objects:
        if obj is not None and not hasattr(obj, "savefig"):
            print(obj)


def run_step(code: str, namespace: dict[str, Any]) -> str:
    """Run one step's code in ``namespace`` as a notebook cell runs: what it prints, then the
    value of its last expression (if not None).

    Args:
        code: the cell's code.
        namespace: the variables shared by the cells (updated).

    Returns:
        The text the cell shows.

    Shape:
        text, one line per printed line.

    >>> run_step("a = 2\\nprint('a is', a)\\na + 1", {})
    'a is 2\\n3\\n'
    """
    namespace.setdefault("display", _display)
    tree = ast.parse(code)
    last = tail if tree.body and isinstance(tail := tree.body[-1], ast.Expr) else None
    if last is not None:
        tree.body.pop()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(tree, "<tour>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<tour>", "eval"), namespace)
            if value is not None:
                print(value)
    return out.getvalue()


def tour() -> None:
    """Print the tour: every step's text and what its code shows (its checks run live).

    Shape:
        one section per step.

    >>> tour()  # doctest: +ELLIPSIS
    Convolutions as matrices...
    1. A convolution is a matrix
    ...
    W is (8, 10); checked: W @ x equals F.conv1d(x, w) = [14.0, 20.0, 26.0, ...]
    ...
    """
    namespace: dict[str, Any] = {}
    run_step(SETUP, namespace)
    print("Convolutions as matrices. Run docs/tour.ipynb in Jupyter for the same steps with code "
          "and pictures.\n")  # fmt: skip
    for step in STEPS:
        shown = run_step(step.code, namespace)
        print(f"{step.title}\n{'-' * len(step.title)}\n{step.text.replace('`', '')}\n\n{shown}")


# -- the tour's own pictures ---------------------------------------------------------------

#: The most inputs :func:`plot_scatter` draws (one row each); more would not be readable.
MAX_SCATTER_INPUTS = 32
#: The most outputs :func:`plot_scatter` draws (one column each).
MAX_SCATTER_OUTPUTS = 96


def _vector(value: Any, name: str) -> torch.Tensor:
    """``value`` as a float64 CPU vector; :class:`ConvMatError` unless a non-empty, finite, real
    1-D tensor."""
    if not isinstance(value, torch.Tensor):
        raise ConvMatError(f"{name} must be a 1-D tensor, got {type(value).__name__}")
    if value.dim() != 1 or value.numel() == 0:
        raise ConvMatError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(value.shape)}")
    if value.is_complex() or value.device.type == "meta":
        raise ConvMatError(f"{name} must hold real values, got {value.dtype} on {value.device}")
    vector = value.detach().cpu().double()
    if not bool(vector.isfinite().all()):
        raise ConvMatError(f"{name} must be finite, got {value.tolist()!r}")
    return vector


def _number(value: torch.Tensor) -> str:
    """A value for a picture's cell: 3 significant digits, and 0 never written ``-0``."""
    return f"{value.item() + 0.0:.3g}"


def plot_scatter(
    x: torch.Tensor, weight: torch.Tensor, *, stride: int = 1, dilation: int = 1
) -> Any:
    """The transposed convolution of one signal drawn as a scatter: input ``x[i]`` adds the
    kernel, scaled by ``x[i]``, into the output from position ``stride * i`` on, and the output
    sums the copies.

    One row per input holds its copy (each kernel tap in the colour :func:`convmat.plot_matrix`
    gives it, the cell naming the product, ``2·w1``, and its value); the last row is the output,
    shaded darker where more copies add up. The copies are the columns of W of
    ``F.conv_transpose1d`` (:func:`convmat.conv_transpose_matrix`) scaled by ``x``. Drawn
    without pyplot, as :func:`convmat.plot_matrix` is; Jupyter shows the figure as a PNG.

    Args:
        x: the input, a 1-D tensor of ``n`` values (at most :data:`MAX_SCATTER_INPUTS`).
        weight: the kernel, a 1-D tensor of ``k`` taps.
        stride: the stride of the transposed convolution, an int >= 1.
        dilation: the spacing of the taps, an int >= 1.

    Returns:
        A ``matplotlib.figure.Figure``.

    Raises:
        ConvMatError: for an ``x`` or ``weight`` that is not a non-empty finite real vector, a
            bad ``stride`` or ``dilation``, or more than :data:`MAX_SCATTER_INPUTS` inputs or
            :data:`MAX_SCATTER_OUTPUTS` outputs (checked before anything is drawn); needs
            ``pip install "convmat[plot]"``.

    Shape:
        ``n + 1`` rows by ``(n - 1) * stride + dilation * (k - 1) + 1`` columns (the output).

    >>> fig = plot_scatter(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]), stride=2)
    >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
    ['x1 = 1', 'x2 = 2', 'y = sum']
    >>> [t.get_text() for t in fig.axes[0].texts][3:6]
    ['2·w1\\n= 2', '2·w2\\n= 4', '2·w3\\n= 6']
    """
    from ..engine import conv_transpose_geometry
    from ..matrix import conv_transpose_matrix
    from .plotting import _new_figure
    from .symbolic import symbolic

    xs, taps = _vector(x, "x"), _vector(weight, "weight")
    n, k = len(xs), len(taps)
    geo = conv_transpose_geometry((1, 1, k), n, stride=stride, dilation=dilation)
    (out,) = geo.output_size
    if n > MAX_SCATTER_INPUTS or out > MAX_SCATTER_OUTPUTS:
        raise ConvMatError(
            f"plot_scatter draws at most {MAX_SCATTER_INPUTS} inputs and {MAX_SCATTER_OUTPUTS} "
            f"outputs, got {n} inputs and {out} outputs; draw a shorter x"
        )
    copies = conv_transpose_matrix(taps.view(1, 1, k), n, stride=stride, dilation=dilation).T
    copies = copies * xs[:, None]  # row i: x[i] times column i of W
    sym = symbolic(n, k, stride=stride, dilation=dilation, transposed=True)
    tap = torch.full((n, out), -1, dtype=torch.long)
    tap[sym.cols, sym.rows] = sym.taps[:, 0]  # W's entry (output r, input c) holds tap t
    counts = (tap >= 0).sum(0)

    fig = _new_figure((max(4.0, 0.62 * out + 1.8), 0.6 * (n + 1) + 1.4))
    ax = fig.add_subplot()
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    tap_colour, tap_norm = colormaps["tab20"], Normalize(0, max(k, 1))  # as plot_matrix
    shade, shade_norm = colormaps["Greys"], Normalize(0, int(counts.max()) + 1.5)
    for i, j in zip(*(tap >= 0).nonzero(as_tuple=True)):
        i, j = int(i), int(j)
        t = int(tap[i, j])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=tap_colour(tap_norm(t)),
                               edgecolor="white"))  # fmt: skip
        colour = tap_colour(tap_norm(t))
        ink = (
            "white" if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] < 0.6 else "black"
        )
        ax.text(j, i, f"{_number(xs[i])}·w{t + 1}\n= {_number(copies[i, j])}",
                ha="center", va="center", fontsize=7, color=ink)  # fmt: skip
    for j in range(out):
        ax.add_patch(Rectangle((j - 0.5, n - 0.5), 1, 1, facecolor=shade(shade_norm(counts[j])),
                               edgecolor="white"))  # fmt: skip
        dark = cast(float, shade_norm(counts[j])) > 0.55  # a scalar in, a numpy float out
        ax.text(j, n, _number(copies[:, j].sum()), ha="center", va="center", fontsize=8,
                color="white" if dark else "black")  # fmt: skip
    ax.axhline(n - 0.5, color="black", linewidth=1.5)
    ax.set_xlim(-0.5, out - 0.5)
    ax.set_ylim(n + 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks(range(out), [f"y{j + 1}" for j in range(out)])
    ax.set_yticks(range(n + 1), [f"x{i + 1} = {_number(v)}" for i, v in enumerate(xs)]
                  + ["y = sum"])  # fmt: skip
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(
        f"transposed convolution, stride {stride}: x_i adds x_i·w from output {stride}·i on;\n"
        "y sums the copies (darker: more copies add up there)",
        fontsize=9,
    )
    return fig


def plot_spectrum(
    values: torch.Tensor,
    marks: dict[str, float] | None = None,
    *,
    title: str = "the singular values of W",
) -> Any:
    """Singular values, largest first, with a dashed line at each of ``marks``.

    The legend gives each mark's value and how many singular values lie above it (the
    directions a layer divided by that value would still stretch). Drawn without pyplot, as
    :func:`convmat.plot_matrix` is; Jupyter shows the figure as a PNG.

    Args:
        values: singular values, a non-empty 1-D tensor (any order).
        marks: ``{label: value}`` lines to draw across, such as the number
            ``torch.nn.utils.parametrizations.spectral_norm`` divides by.
        title: the picture's title.

    Returns:
        A ``matplotlib.figure.Figure``.

    Raises:
        ConvMatError: for ``values`` that are not a non-empty finite real vector, or a mark
            that is not a finite real number; needs ``pip install "convmat[plot]"``.

    Shape:
        one point per singular value.

    >>> fig = plot_spectrum(torch.tensor([1.0, 3.0, 2.0]), {"two": 2.0})
    >>> fig.axes[0].get_legend_handles_labels()[1]
    ['3 singular values', 'two = 2 (1 above)']
    """
    from .plotting import _new_figure

    s = _vector(values, "values").sort(descending=True).values
    lines = []
    for label, value in (marks or {}).items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConvMatError(f"marks[{label!r}] must be a finite real number, got {value!r}")
        lines.append((str(label), float(value)))
    fig = _new_figure((7.0, 3.6))
    ax = fig.add_subplot()
    index = torch.arange(1, len(s) + 1)
    ax.plot(index.numpy(), s.numpy(), marker="o", markersize=2, linewidth=1,
            label=f"{len(s)} singular values")  # fmt: skip
    for (label, value), style in zip(lines, ("--", ":", "-.", (0, (5, 1)))):
        above = int((s > value).sum())
        ax.axhline(value, linestyle=style, color="black", linewidth=1,
                   label=f"{label} = {value:.4g} ({above} above)")  # fmt: skip
    ax.set_xlabel("index, largest first")
    ax.set_ylabel("singular value")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=10)
    return fig


# -- the notebook ----------------------------------------------------------------------------

#: The packages whose versions decide the bytes of the notebook's pictures; the generator
#: records them in the notebook's metadata (``convmat.outputs_made_with``).
PICTURE_PACKAGES = ("matplotlib", "pillow")
#: MIME types stored as lists of lines (as nbformat writes them).
_SPLIT_MIMES = ("application/javascript", "image/svg+xml")


def picture_versions() -> dict[str, str]:
    """The installed versions of :data:`PICTURE_PACKAGES` (``"missing"`` for one not installed).

    Returns:
        ``{package: version}``.

    Shape:
        one entry per package.

    >>> sorted(picture_versions()) == sorted(PICTURE_PACKAGES)
    True
    """
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in PICTURE_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def _cell(kind: str, source: str, cell_id: str) -> dict[str, Any]:
    cell: dict[str, Any] = {
        "cell_type": kind,
        "id": cell_id,
        "metadata": {},
        "source": source.splitlines(keepends=True),
    }
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def notebook() -> dict[str, Any]:
    """The tour as a Jupyter notebook (nbformat 4.5, no outputs): per step a Markdown cell, its
    code and its picture. :func:`execute_notebook` runs it.

    Returns:
        The notebook as a JSON-ready dict.

    Shape:
        ``2 + 3 * len(steps())`` cells at most.

    >>> nb = notebook()
    >>> nb["cells"][2]["source"][0]
    '## 1. A convolution is a matrix\\n'
    """
    cells = [_cell("markdown", _INTRO, "intro"), _cell("code", SETUP, "setup")]
    for i, step in enumerate(STEPS, 1):
        cells.append(_cell("markdown", f"## {step.title}\n\n{step.text}", f"step{i}-text"))
        cells.append(_cell("code", step.code, f"step{i}-code"))
        if step.picture:
            cells.append(_cell("code", step.picture, f"step{i}-picture"))
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _stored(output: dict[str, Any]) -> dict[str, Any]:
    """An output as the file keeps it: plain JSON, multi-line text as lists of lines."""
    out: dict[str, Any] = json.loads(json.dumps(output))
    if isinstance(out.get("text"), str):
        out["text"] = out["text"].splitlines(keepends=True)
    data = out.get("data", {})
    for key, value in data.items():
        if isinstance(value, str) and (key.startswith("text/") or key in _SPLIT_MIMES):
            data[key] = value.splitlines(keepends=True)
    return out


def _merged(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive stream outputs of one stream as one, as Jupyter shows them: how the kernel
    cuts a cell's printing into messages depends on timing, so the file must not."""
    merged: list[dict[str, Any]] = []
    for out in outputs:
        last = merged[-1] if merged else {}
        if out["output_type"] == last.get("output_type") == "stream" and (
            out["name"] == last["name"]
        ):
            last["text"] = "".join(last["text"] + out["text"]).splitlines(keepends=True)
        else:
            merged.append(out)
    return merged


def execute_notebook(
    nb: dict[str, Any] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    timeout: int = 600,
) -> dict[str, Any]:
    """Run a notebook (the tour's by default) in a fresh Jupyter kernel and return it with every
    cell's outputs and execution count, as the repository stores ``docs/tour.ipynb``.

    Nothing that changes between runs is kept: no timings, consecutive printed outputs as one
    (however the kernel cut them into messages), and the notebook's metadata is the
    given one plus the versions of the packages that draw the pictures
    (:func:`picture_versions`), so a second run of unchanged code gives the same file. Needs
    nbclient and ipykernel (``pip install -e ".[test]"``).

    Args:
        nb: the notebook (a dict in the form :func:`notebook` returns); the tour by default.
        cwd: the directory the kernel runs in (a new temporary one by default).
        timeout: the most seconds one cell may run.

    Returns:
        A new notebook dict, with outputs.

    Raises:
        ConvMatError: without nbclient, or when a cell fails (naming the cell and the error).

    Shape:
        the cells of ``nb``.

    >>> code = "import time\\nprint(6)\\ntime.sleep(0.5)  # 6 goes out alone\\nprint(7)"
    >>> nb = {**notebook(), "cells": [_cell("code", code, "answer")]}
    >>> [(out["name"], out["text"]) for out in execute_notebook(nb)["cells"][0]["outputs"]]
    [('stdout', ['6\\n', '7\\n'])]
    """
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConvMatError(
            'running the notebook needs nbclient and ipykernel: pip install -e ".[test]"'
        ) from None
    source = notebook() if nb is None else nb
    node = nbformat.reads(json.dumps(source), as_version=4)  # joins the lines of the sources
    with contextlib.ExitStack() as stack:
        where = cwd if cwd is not None else stack.enter_context(tempfile.TemporaryDirectory())
        resources = {"metadata": {"path": str(where)}}
        client = NotebookClient(node, timeout=timeout, kernel_name="python3",
                                record_timing=False, resources=resources)  # fmt: skip
        try:
            client.execute()
        except CellExecutionError as e:
            errors = [
                (cell.get("id"), out)
                for cell in node.cells
                for out in cell.get("outputs", [])
                if out.get("output_type") == "error"
            ]
            cell_id, out = errors[0] if errors else (None, {"ename": type(e).__name__})
            raise ConvMatError(
                f"cell {cell_id!r} of the notebook failed: {out['ename']}: {out.get('evalue', e)}"
            ) from None
    result = copy.deepcopy(source)
    for cell, ran in zip(result["cells"], node.cells):
        if cell["cell_type"] == "code":
            cell["execution_count"] = ran.get("execution_count")
            cell["outputs"] = _merged([_stored(out) for out in ran.get("outputs", [])])
    result["metadata"] = {
        **source["metadata"],
        "convmat": {"outputs_made_with": picture_versions()},
    }
    return result


def notebook_text(nb: dict[str, Any] | None = None) -> str:
    """A notebook as the text of its ``.ipynb`` file, as nbformat writes it (keys sorted,
    one-space indents, text as lists of lines), so files compare and diff cleanly.

    Args:
        nb: a notebook dict; :func:`notebook` (the tour without outputs) by default.

    Returns:
        JSON ending in a newline.

    Shape:
        as ``nb``.

    >>> import json
    >>> json.loads(notebook_text())["nbformat"]
    4
    """
    nb = copy.deepcopy(notebook() if nb is None else nb)
    for cell in nb["cells"]:
        if isinstance(cell.get("source"), str):
            cell["source"] = cell["source"].splitlines(keepends=True)
        if cell["cell_type"] == "code":
            cell["outputs"] = [_stored(out) for out in cell.get("outputs", [])]
    return (
        json.dumps(nb, indent=1, sort_keys=True, separators=(",", ": "), ensure_ascii=False) + "\n"
    )


def write_notebook(path: str | os.PathLike[str], *, execute: bool = True) -> Path:
    """Write the tour as a notebook (``docs/tour.ipynb`` in the repository), run in a fresh
    Jupyter kernel so that it is stored with its outputs (:func:`execute_notebook`) unless
    ``execute=False``. The file is written whole or not at all.

    Args:
        path: the ``.ipynb`` file to write.
        execute: run the notebook and store its outputs.

    Returns:
        The path written.

    Raises:
        ConvMatError: for a ``path`` that does not end in ``.ipynb`` or is in a directory that
            does not exist (before anything runs), as :func:`execute_notebook`, or when the file
            cannot be written.

    Shape:
        as :func:`notebook`.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write_notebook(os.path.join(d, "tour.ipynb"), execute=False).stat().st_size > 1000
    True
    """
    from .plotting import _output_path, _write_atomically

    p = _output_path(path, (".ipynb",))  # checked before the notebook runs
    text = notebook_text(execute_notebook() if execute else notebook())
    _write_atomically(p, lambda f: f.write(text.encode("utf-8")))
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m convmat.presentation.tour [--no-execute] NOTEBOOK.ipynb``: write the tour's
    notebook, executed unless ``--no-execute``; returns the exit status.

    Args:
        argv: the arguments (``sys.argv[1:]`` by default).

    Returns:
        0 when written, 2 for a mistake (said in one line).

    Shape:
        one line printed.
    """
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    execute = "--no-execute" not in args
    paths = [a for a in args if a != "--no-execute"]
    if len(paths) != 1 or paths[0].startswith("-"):
        print("usage: python -m convmat.presentation.tour [--no-execute] NOTEBOOK.ipynb",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        print(f"wrote {write_notebook(paths[0], execute=execute)}")
    except ConvMatError as e:
        print(f"convmat tour: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m convmat.presentation.tour docs/tour.ipynb
    raise SystemExit(main())
