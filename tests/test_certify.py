"""The tight certificate (an inertia test by sparse Cholesky) against dense SVD in float64."""

import math
import sys

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from convmat import ConvMatError
from convmat.analysis.certify import (
    _elimination_order,
    _gram,
    _gram_lower,
    _gram_side,
    _row_count_bound,
    certify_upper,
    nested_dissection,
)
from convmat.analysis.cholmod import _known as cholmod_known
from convmat.analysis.cholmod import library, load_cvxopt
from convmat.analysis.operator import ConvOperator
from convmat.engine import conv_geometry, conv_transpose_geometry

pytest.importorskip("cvxopt")

EPS = 1e-6


@st.composite
def layers(draw, modes=("zeros", "reflect", "replicate", "circular")):
    """A small random convolution (any padding mode, stride, dilation, groups, or transposed)
    with its float64 weight and geometry."""
    ndim = draw(st.integers(1, 2))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
    size = tuple(draw(st.integers(3, 9 if ndim == 1 else 6)) for _ in range(ndim))
    mode = "zeros" if transposed else draw(st.sampled_from(modes))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    try:
        if transposed:
            shape = (cin, cout // groups, *kernel)
            geo = conv_transpose_geometry(
                shape, size, stride=stride, padding=padding, groups=groups, dilation=dilation
            )
        else:
            shape = (cout, cin // groups, *kernel)
            geo = conv_geometry(
                shape, size, stride=stride, padding=padding, dilation=dilation, groups=groups,
                padding_mode=mode,
            )  # fmt: skip
    except ConvMatError:
        assume(False)
        raise
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    return weight, geo


def dense(weight, geo):
    return ConvOperator.from_geometry(weight, geo).to_dense()


def sigma_max(weight, geo):
    return torch.linalg.svdvals(dense(weight, geo))[0].item()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers())
def test_certificate_holds_at_the_true_norm_and_fails_below(case):
    weight, geo = case
    sigma = sigma_max(weight, geo)
    assume(sigma > 1e-3)
    upper, certified, info = certify_upper(weight, geo, sigma**2, eps=EPS)
    assert certified, info
    assert sigma <= upper <= sigma * math.sqrt(1 + EPS) * (1 + 1e-12)
    assert info["margin"] < EPS / 2
    low = certify_upper(weight, geo, sigma**2 * (1 - 1e-4), eps=EPS)
    assert not low.certified
    assert low.upper == math.inf
    assert low.info["failed_column"] is not None


@settings(max_examples=40, deadline=None)
@given(layers(modes=("zeros",)))
def test_gram_blocks_equal_the_dense_gram(case):
    weight, geo = case
    conv = geo.matching_conv
    side, size, channels, reach = _gram_side(conv)
    row, col, values, _ = _gram_lower(weight, conv, side, reach)
    w = dense(weight, conv)
    gram = w @ w.T if side == "output" else w.T @ w
    positions = math.prod(size)
    # C order (channel, position) -> channels-last (position, channel)
    perm = (np.arange(positions)[:, None] + positions * np.arange(channels)[None, :]).ravel()
    expected = gram[perm][:, perm].numpy()
    built = np.zeros_like(expected)
    np.add.at(built, (row, col), values)
    assert (row >= col).all()
    np.testing.assert_allclose(built, np.tril(expected), rtol=1e-12, atol=1e-12)


def test_a_strided_and_a_large_kernel_layer():
    gen = torch.Generator().manual_seed(1)
    for shape, size, config in [
        ((8, 3, 7, 7), (16, 16), dict(stride=2, padding=3)),
        ((6, 4, 3, 3), (10, 12), dict(stride=(2, 1), padding=1, dilation=(1, 2))),
        ((4, 4, 3, 3, 3), (5, 5, 5), dict(padding=1)),
        # inputs that no tap reaches: rows of zeros in W^T W, folded and not
        ((1, 1, 1, 1), (3, 3), dict(stride=(2, 1), padding=(0, 1), padding_mode="reflect")),
        ((2, 3, 1, 1), (5, 5), dict(stride=2)),
    ]:
        weight = torch.randn(shape, generator=gen, dtype=torch.float64)
        geo = conv_geometry(shape, size, **config)
        sigma = sigma_max(weight, geo)
        upper, certified, _ = certify_upper(weight, geo, sigma**2)
        assert certified
        assert sigma <= upper <= sigma * (1 + EPS)
        assert not certify_upper(weight, geo, sigma**2 * (1 - 1e-5)).certified


def test_float32_weight_and_tensor_theta():
    weight = torch.randn(3, 2, 3, 3)
    geo = conv_geometry(weight.shape, (6, 6), padding=1)
    sigma = sigma_max(weight.double(), geo)
    cert = certify_upper(weight, geo, torch.tensor(sigma**2))
    assert cert.certified and cert.upper >= sigma


def test_nested_dissection_is_a_permutation():
    for size, reach in [((1,), (0,)), ((30,), (2,)), ((17, 23), (1, 3)), ((9, 8, 7), (1, 1, 2))]:
        order = nested_dissection(size, reach)
        assert sorted(order.tolist()) == list(range(math.prod(size)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(theta=0.0), "theta must be a finite number > 0, got 0.0"),
        (dict(theta=float("nan")), "theta must be a finite number > 0"),
        (dict(theta="1"), "theta must be a finite number > 0, got '1'"),
        (dict(theta=1.0, eps=0.0), r"eps must be a number in \(0, 0.01\], got 0.0"),
        (dict(theta=1.0, eps=0.5), r"eps must be a number in \(0, 0.01\], got 0.5"),
    ],
)
def test_bad_arguments(kwargs, match):
    weight = torch.randn(2, 2, 3)
    geo = conv_geometry(weight.shape, 8)
    with pytest.raises(ConvMatError, match=match):
        certify_upper(weight, geo, **kwargs)


