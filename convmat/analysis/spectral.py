"""Singular values and operator norms of convolution layers, exact where a method allows.

The methods, chosen by name (``method=``) or by ``"auto"``:

- ``"fft"``: circular padding (or none) whose windows tile the input (``output * stride ==
  input``): the exact FFT method (Sedghi, Gupta & Long 2019), extended to stride > 1 by splitting
  the input into its ``stride`` polyphase components (Senderovich et al. 2022): the layer becomes
  a stride-1 circular convolution with ``C_in * prod(stride)`` input channels on the smaller
  torus, whose singular values are those of one ``C_out x C_in * prod(stride)`` matrix per
  frequency.
- ``"dense"``: the dense SVD of W (``"auto"`` takes it for all singular values while W has at
  most :data:`AUTO_DENSE_ENTRIES` entries, and for the norm while the SVD costs at most
  :data:`AUTO_DENSE_WORK`).
- ``"lanczos"``: for the top ``k`` singular values, ARPACK (``scipy.sparse.linalg.svds``) on the
  matrix-free operator; for the norm, a Lanczos iteration of our own on the smaller Gram side
  (:func:`_norm_lanczos`).

:func:`operator_norm` returns the largest singular value with a certified interval: the lower
end is ``||W v|| / ||v||`` for the computed vector (true for any vector), the upper end the exact
norm of a circular convolution that contains W as a block (zero padding) or that does after the
padding, times the padding's own norm (reflect/replicate/circular). That norm is a maximum over
frequencies, found without decomposing every frequency (Cholesky certificates, see
:func:`_torus_top`), from Gram matrices summed over tap pairs (:class:`_TorusGrams`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from .._errors import ConvMatError
from ..engine import Geometry, available_memory, check_allocation, check_matrix_memory
from .operator import ConvOperator

__all__ = ["METHODS", "Method", "NormMethod", "NormResult", "operator_norm", "singular_values"]

#: What ``method=`` accepts.
Method = Literal["auto", "fft", "dense", "lanczos"]
#: How a :class:`NormResult` was found (``"jvp-lanczos"``: by :func:`convmat.lipschitz_report`
#: on a module's Jacobian-vector products, no certified upper end).
NormMethod = Literal["fft", "dense", "lanczos", "jvp-lanczos"]
#: The methods by name (``"auto"`` picks one of them).
METHODS: tuple[str, ...] = ("fft", "dense", "lanczos")

# -- the constants, each with why --------------------------------------------------------------
#: What ``certificate=`` accepts.
CertificateKind = Literal["circular", "tight"]
_CERTIFICATES = ("circular", "tight")
#: The tight certificate proves ``sigma^2 <= value^2 (1 + eps)``: a relative width of ~eps / 2,
#: inside the 1e-6 asked of it, and far above the Lanczos value's error (~1e-8).
_TIGHT_EPS = 1e-6
#: "auto" forms W densely for all its singular values up to this many entries (128 MiB in
#: float64; its SVD takes tens of seconds on two cores, and nothing else gives them all).
AUTO_DENSE_ENTRIES = 4096 * 4096
#: "auto" takes the dense SVD for the norm while ``rows * cols * min(rows, cols)`` (the SVD's
#: work) is at most this: ~0.2 s on one core (1024 x 1024), where Lanczos takes ~0.05-0.2 s on
#: any size; a 4096 x 4096 SVD takes 25 s.
AUTO_DENSE_WORK = 1024**3
#: Power steps that rank the frequencies before any is decomposed (only an ordering is needed).
_TORUS_POWER_STEPS = 8
#: Frequencies decomposed exactly per round of :func:`_torus_top` (batched ``eigvalsh``).
_TORUS_BATCH = 4
#: Relative margin of the Cholesky certificates and of an FFT value's interval: far above the
#: rounding of ``eigvalsh`` / ``cholesky`` on Gram matrices of a few thousand rows (~1e-13).
_TORUS_SLACK = 1e-10
#: Relative half-width of a dense SVD value's interval (LAPACK's backward error, ~n * eps).
_DENSE_SLACK = 1e-12
#: Relative accuracy of the float32 passes: well above float32's rounding (~6e-8 on a Gram
#: matrix scaled to norm ~1), enough to point at the top of the spectrum.
_ROUGH_TOL = 1e-5
#: Lanczos basis vectors kept before a restart: more converge faster, but cost memory and
#: ``O(basis * n)`` work at each restart.
_BASIS_MIN, _BASIS_MAX = 20, 400
#: The basis takes at most this many bytes, and at most 1 / _FREE_SHARE of the free memory.
_BASIS_BYTES, _FREE_SHARE = 2**29, 4
#: Free memory assumed where none is reported.
_FREE_UNKNOWN = 2**31
#: Products of the Gram map per Lanczos pass before giving up (converged=False).
_MAX_STEPS = 3000
#: Products per float32 pass: enough where the pass converges (200-450 on ResNet-18's layers);
#: on large inputs (3.2M unknowns) a restarted float32 pass did not reach its tolerance in 3000
#: products (420 s), while the float64 refinement finishes from wherever the passes stop.
_ROUGH_MAX_STEPS = 600
#: Steps between Ritz checks (each an ``eigh`` of the tridiagonal matrix).
_CHECK_EVERY = 4
#: ``beta`` below this fraction of the top Ritz value: the Krylov space is invariant, exact.
_BREAKDOWN = 1e-14
#: A new block vector whose part outside the basis is below this fraction of its norm adds
#: nothing at float64 precision (the basis is invariant to that level); keeping it would break
#: the basis's orthogonality.
_DEFLATION = 1e-10
#: A remainder below this fraction of its vector's norm has lost digits to cancellation: one
#: more projection restores its orthogonality to the basis.
_CANCELLATION = 1e-4
#: Smallest gap used between Ritz values (avoids dividing by zero for exact doubles).
_GAP_FLOOR = 1e-300
#: Vectors in the float64 block refinement: the two float32 vectors, so that a near-double top
#: (two singular values within ~1e-7, as at the top of large zero-padded layers) is resolved
#: instead of settling on a mixture of the pair.
_BLOCK = 2
#: Basis vectors of the float64 block refinement (it starts from good vectors; few steps).
_REFINE_BASIS = 48
#: At least this many float64 products, so that the error estimate rests on more than a handful
#: of Ritz values.
_REFINE_MIN_STEPS = 24
#: The iteration aims at ``tol / _SAFETY`` so that the delivered error stays within ``tol``
#: (the estimate is an estimate).
_SAFETY = 2
#: Convergence is reported against the Gram matrix, whose eigenvalue is the square of the
#: norm: a relative error ``e`` on it is ``~e / 2`` on the norm.
_GRAM_TO_NORM = 0.5
#: ARPACK's tolerance for the top ``k`` singular values.
_SVDS_TOL = 1e-12


@dataclass(frozen=True)
class NormResult:
    """The operator norm with an interval ``lower <= norm <= upper``.

    Attributes:
        value: the norm (exact methods), or the Rayleigh quotient ``||W v|| / ||v||`` of the
            computed vector (a true lower bound; within ``error`` of the norm when converged).
        lower, upper: the interval (certified unless ``upper`` is ``inf``).
        method: how it was found.
        converged: the iteration reached ``tol`` (always True for exact methods).
        tol: the relative accuracy asked for (0.0 for exact methods).
        error: the estimated relative error of ``value`` (rounding for exact methods).
    """

    value: float
    lower: float
    upper: float
    method: NormMethod
    converged: bool = True
    tol: float = 0.0
    error: float = 0.0

    def __float__(self) -> float:
        return self.value


# -- argument checks -------------------------------------------------------------------------
def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol < 1:
        raise ConvMatError(f"tol must be a number with 0 < tol < 1, got {tol!r}")
    return float(tol)


def _check_k(k: Any, count: int) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= count:
        raise ConvMatError(f"k must be an int between 1 and {count} (or None), got {k!r}")
    return int(k)


def _check_method(method: Any) -> str:
    if method != "auto" and method not in METHODS:
        raise ConvMatError(f"method must be one of {('auto', *METHODS)!r}, got {method!r}")
    return method


def _operator(source: Any, input_size: Any, config: dict[str, Any]) -> ConvOperator:
    """A float64 operator of ``source`` with finite real weights (refused otherwise)."""
    if isinstance(source, ConvOperator):
        if config or input_size is not None:
            raise ConvMatError("a ConvOperator carries its own input_size and configuration")
        op = source
    elif isinstance(source, nn.Module):
        if config:
            raise ConvMatError(
                f"a module carries its own configuration; got {sorted(config)!r} as well (build "
                f"the module with them, or pass its weight with them)"
            )
        op = ConvOperator.from_module(source, input_size)
    elif isinstance(source, torch.Tensor):
        op = ConvOperator(source, input_size, **config)
    else:
        raise TypeError(
            f"source must be a weight tensor, a convolution module or a ConvOperator, got "
            f"{type(source).__name__}"
        )
    w = op.weight.detach()
    if w.device.type == "meta":
        raise ConvMatError("the spectral functions need the weight's values, got a weight on "
                           "the meta device (load or initialise the weights first)")  # fmt: skip
    if w.is_complex():
        raise ConvMatError(f"the spectral functions take real weights, got dtype {w.dtype}")
    w = w.to(torch.float64)  # exact for every real dtype (float8 and integers included)
    if not bool(torch.isfinite(w).all()):
        bad = "NaN" if bool(torch.isnan(w).any()) else "inf"
        raise ConvMatError(f"the weight must be finite, got a weight holding {bad}")
    return op.with_weight(w)


def _fft_problem(op: ConvOperator) -> str:
    """Why W is not a circular convolution on its input (``""`` if it is)."""
    geo = op.geometry
    if geo.transposed:
        return "the fft method takes a convolution, not a transposed convolution"
    if geo.padding_mode != "circular" and any(b or a for b, a in geo.padding):
        return f"the fft method needs circular padding (or none), got {geo.padding_mode!r}"
    if any(o * s != i for o, s, i in zip(geo.output_size, geo.stride, geo.input_size)):
        return (
            f"the fft method needs windows that tile the input (output * stride == input in "
            f"every dimension), got output {geo.output_size}, stride {geo.stride}, input "
            f"{geo.input_size}"
        )
    return ""


def _dense_problem(op: ConvOperator) -> str:
    try:
        check_matrix_memory(op.geometry, torch.strided, torch.float64, op.weight.device)
    except ConvMatError as err:
        return f"the dense method forms W: {err}"
    return ""


def _resolve(method: str, op: ConvOperator, norm_only: bool = False) -> str:
    """The method to run: ``method`` if it applies (ConvMatError saying why not), or the one
    ``"auto"`` picks: fft where exact, dense while W is small (:data:`AUTO_DENSE_ENTRIES`; for
    the norm alone, :data:`AUTO_DENSE_WORK`), lanczos otherwise."""
    if method == "auto":
        if not _fft_problem(op):
            return "fft"
        rows, cols = op.shape
        small = rows * cols * min(rows, cols) <= AUTO_DENSE_WORK if norm_only else (
            rows * cols <= AUTO_DENSE_ENTRIES)  # fmt: skip
        if small or min(op.shape) < 3:
            return "dense"
        return "lanczos"
    problem = {"fft": _fft_problem, "dense": _dense_problem}.get(method, lambda _: "")(op)
    if problem:
        raise ConvMatError(f"method={method!r} does not apply: {problem}")
    return method


# -- the exact torus ---------------------------------------------------------------------------
def _tap_shifts(
    kernel: list[int], geo: Geometry, before: tuple[int, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every tap's offset ``q = m*d - before = s*t + r`` split into its phase ``r`` (one flat
    index over the stride's phases) and its shift ``t`` on the small torus (one tensor per
    dimension, not reduced modulo anything), taps in C order."""
    offsets = [torch.arange(k) * d - b for k, d, b in zip(kernel, geo.dilation, before)]
    grids = torch.meshgrid(*offsets, indexing="ij")
    r_flat = torch.zeros((), dtype=torch.long)
    shifts = []
    for q, s in zip(grids, geo.stride):
        r_flat = r_flat * s + torch.remainder(q, s)
        shifts.append(torch.div(q, s, rounding_mode="floor").reshape(-1))
    return r_flat.reshape(-1), shifts


