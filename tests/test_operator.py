"""ConvOperator: forward equals torch's convolution, the adjoint equals torch's gradient, the
adjoint objects, the cache of the flipped kernel, scipy interoperability."""

from __future__ import annotations

import gc
from unittest.mock import patch

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from convmat import ConvMatError, cache_info, clear_cache, conv_transpose_matrix
from convmat.analysis import operator as operator_module
from convmat.analysis.operator import ConvOperator, dottest

from .reference import conv_configs, conv_transpose_configs, reference


def operator(cfg, w):
    return ConvOperator(w, cfg.input_size, transposed=cfg.transposed, **cfg.matrix_kwargs())


def torch_adjoint(cfg, w, y):
    """W^T y by torch's own autograd: the gradient of <reference(x), y> in x."""
    x = torch.zeros(y.shape[0], cfg.in_channels, *cfg.input_size, dtype=w.dtype,
                    requires_grad=True)  # fmt: skip
    (grad,) = torch.autograd.grad(reference(cfg, x, w), x, y)
    return grad


@given(cfg=st.one_of(conv_configs(), conv_transpose_configs()))
def test_operator_and_adjoint_equal_torch(cfg):
    w = cfg.weight()
    op = operator(cfg, w)
    x = cfg.input(batch=3)
    y_ref = reference(cfg, x, w)
    assert op.shape == (y_ref[0].numel(), x[0].numel()) and op.T.shape == op.shape[::-1]
    assert op.out_shape == tuple(y_ref.shape[1:]) and op.in_shape == tuple(x.shape[1:])
    torch.testing.assert_close(op @ x, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(op @ x.reshape(3, -1), y_ref.reshape(3, -1), rtol=0, atol=1e-10)
    torch.testing.assert_close(op @ x[0].reshape(-1), y_ref[0].reshape(-1), rtol=0, atol=1e-10)
    y = torch.randn_like(y_ref)
    expected = torch_adjoint(cfg, w, y)
    torch.testing.assert_close(op.T @ y, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(op.H @ y.reshape(3, -1), expected.reshape(3, -1), rtol=0, atol=1e-10)
    pinned = op._pinned()  # the analysis functions' own operators: the flipped kernel held
    torch.testing.assert_close(pinned.T @ y, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(pinned @ x, y_ref, rtol=0, atol=1e-10)
    assert dottest(op) and dottest(op.T)
    # W as torch's Jacobian of its own convolution.
    jac = torch.autograd.functional.jacobian(lambda v: reference(cfg, v[None], w)[0], x[0])
    W = jac.reshape(op.shape)
    torch.testing.assert_close(op.to_dense(), W, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.T.to_dense(), W.T, rtol=0, atol=1e-12)
    for layout in (torch.sparse_coo, torch.sparse_csr):
        torch.testing.assert_close(op.T.to_sparse(layout).to_dense(), W.T, rtol=0, atol=1e-12)


@given(cfg=st.one_of(conv_configs(modes=("zeros",)), conv_transpose_configs()),
       single=st.booleans())  # fmt: skip
def test_a_strided_adjoint_by_its_polyphase_kernel_equals_torch(cfg, single):
    """A strided adjoint (a convolution's ``W^T``, a transposed layer's ``W``) run as one
    stride-1 correlation of its polyphase kernel, forced here on every layer (on the CPU it
    runs in float32 for few input channels): it equals torch's in float64, to float32's
    rounding in float32 (``single``), plain and pinned; the gradient to the kernel through it
    equals the one through ``conv_transpose``."""
    assume(any(s > 1 for s in cfg.stride))
    w = cfg.weight()

    def side(weight):
        op = operator(cfg, weight)
        return op if cfg.transposed else op.T

    y = torch.randn(2, *side(w).in_shape, dtype=torch.float64)
    expected = reference(cfg, y, w) if cfg.transposed else torch_adjoint(cfg, w, y)
    weight = w.clone().requires_grad_()
    with patch.object(operator_module, "_polyphase_pays", lambda geo, y: True):
        for op in (side(w), side(w)._pinned()):
            if single:
                got = op.to(torch.float32) @ y.float()
                scale = 1 + float(expected.abs().max())
                torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * scale)
            else:
                torch.testing.assert_close(op @ y, expected, rtol=0, atol=1e-10)
        (grad,) = torch.autograd.grad((side(weight) @ y).square().sum(), weight)
    (want,) = torch.autograd.grad((side(weight) @ y).square().sum(), weight)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-9 * (1 + float(want.abs().max())))


@given(cfg=conv_configs(modes=("zeros",)))
def test_adjoint_of_zero_padded_conv_is_conv_transpose_matrix(cfg):
    """Where the adjoint is itself a transposed convolution torch has, it is that one."""
    assume(all(b == a for b, a in cfg.pairs))
    w = cfg.weight()
    op = operator(cfg, w)
    pads = tuple(b for b, _ in cfg.pairs)
    natural = [
        (o - 1) * s - 2 * p + d * (k - 1) + 1
        for o, s, p, d, k in zip(op.out_shape[1:], cfg.stride, pads, cfg.dilation, cfg.kernel_size)
    ]
    out_pad = tuple(i - q for i, q in zip(cfg.input_size, natural))
    assume(all(p < max(s, d) for p, s, d in zip(out_pad, cfg.stride, cfg.dilation)))
    y = torch.randn(2, *op.out_shape, dtype=torch.float64)
    conv_t = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[cfg.ndim]
    got = conv_t(y, w, stride=cfg.stride, padding=pads, output_padding=out_pad,
                   groups=cfg.groups, dilation=cfg.dilation)  # fmt: skip
    torch.testing.assert_close(op.T @ y, got, rtol=0, atol=1e-10)
    WT = conv_transpose_matrix(w, op.out_shape[1:], stride=cfg.stride, padding=pads,
                               output_padding=out_pad, groups=cfg.groups, dilation=cfg.dilation)  # fmt: skip
    torch.testing.assert_close(op.T.to_dense(), WT, rtol=0, atol=0)


def test_adjoint_objects():
    w = torch.randn(3, 2, 3, dtype=torch.float64)
    op = ConvOperator(w, 7, padding=1, stride=2)
    assert op.T.is_adjoint and not op.T.T.is_adjoint and op.H.shape == (14, 12)
    assert op.T.weight is w and op.T.geometry == op.geometry
    assert type(ConvOperator.H) is property and type(ConvOperator.T) is property
    with pytest.raises(AttributeError):
        op.weight = w  # read-only: with_weight makes another operator
    other = op.with_weight(2 * w)
    x = torch.randn(7 * 2, dtype=torch.float64)
    torch.testing.assert_close(other @ x, 2 * (op @ x), rtol=0, atol=1e-12)
    assert op.to(torch.float32).weight.dtype == torch.float32 and op.weight.dtype == torch.float64
    assert op.T.to(torch.float32).is_adjoint
    with pytest.raises(ConvMatError, match=r"weight must have shape \(3, 2, 3\).*got \(3, 2, 2\)"):
        op.with_weight(w[..., :2])
    geo = op.geometry
    torch.testing.assert_close(ConvOperator.from_geometry(w, geo) @ x, op @ x, rtol=0, atol=0)


def test_complex_adjoint_is_the_conjugate_transpose():
    w = torch.randn(2, 2, 3, dtype=torch.complex128)
    op = ConvOperator(w, 6, padding=1)
    W = op.to_dense()
    y = torch.randn(op.shape[0], dtype=torch.complex128)
    torch.testing.assert_close(op.H @ y, W.mH @ y, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.T @ y, W.T @ y, rtol=0, atol=1e-12)
    assert dottest(op)


def test_flipped_kernel_follows_the_values():
    """Changed through .data, in place, or swapped for a new tensor: the adjoint follows."""
    clear_cache()
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    op = ConvOperator(w, (5, 5), padding=1)
    y = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    reference_cfg = dict(padding=1)

    def expected(weight):
        x = torch.zeros(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
        return torch.autograd.grad(F.conv2d(x, weight, **reference_cfg), x, y)[0]

    torch.testing.assert_close(op.T @ y, expected(w), rtol=0, atol=1e-12)
    flipped = [o for o in cache_info() if o.startswith("flipped kernel#")]
    assert len(flipped) == 1 and cache_info()[flipped[0]]["entries"] == 1
    w.data.mul_(-3)  # no version bump
    torch.testing.assert_close(op.T @ y, expected(w), rtol=0, atol=1e-12)
    w.add_(1)
    torch.testing.assert_close(op.T @ y, expected(w), rtol=0, atol=1e-12)
    clear_cache()
    assert not any(o.startswith("flipped kernel") for o in cache_info())
    torch.testing.assert_close(op.T @ y, expected(w), rtol=0, atol=1e-12)
    del op  # the entry goes with the last operator holding it
    gc.collect()
    assert not any(o.startswith("flipped kernel") for o in cache_info())


def test_adjoint_is_differentiable_in_the_weight_every_time():
    """The flipped kernel is not cached with an autograd graph: two backward passes work and
    equal torch's gradients."""
    w = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 3, 6, dtype=torch.float64)
    x = torch.zeros(1, 2, 6, dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(F.conv1d(x, w, padding=1), x, y, create_graph=True)
    (expected,) = torch.autograd.grad(ref.square().sum(), w)
    op = ConvOperator(w, 6, padding=1)
    for _ in range(2):
        (grad,) = torch.autograd.grad((op.T @ y).square().sum(), w)
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_matmul_checks_its_argument():
    op = ConvOperator(torch.randn(2, 1, 3, dtype=torch.float64), 5, padding=1)
    with pytest.raises(ConvMatError, match=r"x must have the operator's dtype torch.float64, "
                                           r"got torch.float32"):  # fmt: skip
        op @ torch.zeros(5)
    with pytest.raises(ConvMatError, match=r"got torch.int64"):
        op @ torch.zeros(5, dtype=torch.long)
    with pytest.raises(TypeError, match=r"x to be a torch.Tensor, got list"):
        op @ [1.0] * 5
    with pytest.raises(ConvMatError, match=r"x must have shape \(5,\), \(B, 5\) or"):
        op @ torch.zeros(0, dtype=torch.float64)
    empty = torch.zeros(0, 5, dtype=torch.float64)
    assert (op @ empty).shape == (0, 10) and (op.T @ torch.zeros(0, 10).double()).shape == (0, 5)
    assert (op @ torch.zeros(0, 1, 5, dtype=torch.float64)).shape == (0, 2, 5)


def test_dottest_returns_or_raises():
    class Broken(ConvOperator):
        def __matmul__(self, x):
            return 2 * super().__matmul__(x) if not self.is_adjoint else super().__matmul__(x)

    op = Broken(torch.randn(2, 1, 3, dtype=torch.float64), 6)
    with pytest.raises(ValueError, match=r"dot test failed: <op x, y> = .*relative difference"):
        dottest(op)
    assert dottest(op, raise_error=False) is False
    with pytest.raises(TypeError, match=r"dottest needs op to be a ConvOperator, got Tensor"):
        dottest(torch.zeros(3, 3))


def test_scipy_svds_and_lsqr():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=gen)
    op = ConvOperator(w, (6, 7), padding=1, padding_mode="reflect")
    A = op.to_scipy()
    W = op.to_dense().numpy()
    top = spla.svds(A, k=3, return_singular_vectors=False, tol=1e-12)
    np.testing.assert_allclose(
        np.sort(top)[::-1], np.linalg.svd(W, compute_uv=False)[:3], rtol=1e-8
    )
    b = np.random.default_rng(0).standard_normal(op.shape[0])
    x = spla.lsqr(A, b, atol=1e-14, btol=1e-14, iter_lim=5000)[0]
    expected = np.linalg.lstsq(W, b, rcond=None)[0]
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(A.matmat(np.eye(op.shape[1])[:, :4]), W[:, :4], atol=1e-12)


def test_from_module():
    conv = torch.nn.ConvTranspose2d(2, 3, 3, stride=2, output_padding=1).double()
    op = ConvOperator.from_module(conv, (4, 5))
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(op @ x, conv(x) - conv.bias.view(1, -1, 1, 1), rtol=0, atol=1e-10)

    class Scaled(torch.nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ConvMatError, match=r"\(Scaled\) overrides forward"):
        ConvOperator.from_module(Scaled(1, 1, 3), (5, 5))
