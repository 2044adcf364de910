"""The guided tour: convolutions as matrices, step by step, each matrix checked against torch.

The steps follow the tutorial the project grew from: a convolution as a matrix; sparse
connection and parameter sharing; a ``Conv1D`` layer that builds W; stride; dilation; padding;
channels; a 2-D convolution as a 1-D one with rows as channels; the transposed convolution as
W transposed; the true (flipped) convolution beside the cross-correlation.

This module is the one source of the tour. Each :class:`Step` holds its text (Markdown) and its
code; ``convmat tour`` runs the code and prints the text and what the code shows, and
:func:`write_notebook` writes the same steps as the notebook ``docs/tour.ipynb``, where each
step also draws its picture. To change the tour, edit the steps here and run
``python -m convmat.presentation.tour docs/tour.ipynb`` (a test checks that the committed
notebook is up to date).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["Step", "notebook", "run_step", "steps", "tour", "write_notebook"]


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

from convmat import (animate, conv2d_as_conv1d, conv_matrix, conv_transpose_matrix,
                     plot_matrix, symbolic, to_matrix)
from convmat.nn import Conv1D"""

_INTRO = """\
# Convolutions as matrices

A convolution layer is a linear map, so it is a matrix W: `conv(x).flatten() == W @ x.flatten()`.
This tour builds W step by step with convmat for every idea of the classic
tutorial: sparse connection and parameter sharing, stride, dilation, padding, channels, 2-D as
1-D, the transposed convolution and the true (flipped) convolution. Every step shows W with its
entries named by kernel taps, draws it, and checks it against torch's own convolution.

`convmat tour` prints the same steps in a terminal; both come from `convmat/presentation/tour.py`
(this notebook is generated from it by `write_notebook`)."""

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
print(f"checked: x @ W.T equals nn.Conv1d(x) (max difference {diff:.0e})")
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
x = torch.randn(2, 1, 10, dtype=torch.float64)
W = conv_matrix(w, 10, stride=2)
assert torch.equal(W, conv_matrix(w, 10)[::2])
diff = (x.flatten(1) @ W.T - F.conv1d(x, w, stride=2).flatten(1)).abs().max().item()
assert diff < 1e-12
print(f"W is {tuple(W.shape)}, every second row of the stride-1 W; "
      f"checked: equals F.conv1d(stride=2) (max difference {diff:.0e})")
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
diff = (x.flatten(1) @ W.T - F.conv1d(x, w, dilation=2).flatten(1)).abs().max().item()
assert diff < 1e-12
both = conv_matrix(w, 10, dilation=2, stride=2)
assert torch.equal(both, W[::2])
print(f"W is {tuple(W.shape)}; checked: equals F.conv1d(dilation=2) (max difference {diff:.0e}),"
      f" and with stride 2 it keeps every second row")
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
w = torch.randn(3, 2, 3, dtype=torch.float64)  # (out_channels, in_channels, kernel)
x = torch.randn(2, 2, 4, dtype=torch.float64)
W = conv_matrix(w, 4)
diff = (x.flatten(1) @ W.T - F.conv1d(x, w).flatten(1)).abs().max().item()
assert diff < 1e-12
assert torch.equal(W[2:4, 4:8], conv_matrix(w[1:2, 1:2], 4))  # block (out 1, in 1)
print(f"W is {tuple(W.shape)}: 3 x 2 blocks of 2 x 4; "
      f"checked: equals F.conv1d (max difference {diff:.0e})")
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
        "9. The transposed convolution is W transposed",
        "If `y = W x`, then `W.T` maps y's size back to x's: the transposed convolution, used to "
        "upsample in\ndecoders. It is the adjoint, not an inverse (`W.T @ W` is not the "
        "identity). Its output size is\n(in - 1) * stride - 2 * padding + dilation * (k - 1) + "
        "output_padding + 1 = 3 * 2 + 2 + 1 = 9 here.",
        """\
w = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
WT = conv_transpose_matrix(w, 4, stride=2)  # 4 inputs -> 9 outputs
W = conv_matrix(w, 9, stride=2)  # the stride-2 convolution: 9 inputs -> 4 outputs
assert torch.equal(WT, W.T)
x = torch.randn(2, 1, 4, dtype=torch.float64)
diff = (x.flatten(1) @ WT.T - F.conv_transpose1d(x, w, stride=2).flatten(1)).abs().max().item()
assert diff < 1e-12
print(f"checked: conv_transpose_matrix(w, 4, stride=2) is conv_matrix(w, 9, stride=2).T, and "
      f"x @ WT.T equals F.conv_transpose1d (max difference {diff:.0e})")
symbolic(4, 3, stride=2, transposed=True)""",
        "animate(None, 4, 3, stride=2, transposed=True)",
    ),
    Step(
        "10. True convolution and cross-correlation",
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
    code and its picture.

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


def notebook_text() -> str:
    """:func:`notebook` as the text of an ``.ipynb`` file (stable, so it can be compared).

    Returns:
        JSON, one-space indented, ending in a newline.

    Shape:
        as :func:`notebook`.

    >>> import json
    >>> json.loads(notebook_text())["nbformat"]
    4
    """
    return json.dumps(notebook(), indent=1, ensure_ascii=False) + "\n"


def write_notebook(path: str | os.PathLike[str]) -> Path:
    """Write the tour as a notebook (``docs/tour.ipynb`` in the repository).

    Args:
        path: the ``.ipynb`` file to write.

    Returns:
        The path written.

    Shape:
        as :func:`notebook`.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     write_notebook(os.path.join(d, "tour.ipynb")).stat().st_size > 1000
    True
    """
    p = Path(path)
    p.write_text(notebook_text(), encoding="utf-8")
    return p


if __name__ == "__main__":  # python -m convmat.presentation.tour docs/tour.ipynb
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m convmat.presentation.tour NOTEBOOK.ipynb")
    print(f"wrote {write_notebook(sys.argv[1])}")
