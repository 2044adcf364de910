"""The engine's per-axis rules (engine/axes.py and the Geometry methods over them) against
torch's own convolutions of one-hot inputs and kernels, and the engine's argument checks."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from convmat import ConvMatError, _typing
from convmat.engine import (
    PADDING_MODES,
    Geometry,
    adaptive_window,
    check_count,
    check_int,
    check_shape,
    conv_geometry,
    conv_transpose_geometry,
    coupling_reach,
    most_reads,
    natural_size,
    read_by,
    reads,
    tap_reading,
)

ROOT = Path(__file__).resolve().parent.parent


@st.composite
def axes_1d(draw, modes=tuple(PADDING_MODES)):
    """One axis of a convolution torch accepts: ``(size, k, s, d, before, after, mode)``."""
    k, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    before, after = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    mode = draw(st.sampled_from(modes))
    lo = max(1, d * (k - 1) + 1 - before - after)
    if mode == "reflect":
        lo = max(lo, before + 1, after + 1)
    if mode == "circular":
        lo = max(lo, before, after)
    size = draw(st.integers(lo, lo + 8))
    return size, k, s, d, before, after, mode


def _one_hot_taps(size, k, s, d, before, after, mode):
    """``hit[m, o, j]``: output ``o`` reads input ``j`` through tap ``m``, by torch: the inputs
    are the unit vectors, the kernels the unit taps, the padding torch's own ``F.pad``."""
    eye = torch.eye(size, dtype=torch.float64)[:, None, :]  # (j, 1, size)
    kernels = torch.eye(k, dtype=torch.float64)[:, None, :]  # (m, 1, k)
    torch_mode = PADDING_MODES[mode].torch_pad_mode
    padded = F.pad(eye, (before, after), mode=torch_mode)
    y = F.conv1d(padded, kernels, stride=s, dilation=d)  # (j, m, o)
    return y.permute(1, 2, 0)


@given(axes_1d())
def test_taps_are_the_reads_of_torchs_convolution(axis):
    size, k, s, d, before, after, mode = axis
    geo = conv_geometry((1, 1, k), size, stride=s, dilation=d, padding=((before, after),),
                        padding_mode=mode)  # fmt: skip
    cols, valid = geo.taps(0)
    assert cols.shape == valid.shape == (geo.output_size[0], k)
    mine = torch.zeros(k, geo.output_size[0], size, dtype=torch.float64)
    o, m = torch.nonzero(valid, as_tuple=True)
    mine[m, o, cols[o, m]] = 1.0
    torch.testing.assert_close(mine, _one_hot_taps(*axis), rtol=0, atol=0)
    # before the padding mode: the plain rule o*s + m*d - before, and its inverses
    raw = reads(torch.arange(geo.output_size[0])[:, None], torch.arange(k), s, d, before)
    assert torch.equal(raw, geo.reads(0, torch.arange(geo.output_size[0])[:, None],
                                      torch.arange(k)))  # fmt: skip
    if mode == "zeros":
        assert torch.equal(cols[valid], raw[valid])
    back, exact = read_by(raw, torch.arange(k), s, d, before)
    assert bool(exact.all()) and torch.equal(back, torch.arange(geo.output_size[0])[:, None]
                                             .expand_as(back))  # fmt: skip
    tap, exact = tap_reading(raw, torch.arange(geo.output_size[0])[:, None], s, d, before)
    assert bool(exact.all()) and torch.equal(tap, torch.arange(k).expand_as(tap))


