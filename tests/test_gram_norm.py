"""The spectral norm of a dense matrix from its Gram matrix (a linear layer's norm), against
numpy's SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from convmat import lipschitz_report
from convmat.analysis import spectral
from convmat.analysis.torus import gram_norm


def _top(A: torch.Tensor) -> float:
    return float(np.linalg.svd(A.numpy(), compute_uv=False)[0]) if A.numel() else 0.0


@given(m=st.integers(1, 40), n=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_the_gram_matrix_from_its_lower_triangle_is_numpys(m, n, seed):
    """The blocked lower-triangle product (any number of rows against the blocks): exactly
    symmetric, numpy's ``A A^T`` to rounding."""
    from convmat.analysis.torus import _gram

    A = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    G = _gram(A)
    assert torch.equal(G, G.T)
    want = A.numpy() @ A.numpy().T
    assert np.allclose(G.numpy(), want, rtol=1e-13, atol=1e-13 * np.abs(want).max())


@settings(deadline=None, max_examples=40)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 300),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-6, 1.0, 1e6]),
    rank=st.integers(1, 40),
)
@example(m=4, n=4, seed=1, scale=1.0, rank=4)  # its eigenvalue's rounding: lower was 2 ulp high
def test_the_interval_brackets_the_svds_norm(m, n, seed, scale, rank):
    """Random matrices of any shape (Gram matrices up to 300 wide: the Lanczos path beyond 128)
    and rank, at scales far from 1: lower <= ||A|| <= upper, narrow, the value within it."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(rank, m, n)
    A = (torch.randn(m, rank, dtype=torch.float64, generator=gen)
         @ torch.randn(rank, n, dtype=torch.float64, generator=gen)) * scale  # fmt: skip
    A = A if seed % 2 else A.T.contiguous()
    value, lower, upper = gram_norm(A)
    true = _top(A)
    assert lower <= true <= upper
    assert lower <= value <= upper
    assert upper / lower - 1 <= 1e-6
    assert value == pytest.approx(true, rel=1e-9)


def test_a_near_double_top_and_the_zero_matrix():
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(150, 150, dtype=torch.float64, generator=gen))
    s = torch.linspace(1, 0.1, 150, dtype=torch.float64)
    s[0] = 1 + 1e-12
    A = U[:, :150] @ torch.diag(s) @ V.T
    value, lower, upper = gram_norm(A)
    assert lower <= 1 + 1e-12 <= upper and value == pytest.approx(1.0, rel=1e-10)
    value, lower, upper = gram_norm(torch.zeros(5, 7, dtype=torch.float64))
    assert value == lower == 0.0 and 0.0 <= upper < 1e-100


def test_a_linear_layers_norm_is_the_same_by_svd_or_by_gram(monkeypatch):
    """lipschitz_report's linear layers (and the factors folded into them) through either
    route: the same value, both intervals around numpy's norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 30), nn.BatchNorm1d(30), nn.ReLU(),
                          nn.Linear(30, 5)).double().eval()  # fmt: skip
    model[2].running_var.uniform_(0.5, 2)
    svd = lipschitz_report(model, (3, 4, 4), progress=False, probes=0)
    monkeypatch.setattr(spectral, "_GRAM_FROM", 0)
    gram = lipschitz_report(model, (3, 4, 4), progress=False, probes=0)
    for a, b, layer in zip(svd, gram, (model[1], model[4])):
        true = _top(layer.weight.detach())
        assert a.norm == pytest.approx(b.norm, rel=1e-10)
        assert a.lower <= true <= a.upper and b.lower <= true <= b.upper
    assert gram.upper == pytest.approx(svd.upper, rel=1e-8)