def test_bad_weight_and_geometry():
    geo = conv_geometry((2, 2, 3), 8)
    with pytest.raises(ConvMatError, match=r"weight must have shape \(2, 2, 3\)"):
        certify_upper(torch.randn(2, 2, 5), geo, 1.0)
    with pytest.raises(ConvMatError, match="geometry must be a Geometry, got tuple"):
        certify_upper(torch.randn(2, 2, 3), (8,), 1.0)
    with pytest.raises(ConvMatError, match="weight must be finite"):
        certify_upper(torch.full((2, 2, 3), float("inf")), geo, 1.0)


def test_missing_cvxopt_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cvxopt", None)
    geo = conv_geometry((2, 2, 3), 8)
    with pytest.raises(ConvMatError, match=r'pip install "convmat\[certify\]"'):
        certify_upper(torch.randn(2, 2, 3), geo, 1.0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers())
def test_the_row_count_bound_holds_for_the_order_factored(case):
    """``k`` (and the bound on the factor's entries) bound the factor of the Gram side in the
    order it is factored in: the longest row of L and its non-zeros, L from CHOLMOD directly."""
    weight, geo = case
    conv = geo.matching_conv
    side, size, channels, reach = _gram_side(conv)
    n = math.prod(size) * channels
    cvxopt = load_cvxopt()
    perm, k, nnz_bound = _elimination_order(conv, side, size, channels, reach, cvxopt)
    row, col, values, on_diag, diag, _, _ = _gram(weight, conv, side, size, channels, reach)
    values[on_diag] += diag.sum() + 1.0  # positive definite, the same pattern
    with library().factor(row, col, values, perm, n) as f:
        assert f.failed_column is None
        lower = f.lower().tocsr()
    lower.eliminate_zeros()  # relaxed supernodes store exact zeros; k bounds the rest
    assert k >= np.diff(lower.indptr).max()
    assert nnz_bound >= lower.nnz


@pytest.mark.parametrize("side", [5, 8])
def test_the_row_count_bound_is_of_the_given_order(side):
    """On a grid in a poor order (one where another order has less fill, which cvxopt's default
    would pick instead), the bound is the given order's: the factor's longest row and entries
    in that order reach it exactly."""
    a, order = cholmod_known(side)
    pattern = scipy.sparse.csr_matrix(np.tril(a) != 0)
    k, nnz = _row_count_bound(pattern, order, 1, load_cvxopt())
    row, col = np.nonzero(np.tril(a))
    with library().factor(row, col, a[row, col], order, len(a)) as f:
        lower = f.lower().tocsr()
    lower.eliminate_zeros()
    assert (k, nnz) == (np.diff(lower.indptr).max(), lower.nnz)
