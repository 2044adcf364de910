"""flip=True (the true convolution) beyond conv_matrix: symbolic, ConvOperator, the spectra.

Each is checked against ``conv_matrix(w, ..., flip=True)`` (for a transposed convolution,
``conv_transpose_matrix(w.flip(spatial dims), ...)``) over drawn configurations, and on its own
against scipy's convolve / convolve2d in the modes 'full', 'same' and 'valid'.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from convmat import (
    ConvMatError,
    ConvOperator,
    conv_matrix,
    conv_transpose_matrix,
    operator_norm,
    plot_matrix,
    singular_values,
    symbolic,
)
from convmat.analysis.operator import dottest

from .reference import conv_configs, conv_transpose_configs, reference
from .test_flip import cases, pads_for
from .test_flip import reference as scipy_reference
from .test_symbolic import _evaluate

ANY_CONFIG = st.one_of(conv_configs(), conv_transpose_configs())


def spatial(w: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, w.dim()))


def flipped_matrix(cfg, w: torch.Tensor) -> torch.Tensor:
    """W of the true convolution with kernel ``w``, from the matrix functions."""
    if cfg.transposed:
        W = conv_transpose_matrix(w, cfg.input_size, flip=True, **cfg.matrix_kwargs())
        assert torch.equal(W, conv_transpose_matrix(w.flip(spatial(w)), cfg.input_size,
                                                    **cfg.matrix_kwargs()))  # fmt: skip
        return W
    return conv_matrix(w, cfg.input_size, flip=True, **cfg.matrix_kwargs())


def symbolic_of(cfg, flip=True):
    return symbolic(cfg.input_size, cfg.kernel_size, in_channels=cfg.in_channels,
                    out_channels=cfg.out_channels, transposed=cfg.transposed, flip=flip,
                    **cfg.matrix_kwargs())  # fmt: skip


def operator_of(cfg, w, flip=True):
    return ConvOperator(w, cfg.input_size, transposed=cfg.transposed, flip=flip,
                        **cfg.matrix_kwargs())  # fmt: skip


def table_matrix(sym, w: torch.Tensor) -> torch.Tensor:
    """W from the full tap table of ``sym`` with the values of ``w`` put in."""
    flat = torch.cat([w.flatten(), w.new_zeros(1)])  # index -1: past an entry's last tap
    W = w.new_zeros(sym.shape)
    W[sym.rows, sym.cols] = flat[sym.taps].sum(1)
    return W


# -- symbolic ----------------------------------------------------------------------------------


@given(cfg=st.one_of(conv_configs(dims=(1, 2)), conv_transpose_configs(dims=(1, 2))))
def test_symbolic_labels_and_tap_table_evaluate_to_the_flipped_matrix(cfg):
    assume(cfg.ndim == 1 or cfg.in_channels * cfg.out_channels * max(cfg.input_size) <= 24)
    s = symbolic_of(cfg)
    w = cfg.weight(integer=True)
    expected = flipped_matrix(cfg, w)
    # torch's own convolution with the flipped kernel, independently of the matrix functions.
    x = cfg.input(batch=1, integer=True)
    torch.testing.assert_close(expected @ x.flatten(),
                               reference(cfg, x, w.flip(spatial(w))).flatten(), rtol=0, atol=0)  # fmt: skip
    got = torch.tensor([[_evaluate(v, w) for v in row] for row in s.labels()], dtype=w.dtype)
    assert torch.equal(got, expected)
    assert torch.equal(table_matrix(s, w), expected)
    # The taps of each entry ascend, -1 after the last.
    taps = s.taps.clone()
    taps[taps < 0] = torch.iinfo(torch.long).max
    assert torch.equal(taps, taps.sort(1).values)


def test_symbolic_renderings():
    assert str(symbolic(5, 3, flip=True)) == (
        "[[w3, w2, w1,  0,  0],\n [ 0, w3, w2, w1,  0],\n [ 0,  0, w3, w2, w1]]"
    )
    # Folded taps are named in ascending order, whichever way the kernel reads.
    s = symbolic(4, 3, padding=1, padding_mode="reflect", flip=True)
    assert s.labels([0, 3], [0, 1, 2, 3]) == [["w2", "w1+w3", "0", "0"],
                                              ["0", "0", "w1+w3", "w2"]]  # fmt: skip
    assert s.taps[1].tolist() == [0, 2]
    assert symbolic((2, 2), 2, flip=True).labels([0], [0, 1, 2, 3]) == [
        ["w[0,0,1,1]", "w[0,0,1,0]", "w[0,0,0,1]", "w[0,0,0,0]"]
    ]
    t = symbolic(3, 2, stride=2, transposed=True, flip=True)
    assert t.labels() == [["w2", "0", "0"], ["w1", "0", "0"], ["0", "w2", "0"],
                          ["0", "w1", "0"], ["0", "0", "w2"], ["0", "0", "w1"]]  # fmt: skip


def test_plot_matrix_colours_the_flipped_taps():
    fig = plot_matrix(input_size=5, kernel_size=3, flip=True)
    image = fig.axes[0].images[0].get_array()
    assert np.asarray(image)[0, :3].tolist() == [2.0, 1.0, 0.0]  # w3, w2, w1


# -- ConvOperator ------------------------------------------------------------------------------


@given(cfg=ANY_CONFIG)
def test_operator_is_the_flipped_matrix(cfg):
    w = cfg.weight()
    op = operator_of(cfg, w)
    W = flipped_matrix(cfg, w)
    assert op.shape == tuple(W.shape)
    assert torch.equal(op.weight, w.flip(spatial(w)))
    x = cfg.input(batch=2)
    flat = x.reshape(2, -1)
    torch.testing.assert_close(op @ x[0].reshape(-1), W @ flat[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(op @ flat, flat @ W.T, rtol=0, atol=1e-10)
    torch.testing.assert_close((op @ x).reshape(2, -1), flat @ W.T, rtol=0, atol=1e-10)
    y = torch.randn(2, W.shape[0], dtype=w.dtype)
    torch.testing.assert_close(op.T @ y, y @ W, rtol=0, atol=1e-10)
    torch.testing.assert_close(op.H @ y[0], W.T @ y[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(op.to_dense(), W, rtol=0, atol=0)
    torch.testing.assert_close(op.T.to_dense(), W.T, rtol=0, atol=0)
    torch.testing.assert_close(op.to_sparse().to_dense(), W, rtol=0, atol=0)
    assert dottest(op) and dottest(op.T)
    # The other ways to make it agree.
    for other in (op.with_weight(op.weight), op.with_weight(w, flip=True),
                  ConvOperator.from_geometry(w, op.geometry, flip=True),
                  operator_of(cfg, w.flip(spatial(w)), flip=False)):  # fmt: skip
        torch.testing.assert_close(other.to_dense(), W, rtol=0, atol=0)
    assert torch.equal(op.T.T.weight, op.weight) and op.T.with_weight(op.weight).is_adjoint


def test_operator_to_scipy_and_gradient():
    w = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    kw = dict(stride=(2, 1), padding=((2, 0), (1, 1)), padding_mode="zeros")
    op = ConvOperator(w, (7, 5), flip=True, **kw)
    W = conv_matrix(w, (7, 5), flip=True, **kw).numpy()
    lin = op.to_scipy()
    v = np.random.default_rng(0).standard_normal(W.shape[1])
    u = np.random.default_rng(1).standard_normal(W.shape[0])
    np.testing.assert_allclose(lin.matvec(v), W @ v, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lin.rmatvec(u), W.T @ u, rtol=0, atol=1e-12)
    top = spla.svds(lin, k=1, return_singular_vectors=False)[0]
    assert abs(top - np.linalg.norm(W, 2)) < 1e-9
    # Gradients reach the kernel as given (the flip is part of the graph).
    wg = w.clone().requires_grad_(True)
    x = torch.randn(1, 3, 7, 5, dtype=torch.float64)
    (ConvOperator(wg, (7, 5), flip=True, **kw) @ x).sum().backward()
    expected = torch.autograd.grad((conv_matrix(wg, (7, 5), flip=True, **kw)
                                    @ x.flatten()).sum(), wg)[0]  # fmt: skip
    torch.testing.assert_close(wg.grad, expected, rtol=0, atol=1e-12)


# -- singular values and norms -----------------------------------------------------------------


@given(cfg=st.one_of(conv_configs(dims=(1, 2)), conv_transpose_configs(dims=(1, 2))))
def test_spectra_of_the_flipped_matrix(cfg):
    w = cfg.weight()
    W = flipped_matrix(cfg, w)
    assume(max(W.shape) <= 200)
    expected = torch.linalg.svdvals(W)
    kw = dict(transposed=True) if cfg.transposed else {}
    got = singular_values(w, cfg.input_size, flip=True, **kw, **cfg.matrix_kwargs())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    r = operator_norm(w, cfg.input_size, flip=True, **kw, **cfg.matrix_kwargs())
    assert abs(r.value - expected[0].item()) <= 1e-10 * max(1.0, expected[0].item())
    assert r.lower <= expected[0].item() * (1 + 1e-12) + 1e-12
    assert r.upper >= expected[0].item() * (1 - 1e-12) - 1e-12


@pytest.mark.parametrize(
    ("kw", "differs"),
    [
        (dict(padding=1), False),  # symmetric zero padding: W_flip = J W J, the same norm
        (dict(padding=((2, 0),)), True),
        (dict(stride=2, padding=1), True),
        (dict(padding=((0, 2),), padding_mode="circular"), False),
    ],
)
@pytest.mark.parametrize("method", ["auto", "lanczos"])
def test_norm_of_the_flipped_matrix_not_the_unflipped(kw, differs, method):
    w = torch.tensor([[[0.3, -1.2, 2.1]], [[1.0, 0.4, -0.7]]], dtype=torch.float64)
    flipped = torch.linalg.matrix_norm(conv_matrix(w, 6, flip=True, **kw), 2).item()
    plain = torch.linalg.matrix_norm(conv_matrix(w, 6, **kw), 2).item()
    assert (abs(flipped - plain) > 1e-8) == differs
    r = operator_norm(w, 6, flip=True, method=method, **kw)
    assert abs(r.value - flipped) <= 1e-9 * flipped
    assert r.lower <= flipped * (1 + 1e-12) and r.upper >= flipped * (1 - 1e-12)


def test_fft_method_with_flip():
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    kw = dict(padding=((2, 0), (0, 1)), padding_mode="circular")
    W = conv_matrix(w, (6, 4), flip=True, **kw)
    got = singular_values(w, (6, 4), method="fft", flip=True, **kw)
    torch.testing.assert_close(got, torch.linalg.svdvals(W), rtol=1e-10, atol=1e-10)


# -- against scipy, independently of conv_matrix -----------------------------------------------


@given(case=st.one_of(cases(1), cases(2)))
def test_operator_and_symbolic_against_scipy(case):
    n, k, mode, cin, cout, seed = case
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((cin, *n)), rng.standard_normal((cout, cin, *k))
    expected = scipy_reference(x, w, mode).reshape(-1)
    pads = tuple(pads_for(mode, ki) for ki in k)
    wt = torch.from_numpy(w)
    op = ConvOperator(wt, n, padding=pads, flip=True)
    got = (op @ torch.from_numpy(x).reshape(-1)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    s = symbolic(n, k, padding=pads, in_channels=cin, out_channels=cout, flip=True)
    W = table_matrix(s, wt).numpy()
    np.testing.assert_allclose(W @ x.reshape(-1), expected, rtol=0, atol=1e-12)
    if s.shape[0] * s.shape[1] <= 2000:
        labelled = np.array([[_evaluate(v, wt) for v in row] for row in s.labels()])
        np.testing.assert_allclose(labelled @ x.reshape(-1), expected, rtol=0, atol=1e-12)


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", ["yes", 1, 0, None, np.bool_(True), torch.tensor(True)])
def test_flip_must_be_a_bool_everywhere(flip):
    message = re.escape(f"flip must be True or False, got {flip!r}")
    w = torch.ones(1, 1, 3, dtype=torch.float64)
    op = ConvOperator(w, 5)
    calls = [
        lambda: symbolic(5, 3, flip=flip),
        lambda: symbolic(5, 3, transposed=True, flip=flip),
        lambda: ConvOperator(w, 5, flip=flip),
        lambda: ConvOperator(w, 5, transposed=True, flip=flip),
        lambda: ConvOperator.from_geometry(w, op.geometry, flip=flip),
        lambda: op.with_weight(w, flip=flip),
        lambda: operator_norm(w, 5, flip=flip),
        lambda: singular_values(w, 5, flip=flip),
        lambda: plot_matrix(input_size=5, kernel_size=3, flip=flip),
    ]
    for call in calls:
        with pytest.raises(ConvMatError, match=message):
            call()