def _flat(coords: list[torch.Tensor], sizes: tuple[int, ...] | list[int]) -> torch.Tensor:
    """C-order flat index of per-dimension coordinates (each ``0 <= c < size``)."""
    flat = torch.zeros((), dtype=torch.long)
    for c, n in zip(coords, sizes):
        flat = flat * n + c
    return flat


def _polyphase(weight: torch.Tensor, geo: Geometry, column: torch.Tensor, phases: int,
               positions: int) -> torch.Tensor:  # fmt: skip
    """``(groups, C_out/g, C_in/g * phases, positions)``: the weight with tap ``j`` added at
    ``column[j] = phase * positions + position``."""
    groups, (c_out, cin_g) = geo.groups, weight.shape[:2]
    w = weight.detach().to(torch.float64).reshape(groups, c_out // groups, cin_g, -1)
    poly = w.new_zeros(groups, c_out // groups, cin_g, phases * positions)
    poly.index_add_(3, column.to(w.device), w)
    return poly.reshape(groups, c_out // groups, cin_g * phases, positions)


def _torus_spectrum(
    weight: torch.Tensor,
    geo: Geometry,
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
    small = tuple(t // s for t, s in zip(torus, geo.stride))
    r_flat, shifts = _tap_shifts(list(weight.shape[2:]), geo, before)
    phases = math.prod(geo.stride)
    if top_only:  # number the phases that are read 0, 1, ...
        read, r_flat = torch.unique(r_flat, return_inverse=True)
        phases = read.numel()
    t_flat = _flat([torch.remainder(t, m) for t, m in zip(shifts, small)], small)
    poly = _polyphase(weight, geo, r_flat * math.prod(small) + t_flat, phases, math.prod(small))
    poly = poly.reshape(*poly.shape[:3], *small)
    axes = tuple(range(3, 3 + len(small)))
    spectrum = torch.fft.rfftn(poly, dim=axes) if top_only else torch.fft.fftn(poly, dim=axes)
    return spectrum.reshape(*spectrum.shape[:3], -1).permute(0, 3, 1, 2)


#: Most bytes of the tap-pair products of :class:`_TorusGrams` (beyond: per-frequency products).
_PAIRS_BYTES = 2**30
#: Most bytes of one chunk of Gram matrices (and at most 1 / _FREE_SHARE of the free memory).
_CHUNK_BYTES = 2**28


class _TorusGrams:
    """The Gram matrices ``M M^H`` or ``M^H M`` (the smaller) of :func:`_torus_spectrum`'s
    per-frequency matrices ``M`` (``top_only``), numbered ``0 .. count - 1`` (group-major), made
    on demand in chunks of bounded memory: :meth:`at` gives ``(len(index), side, side)``
    complex128.

    With ``A_t`` the real matrix of the taps at shift ``t`` (``M_f = sum_t A_t e^{-i w_f t}``),
    ``M_f M_f^H = sum_delta B_delta e^{-i w_f delta}`` where ``B_delta = sum_{t - t' = delta}
    A_t A_t'^T``: all tap pairs in one real product, then a short sum over the offsets
    ``delta`` per frequency (for a 3x3 kernel 81 real products per channel block in all, where
    forming each frequency's Gram matrix takes four complex products per frequency). Where the
    pairs outnumber the frequencies (large kernels on small tori) the Gram matrices are formed
    from the FFT spectrum, all at once, after a memory check.
    """

    def __init__(
        self, weight: torch.Tensor, geo: Geometry, before: tuple[int, ...], torus: tuple[int, ...]
    ) -> None:
        small = tuple(t // s for t, s in zip(torus, geo.stride))
        r_flat, shifts = _tap_shifts(list(weight.shape[2:]), geo, before)
        read, r_flat = torch.unique(r_flat, return_inverse=True)
        low = [int(t.min()) for t in shifts]
        box = [int(t.max()) - lo + 1 for t, lo in zip(shifts, low)]
        taps, groups = math.prod(box), geo.groups
        rows, cols = weight.shape[0] // groups, weight.shape[1] * read.numel()
        self.side = side = min(rows, cols)
        self.freq_shape = (*small[:-1], small[-1] // 2 + 1)
        self.small, self.groups, self.device = small, groups, weight.device
        self.freqs = math.prod(self.freq_shape)
        self.count = groups * self.freqs
        free = available_memory(weight.device) or _FREE_UNKNOWN
        budget = min(_CHUNK_BYTES, free // _FREE_SHARE)
        if taps * taps > 4 * self.freqs or 2 * groups * (taps * side) ** 2 * 8 > _PAIRS_BYTES:
            need = self.count * (rows * cols + side * side) * 16
            check_allocation(need, weight.device, "the enclosing circular convolution's "
                             "per-frequency matrices")  # fmt: skip
            M = _torus_spectrum(weight, geo, before, torus, top_only=True).flatten(0, 1)
            self._all: torch.Tensor | None = M @ M.mH if rows <= cols else M.mH @ M
            self.chunk = self.count
            return
        self._all = None
        t_flat = _flat([t - lo for t, lo in zip(shifts, low)], box)
        poly = _polyphase(weight, geo, r_flat * taps + t_flat, read.numel(), taps)
        # A[g, t] = the taps at shift t as a side x other matrix.
        A = poly.permute(0, 3, 1, 2) if rows <= cols else poly.permute(0, 3, 2, 1)
        A = A.reshape(groups, taps * side, -1)
        pairs = (A @ A.mT).view(groups, taps, side, taps, side).transpose(2, 3)
        # delta = t - t' for M M^H, t' - t for M^H M; B[g, j] sums the pairs at offset j.
        coords = [c.reshape(-1) for c in torch.meshgrid(*map(torch.arange, box), indexing="ij")]
        sign = 1 if rows <= cols else -1
        delta = torch.stack([sign * (c[:, None] - c[None, :]).reshape(-1) for c in coords], 1)
        self.offsets, which = torch.unique(delta, dim=0, return_inverse=True)
        B = A.new_zeros(groups, len(self.offsets), side, side)
        B.index_add_(1, which.to(A.device), pairs.reshape(groups, taps * taps, side, side))
        self._B = B.to(torch.complex128).reshape(groups, len(self.offsets), side * side)
        per_matrix = side * side * 16 * (len(self.offsets) if groups > 1 else 3)
        self.chunk = max(1, budget // per_matrix)

    def at(self, index: torch.Tensor) -> torch.Tensor:
        """The Gram matrices numbered ``index``, ``(len(index), side, side)`` (fresh memory)."""
        if self._all is not None:
            return self._all[index]
        g, f = index.div(self.freqs, rounding_mode="floor"), index.remainder(self.freqs)
        # e^{-i w_f . delta}, the angle reduced exactly in integers first.
        coords = torch.stack(torch.unravel_index(f, self.freq_shape), 1)
        turns = torch.zeros(len(index), len(self.offsets), dtype=torch.float64)
        for d, n in enumerate(self.small):
            turns += torch.remainder(coords[:, d, None] * self.offsets[None, :, d], n).double() / n
        phase = torch.polar(torch.ones_like(turns), -2 * math.pi * turns).to(self.device)
        if self.groups == 1:
            G = phase @ self._B[0]
        else:
            G = torch.einsum("cj,cjk->ck", phase, self._B[g.to(self.device)])
        return G.view(-1, self.side, self.side)

    def chunks(self, index: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(part, at(part))`` for consecutive parts of ``index`` of at most ``chunk``."""
        for part in index.split(self.chunk):
            yield part, self.at(part)


def _torus_top(grams: _TorusGrams) -> float:
    """The exact largest singular value of a circular convolution, from the Gram matrices of its
    per-frequency matrices.

    Only the frequencies that may hold the maximum get an eigendecomposition: a few batched power
    steps rank them, the best few are decomposed, and Cholesky factorisations of
    ``lam * I - G`` for the other Gram matrices ``G`` prove that they have no eigenvalue above
    the largest ``lam`` found (those that fail go round again). Exact up to a relative
    :data:`_TORUS_SLACK`.
    """
    tiny = torch.finfo(torch.float64).tiny
    gen = torch.Generator().manual_seed(0)

    def estimate(G: torch.Tensor) -> torch.Tensor:
        """``||G v||`` after a few power steps: at most the largest eigenvalue."""
        v = torch.randn(G.shape[:2], dtype=torch.float64, generator=gen).to(G).unsqueeze(-1)
        for _ in range(_TORUS_POWER_STEPS):
            v = G @ v
            v = v / v.norm(dim=1, keepdim=True).clamp_min(tiny)
        return (G @ v).norm(dim=(1, 2)).cpu()

    def above(index: torch.Tensor, shift: float) -> torch.Tensor:
        """The frequencies among ``index`` whose ``shift * I - G`` has no Cholesky factor."""
        failed = []
        for part, G in grams.chunks(index):
            S = G.neg_()
            S.diagonal(dim1=-2, dim2=-1).add_(shift)
            failed.append(part[torch.linalg.cholesky_ex(S).info.cpu() > 0])
        return torch.cat(failed)

    everything = torch.arange(grams.count)
    ranking = torch.cat([estimate(G) for _, G in grams.chunks(everything)])
    # Decompose the most promising few; every other frequency that passes the Cholesky test has
    # no eigenvalue above the largest found; repeat on those that fail.
    lam = 0.0
    rest = everything
    while rest.numel():
        order = torch.argsort(ranking[rest], descending=True)
        chosen, rest = rest[order[:_TORUS_BATCH]], rest[order[_TORUS_BATCH:]]
        lam = max(lam, float(torch.linalg.eigvalsh(grams.at(chosen))[:, -1].max()))
        if rest.numel():
            rest = above(rest, lam * (1 + _TORUS_SLACK) + tiny)
    return math.sqrt(max(lam, 0.0))


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
    bound = _torus_top(_TorusGrams(op.weight, geo, (0,) * geo.ndim, torus))
    if geo.mode.folds:
        pairs = zip(geo.input_size, geo.padding)
        bound *= math.sqrt(math.prod(geo.mode.copies(i, b, a) for i, (b, a) in pairs))
    return bound * (1 + _TORUS_SLACK)


# -- Lanczos -----------------------------------------------------------------------------------
def _error_estimate(theta: torch.Tensor, residuals: torch.Tensor) -> float:
    """An estimate of how far the largest Ritz value lies below the largest eigenvalue.

    ``theta``: Ritz values, ascending; ``residuals``: their residual norms. The smaller of the
    residual and, for each cluster of the top ``k`` Ritz values, the cluster's squared residual
    over its gap to the next Ritz value (the block Kato-Temple estimate; a near-double top
    eigenvalue needs no separation from its twin).
    """
    error = float(residuals[-1])
    squared = torch.cumsum(residuals.flip(0) ** 2, 0)[:-1]
    gaps = (theta.flip(0)[:-1] - theta.flip(0)[1:]).clamp_min(_GAP_FLOOR)
    if gaps.numel():
        error = min(error, float((squared / gaps).min()))
    return error


def _lanczos_top(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    tol: float,
    basis: int,
    max_steps: int = _MAX_STEPS,
) -> tuple[torch.Tensor, bool]:
    """A top eigenvector of the symmetric positive semi-definite map ``apply`` by Lanczos
    (three-term recurrence, explicitly restarted every ``basis`` steps, at most ``max_steps``
    products), and whether its estimate (:func:`_error_estimate`) reached ``tol`` relative."""
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
            if j % _CHECK_EVERY == _CHECK_EVERY - 1 or j == m - 1 or beta == 0.0:
                off = torch.tensor(betas[:-1], dtype=torch.float64)
                T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
                theta, S = torch.linalg.eigh(T + torch.diag(off, 1) + torch.diag(off, -1))
                top = max(float(theta[-1]), _GAP_FLOOR)
                if _error_estimate(theta, beta * S[-1].abs()) <= tol * top or beta <= (
                    _BREAKDOWN * top
                ):
                    converged = True
                    break
            prev, v = v, w / beta
        y = S[:, -1].to(device=V.device, dtype=V.dtype) @ V[: j + 1]
        steps += j + 1
        if converged or steps >= max_steps:
            return y, converged
        v = y / y.norm()


def _orthonormal(block: torch.Tensor, against: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``block`` made orthonormal and orthogonal to the (orthonormal) rows of
    ``against``: projected out twice as a block (classical Gram-Schmidt twice), then row by row
    against each other; a row whose remainder is below :data:`_DEFLATION` of its norm is
    dropped, and one with heavy cancellation (below :data:`_CANCELLATION`) is projected once
    more."""
    scale = block.norm(dim=1).tolist()

    def project(rows: torch.Tensor) -> torch.Tensor:
        return rows if against is None else rows - (rows @ against.T) @ against

    block = project(project(block))
    kept: list[torch.Tensor] = []
    for row, norm0 in zip(block, scale):  # at most _BLOCK rows
        for _ in range(2):
            for k in kept:
                row = row - torch.dot(k, row) * k
        norm = float(row.norm())
        if norm <= _DEFLATION * max(norm0, _GAP_FLOOR):
            continue
        if norm <= _CANCELLATION * norm0:
            row = project((row / norm)[None])[0]
            for k in kept:
                row = row - torch.dot(k, row) * k
            norm = float(row.norm())
        kept.append(row / norm)
    return torch.stack(kept) if kept else block.new_empty(0, block.shape[1])


def _block_refine(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    tol: float,
    basis: int,
) -> tuple[torch.Tensor, bool, float]:
    """Block Lanczos with Rayleigh-Ritz on its whole basis, started from the rows of ``start``
    (``apply`` maps a ``(b, n)`` block), restarted from the top ``b`` Ritz vectors (whose
    images are kept, not recomputed) when the basis is full.

    The basis ``V``, its image ``AV`` and ``H = V^T A V`` live in buffers of ``basis`` rows
    allocated once; ``size`` rows are in use.

    Returns the top Ritz vector, whether its error estimate reached ``tol`` (relative), and the
    estimate.
    """
    b, n = start.shape
    V, AV = start.new_empty(basis, n), start.new_empty(basis, n)
    H = start.new_zeros(basis, basis)

    def extend(block: torch.Tensor, size: int) -> int:
        """Appends ``block`` (orthonormal, orthogonal to the basis) and its image; the new
        size."""
        end = size + block.shape[0]
        V[size:end] = block
        AV[size:end] = apply(block)
        column = V[:end] @ AV[size:end].T
        H[:end, size:end] = column
        H[size:end, :size] = column[:size].T
        return end

    size = extend(_orthonormal(start, None), 0)
    last = steps = size
    error = math.inf
    while True:
        full = size + b > basis
        if steps >= _REFINE_MIN_STEPS or full:  # Ritz pairs: only when they may be used
            h = H[:size, :size]
            theta, S = torch.linalg.eigh((h + h.T) / 2)
            top = max(float(theta[-1]), _GAP_FLOOR)
            count = min(2 * b + 2, theta.numel())  # the top few Ritz pairs and residuals
            Y, AY = S[:, -count:].T @ V[:size], S[:, -count:].T @ AV[:size]
            residuals = (AY - theta[-count:, None] * Y).norm(dim=1)
            error = _error_estimate(theta[-count:], residuals) / top
            if (steps >= _REFINE_MIN_STEPS and error <= tol) or steps >= _MAX_STEPS:
                return Y[-1], error <= tol, error
            if full:
                last = size = min(b, count)
                V[:size], AV[:size] = Y[-size:], AY[-size:]
                H.zero_()
                H.diagonal()[:size] = theta[-size:]
        block = _orthonormal(AV[size - last : size], V[:size])
        if block.shape[0] == 0:  # the basis spans an invariant subspace (to _DEFLATION)
            h = H[:size, :size]
            theta, S = torch.linalg.eigh((h + h.T) / 2)
            top = max(float(theta[-1]), _GAP_FLOOR)
            y, ay = S[:, -1] @ V[:size], S[:, -1] @ AV[:size]
            error = float((ay - theta[-1] * y).norm()) / top
            return y, error <= tol, error
        last = block.shape[0]
        size = extend(block, size)
        steps += last


def _basis_size(
    n: int, device: torch.device, arrays: int = 1, itemsize: int = 8, capped: bool = True
) -> int:
    """Basis vectors of length ``n`` (``itemsize`` bytes an entry, ``arrays`` of them) that fit
    1 / :data:`_FREE_SHARE` of the free memory and, if ``capped``, :data:`_BASIS_BYTES`."""
    free = (available_memory(device) or _FREE_UNKNOWN) // _FREE_SHARE
    budget = (min(_BASIS_BYTES, free) if capped else free) // (itemsize * arrays * n)
    return int(max(_BASIS_MIN, min(_BASIS_MAX, budget)))


def _rough_vectors(side: ConvOperator, tol: float, basis: int) -> torch.Tensor:
    """Up to :data:`_BLOCK` float64 unit vectors spanning the top of ``side.T @ side``, from
    float32 Lanczos passes on a copy scaled to norm ~1, each from a random start orthogonal to
    the vectors found before (a start that nearly lacks the top vector, or a top just above the
    one found, is then caught by the next pass)."""
    scale = float(side.weight.abs().max()) or 1.0
    fast = side.with_weight(side.weight / scale).to(torch.float32)
    gen = torch.Generator(device=side.weight.device).manual_seed(0)
    n = side.shape[1]
    found: list[torch.Tensor] = []
    for _ in range(min(_BLOCK, n)):
        start = torch.randn(n, dtype=torch.float64, device=gen.device, generator=gen)
        if found:
            prior = torch.stack(found)
            start = start - (prior @ start) @ prior
            prior32 = prior.float()

            def apply(v: torch.Tensor, p: torch.Tensor = prior32) -> torch.Tensor:
                w = fast.T @ (fast @ (v - (p @ v) @ p))
                return w - (p @ w) @ p
        else:
            apply = lambda v: fast.T @ (fast @ v)  # noqa: E731
        vector, _ = _lanczos_top(
            apply, start.float(), max(2 * tol, _ROUGH_TOL), basis, _ROUGH_MAX_STEPS
        )
        vector = vector.double()
        if found:
            vector = vector - (prior @ vector) @ prior
        found.append(vector / vector.norm())
    return torch.stack(found)


#: Basis vectors of the block Lanczos on a map given only by its products (no float32 pass
#: to start from; full reorthogonalisation costs ``O(basis^2 * n)`` per cycle).
_PRODUCT_BASIS = 100


def _gram_top(
    gram: Callable[[torch.Tensor], torch.Tensor], n: int, tol: float, device: torch.device
) -> tuple[torch.Tensor, bool, float]:
    """A top eigenvector of the ``n x n`` positive semi-definite map ``gram`` (``J^T J`` given
    on ``(b, n)`` blocks), by float64 block Lanczos from random starts; whether it reached
    ``tol`` relative on the norm ``sqrt(eigenvalue)``, and the norm's estimated error."""
    gen = torch.Generator(device=device).manual_seed(0)
    start = torch.randn(min(_BLOCK, n), n, dtype=torch.float64, device=device, generator=gen)
    basis = max(min(_PRODUCT_BASIS, _basis_size(n, device, arrays=2), n), 2 * start.shape[0])
    vector, converged, error = _block_refine(gram, start, tol / (_SAFETY * _GRAM_TO_NORM), basis)
    return vector, converged, error * _GRAM_TO_NORM


# -- the norm methods --------------------------------------------------------------------------
def _norm_fft(op: ConvOperator, tol: float) -> NormResult:
    geo = op.geometry
    before = tuple(b for b, _ in geo.padding)
    value = _torus_top(_TorusGrams(op.weight, geo, before, geo.input_size))
    lower, upper = value * (1 - _TORUS_SLACK), value * (1 + _TORUS_SLACK)
    return NormResult(value, lower, upper, "fft", error=_TORUS_SLACK)


def _norm_dense(op: ConvOperator, tol: float) -> NormResult:
    value = float(torch.linalg.matrix_norm(op.to_dense().cpu(), ord=2))
    slack = _DENSE_SLACK * max(value, 1.0)
    return NormResult(value, value - slack, value + slack, "dense", error=_DENSE_SLACK)


def _norm_lanczos(op: ConvOperator, tol: float) -> NormResult:
    """Lanczos on ``W^T W`` (or ``W W^T``, the smaller): float32 passes find the top of the
    spectrum (:func:`_rough_vectors`), a float64 block refinement from those vectors
    (:func:`_block_refine`) resolves it to ``tol``; the value is the Rayleigh quotient of the
    final vector, the upper end the enclosing circular convolution's norm."""
    side = op if op.shape[1] <= op.shape[0] else op.T  # iterate on the smaller side
    n = side.shape[1]
    with torch.no_grad():
        upper = _enclosing_torus(op)
        rough = _rough_vectors(side, tol, _basis_size(n, op.weight.device, itemsize=4))
        # The refinement's basis is small but matters: on large layers a basis of 20 took 4x
        # the products of one of 48.
        refine_basis = min(_REFINE_BASIS, _basis_size(n, op.weight.device, 2, capped=False), n)
        gram_tol = tol / (_SAFETY * _GRAM_TO_NORM)
        vector, converged, error = _block_refine(
            lambda X: side.T @ (side @ X), rough, gram_tol, max(refine_basis, 2 * rough.shape[0])
        )
        value = float((side @ vector).norm() / vector.norm())
    if not converged:
        warnings.warn(
            f"operator_norm: Lanczos did not reach tol={tol} for {op.geometry} (estimated "
            f"error {error * _GRAM_TO_NORM:.1e}); the value is a lower bound",
            stacklevel=3,
        )
    return NormResult(value, value, max(upper, value), "lanczos", converged, tol,
                      error * _GRAM_TO_NORM)  # fmt: skip


_NORM_METHODS: dict[str, Callable[[ConvOperator, float], NormResult]] = {
    "fft": _norm_fft,
    "dense": _norm_dense,
    "lanczos": _norm_lanczos,
}


def _certified_upper(source: Any, input_size: Any, method: str = "auto") -> float:
    """The upper end :func:`operator_norm` gives (circular certificate), without the value where
    that takes an iteration: for Lanczos the enclosing circular convolution's norm, which is
    that upper end (the Lanczos value lies below it)."""
    op = _operator(source, input_size, {})
    chosen = _resolve(_check_method(method), op, norm_only=True)
    if chosen == "lanczos":
        return _enclosing_torus(op)
    return _NORM_METHODS[chosen](op, _ROUGH_TOL).upper  # exact methods: no tol


# -- the singular value methods ------------------------------------------------------------------
def _values_fft(op: ConvOperator, k: int | None) -> torch.Tensor:
    geo = op.geometry
    before = tuple(b for b, _ in geo.padding)
    per_freq = _torus_spectrum(op.weight, geo, before, geo.input_size)
    values = torch.linalg.svdvals(per_freq).reshape(-1)
    return torch.sort(values, descending=True).values.cpu()


def _values_dense(op: ConvOperator, k: int | None) -> torch.Tensor:
    return torch.linalg.svdvals(op.to_dense().cpu())


def _is_zero(op: ConvOperator) -> bool:
    """W is the zero matrix: |W| applied to ones is zero (every tap reads padding, is cropped
    away, or has a zero weight)."""
    magnitude = op.with_weight(op.weight.abs())
    ones = torch.ones(1, *magnitude.in_shape, dtype=torch.float64, device=op.weight.device)
    return not bool((magnitude @ ones).any())


def _values_lanczos(op: ConvOperator, k: int | None) -> torch.Tensor:
    count = min(op.shape)
    if k is None or k >= count:
        raise ConvMatError(
            f"method='lanczos' finds the top k < {count} singular values of this "
            f"{op.shape[0]} x {op.shape[1]} W; ask for k (or method='dense' for all), got k={k!r}"
        )
    if _is_zero(op):
        return torch.zeros(k, dtype=torch.float64)
    from scipy.sparse.linalg import svds  # type: ignore[import-untyped]

    top = svds(op.to_scipy(), k=k, return_singular_vectors=False, tol=_SVDS_TOL)
    return torch.sort(torch.as_tensor(top.copy(), dtype=torch.float64), descending=True).values


_VALUE_METHODS: dict[str, Callable[[ConvOperator, int | None], torch.Tensor]] = {
    "fft": _values_fft,
    "dense": _values_dense,
    "lanczos": _values_lanczos,
}


def singular_values(
    weight: Any,
    input_size: Any = None,
    *,
    k: int | None = None,
    method: Method = "auto",
    **config: Any,
) -> torch.Tensor:
    """Singular values of a convolution layer, descending (all, or the top ``k``).

    Args:
        weight: the weight (with ``**config`` as for :func:`convmat.conv_matrix`, plus
            ``transposed=True`` for a transposed convolution), a plain conv module, or a
            :class:`~convmat.ConvOperator`.
        input_size: spatial size of one input.
        k: only the ``k`` largest.
        method: ``"fft"`` (exact; circular padding or none, windows tiling the input),
            ``"dense"`` (SVD of W), ``"lanczos"`` (ARPACK, top ``k < min(W.shape)`` only) or
            ``"auto"``: fft where it applies, dense while W is small, lanczos otherwise.

    Returns:
        float64 tensor on the CPU.

    Raises:
        ConvMatError: a method that does not apply (saying why), all values of a W too large to
            form (ask for ``k``), non-finite or complex weights, a bad ``k``.

    Shape:
        ``(min(rows, cols),)`` or ``(k,)``.

    >>> w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    >>> fft = singular_values(w, (8, 8), padding=1, padding_mode="circular", method="fft")
    >>> from convmat import conv_matrix
    >>> W = conv_matrix(w, (8, 8), padding=1, padding_mode="circular")
    >>> torch.allclose(fft, torch.linalg.svdvals(W), atol=1e-10)
    True
    """
    method = _check_method(method)
    op = _operator(weight, input_size, config)
    k = _check_k(k, min(op.shape))
    chosen = _resolve(method, op)
    if method == "auto" and chosen == "lanczos" and k is None:
        raise ConvMatError(
            f"W is {op.shape[0]} x {op.shape[1]}: too large for all its singular values "
            f"without an exact method; ask for the top k"
        )
    values = _VALUE_METHODS[chosen](op, k)
    return values if k is None else values[:k]


def operator_norm(
    source: Any,
    input_size: Any = None,
    *,
    tol: float = 1e-7,
    method: Method = "auto",
    certificate: CertificateKind = "circular",
    **config: Any,
) -> NormResult:
    """The largest singular value of a convolution layer, with a certified interval.

    Exact methods (FFT, dense SVD) give an interval of rounding width. Lanczos runs on
    ``W^T W`` (or ``W W^T``, whichever is smaller): float32 passes from random starts locate the
    top of the spectrum, a float64 block Lanczos from their vectors resolves it. The value is
    the Rayleigh quotient ``||W v|| / ||v||`` of the final vector in float64, which is also the
    lower end; the upper end is the exact norm of the circular convolution that encloses W
    (times the padding's norm for reflect/replicate/circular).

    Args:
        source: a weight (with ``**config``), a plain conv module, or a ConvOperator.
        input_size: spatial size of one input.
        tol: the relative accuracy Lanczos delivers on the value when it converges (checked
            against dense SVD and ARPACK on random layers at the default); the result's
            ``converged`` and ``error`` say what it reached.
        method: ``"fft"``, ``"dense"``, ``"lanczos"`` or ``"auto"`` (fft where it applies, dense
            while its SVD is cheap (:data:`AUTO_DENSE_WORK`), lanczos otherwise).
        certificate: the upper end of a Lanczos value: ``"circular"`` (fast; the enclosing
            circular convolution's norm, up to a few percent above for zero padding) or
            ``"tight"`` (an inertia test by sparse Cholesky, :func:`convmat.analysis.certify.
            certify_upper`: relative width ~5e-7, minutes and gigabytes for large layers; needs
            ``pip install "convmat[certify]"``). Where the tight test fails, the circular end
            stays.

    Returns:
        :class:`NormResult`.

    Raises:
        ConvMatError: a method that does not apply (saying why), non-finite or complex weights,
            a ``tol`` outside (0, 1), a module that is not a plain convolution.

    Shape:
        a scalar.

    >>> r = operator_norm(nn.Conv2d(2, 2, 3, padding=1).double(), (6, 6))
    >>> r.lower <= r.value <= r.upper, r.method, r.converged
    (True, 'dense', True)
    """
    tol = _check_tol(tol)
    method = _check_method(method)
    if certificate not in _CERTIFICATES:
        raise ConvMatError(f"certificate must be one of {_CERTIFICATES!r}, got {certificate!r}")
    op = _operator(source, input_size, config)
    result = _NORM_METHODS[_resolve(method, op, norm_only=True)](op, tol)
    if certificate == "tight" and result.method == "lanczos":
        from .certify import certify_upper

        weight = op.weight.detach().to(torch.float64)
        proof = certify_upper(weight, op.geometry, result.value**2, eps=_TIGHT_EPS)
        if proof.certified and proof.upper < result.upper:
            result = replace(result, upper=max(proof.upper, result.value))
    return result
