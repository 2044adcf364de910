"""Singular values and operator norms of convolution layers, exact where a method allows.

- Circular padding (or none) whose windows tile the input (``output * stride == input``): the
  exact FFT method (Sedghi, Gupta & Long 2019), extended to stride > 1 by splitting the input
  into its ``stride`` polyphase components (Senderovich et al. 2022): the layer becomes a
  stride-1 circular convolution with ``C_in * prod(stride)`` input channels on the smaller torus,
  whose singular values are those of one ``C_out x C_in * prod(stride)`` matrix per frequency.
- Otherwise: the dense SVD of W where W is small; for the top ``k`` of a large W, ARPACK
  (``scipy.sparse.linalg.svds``) on the matrix-free operator, and for the norm alone a Lanczos
  iteration of our own on the smaller Gram side.

:func:`operator_norm` returns the largest singular value with a certified interval: the lower
end is ``||W v|| / ||v||`` for the computed vector (true for any vector), the upper end the exact
norm of a circular convolution that contains W as a block (zero padding) or that does after the
padding, times the padding's own norm (reflect/replicate/circular). That norm is a maximum over
frequencies, found without decomposing every frequency (Cholesky certificates, see
:func:`_torus_top`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import ConvMatError
from ..engine import Geometry, available_memory
from .operator import ConvOperator

__all__ = ["NormResult", "operator_norm", "singular_values"]

#: Above this many entries W is not formed densely for an SVD.
DENSE_LIMIT = 4096 * 4096


def _torus_spectrum(
    weight: torch.Tensor,
    groups: int,
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    before: tuple[int, ...],
    torus: tuple[int, ...],
    *,
    top_only: bool = False,
) -> torch.Tensor:
    """The per-frequency matrices of ``y[o, n] = sum w[o, c, m] x[c, (n*s + m*d - before) mod N]``
    (``n < N / s``) after splitting the input into its polyphase components.

    Returns ``(groups, F, C_out/g, C_in/g * phases)`` complex128. ``top_only`` (enough for the
    largest singular value) keeps the non-negative frequencies of the last axis only (the others
    are complex conjugates) and only the phases some tap reads (the others are zero columns).
    """
    n_dims = len(torus)
    c_out, cin_g, *kernel = weight.shape
    small = tuple(t // s for t, s in zip(torus, stride))
    # Every tap's offset q = m*d - before = s*t + r: phase r, shift t on the small torus.
    offsets = [torch.arange(k) * d - b for k, d, b in zip(kernel, dilation, before)]
    grids = torch.meshgrid(*offsets, indexing="ij")
    r_flat = torch.zeros((), dtype=torch.long)
    t_flat = torch.zeros((), dtype=torch.long)
    for q, s, m in zip(grids, stride, small):
        r_flat = r_flat * s + torch.remainder(q, s)
        t_flat = t_flat * m + torch.remainder(torch.div(q, s, rounding_mode="floor"), m)
    phases = math.prod(stride)
    if top_only:  # number the phases that are read 0, 1, ...
        read, r_flat = torch.unique(r_flat, return_inverse=True)
        phases = read.numel()
    column = (r_flat * math.prod(small) + t_flat).reshape(-1)
    w = weight.detach().to(torch.float64).reshape(groups, c_out // groups, cin_g, -1)
    poly = w.new_zeros(groups, c_out // groups, cin_g, phases * math.prod(small))
    poly.index_add_(3, column.to(w.device), w)
    poly = poly.reshape(groups, c_out // groups, cin_g * phases, *small)
    axes = tuple(range(3, 3 + n_dims))
    spectrum = torch.fft.rfftn(poly, dim=axes) if top_only else torch.fft.fftn(poly, dim=axes)
    return spectrum.reshape(*spectrum.shape[:3], -1).permute(0, 3, 1, 2)


def _torus_singular_values(weight: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """All singular values of an exact-torus convolution (descending)."""
    before = tuple(b for b, _ in geo.padding)
    per_freq = _torus_spectrum(weight, geo.groups, geo.stride, geo.dilation, before,
                               geo.input_size)  # fmt: skip
    values = torch.linalg.svdvals(per_freq).reshape(-1)
    return torch.sort(values, descending=True).values


def _torus_top(per_freq: torch.Tensor) -> float:
    """The exact largest singular value of a circular convolution, from its per-frequency
    matrices (:func:`_torus_spectrum` with ``top_only=True``).

    Only the frequencies that may hold the maximum get an eigendecomposition: a few batched power
    steps rank them, the best few are decomposed, and Cholesky factorisations of
    ``lam * I - G`` for the other Gram matrices ``G`` prove that they have no eigenvalue above
    the largest ``lam`` found (those that fail go round again). Exact up to a relative 1e-10.
    """
    M = per_freq.flatten(0, 1)
    rows, cols = M.shape[1:]
    G = M @ M.mH if rows <= cols else M.mH @ M  # the smaller Gram matrix
    gen = torch.Generator(device=G.device).manual_seed(0)
    v = torch.randn(G.shape[:2], dtype=torch.float64, device=G.device, generator=gen)
    v = v.to(G.dtype).unsqueeze(-1)
    for _ in range(8):
        v = G @ v
        v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    estimate = (G @ v).norm(dim=(1, 2))  # ||G v|| <= the largest eigenvalue

    def above(index: torch.Tensor, shift: float) -> torch.Tensor:
        """The frequencies among ``index`` whose ``shift * I - G`` has no Cholesky factor."""
        S = G[index].neg_()
        S.diagonal(dim1=-2, dim2=-1).add_(shift)
        return index[torch.linalg.cholesky_ex(S).info > 0]

    # Decompose the most promising few; every other frequency that passes the Cholesky test has
    # no eigenvalue above the largest found; repeat on those that fail.
    lam = 0.0
    rest = torch.arange(G.shape[0], device=G.device)
    while rest.numel():
        order = torch.argsort(estimate[rest], descending=True)
        chosen, rest = rest[order[:4]], rest[order[4:]]
        lam = max(lam, float(torch.linalg.eigvalsh(G[chosen])[:, -1].max()))
        if rest.numel():
            rest = above(rest, lam * (1 + 1e-10) + torch.finfo(torch.float64).tiny)
    return math.sqrt(max(lam, 0.0))


def _exact_torus(geo: Geometry) -> bool:
    """W is a circular convolution on the input: circular padding (or none at all) and windows
    that tile the input exactly."""
    return (
        not geo.transposed
        and (geo.padding_mode == "circular" or not any(b or a for b, a in geo.padding))
        and all(o * s == i for o, s, i in zip(geo.output_size, geo.stride, geo.input_size))
    )


def _enclosing_torus(op: ConvOperator) -> float:
    """A certified upper bound on ``||W||_2``.

    W reads the padded input through windows that fit in it; on a torus at least as large as
    the padded input (and a multiple of the stride) no window wraps, so W (after the padding) is a
    block of that circular convolution, whose norm is exact by :func:`_torus_top`. The padding of
    reflect/replicate/circular has norm sqrt(most copies any input has in the padded input).
    A transposed layer's W is the transpose of a convolution's, with the same norm.
    """
    geo = op.geometry.matching_conv
    torus = tuple(
        s * max(o, -(-p // s)) for s, o, p in zip(geo.stride, geo.output_size, geo.padded_size)
    )
    bound = _torus_top(_torus_spectrum(op.weight, geo.groups, geo.stride, geo.dilation,
                                       (0,) * geo.ndim, torus, top_only=True))  # fmt: skip
    if geo.mode.folds:
        pairs = zip(geo.input_size, geo.padding)
        copies = math.prod(geo.mode.copies(i, b, a) for i, (b, a) in pairs)
        bound *= math.sqrt(copies)
    return bound * (1 + 1e-10)


def _settled(theta: torch.Tensor, residuals: torch.Tensor, tol: float) -> bool:
    """Whether the largest Ritz value is within ``tol`` (relative) of the largest eigenvalue.

    ``theta``: Ritz values, ascending; ``residuals``: their residual norms. The error estimate is
    the smaller of the residual and, for each cluster of the top ``k`` Ritz values, the cluster's
    squared residual over its gap to the next Ritz value (the block Kato-Temple estimate; a
    near-double top eigenvalue needs no separation from its twin).
    """
    top = float(theta[-1])
    error = float(residuals[-1])
    squared = torch.cumsum(residuals.flip(0) ** 2, 0)[:-1]
    gaps = (theta.flip(0)[:-1] - theta.flip(0)[1:]).clamp_min(1e-300)
    if gaps.numel():
        error = min(error, float((squared / gaps).min()))
    return error <= tol * top


def _lanczos_top(
    apply: Any,
    start: torch.Tensor,
    tol: float,
    *,
    basis: int = 160,
    max_steps: int = 3000,
    min_steps: int = 0,
) -> tuple[torch.Tensor, bool]:
    """A top eigenvector of the symmetric positive semi-definite map ``apply`` by Lanczos
    (explicitly restarted every ``basis`` steps), and whether it converged.

    Converged: see :func:`_settled`.
    """
    v = start / start.norm()
    steps = 0
    while True:
        m = min(basis, max_steps - steps)
        V = v.new_empty(m, v.numel())
        alphas: list[float] = []
        betas: list[float] = []
        prev, beta, converged = None, 0.0, False
        for j in range(m):
            V[j] = v
            w = apply(v)
            alpha = float(torch.dot(w, v))
            w = w - alpha * v if prev is None else w - alpha * v - beta * prev
            beta = float(w.norm())
            alphas.append(alpha)
            betas.append(beta)
            if (j % 4 == 3 and steps + j >= min_steps) or j == m - 1 or beta == 0.0:
                T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
                off = torch.tensor(betas[:-1], dtype=torch.float64)
                T = T + torch.diag(off, 1) + torch.diag(off, -1)
                theta, S = torch.linalg.eigh(T)
                top = float(theta[-1])
                if _settled(theta, beta * S[-1].abs(), tol) or beta <= 1e-14 * max(top, 1e-300):
                    converged = True
                    break
            prev, v = v, w / beta
        y = S[:, -1].to(device=V.device, dtype=V.dtype) @ V[: j + 1]
        steps += j + 1
        if converged or steps >= max_steps:
            return y, converged
        v = y / y.norm()


def _dense_ok(op: ConvOperator) -> bool:
    """Small enough for a dense SVD (or too small for Lanczos, which needs k < min(shape))."""
    return op.shape[0] * op.shape[1] <= DENSE_LIMIT or min(op.shape) < 3


def _is_zero(op: ConvOperator) -> bool:
    """W is the zero matrix: |W| applied to ones is zero (every tap reads padding, is cropped
    away, or has a zero weight)."""
    magnitude = op.to(torch.float64)
    magnitude.weight = op.weight.detach().abs().to(torch.float64)
    ones = torch.ones(1, *magnitude.in_shape, dtype=torch.float64, device=op.weight.device)
    return not bool((magnitude @ ones).any())


def _operator(source: Any, input_size: Any, config: dict[str, Any]) -> ConvOperator:
    if isinstance(source, ConvOperator):
        op = source
    elif isinstance(source, nn.Module):
        op = ConvOperator.from_module(source, input_size)
    else:
        op = ConvOperator(source, input_size, **config)
    if op.weight.is_complex():
        raise ConvMatError(f"the spectral functions take real weights, got {op.weight.dtype}")
    return op


def singular_values(
    weight: Any, input_size: Any = None, *, k: int | None = None, **config: Any
) -> torch.Tensor:
    """Singular values of a convolution layer, descending (all, or the top ``k``).

    Args:
        weight: the weight (with ``**config`` as for :func:`convmat.conv_matrix`, plus
            ``transposed=True`` for a transposed convolution), a conv module, or a
            :class:`~convmat.ConvOperator`.
        input_size: spatial size of one input.
        k: only the ``k`` largest.

    Returns:
        float64 tensor on the CPU.

    Raises:
        ConvMatError: for all values of a W too large to form (ask for ``k``).

    Shape:
        ``(min(rows, cols),)`` or ``(k,)``.

    >>> w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    >>> fft = singular_values(w, (8, 8), padding=1, padding_mode="circular")
    >>> from convmat import conv_matrix
    >>> W = conv_matrix(w, (8, 8), padding=1, padding_mode="circular")
    >>> torch.allclose(fft, torch.linalg.svdvals(W), atol=1e-10)
    True
    """
    op = _operator(weight, input_size, config)
    geo = op.geometry
    count = min(op.shape)
    if k is not None and not 1 <= k <= count:
        raise ConvMatError(f"k must be between 1 and {count}, got {k!r}")
    if _exact_torus(geo):
        values = _torus_singular_values(op.weight, geo).cpu()
    elif _dense_ok(op):
        dense = op.to_dense().detach().to(torch.float64).cpu()
        values = torch.linalg.svdvals(dense)
    else:
        if k is None:
            raise ConvMatError(
                f"W is {op.shape[0]} x {op.shape[1]}: too large for all its singular values "
                f"without an exact method; ask for the top k"
            )
        from scipy.sparse.linalg import svds  # type: ignore[import-untyped]

        if _is_zero(op):
            values = torch.zeros(k, dtype=torch.float64)
        else:
            top = svds(op.to_scipy(), k=k, return_singular_vectors=False, tol=1e-12)
            values = torch.sort(torch.as_tensor(top.copy(), dtype=torch.float64), descending=True)[
                0
            ]
    return values if k is None else values[:k]


@dataclass(frozen=True)
class NormResult:
    """The operator norm with a certified interval ``lower <= norm <= upper``."""

    value: float
    lower: float
    upper: float
    method: str

    def __float__(self) -> float:
        return self.value


def operator_norm(
    source: Any, input_size: Any = None, *, tol: float = 1e-7, **config: Any
) -> NormResult:
    """The largest singular value of a convolution layer, with a certified interval.

    Exact methods (FFT, dense SVD) give an interval of rounding width. Otherwise Lanczos runs on
    ``W^T W`` (or ``W W^T``, whichever is smaller) from a random start, first with float32
    products (to 1e-5), then in float64 from that vector. The value is the Rayleigh quotient
    ``||W v|| / ||v||`` of the final vector in float64, which is also the lower end; the upper
    end is the exact norm of the circular convolution that encloses W (times the padding's norm
    for reflect/replicate/circular).

    Args:
        source: a weight (with ``**config``), a conv module, or a ConvOperator.
        input_size: spatial size of one input.
        tol: the relative accuracy the iteration aims for, judged from the Ritz residuals. A
            singular value just above the one found (within ~1e-7, as in the dense top of a
            large zero-padded layer) can go unseen, so the error can exceed a small ``tol`` by
            that much; the tests and the benchmark check 1e-6 at the default.

    Returns:
        :class:`NormResult`.

    Shape:
        a scalar.

    >>> r = operator_norm(nn.Conv2d(2, 2, 3, padding=1).double(), (6, 6))
    >>> r.lower <= r.value <= r.upper
    True
    """
    op = _operator(source, input_size, config)
    geo = op.geometry
    if _exact_torus(geo):
        before = tuple(b for b, _ in geo.padding)
        value = _torus_top(_torus_spectrum(op.weight, geo.groups, geo.stride, geo.dilation,
                                           before, geo.input_size, top_only=True))  # fmt: skip
        return NormResult(value, value * (1 - 1e-10), value * (1 + 1e-10), "fft")
    if _dense_ok(op):
        value = float(singular_values(op, k=1)[0])
        slack = 1e-12 * max(value, 1.0)
        return NormResult(value, value - slack, value + slack, "dense svd")
    op64 = op.to(torch.float64)
    op64.weight = op64.weight.detach()
    upper = _enclosing_torus(op64)
    side = op64 if op.shape[1] <= op.shape[0] else op64.T  # iterate on the smaller side
    # Float32 passes find the top of the spectrum cheaply (to 1e-5, above float32's rounding),
    # on a copy scaled to norm ~1; float64 steps then refine the value, at least 24 of them so
    # that the error estimate rests on more than a handful of Ritz values.
    fast = side.to(torch.float32)
    fast.weight = fast.weight / (float(op64.weight.abs().max()) or 1.0)
    gen = torch.Generator(device=op64.weight.device).manual_seed(0)
    # Up to 400 basis vectors, in at most 512 MiB or a quarter of the free memory.
    free = available_memory(op64.weight.device) or 2**31
    basis = int(max(20, min(400, min(2**29, free // 4) // (8 * side.shape[1]))))

    def rough(found: torch.Tensor | None) -> torch.Tensor:
        """A float32 top eigenvector of W^T W from a random start, orthogonal to ``found``."""
        start = torch.randn(side.shape[1], dtype=torch.float64, device=gen.device, generator=gen)
        if found is None:
            apply = lambda v: fast.T @ (fast @ v)  # noqa: E731
        else:
            f = found.float()
            start = start - torch.dot(found, start) * found

            def apply(v: torch.Tensor) -> torch.Tensor:
                w = fast.T @ (fast @ (v - torch.dot(f, v) * f))
                return w - torch.dot(f, w) * f

        vector, _ = _lanczos_top(apply, start.float(), max(2 * tol, 1e-5), basis=basis)
        vector = vector.double()
        return vector / vector.norm()

    with torch.no_grad():
        # Lanczos misses a top singular vector that its start (nearly) lacks, or that sits just
        # above the one it settles on; a second pass, orthogonal to the first vector, finds it,
        # and Rayleigh-Ritz on the two vectors keeps the best combination to refine.
        first = rough(None)
        pair = torch.linalg.qr(torch.stack([first, rough(first)], 1))[0]
        images = (side @ pair.T.reshape(2, *side.in_shape)).reshape(2, -1)
        best = pair @ torch.linalg.eigh(images @ images.T)[1][:, -1]
        vector, converged = _lanczos_top(lambda v: side.T @ (side @ v), best, 2 * tol,
                                         basis=basis, min_steps=24)  # fmt: skip
        value = float((side @ vector).norm() / vector.norm())
    if not converged:
        warnings.warn(
            f"operator_norm: Lanczos did not reach tol={tol} for {geo}; the value is a lower bound",
            stacklevel=2,
        )
    return NormResult(value, value, max(upper, value), "lanczos")
