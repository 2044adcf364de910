"""conv_matrix / conv_transpose_matrix / to_matrix against torch's own convolutions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

import convmat
from convmat import conv_matrix, conv_transpose_matrix, to_matrix
from convmat.engine import conv_transpose_output_size

from .reference import (
    LAYOUTS,
    MODULE,
    MODULE_T,
    apply,
    conv_configs,
    conv_transpose_configs,
    reference,
)


def build(cfg, weight, layout=torch.strided):
    fn = conv_transpose_matrix if cfg.transposed else conv_matrix
    return fn(weight, cfg.input_size, layout=layout, **cfg.matrix_kwargs())


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@given(cfg=conv_configs())
def test_conv_matrix_matches_torch(cfg, layout):
    w, x = cfg.weight(), cfg.input()
    W = build(cfg, w, layout)
    y = reference(cfg, x, w)
    assert W.layout == layout and W.dtype == w.dtype
    assert W.shape == (y[0].numel(), x[0].numel())
    torch.testing.assert_close(apply(W, x), y.flatten(1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@given(cfg=conv_transpose_configs())
def test_conv_transpose_matrix_matches_torch(cfg, layout):
    w, x = cfg.weight(), cfg.input()
    W = build(cfg, w, layout)
    y = reference(cfg, x, w)
    assert W.shape == (y[0].numel(), x[0].numel())
    torch.testing.assert_close(apply(W, x), y.flatten(1), rtol=0, atol=1e-10)


@given(cfg=conv_configs(), data=st.data())
def test_integer_inputs_are_bit_exact(cfg, data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    w, x = cfg.weight(integer=True, generator=gen), cfg.input(integer=True, generator=gen)
    expected = reference(cfg, x, w).flatten(1)
    for layout in LAYOUTS:
        assert torch.equal(apply(build(cfg, w, layout), x), expected)


@given(cfg=conv_transpose_configs(asymmetric=False))
def test_transposed_integer_inputs_are_bit_exact(cfg):
    w, x = cfg.weight(integer=True), cfg.input(integer=True)
    assert torch.equal(apply(build(cfg, w), x), reference(cfg, x, w).flatten(1))


@given(cfg=conv_transpose_configs())
def test_transpose_relation(cfg):
    """conv_transpose_matrix is exactly the transpose of the matching conv_matrix."""
    w = cfg.weight()
    WT = build(cfg, w)
    out = conv_transpose_output_size(
        cfg.input_size, cfg.kernel_size, cfg.stride, cfg.pairs, cfg.output_padding, cfg.dilation
    )
    W = conv_matrix(
        w, out, stride=cfg.stride, padding=cfg.pairs, dilation=cfg.dilation, groups=cfg.groups
    )
    # With output_padding >= stride (allowed when dilation is larger) the matching convolution
    # produces extra trailing positions; the transposed layer's input covers the first ones.
    conv_out = W.shape[0] // cfg.in_channels
    grid = W.reshape(cfg.in_channels, *[conv_out_d for conv_out_d in _conv_out(cfg, out)], -1)
    index = (slice(None), *(slice(0, i) for i in cfg.input_size))
    assert conv_out >= np.prod(cfg.input_size)
    assert torch.equal(WT, grid[index].reshape(-1, W.shape[1]).T)
    for layout in (torch.sparse_coo, torch.sparse_csr):
        assert torch.equal(build(cfg, w, layout).to_dense(), WT)


def _conv_out(cfg, out):
    return convmat.conv_output_size(out, cfg.kernel_size, cfg.stride, cfg.pairs, cfg.dilation)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@given(cfg=st.one_of(conv_configs(dims=(1, 2)), conv_transpose_configs(dims=(1, 2))))
def test_gradients_match_torch(cfg, layout):
    w1 = cfg.weight().requires_grad_()
    w2 = w1.detach().clone().requires_grad_()
    x = cfg.input()
    y1 = apply(build(cfg, w1, layout), x)
    y2 = reference(cfg, x, w2).flatten(1)
    g = torch.randn_like(y2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=1e-10)


@given(m=st.integers(1, 6), mode=st.sampled_from(["full", "valid", "same"]), data=st.data())
def test_scipy_convolution_matrix(m, mode, data):
    """scipy computes true convolution: its kernel is ours flipped."""
    # scipy's 'valid' and 'same' need n >= m ('same' has max(m, n) rows; no convolution of
    # n < m inputs gives that), so only such n are drawn.
    n = data.draw(st.integers(1 if mode == "full" else m, 12), label="n")
    a = np.array(data.draw(st.lists(st.integers(-9, 9), min_size=m, max_size=m)), dtype=float)
    expected = scipy.linalg.convolution_matrix(a, n, mode)
    pad = {"full": (m - 1, m - 1), "valid": (0, 0), "same": (m // 2, (m - 1) // 2)}[mode]
    w = torch.tensor(a[::-1].copy()).view(1, 1, m)
    W = conv_matrix(w, n, padding=(pad,))
    np.testing.assert_array_equal(W.numpy(), expected)


def test_seed_example_stride_2():
    """Input 10, kernel 3, stride 2: four outputs two apart."""
    w = torch.tensor([[[1.0, 2.0, 3.0]]])
    W = conv_matrix(w, 10, stride=2)
    assert W.shape == (4, 10)
    for r in range(4):
        row = torch.zeros(10)
        row[2 * r : 2 * r + 3] = torch.tensor([1.0, 2.0, 3.0])
        assert torch.equal(W[r], row)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_to_matrix_modules(n):
    gen = torch.Generator().manual_seed(n)
    size = (5,) * n
    layers = [
        MODULE[n](4, 6, 3, stride=2, padding=1, dilation=1, groups=2, padding_mode="reflect"),
        MODULE[n](2, 3, 2, padding="same", padding_mode="circular", dilation=2),
        MODULE[n](3, 2, 3, padding="valid", padding_mode="replicate"),
        MODULE[n](2, 2, 3, padding=2),
        MODULE_T[n](4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1),
        MODULE_T[n](2, 3, 2, stride=1, padding=0, output_padding=1, dilation=2),
    ]
    for layer in layers:
        layer = layer.double()
        x = torch.randn(2, layer.in_channels, *size, dtype=torch.float64, generator=gen)
        bias = layer.bias.detach()
        y = layer(x) - bias.view(-1, *(1,) * n)
        for layout in LAYOUTS:
            W = to_matrix(layer, size, layout=layout)
            torch.testing.assert_close(apply(W, x), y.flatten(1), rtol=0, atol=1e-10)


def test_pattern_is_cached_and_shared():
    convmat.clear_cache()
    from convmat.engine.cache import builds as built

    w = torch.randn(4, 3, 3, 3)
    builds = built("pattern")
    a = conv_matrix(w, (9, 9), padding=1, layout=torch.sparse_csr)
    b = conv_matrix(2 * w, (9, 9), padding=1, layout=torch.sparse_csr)
    assert built("pattern") == builds + 1
    assert a.col_indices().data_ptr() == b.col_indices().data_ptr()
    torch.testing.assert_close(b.values(), 2 * a.values())
    conv_matrix(w, (9, 9), padding=2, layout=torch.sparse_csr)
    assert built("pattern") == builds + 2


@given(cfg=conv_configs(dims=(1, 2)))
def test_sparse_layouts_are_canonical(cfg):
    """COO comes coalesced; CSR columns are sorted and distinct within each row."""
    w = cfg.weight()
    coo = build(cfg, w, torch.sparse_coo)
    assert coo.is_coalesced()
    idx = coo.indices()
    key = idx[0] * coo.shape[1] + idx[1]
    assert bool((key[1:] > key[:-1]).all())
    csr = build(cfg, w, torch.sparse_csr)
    assert csr.crow_indices().dim() == csr.col_indices().dim() == csr.values().dim() == 1
    torch._validate_sparse_csr_tensor_args(
        csr.crow_indices(), csr.col_indices(), csr.values(), csr.shape
    )
    torch.testing.assert_close(csr.to_dense(), build(cfg, w), rtol=0, atol=0)


def test_float32_and_dtype_kept():
    w = torch.randn(3, 2, 3, 3)
    x = torch.randn(4, 2, 7, 7)
    for layout in LAYOUTS:
        W = conv_matrix(w, (7, 7), padding=1, layout=layout)
        assert W.dtype == torch.float32
        torch.testing.assert_close(
            apply(W, x),
            torch.nn.functional.conv2d(x, w, padding=1).flatten(1),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device():
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device="cuda")
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64, device="cuda")
    for layout in LAYOUTS:
        W = conv_matrix(w, (7, 7), padding=1, padding_mode="reflect", layout=layout)
        assert W.device == w.device
        y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), w)
        torch.testing.assert_close(apply(W, x), y.flatten(1), rtol=0, atol=1e-10)
