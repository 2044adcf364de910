"""Second (and higher) derivatives through the sparse layouts of W, against the dense layout.

W in ``torch.sparse_coo`` or ``torch.sparse_csr`` is built from its values by a function whose
backward gathers the incoming gradient at W's non-zeros (whatever layout that gradient has),
and whose gather has a backward of its own: ``gradgradcheck`` (finite differences of the
analytic first derivative) holds, and Hessian-vector products equal the dense layout's.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from convmat import conv_matrix, conv_transpose_matrix
from convmat.engine import conv_geometry
from convmat.engine.assembly import _values_at
from convmat.engine.pattern import get_pattern

from .reference import conv_configs, conv_transpose_configs

SPARSE = [torch.sparse_coo, torch.sparse_csr]
CONFIGS = st.one_of(conv_configs(dims=(1, 2)), conv_transpose_configs(dims=(1, 2)))


def build(cfg, weight, layout):
    fn = conv_transpose_matrix if cfg.transposed else conv_matrix
    return fn(weight, cfg.input_size, layout=layout, **cfg.matrix_kwargs())


def _hessian_products(cfg, layout, w, x, c, u, v, through):
    """The gradient of ``<grad_w L, u> + <grad_x L, v>`` in ``(w, x)``, for a loss ``L`` with
    non-zero second derivatives in ``w`` and in ``(w, x)`` together."""
    w = w.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    W = build(cfg, w, layout)
    # W @ x: the gradient reaching W comes dense; W.to_dense() @ x: it comes sparse
    dense = W.to_dense() if through == "to_dense" and W.layout != torch.strided else W
    y = dense @ x
    loss = (y * y * c).sum()
    gw, gx = torch.autograd.grad(loss, (w, x), create_graph=True)
    return torch.autograd.grad((gw * u).sum() + (gx * v).sum(), (w, x))


@pytest.mark.parametrize("layout", SPARSE, ids=str)
@pytest.mark.parametrize("through", ["product", "to_dense"])
@settings(max_examples=25)
@given(cfg=CONFIGS, seed=st.integers(0, 2**31 - 1))
def test_hessian_vector_products_equal_the_dense_layouts(cfg, seed, layout, through):
    gen = torch.Generator().manual_seed(seed)
    w = cfg.weight(generator=gen)
    rows, cols = build(cfg, w, torch.strided).shape
    assume(build(cfg, w, torch.sparse_coo)._nnz() > 0)  # some tap reads the input
    x = torch.randn(cols, 2, dtype=torch.float64, generator=gen)
    c = torch.randn(rows, 2, dtype=torch.float64, generator=gen)
    u = torch.randn(w.shape, dtype=torch.float64, generator=gen)
    v = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    sparse = _hessian_products(cfg, layout, w, x, c, u, v, through)
    dense = _hessian_products(cfg, torch.strided, w, x, c, u, v, through)
    for got, want in zip(sparse, dense):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # w enters the loss squared: its second derivative is not zero, so this compares something
    assert dense[0].abs().max() > 0


@pytest.mark.parametrize("layout", SPARSE, ids=str)
@settings(max_examples=20)
@given(cfg=CONFIGS)
def test_gradgradcheck(cfg, layout):
    w = cfg.weight().requires_grad_()
    x = torch.randn(build(cfg, w, torch.strided).shape[1], 2, dtype=torch.float64)
    x.requires_grad_()

    def product(w, x):
        return build(cfg, w, layout) @ x

    def entries(w):
        return build(cfg, w, layout).to_dense()

    assert gradcheck(product, (w, x), fast_mode=True)
    assert gradgradcheck(product, (w, x), fast_mode=True)
    assert gradgradcheck(entries, (w,), fast_mode=True)


def _random_sparse(shape, gen, layout, density=0.3):
    """A random integer-valued matrix in ``layout`` (sums of repeated positions are exact);
    COO left uncoalesced, with repeated positions."""
    rows, cols = shape
    count = max(1, int(density * rows * cols))
    index = torch.stack(
        [
            torch.randint(0, rows, (count,), generator=gen),
            torch.randint(0, cols, (count,), generator=gen),
        ]
    )
    values = torch.randint(-9, 10, (count,), generator=gen).to(torch.float64)
    coo = torch.sparse_coo_tensor(index, values, shape, check_invariants=True)
    if layout == torch.sparse_coo:
        return coo
    if layout == torch.sparse_csr:
        return coo.coalesce().to_sparse_csr()
    return coo.to_dense()


@pytest.mark.parametrize("layout", [torch.strided, *SPARSE], ids=str)
@given(cfg=conv_configs(dims=(1, 2)), seed=st.integers(0, 2**31 - 1), density=st.floats(0, 1))
def test_values_at_reads_any_matrix_at_the_pattern(cfg, seed, density, layout):
    """The gather behind every backward, on matrices whose stored positions differ from W's."""
    w = cfg.weight()
    geo = conv_geometry(w.shape, cfg.input_size, **cfg.matrix_kwargs())
    pattern = get_pattern(geo, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    other = _random_sparse(pattern.shape, gen, layout, density)
    got = _values_at(pattern, other)
    rows, cols = pattern.coo_indices()
    want = other.to_dense()[rows, cols] if layout != torch.strided else other[rows, cols]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("layout", SPARSE, ids=str)
def test_a_gradient_stored_elsewhere_than_w(layout):
    """``(W + S).to_dense()``: the gradient reaching W is stored at the union of both patterns;
    first and second derivatives still equal the dense layout's."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    other = _random_sparse((2 * 16, 2 * 36), gen, torch.sparse_coo).coalesce()
    if layout == torch.sparse_csr:
        other = other.to_sparse_csr()
    c = torch.randn(2 * 16, 2 * 36, dtype=torch.float64, generator=gen)

    def loss(layout):
        W = conv_matrix(w, 6, layout=layout)
        total = (W + other).to_dense() if layout != torch.strided else W + other.to_dense()
        (g,) = torch.autograd.grad((total**2 * c).sum(), w, create_graph=True)
        return g, torch.autograd.grad((g**2).sum(), w)[0]

    for got, want in zip(loss(layout), loss(torch.strided)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
