"""ConvOperator: forward equals W, the adjoint equals W^T, scipy interoperability."""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as spla
import torch
from hypothesis import given
from hypothesis import strategies as st

from convmat import conv_matrix, conv_transpose_matrix
from convmat.analysis.operator import ConvOperator, dottest

from .reference import conv_configs, conv_transpose_configs


def operator(cfg, w):
    return ConvOperator(w, cfg.input_size, transposed=cfg.transposed, **cfg.matrix_kwargs())


def matrix(cfg, w, layout=torch.strided):
    fn = conv_transpose_matrix if cfg.transposed else conv_matrix
    return fn(w, cfg.input_size, layout=layout, **cfg.matrix_kwargs())


@given(cfg=st.one_of(conv_configs(), conv_transpose_configs()))
def test_operator_and_adjoint_equal_w(cfg):
    w = cfg.weight()
    op = operator(cfg, w)
    W = matrix(cfg, w)
    assert op.shape == tuple(W.shape) and op.T.shape == tuple(W.T.shape)
    x = torch.randn(3, op.shape[1], dtype=torch.float64)
    y = torch.randn(3, op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ x, x @ W.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(op.T @ y, y @ W, rtol=0, atol=1e-10)
    torch.testing.assert_close(op @ x[0], W @ x[0], rtol=0, atol=1e-10)
    shaped = x.view(3, *op.in_shape)
    assert (op @ shaped).shape == (3, *op.out_shape)
    assert dottest(op) and dottest(op.T)
    torch.testing.assert_close(op.to_dense(), W, rtol=0, atol=0)
    torch.testing.assert_close(op.T.to_dense(), W.T, rtol=0, atol=0)
    for layout in (torch.sparse_coo, torch.sparse_csr):
        torch.testing.assert_close(op.T.to_sparse(layout).to_dense(), W.T, rtol=0, atol=0)


@given(cfg=conv_configs(modes=("zeros",)))
def test_adjoint_of_zero_padded_conv_is_conv_transpose_matrix(cfg):
    """Where the adjoint is itself a transposed convolution, it equals conv_transpose_matrix."""
    if any(b != a for b, a in cfg.pairs) or isinstance(cfg.padding, str):
        return
    w = cfg.weight()
    op = operator(cfg, w)
    pads = tuple(b for b, _ in cfg.pairs)
    natural = [
        (o - 1) * s - 2 * p + d * (k - 1) + 1
        for o, s, p, d, k in zip(op.out_shape[1:], cfg.stride, pads, cfg.dilation, cfg.kernel_size)
    ]
    out_pad = tuple(i - q for i, q in zip(cfg.input_size, natural))
    if any(p >= max(s, d) for p, s, d in zip(out_pad, cfg.stride, cfg.dilation)):
        return  # torch has no transposed convolution with that output_padding
    WT = conv_transpose_matrix(w, op.out_shape[1:], stride=cfg.stride, padding=pads,
                               output_padding=out_pad, groups=cfg.groups, dilation=cfg.dilation)  # fmt: skip
    torch.testing.assert_close(op.T.to_dense(), WT, rtol=0, atol=0)


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
