"""Symbolic W: exact renderings of the seed examples, and labels that evaluate to conv_matrix."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from convmat import ConvMatError, conv_matrix, conv_transpose_matrix
from convmat.presentation.symbolic import symbolic

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
    # Keep the per-entry label check small.
    assume(cfg.ndim == 1 or cfg.in_channels * cfg.out_channels * max(cfg.input_size) <= 24)
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


def _symbolic_of(cfg, flip=False):
    return symbolic(cfg.input_size, cfg.kernel_size, in_channels=cfg.in_channels,
                    out_channels=cfg.out_channels, transposed=cfg.transposed, flip=flip,
                    **cfg.matrix_kwargs())  # fmt: skip


def _matrix_of(cfg, weight, flip=False):
    fn = conv_transpose_matrix if cfg.transposed else conv_matrix
    return fn(weight, cfg.input_size, flip=flip, **cfg.matrix_kwargs())


@given(
    cfg=st.one_of(conv_configs(dims=(1, 2, 3)), conv_transpose_configs(dims=(1, 2, 3))),
    data=st.data(),
    flip=st.booleans(),
)
def test_some_cells_and_rows_match_the_matrix(cfg, data, flip):
    """Labels of a few rows and columns (negative indices included) and the inputs a row reads
    are those of W: structural non-zeros of a W with positive weights; the same for the true
    convolution (``flip=True``), whose rows read the same inputs."""
    s = _symbolic_of(cfg, flip)
    w = cfg.weight().abs() + 1  # positive: folded taps never cancel
    W = _matrix_of(cfg, w, flip)
    n_rows, n_cols = W.shape
    rows = data.draw(st.lists(st.integers(-n_rows, n_rows - 1), min_size=1, max_size=4))
    cols = data.draw(st.lists(st.integers(-n_cols, n_cols - 1), min_size=1, max_size=4))
    got = torch.tensor([[_evaluate(x, w) for x in line] for line in s.labels(rows, cols)],
                       dtype=w.dtype)  # fmt: skip
    # Folded taps may be summed in another order than W's assembly sums them.
    torch.testing.assert_close(got, W[rows][:, cols], rtol=1e-12, atol=0)
    row = rows[0]
    expected = [s.input_label(c) for c in torch.nonzero(W[row]).flatten().tolist()]
    assert s.depends_on(row) == expected
    assert s.describe(row) == f"{s.output_label(row)} depends on {', '.join(expected)}"


def test_large_configurations_print_at_once():
    s = symbolic((512, 512), 3, in_channels=64, out_channels=64)
    assert s.shape == (64 * 510 * 510, 64 * 512 * 512)
    lines = str(s).splitlines()
    assert len(lines) == 18
    assert lines[0].startswith("[[  w[0,0,0,0],   w[0,0,0,1],   w[0,0,0,2],")
    assert (
        lines[-1] == "(16646400 x 16777216: showing 16 rows and 16 columns; '...' marks the rest)"
    )
    assert len(s.depends_on(-1)) == 64 * 9
    assert s.labels([-1], [-1]) == [["w[63,63,2,2]"]]
    assert "<table>" in s._repr_html_()


def test_every_cell_at_once_is_refused_before_allocating():
    s = symbolic((512, 512), 3, in_channels=64, out_channels=64)
    with pytest.raises(ConvMatError, match=r"the labels of 16646400 x 16777216 entries .* needs "
                       r"[\d,]+ bytes.*labels\(rows=\[\.\.\.\], cols"):  # fmt: skip
        s.labels()
    with pytest.raises(
        ConvMatError, match=r"the tap table of every non-zero .* needs [\d,]+ bytes"
    ):
        s.taps  # noqa: B018 - the property is what is tested


def test_full_tap_table_of_a_small_matrix():
    s = symbolic(4, 3, padding=1, padding_mode="reflect")
    assert s.rows.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert s.taps[1].tolist() == [0, 2]  # w1+w3 fold onto x2


def test_indices_follow_sequence_rules():
    s = symbolic(10, 3, stride=2)
    assert s.depends_on(-1) == s.depends_on(3) == ["x7", "x8", "x9"]
    assert s.output_label(-4) == "y1" and s.input_label(-1) == "x10"
    for bad in (4, -5, 100):
        with pytest.raises(IndexError, match=rf"row {bad} is out of range for W's rows \(4; "):
            s.depends_on(bad)
    with pytest.raises(IndexError, match="row 100 is out of range"):
        s.describe(100)
    with pytest.raises(IndexError, match="column 10 is out of range"):
        s.labels([0], [10])
    with pytest.raises(IndexError, match="column -11 is out of range"):
        s.input_label(-11)
    with pytest.raises(TypeError, match=r"row must be an int, got 1.5"):
        s.depends_on(1.5)
    with pytest.raises(TypeError, match=r"row must be an int, got '1'"):
        s.labels(["1"], [0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transposed": "yes"}, "transposed must be True or False, got 'yes'"),
        ({"transposed": 1}, "transposed must be True or False, got 1"),
        ({"transposed": None}, "transposed must be True or False, got None"),
        ({"in_channels": 1.5}, "in_channels must be an int >= 1, got 1.5"),
        ({"in_channels": "2"}, "in_channels must be an int >= 1, got '2'"),
        ({"in_channels": True}, "in_channels must be an int >= 1, got True"),
        ({"in_channels": 0}, "in_channels must be an int >= 1, got 0"),
        ({"in_channels": (2,)}, r"in_channels must be an int >= 1, got \(2,\)"),
        ({"out_channels": -1}, "out_channels must be an int >= 1, got -1"),
        ({"out_channels": 2.0}, "out_channels must be an int >= 1, got 2.0"),
        ({"groups": 0}, "groups must be an int >= 1, got 0"),
        ({"groups": 1.5}, "groups must be an int >= 1, got 1.5"),
        ({"groups": 2, "in_channels": 3, "out_channels": 2},
         "in_channels must be divisible by groups, got in_channels=3 with groups=2"),
        ({"groups": 2, "in_channels": 2, "out_channels": 3},
         "out_channels must be divisible by groups, got out_channels=3 with groups=2"),
        ({"stride": 0}, "stride must be >= 1"),
        ({"padding_mode": "mirror"}, "padding_mode must be one of"),
        ({"transposed": True, "padding": "same"}, "got 'same'"),
        ({"transposed": True, "output_padding": 5}, "output_padding must be >= 0 and smaller"),
    ],
)  # fmt: skip
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConvMatError, match=message):
        symbolic(8, 3, **kwargs)


def test_indices_beyond_int64_are_refused():
    with pytest.raises(
        ConvMatError, match=r"too large to label: its indices must stay below 2\*\*62"
    ):
        symbolic(2**62, 3)
