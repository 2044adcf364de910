"""conv_matrix(..., flip=True): the true (flipped-kernel) convolution, against numpy and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from convmat import ConvMatError, conv_matrix

MODES = ("full", "same", "valid")


def pads_for(mode: str, k: int) -> tuple[int, int]:
    """The (before, after) zeros that make a correlation with the flipped kernel match
    numpy/scipy's ``mode`` (scipy centres 'same' on the 'full' output)."""
    return {"full": (k - 1, k - 1), "same": (k // 2, (k - 1) // 2), "valid": (0, 0)}[mode]


def reference(x: np.ndarray, w: np.ndarray, mode: str) -> np.ndarray:
    """``y[o] = sum_c convolve(x[c], w[o, c], mode)`` for x ``(C_in, *n)``, w ``(C_out, C_in,
    *k)``."""
    conv = scipy.signal.convolve2d if x.ndim == 3 else scipy.signal.convolve
    return np.stack([sum(conv(xc, wc, mode) for xc, wc in zip(x, wo)) for wo in w])


@st.composite
def cases(draw, ndim: int):
    n = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    k = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    mode = draw(st.sampled_from(MODES))
    if mode == "valid":
        assume(all(ki <= ni for ki, ni in zip(k, n)))
    cin, cout = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return n, k, mode, cin, cout, seed


def check(n, k, mode, cin, cout, seed, layout=torch.strided):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cin, *n))
    w = rng.standard_normal((cout, cin, *k))
    pads = tuple(pads_for(mode, ki) for ki in k)
    W = conv_matrix(torch.from_numpy(w), n, padding=pads, flip=True, layout=layout)
    if layout != torch.strided:
        W = W.to_dense()
    y = W.numpy() @ x.reshape(-1)
    expected = reference(x, w, mode)
    np.testing.assert_allclose(y, expected.reshape(-1), rtol=0, atol=1e-12)


@given(cases(1))
def test_1d_against_scipy_convolve(case):
    check(*case)


@given(cases(2))
def test_2d_against_scipy_convolve2d(case):
    check(*case)


@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from(MODES), st.integers(0, 2**16))
def test_single_channel_against_numpy_convolve(n, k, mode, seed):
    # numpy.convolve swaps its arguments when the kernel is the longer one ('same' then has the
    # kernel's length); draw cases where it does not.
    assume(k <= n)
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(n), rng.standard_normal(k)
    W = conv_matrix(torch.from_numpy(w).view(1, 1, k), n, padding=(pads_for(mode, k),), flip=True)
    np.testing.assert_allclose(W.numpy() @ x, np.convolve(x, w, mode), rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr])
def test_sparse_layouts(layout):
    check((5, 6), (3, 2), "full", 2, 3, 7, layout=layout)
    check((9,), (4,), "same", 3, 2, 8, layout=layout)


@given(
    st.integers(3, 8),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    st.integers(0, 2**16),
)
def test_flip_is_correlation_with_flipped_kernel(n, k, stride, dilation, mode, seed):
    # The one-line relationship: W_conv(w) = W_corr(flip(w)), for every configuration.
    assume(dilation * (k - 1) + 1 <= n)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 3, k, k, dtype=torch.float64, generator=gen)
    kw = dict(stride=stride, dilation=dilation, padding=1, padding_mode=mode)
    flipped = conv_matrix(w, (n, n), flip=True, **kw)
    assert torch.equal(flipped, conv_matrix(w.flip(2, 3), (n, n), **kw))


def test_gradient_flows_to_the_unflipped_weight():
    w = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64, requires_grad=True)
    x = torch.arange(1.0, 7.0, dtype=torch.float64)
    (conv_matrix(w, 6, flip=True) @ x).sum().backward()
    # y[n] = x[n+2] w1 + x[n+1] w2 + x[n] w3: d(sum y)/dw1 = x3+x4+x5+x6, ...
    assert w.grad.tolist() == [[[18.0, 14.0, 10.0]]]


def test_groups():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((4, 6)), rng.standard_normal((2, 2, 3))
    W = conv_matrix(torch.from_numpy(w), 6, groups=2, padding=((2, 2),), flip=True)
    expected = [sum(np.convolve(xc, wc, "full") for xc, wc in zip(x[2 * o:2 * o + 2], w[o]))
                for o in range(2)]  # fmt: skip
    np.testing.assert_allclose(W.numpy() @ x.reshape(-1), np.concatenate(expected), atol=1e-12)


@pytest.mark.parametrize("flip", ["yes", 1, None])
def test_flip_must_be_a_bool(flip):
    with pytest.raises(ConvMatError, match=rf"flip must be True or False, got {flip!r}"):
        conv_matrix(torch.ones(1, 1, 3), 5, flip=flip)
