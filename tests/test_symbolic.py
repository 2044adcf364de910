"""Symbolic W: exact renderings of the seed examples, and labels that evaluate to conv_matrix."""

from __future__ import annotations

import re

import torch
from convmat.presentation.symbolic import symbolic
from hypothesis import given
from hypothesis import strategies as st

from convmat import conv_matrix, conv_transpose_matrix

from .reference import conv_configs, conv_transpose_configs

STRIDE_1 = """\
[[w1, w2, w3,  0,  0,  0,  0,  0,  0,  0],
 [ 0, w1, w2, w3,  0,  0,  0,  0,  0,  0],
 [ 0,  0, w1, w2, w3,  0,  0,  0,  0,  0],
 [ 0,  0,  0, w1, w2, w3,  0,  0,  0,  0],
 [ 0,  0,  0,  0, w1, w2, w3,  0,  0,  0],
 [ 0,  0,  0,  0,  0, w1, w2, w3,  0,  0],
 [ 0,  0,  0,  0,  0,  0, w1, w2, w3,  0],
 [ 0,  0,  0,  0,  0,  0,  0, w1, w2, w3]]"""

STRIDE_2 = """\
[[w1, w2, w3,  0,  0,  0,  0,  0,  0,  0],
 [ 0,  0, w1, w2, w3,  0,  0,  0,  0,  0],
 [ 0,  0,  0,  0, w1, w2, w3,  0,  0,  0],
 [ 0,  0,  0,  0,  0,  0, w1, w2, w3,  0]]"""

DILATION_2 = """\
[[w1,  0, w2,  0, w3,  0,  0,  0,  0,  0],
 [ 0, w1,  0, w2,  0, w3,  0,  0,  0,  0],
 [ 0,  0, w1,  0, w2,  0, w3,  0,  0,  0],
 [ 0,  0,  0, w1,  0, w2,  0, w3,  0,  0],
 [ 0,  0,  0,  0, w1,  0, w2,  0, w3,  0],
 [ 0,  0,  0,  0,  0, w1,  0, w2,  0, w3]]"""


def test_seed_renderings():
    assert str(symbolic(10, 3)) == STRIDE_1
    assert str(symbolic(10, 3, stride=2)) == STRIDE_2
    assert str(symbolic(10, 3, dilation=2)) == DILATION_2


def test_depends_on_and_describe():
    s = symbolic(10, 3, stride=2)
    assert s.depends_on(1) == ["x3", "x4", "x5"]
    assert s.describe(0) == "y1 depends on x1, x2, x3"
    t = symbolic((3, 3), 2, in_channels=2, out_channels=1)
    assert (
        t.describe(0)
        == "y[0,0,0] depends on x[0,0,0], x[0,0,1], x[0,1,0], x[0,1,1], x[1,0,0], x[1,0,1], x[1,1,0], x[1,1,1]"
    )


def test_large_matrices_are_elided():
    text = str(symbolic(1000, 3))
    lines = text.splitlines()
    assert len(lines) == 18  # 16 rows, the '...' row, the note
    assert lines[-1] == "(998 x 1000: showing 16 rows and 16 columns; '...' marks the rest)"
    assert all(line.count(",") <= 17 for line in lines[:-1])
    assert " ...," in lines[8]


def test_html():
    page = symbolic(5, 2, padding=1, padding_mode="circular")._repr_html_()
    assert page.startswith("<table>") and "<th>y1</th>" in page and "<td>w1</td>" in page


def _evaluate(label: str, weight: torch.Tensor) -> float:
    if label == "0":
        return 0.0
    total = 0.0
    for part in label.split("+"):
        if (m := re.fullmatch(r"w(\d+)", part)) is not None:
            total += weight.flatten()[int(m.group(1)) - 1].item()
        else:
            index = tuple(int(v) for v in re.fullmatch(r"w\[([\d,]+)\]", part).group(1).split(","))
            total += weight[index].item()
    return total


@given(cfg=st.one_of(conv_configs(dims=(1, 2)), conv_transpose_configs(dims=(1, 2))))
def test_labels_evaluate_to_conv_matrix(cfg):
    if cfg.ndim == 2 and cfg.in_channels * cfg.out_channels * max(cfg.input_size) > 24:
        return  # keep the per-entry label check small
    kwargs = cfg.matrix_kwargs()
    s = symbolic(
        cfg.input_size,
        cfg.kernel_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        transposed=cfg.transposed,
        **kwargs,
    )
    w = cfg.weight(integer=True)
    fn = conv_transpose_matrix if cfg.transposed else conv_matrix
    expected = fn(w, cfg.input_size, **kwargs)
    got = torch.tensor([[_evaluate(x, w) for x in row] for row in s.labels()], dtype=w.dtype)
    assert torch.equal(got, expected)
    assert s.shape == tuple(expected.shape)
