"""singular_values and operator_norm against dense SVD of conv_matrix (float64)."""

from __future__ import annotations

import pytest
import torch
from convmat.analysis.spectral import operator_norm, singular_values
from hypothesis import given
from hypothesis import strategies as st

from convmat import ConvMatError, conv_matrix, conv_transpose_matrix
from convmat.analysis import spectral

from .reference import conv_configs, conv_transpose_configs


def dense(cfg, w):
    fn = conv_transpose_matrix if cfg.transposed else conv_matrix
    return fn(w, cfg.input_size, **cfg.matrix_kwargs())


def spectrum(cfg, w, **kw):
    return singular_values(
        w, cfg.input_size, transposed=cfg.transposed, **cfg.matrix_kwargs(), **kw
    )


@st.composite
def torus_configs(draw):
    """Circular padding whose windows tile the input: the exact FFT / polyphase method."""
    n = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.integers(1, 2))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    s = tuple(draw(st.integers(1, 3)) for _ in range(n))
    d = tuple(draw(st.integers(1, 2)) for _ in range(n))
    k = tuple(draw(st.integers(1, 3)) for _ in range(n))
    m = tuple(draw(st.integers(1, {1: 6, 2: 3, 3: 2}[n])) for _ in range(n))
    size = tuple(mm * ss for mm, ss in zip(m, s))
    pads = []
    for kk, dd, i in zip(k, d, size):
        total = dd * (kk - 1)
        if total > 2 * i:
            return None  # circular padding may wrap around once at most
        before = draw(st.integers(max(0, total - i), min(total, i)))
        pads.append((before, total - before))
    if any(b > i or a > i for (b, a), i in zip(pads, size)):
        return None
    w = torch.randn(cout, cin // groups, *k, dtype=torch.float64)
    return (
        w,
        size,
        dict(stride=s, dilation=d, padding=tuple(pads), groups=groups, padding_mode="circular"),
    )


@given(case=torus_configs())
def test_fft_and_polyphase_are_exact(case):
    if case is None:
        return
    w, size, kw = case
    values = singular_values(w, size, **kw)
    expected = torch.linalg.svdvals(conv_matrix(w, size, **kw))
    assert values.shape == expected.shape
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-8 * max(1.0, expected[0].item()))
    result = operator_norm(w, size, **kw)
    assert result.method == "fft" and result.lower <= expected[0].item() <= result.upper


@given(
    cfg=st.one_of(conv_configs(dims=(1, 2)), conv_transpose_configs(dims=(1, 2))),
    k=st.integers(1, 3),
)
def test_singular_values_dense_path(cfg, k):
    w = cfg.weight()
    expected = torch.linalg.svdvals(dense(cfg, w))
    torch.testing.assert_close(spectrum(cfg, w), expected, rtol=0, atol=1e-10)
    k = min(k, expected.numel())
    torch.testing.assert_close(spectrum(cfg, w, k=k), expected[:k], rtol=0, atol=1e-10)


@given(cfg=st.one_of(conv_configs(), conv_transpose_configs()))
def test_certified_interval_contains_the_norm(cfg):
    w = cfg.weight()
    expected = torch.linalg.svdvals(dense(cfg, w))[0].item()
    if min(dense(cfg, w).shape) < 3:
        return
    old = spectral.DENSE_LIMIT
    spectral.DENSE_LIMIT = 0  # force the iterative method and the bounds
    try:
        r = operator_norm(w, cfg.input_size, transposed=cfg.transposed, **cfg.matrix_kwargs())
        top = spectrum(cfg, w, k=2)
    finally:
        spectral.DENSE_LIMIT = old
    assert r.method in ("lanczos", "fft", "zero")
    assert r.lower <= expected * (1 + 1e-12) and expected <= r.upper * (1 + 1e-12)
    assert abs(r.value - expected) <= 1e-6 * max(expected, 1e-12) + 1e-12
    torch.testing.assert_close(
        top[0], torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-12
    )


def test_zero_padding_bound_is_tight_and_spectral_norm_is_low():
    """16->16, 3x3 on 16x16 with zero padding: the bound is the circular norm, a few % above."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64, generator=gen) / 12
    old = spectral.DENSE_LIMIT
    spectral.DENSE_LIMIT = 0
    try:
        r = operator_norm(w, (16, 16), padding=1)
    finally:
        spectral.DENSE_LIMIT = old
    exact = torch.linalg.svdvals(conv_matrix(w, (16, 16), padding=1))[0].item()
    # Both ends hold up to rounding: the dense SVD itself is exact only to ~1e-15 relative.
    assert r.lower <= exact * (1 + 1e-12) and exact <= r.upper * (1 + 1e-12)
    assert abs(r.value - exact) <= 1e-6 * exact
    assert r.upper <= 1.1 * exact
    reshaped = torch.linalg.matrix_norm(w.reshape(16, -1), ord=2).item()
    assert reshaped < 0.9 * exact


def test_errors():
    w = torch.randn(2, 2, 3, dtype=torch.float64)
    with pytest.raises(ConvMatError, match=r"k must be between 1 and 16, got 17"):
        singular_values(w, 8, padding=1, k=17)