@given(axes_1d(modes=("zeros",)), st.integers(0, 3))
def test_transposed_taps_are_the_reads_of_torchs_transposed_convolution(axis, extra):
    size, k, s, d, before, after, _ = axis
    i = size  # the transposed layer's input
    op = extra % max(s, d)
    out = (i - 1) * s - before - after + d * (k - 1) + op + 1
    assume(out >= 1)
    geo = conv_transpose_geometry((1, 1, k), i, stride=s, dilation=d,
                                  padding=((before, after),), output_padding=op)  # fmt: skip
    assert geo.output_size == (out,)
    cols, valid = geo.taps(0)
    mine = torch.zeros(k, out, i, dtype=torch.float64)
    r, m = torch.nonzero(valid, as_tuple=True)
    mine[m, r, cols[r, m]] = 1.0
    # torch: unpadded transposed convolution of every unit input with every unit tap, then
    # the layer's window of it (the pads cropped, output_padding zero-extended)
    eye = torch.eye(i, dtype=torch.float64)[:, None, :]
    kernels = torch.eye(k, dtype=torch.float64)[None, :, :]  # (1, m, k): C_in 1, C_out k
    full = F.conv_transpose1d(eye, kernels, stride=s, dilation=d)  # (j, m, L)
    full = F.pad(full, (0, max(0, before + out - full.shape[2])))
    ref = full[:, :, before : before + out].permute(1, 2, 0)
    torch.testing.assert_close(mine, ref, rtol=0, atol=0)


@given(axes_1d(modes=("zeros",)))
def test_natural_size_is_what_the_windows_read(axis):
    size, k, s, d, before, after, _ = axis
    geo = conv_geometry((1, 1, k), size, stride=s, dilation=d, padding=((before, after),))
    natural = natural_size(geo.output_size[0], k, s, d)
    assert geo.natural_size == (natural,) and natural <= geo.padded_size[0]
    # torch reads padded position natural - 1 and nothing after it
    padded = torch.zeros(1, 1, geo.padded_size[0], dtype=torch.float64)
    padded[..., natural - 1] = 1.0
    ones = torch.ones(1, 1, k, dtype=torch.float64)
    assert F.conv1d(padded, ones, stride=s, dilation=d).sum() == 1
    padded.zero_()
    padded[..., natural:] = 1.0
    assert F.conv1d(padded, ones, stride=s, dilation=d).sum() == 0


@given(axes_1d(modes=("zeros",)))
def test_gram_reach_bounds_the_band_of_torchs_gram_matrices(axis):
    size, k, s, d, before, after, _ = axis
    geo = conv_geometry((1, 1, k), size, stride=s, dilation=d, padding=((before, after),))
    W = _one_hot_taps(*axis).sum(0)  # an all-ones kernel: no cancellation
    for side, gram in (("input", W.T @ W), ("output", W @ W.T)):
        reach = geo.gram_reach(side)[0]
        assert reach == min(coupling_reach(k, s, d, side), gram.shape[0] - 1)
        i, j = torch.nonzero(gram, as_tuple=True)
        assert max((i - j).abs().tolist(), default=0) <= reach, side


@given(st.integers(1, 30), st.integers(1, 30))
def test_adaptive_window_is_torchs(size, outputs):
    eye = torch.eye(size, dtype=torch.float64)[:, None, :]
    pooled = F.adaptive_avg_pool1d(eye, outputs)[:, 0, :].T  # (o, j)
    start, end = adaptive_window(torch.arange(outputs), size, outputs)
    j = torch.arange(size)
    assert torch.equal(pooled != 0, (j >= start[:, None]) & (j < end[:, None]))
    assert torch.equal(1 / (end - start).double(), pooled.max(1).values)


@given(st.lists(st.integers(-3, 12), max_size=40), st.integers(1, 10))
def test_most_reads_counts(positions, size):
    inside = [p for p in positions if 0 <= p < size]
    expected = max((inside.count(p) for p in inside), default=0)
    assert most_reads(torch.tensor(positions, dtype=torch.int64), size) == expected


@given(st.integers(-50, 50), st.integers(0, 6), st.integers(1, 5), st.integers(1, 4),
       st.integers(0, 5))  # fmt: skip
def test_read_by_inverts_reads_on_the_integers(position, tap, stride, dilation, before):
    out, exact = read_by(position, tap, stride, dilation, before)
    assert exact == any(reads(o, tap, stride, dilation, before) == position
                        for o in range(-100, 100))  # fmt: skip
    if exact:
        assert reads(out, tap, stride, dilation, before) == position


def test_rules_take_numpy_too():
    np = pytest.importorskip("numpy")
    got = reads(np.arange(3)[:, None], np.arange(2)[None, :], 2, 3, 1)
    assert got.tolist() == reads(torch.arange(3)[:, None], torch.arange(2), 2, 3, 1).tolist()


# -- construction from channel counts ---------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
def test_from_channels_is_the_weight_shapes_geometry(transposed):
    kw = dict(stride=2, padding=1, dilation=(1, 2), groups=2)
    geo = Geometry.from_channels((7, 9), 3, in_channels=4, out_channels=6,
                                 transposed=transposed, **kw)  # fmt: skip
    make = conv_transpose_geometry if transposed else conv_geometry
    assert geo == make(geo.weight_shape, (7, 9), **kw)
    assert geo.weight_shape == ((4, 3, 3, 3) if transposed else (6, 2, 3, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(in_channels=0), "in_channels must be an int >= 1, got 0"),
        (dict(out_channels=True), "out_channels must be an int >= 1, got True"),
        (dict(groups=1.5), "groups must be an int >= 1, got 1.5"),
        (dict(in_channels=3, groups=2, out_channels=2),
         "in_channels must be divisible by groups, got in_channels=3 with groups=2"),
        (dict(transposed=1), "transposed must be True or False, got 1"),
        (dict(padding_mode="mirror"), "padding_mode must be one of"),
    ],
)  # fmt: skip
def test_from_channels_errors(kwargs, message):
    with pytest.raises(ConvMatError, match=re.escape(message)):
        Geometry.from_channels(8, 3, **kwargs)


# -- the argument checks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1.5, "stride"), "stride must be an int, got 1.5"),
        ((True, "k", 1), "k must be an int >= 1, got True"),
        (("3", "k", 0), "k must be an int >= 0, got '3'"),
        ((0, "fps", 1, 50), "fps must be an int from 1 to 50, got 0"),
        ((51, "fps", 1, 50), "fps must be an int from 1 to 50, got 51"),
        ((2**63, "n"), "n must fit in a 64-bit integer (as in torch), got 9223372036854775808"),
    ],
)
def test_check_int_errors(args, message):
    with pytest.raises(ConvMatError, match=re.escape(message)):
        check_int(*args)


def test_checks_accept_integers_of_any_kind():
    np = pytest.importorskip("numpy")
    assert check_int(np.int64(3), "n", 1) == 3 and check_count(torch.tensor(2), "c") == 2
    assert check_shape([np.int32(3), 8], "s", "a shape") == (3, 8)


@pytest.mark.parametrize("value", [(), "38", (3, 0), (3, 1.0), (True, 2), 3, None])
def test_check_shape_errors(value):
    with pytest.raises(ConvMatError, match=re.escape(f"s must be a shape, got {value!r}")):
        check_shape(value, "s", "a shape")


# -- the padding modes: one registry ----------------------------------------------------------


def test_padding_mode_names_are_the_registrys():
    assert typing.get_args(_typing.PaddingMode) == tuple(PADDING_MODES)
    page = (ROOT / "convmat" / "presentation" / "explorer.html").read_text(encoding="utf-8")
    listed = re.search(r"const MODES = \[([^\]]*)\]", page)
    assert listed is not None
    assert tuple(re.findall(r'"(\w+)"', listed.group(1))) == tuple(PADDING_MODES)
    assert {m.label for m in PADDING_MODES.values()} == {"zero", "reflect", "replicate",
                                                         "circular"}  # fmt: skip


def test_only_circular_padding_is_periodic():
    """``periodic``: the padded input repeats the input, by torch's own padding."""
    x = torch.arange(1.0, 6.0).reshape(1, 1, 5)
    for name, mode in PADDING_MODES.items():
        padded = F.pad(x, (5, 5), mode=mode.torch_pad_mode) if name != "reflect" else None
        repeats = padded is not None and torch.equal(padded, x.repeat(1, 1, 3))
        assert mode.periodic == repeats == (name == "circular"), name
