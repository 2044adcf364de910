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
frequencies, certified by Cholesky tests of every frequency (:mod:`convmat.analysis.torus`).

``width=`` asks for the interval instead of the value: :func:`operator_norm` returns as soon as
``upper / lower - 1 <= width``. The circular upper end is then certified only to the room the
width allows (most frequencies pass in single precision), and the lower end first comes from the
circular convolution's top singular vector, windowed to suit zero padding (two convolutions;
within ``O(1/N^2)`` of the circular norm on an ``N``-wide grid); Lanczos, started from that
vector, runs only until the interval is narrow enough. Where the circular certificate cannot
reach the width (small grids with many channels, folding padding modes) the result says so
(``reached=False``, and its ``note`` says what would reach it).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import torch
from torch import nn

from .._errors import ConvMatError
from ..engine import available_memory, check_matrix_memory, kept_pages
from .operator import ConvOperator
from .torus import (
    SLACK,
    TorusGrams,
    eigh,
    enclosing_norm,
    gram_norm,
    torus_spectrum,
    torus_top,
    windowed_vector,
)

__all__ = [
    "METHODS",
    "REGISTRY",
    "Method",
    "NormMethod",
    "NormResult",
    "SpectralMethod",
    "operator_norm",
    "singular_values",
]

#: What ``method=`` accepts.
Method = Literal["auto", "fft", "dense", "lanczos"]
#: How a :class:`NormResult` was found (``"jvp-lanczos"``: by :func:`convmat.lipschitz_report`
#: on a module's Jacobian-vector products, no certified upper end).
#: ``"window"``: the interval asked for (``width=``) was reached by the windowed top vector of
#: the enclosing circular convolution, with no Lanczos step.
NormMethod = Literal["fft", "dense", "lanczos", "window", "jvp-lanczos"]
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
#: Relative half-width of an FFT value's interval (the room of :func:`~convmat.analysis.torus.
#: torus_top`'s certificate, on the Gram matrices: half of it on the norm).
_TORUS_SLACK = SLACK
#: Of a requested width, the share the circular upper end may take above the largest
#: eigenvalue found (on the norm: a quarter; the rest is left to the lower end).
_UPPER_SHARE = 0.5
#: A Lanczos pass in width mode stops when its estimated error is below this fraction of the
#: width (the lower end then cannot rise further by much: the width is out of reach).
_WIDTH_SETTLED = 0.05
#: Relative half-width of a dense SVD value's interval (LAPACK's backward error, ~n * eps).
_DENSE_SLACK = 1e-12
#: A dense matrix (a linear layer's weight, a reshaped kernel) whose SVD would take more
#: multiply-adds than this (rows * cols * min(rows, cols)) gets its norm from its Gram matrix
#: (an interval ~1e-7 wide instead of ~1e-12). Measured on 2 cores, SVD against Gram: 1000 x
#: 1000 0.22 / 0.13 s, 2048 x 2048 1.9 / 0.83 s, 4096 x 4096 22.9 / 3.7 s, 4096 x 25088 (VGG's
#: first linear layer) 212 / 15.4 s.
_GRAM_FROM = 2**30
#: Relative accuracy of the float32 passes: above float32's rounding (~6e-8 on a Gram matrix
#: scaled to norm ~1). A float32 product costs half a float64 one: the float64 refinement
#: then starts close (ResNet-18's layers: 49-65 float64 products instead of 81-229 from 1e-5).
_ROUGH_TOL = 1e-6
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
#: The same in single precision (:func:`_block_pass`), whose rounding after two projections is
#: ~1e-6 of a vector's norm: a remainder below it is rounding, its direction meaningless (on
#: three unknowns it was exactly 0 once, and made the basis NaN).
_DEFLATION_SINGLE = 1e-5
#: A remainder below this fraction of its vector's norm has lost digits to cancellation: one
#: more projection restores its orthogonality to the basis.
_CANCELLATION = 1e-4
#: A projection onto the basis that leaves less than this fraction of a vector's norm is made
#: again (Daniel, Gragg, Kaufman and Stewart's criterion: what remains may have lost its
#: orthogonality to the rounding of the part removed).
_REPROJECT = 0.5
#: Smallest gap used between Ritz values (avoids dividing by zero for exact doubles).
_GAP_FLOOR = 1e-300
#: Ritz values the error estimate looks at: a cluster of more, above a wide gap, may lie close
#: to the top of a band of eigenvalues while Lanczos has not yet found all of them (a pass once
#: stopped 30x its tol below the top of a band of ten).
_CLUSTER = 6
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
#: How far a float32 pass's Ritz value may lie from the float64 one besides its estimated
#: error (relative; ~16 units of float32's rounding on a Gram matrix of norm ~1).
_FLOAT32_RITZ = 1e-6
#: ARPACK's tolerance for the top ``k`` singular values.
_SVDS_TOL = 1e-12
#: The value's relative accuracy when neither ``tol`` nor ``width`` is given.
DEFAULT_TOL = 1e-7
#: The keywords of the public functions (for the message that refuses an unknown one).
_ARGUMENTS = {
    "operator_norm": ("source", "input_size", "tol", "width", "method", "certificate"),
    "singular_values": ("weight", "input_size", "k", "width", "method"),
}


@dataclass(frozen=True)
class NormResult:
    """The operator norm with an interval ``lower <= norm <= upper``.

    Attributes:
        value: the norm (exact methods), or the Rayleigh quotient ``||W v|| / ||v||`` of the
            computed vector (a true lower bound; within ``error`` of the norm when converged).
        lower, upper: the interval (certified unless ``upper`` is ``inf``).
        method: how it was found.
        converged: the iteration reached ``tol`` (always True for exact methods; with
            ``width``, the same as ``reached``).
        tol: the relative accuracy asked for (0.0 for exact methods and with ``width``).
        error: the estimated relative error of ``value`` (rounding for exact methods; with
            ``width``, ``upper / lower - 1``, which bounds it).
        width: the relative width asked for (``None``: none was).
        reached: ``upper / lower - 1 <= width`` (True where no width was asked).
        note: where the width was not reached: why, and what would reach it.
    """

    value: float
    lower: float
    upper: float
    method: NormMethod
    converged: bool = True
    tol: float = 0.0
    error: float = 0.0
    width: float | None = None
    reached: bool = True
    note: str = ""

    def __float__(self) -> float:
        return self.value


# -- argument checks -------------------------------------------------------------------------
def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < float(tol) < 1:
        raise ConvMatError(f"tol must be a number with 0 < tol < 1, got {tol!r}")
    return float(tol)


def _check_width(width: Any) -> float | None:
    """``None``, or a relative width with ``0 < width < 1``."""
    if width is None:
        return None
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not 0 < float(width) < 1:
        raise ConvMatError(
            f"width must be a number with 0 < width < 1 (the relative width upper / lower - 1 "
            f"of the interval), or None, got {width!r}"
        )
    return float(width)


def _check_accuracy(tol: Any, width: Any) -> tuple[float, float | None]:
    """``(tol, width)`` checked: one of them (``tol`` defaults to :data:`DEFAULT_TOL`)."""
    if tol is not None and width is not None:
        raise ConvMatError(
            f"give tol (the value's accuracy) or width (the interval's), not both; got "
            f"tol={tol!r} and width={width!r}"
        )
    return _check_tol(DEFAULT_TOL if tol is None else tol), _check_width(width)


#: Keywords that describe a layer given by its weight (:class:`ConvOperator`'s).
_CONFIG_KEYS = ("stride", "padding", "dilation", "groups", "padding_mode", "output_padding",
                "transposed", "flip")  # fmt: skip


def _check_config(function: str, config: dict[str, Any]) -> None:
    """Refuses a keyword that is not a setting of the layer, naming the allowed ones."""
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        raise ConvMatError(
            f"{function}() got an unexpected keyword argument {unknown[0]!r}; it takes "
            f"{', '.join(_ARGUMENTS[function])} and the layer's settings "
            f"{', '.join(_CONFIG_KEYS)}"
        )


def _check_k(k: Any, count: int) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= int(k) <= count:
        raise ConvMatError(f"k must be an int between 1 and {count} (or None), got {k!r}")
    return int(k)


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
    return op.with_weight(w)._pinned()  # the call's own: nothing changes its weight


def _fft_problem(op: ConvOperator) -> str:
    """Why W (a transposed layer's: W^T, of its matching convolution, with the same singular
    values) is not a circular convolution on its input (``""`` if it is)."""
    geo = op.geometry.matching_conv
    of = " of the matching convolution" if op.geometry.transposed else ""
    if not geo.mode.periodic and any(b or a for b, a in geo.padding):
        if of:
            return (f"the fft method needs circular padding (or none); a transposed "
                    f"convolution's padding is its matching convolution's zero padding, got "
                    f"padding {op.geometry.padding}")  # fmt: skip
        return f"the fft method needs circular padding (or none), got {geo.padding_mode!r}"
    if any(o * s != i for o, s, i in zip(geo.output_size, geo.stride, geo.input_size)):
        return (
            f"the fft method needs windows that tile the input (output * stride == input in "
            f"every dimension), got output {geo.output_size}, stride {geo.stride}, input "
            f"{geo.input_size}{of}"
        )
    return ""


def _dense_problem(op: ConvOperator) -> str:
    try:
        check_matrix_memory(op.geometry, torch.strided, torch.float64, op.weight.device)
    except ConvMatError as err:
        return f"the dense method forms W: {err}"
    return ""


# -- Lanczos -----------------------------------------------------------------------------------
def _error_estimate(
    theta: torch.Tensor, residuals: torch.Tensor, known: torch.Tensor | None = None
) -> float:
    """An estimate of how far the largest Ritz value lies below the largest eigenvalue.

    ``theta``: Ritz values, ascending; ``residuals``: their residual norms; ``known``: the
    largest Ritz values seen by rank in earlier bases (:func:`_known`), or ``None``. The
    smaller of the residual and, for each cluster of the top ``k`` Ritz values, the cluster's
    squared residual over its gap to the next eigenvalue (the block Kato-Temple estimate; a
    near-double top eigenvalue needs no separation from its twin).

    The next eigenvalue is estimated at the ``k+1``-th Ritz value plus its residual (a Ritz
    value lies below its eigenvalue, far below where it has not converged), and never below
    the ``k+1``-th of ``known`` (Ritz values bound their eigenvalues from below, Cauchy's
    interlacing, so the next eigenvalue is at least that high): a basis just restarted from
    its top vectors says nothing of the spectrum below them. An estimate, not a bound: an
    eigenvalue Lanczos has not yet found is not seen.
    """
    error = float(residuals[-1])
    squared = torch.cumsum(residuals.flip(0) ** 2, 0)[:-1]
    # The k+1-th largest, k = 1, 2, ...: each Ritz value plus its residual, floored by known.
    below = _known(theta + residuals, known).flip(0)[1 : theta.numel()]
    gaps = (theta.flip(0)[:-1] - below).clamp_min(_GAP_FLOOR)
    if gaps.numel():
        error = min(error, float((squared / gaps).min()))
    return error


def _known(theta: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    """The largest values by rank (ascending, aligned at the top) of ``theta`` and the earlier
    ``known`` Ritz values (each Ritz value is below the eigenvalue of its rank, so the larger
    of two is the better bound)."""
    if known is None:
        return theta.clone()
    size = max(theta.numel(), known.numel())
    a = torch.full((size,), -math.inf, dtype=theta.dtype, device=theta.device)
    b = a.clone()
    a[size - theta.numel():], b[size - known.numel():] = theta, known.to(theta)
    return torch.maximum(a, b)


def _lanczos_top(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    tol: float,
    basis: int,
    max_steps: int = _MAX_STEPS,
    enough: float = math.inf,
    min_steps: int = _REFINE_MIN_STEPS,
) -> tuple[torch.Tensor, bool]:
    """A top eigenvector of the symmetric positive semi-definite map ``apply`` by Lanczos
    (three-term recurrence, explicitly restarted every ``basis`` steps, at most ``max_steps``
    products), and whether its estimate (:func:`_error_estimate`) reached ``tol`` relative
    (trusted after ``min_steps`` products, or on an invariant Krylov space). It also stops
    once the top Ritz value reaches ``enough`` (returning ``False``)."""
    v = start / start.norm()
    steps = 0
    known: torch.Tensor | None = None
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
                theta, S = eigh(T + torch.diag(off, 1) + torch.diag(off, -1))
                top = max(float(theta[-1]), _GAP_FLOOR)
                top_few = slice(-_CLUSTER, None)
                residuals = beta * S[-1, top_few].abs()
                estimated = _error_estimate(theta[top_few], residuals, known) <= tol * top
                if (estimated and steps + j + 1 >= min_steps) or beta <= _BREAKDOWN * top:
                    converged = True
                    break
                if top >= enough:
                    break
            prev, v = v, w / beta
        y = S[:, -1].to(device=V.device, dtype=V.dtype) @ V[: j + 1]
        steps += j + 1
        if converged or steps >= max_steps or top >= enough:
            return y, converged
        known = _known(theta, known)
        v = y / y.norm()


def _orthonormal(
    block: torch.Tensor, against: torch.Tensor | None, outside: torch.Tensor | None = None
) -> torch.Tensor:
    """The rows of ``block`` made orthonormal and orthogonal to the (orthonormal) rows of
    ``against``: projected out twice as a block (classical Gram-Schmidt twice; ``outside``: that
    projection, already made), then row by row against each other; a row whose remainder is
    below :data:`_DEFLATION` (:data:`_DEFLATION_SINGLE` in single precision) of its norm is
    dropped, and one with heavy cancellation (below :data:`_CANCELLATION`) is projected once
    more (and dropped if that leaves as little of it)."""
    scale = block.norm(dim=1).tolist()
    deflation = _DEFLATION if block.dtype == torch.float64 else _DEFLATION_SINGLE

    def project(rows: torch.Tensor) -> torch.Tensor:
        return rows if against is None else rows - (rows @ against.T) @ against

    block = project(project(block)) if outside is None else outside
    kept: list[torch.Tensor] = []
    for row, norm0 in zip(block, scale):  # at most _BLOCK rows
        for _ in range(2):
            for k in kept:
                row = row - torch.dot(k, row) * k
        norm = float(row.norm())
        if norm <= deflation * max(norm0, _GAP_FLOOR):
            continue
        if norm <= _CANCELLATION * norm0:
            row = project((row / norm)[None])[0]
            for k in kept:
                row = row - torch.dot(k, row) * k
            norm = float(row.norm())
            if norm <= deflation:  # (of a unit row)
                continue
        kept.append(row / norm)
    return torch.stack(kept) if kept else block.new_empty(0, block.shape[1])


def _block_lanczos(
    apply: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    tol: float,
    basis: int,
    enough: float = math.inf,
    cheap: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_steps: int | None = None,
) -> tuple[torch.Tensor, bool, float]:
    """Block Lanczos with Rayleigh-Ritz on its whole basis, started from the rows of ``start``
    (``apply`` maps a ``(b, n)`` block), restarted from the top ``b`` Ritz vectors (whose
    images are kept, not recomputed) when the basis is full, for at most ``max_steps``
    products (default :data:`_MAX_STEPS`). It also stops once the top Ritz value reaches
    ``enough``.

    The basis ``V``, its image ``AV`` and ``H = V^T A V`` live in buffers of ``basis`` rows
    allocated once; ``size`` rows are in use. Only the last block's images reach outside the
    basis (each earlier block's were made the next block), so ``A V = V H + R^T E`` with ``R``
    their parts outside it (:func:`_outside`) and ``E`` picking the last block: the residual
    of a Ritz pair ``(theta, V^T s)`` is ``R^T s_last``, read from ``R`` (a block) instead of
    the whole basis, plus at most ``lost``: the parts of ``R`` no block kept (rows dropped as
    deflated, below :data:`_DEFLATION`), which no later residual sees.

    With ``cheap`` (a faster, less exact ``apply``: float32 products) every block but the
    first, an *anchor*, is multiplied by ``cheap``; the anchor's images are ``apply``'s, and so
    are its rows of ``H`` (``v_i^T A v_j = (A v_i)^T v_j``). A Ritz vector that is mostly the
    anchor then has a Ritz value whose error from ``cheap`` is its other part's weight squared
    times ``cheap``'s error (~1e-6 relative), and a residual whose error is that part's weight
    times it. Where the estimate reaches ``tol``, the top ``b`` Ritz vectors are multiplied by
    ``apply`` and their Ritz pairs and residuals taken again from those exact images; if the
    estimate still holds they are the answer, otherwise they are the anchor of a restarted
    basis (as at every restart: the kept vectors' images are ``apply``'s).

    Returns the top Ritz vectors (as many as the block has rows, or fewer where rows were
    deflated; ascending, the top one last), whether the top one's error estimate reached
    ``tol`` (relative), and the estimate.
    """
    b, n = start.shape
    max_steps = _MAX_STEPS if max_steps is None else max_steps
    V, AV = start.new_empty(basis, n), start.new_empty(basis, n)
    H = start.new_zeros(basis, basis)
    anchor = 0  # the first rows of the basis, whose images are apply's (with cheap)

    def extend(block: torch.Tensor, size: int, previous: int) -> tuple[int, torch.Tensor]:
        """Appends ``block`` (orthonormal, orthogonal to the basis) and its image, and fills
        the image's column of ``H``; the new size and the image's part outside the new basis.

        The image is taken off the last two blocks (``previous`` rows, then the new ones: in
        exact arithmetic its only parts in the basis), then projected once onto the whole
        basis, whose coefficients complete the column (two passes over the basis instead of
        four); a second projection only where the first removed much (DGKS's criterion)."""
        end = size + block.shape[0]
        V[size:end] = block
        image = apply(block) if cheap is None or size < anchor else cheap(block)
        AV[size:end] = image
        near = V[size - previous : end]
        column = V.new_zeros(end, block.shape[0])
        column[size - previous :] = near @ image.T
        rows = image - column[size - previous :].T @ near
        for _ in range(2):
            before = rows.norm(dim=1)
            again = V[:end] @ rows.T
            rows = rows - again.T @ V[:end]
            column += again
            if bool((rows.norm(dim=1) >= _REPROJECT * before).all()):
                break
        if cheap is not None and size >= anchor:  # the anchor's rows from its exact images
            column[:anchor] = AV[:anchor] @ block.T
        H[:end, size:end] = column
        H[size:end, :size] = column[:size].T
        return end, rows

    def anchored(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Ritz pairs of the span of the orthonormal rows ``Y`` from their exact images:
        ``(values ascending, vectors, images)``."""
        AY = apply(Y)
        h = Y @ AY.T
        values, Q = eigh((h + h.T) / 2)
        return values, Q.T @ Y, Q.T @ AY

    start = _orthonormal(start, None)
    anchor = start.shape[0] if cheap is not None else 0
    size, R = extend(start, 0, 0)
    last = steps = size
    error, lost = math.inf, 0.0
    known: torch.Tensor | None = None
    while True:
        images = AV[size - last : size]
        full = size + b > basis
        if steps >= _REFINE_MIN_STEPS or full or enough < math.inf:  # Ritz pairs: when used
            h = H[:size, :size]
            theta, S = eigh((h + h.T) / 2)
            top = max(float(theta[-1]), _GAP_FLOOR)
            count = min(max(_CLUSTER, 2 * b + 2), theta.numel())  # the top few Ritz pairs
            ends = S[size - last :, -count:].T  # (count, last): the last block's coefficients
            residuals = (ends @ R).norm(dim=1) + lost
            error = _error_estimate(theta[-count:], residuals, known) / top
            settled = steps >= _REFINE_MIN_STEPS and error <= tol
            kept = min(b, count)
            if settled and cheap is not None:  # the top Ritz pairs again, from exact images
                values, Y, AY = anchored(S[:, -kept:].T @ V[:size])
                steps += kept
                exact = (AY - values[:, None] * Y).norm(dim=1) + lost
                order = torch.argsort(torch.cat([theta[-count:-kept], values]))
                theta = torch.cat([theta[-count:-kept], values])[order]
                residuals = torch.cat([residuals[:-kept], exact])[order]
                top = max(float(theta[-1]), _GAP_FLOOR)
                error = _error_estimate(theta, residuals, known) / top
                if error <= tol or steps >= max_steps:
                    return Y, error <= tol, error
                known = _known(theta, known)  # not settled after all: the anchor of a new basis
            elif settled or steps >= max_steps or float(theta[-1]) >= enough:
                return S[:, -kept:].T @ V[:size], error <= tol, error
            elif full:
                known = _known(theta[-count:], known)
                Y = S[:, -kept:].T @ V[:size]
                if cheap is None:
                    AY, values = S[:, -kept:].T @ AV[:size], theta[-kept:]
                    R = ends[-kept:] @ R  # their residuals: outside the new basis
                else:
                    values, Y, AY = anchored(Y)
                    steps += kept
            if settled or full:  # restarted from Y, their images AY, Ritz values on H's diagonal
                if cheap is not None:  # (the part of AY outside Y, to rounding AY - values Y)
                    R, anchor = _outside(AY, Y, torch.diag(values)), kept
                images, last = AY, kept
                V[:kept], AV[:kept], size = Y, AY, kept
                H.zero_()
                H.diagonal()[:kept] = values
        block = _orthonormal(images, V[:size], R)
        if block.shape[0] == 0:  # the basis spans an invariant subspace (to _DEFLATION)
            h = H[:size, :size]
            theta, S = eigh((h + h.T) / 2)
            top = max(float(theta[-1]), _GAP_FLOOR)
            Y = S[:, -min(b, size) :].T @ V[:size]
            ay = S[:, -1] @ AV[:size] if cheap is None else apply(Y[-1:])[0]
            error = float((ay - theta[-1] * Y[-1]).norm()) / top
            return Y, error <= tol, error
        if block.shape[0] < R.shape[0]:  # rows dropped: what they held is lost
            lost += float((R - (R @ block.T) @ block).norm())
        size, R = extend(block, size, last)
        last = block.shape[0]
        steps += last


def _outside(block: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """The rows of ``block`` less their parts in the (orthonormal) rows of ``basis``, given
    ``coefficients = basis @ block.T``: removed once with those, then once more (classical
    Gram-Schmidt twice, one pass over the basis fewer)."""
    rows = block - coefficients.T @ basis
    result: torch.Tensor = rows - (rows @ basis.T) @ basis
    return result


def _basis_size(
    n: int, device: torch.device, arrays: int = 1, itemsize: int = 8, capped: bool = True
) -> int:
    """Basis vectors of length ``n`` (``itemsize`` bytes an entry, ``arrays`` of them) that fit
    1 / :data:`_FREE_SHARE` of the free memory and, if ``capped``, :data:`_BASIS_BYTES`."""
    free = (available_memory(device) or _FREE_UNKNOWN) // _FREE_SHARE
    budget = (min(_BASIS_BYTES, free) if capped else free) // (itemsize * arrays * n)
    return int(max(_BASIS_MIN, min(_BASIS_MAX, budget)))


def _gram_of(op: ConvOperator) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> op.T @ (op @ v)``."""

    def apply(v: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = op.T @ (op @ v)
        return result

    return apply


def _deflated(
    apply: Callable[[torch.Tensor], torch.Tensor], prior: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``apply`` on the complement of the (orthonormal) rows of ``prior``."""

    def deflated(v: torch.Tensor) -> torch.Tensor:
        w = apply(v - (prior @ v) @ prior)
        result: torch.Tensor = w - (prior @ w) @ prior
        return result

    return deflated


def _rough_vectors(
    side: ConvOperator,
    tol: float,
    basis: int,
    starts: torch.Tensor | None = None,
    enough: float = math.inf,
    passes: int = _BLOCK,
    single: tuple[ConvOperator, float] | None = None,
) -> tuple[torch.Tensor, bool]:
    """Up to ``passes`` float64 unit vectors spanning the top of ``side.T @ side``, from
    float32 Lanczos passes on a copy scaled to norm ~1, each from a random start (pass ``p``
    from ``starts[p]`` plus a random vector where ``starts`` has a nonzero row ``p``: a
    start alone may lie in an invariant subspace without the top, as one group of a grouped
    layer) orthogonal to the vectors found before (a start that nearly lacks the top vector,
    or a top just above the one found, is then caught by the next pass).
    A pass stops early once its Ritz value reaches ``enough`` (on ``side.T @ side``). Also
    whether every pass settled to :func:`_rough_tol` of ``tol``. ``single``: the float32
    copy (:func:`_single`), where the caller has made it."""
    fast, scale = single or _single(side)
    gen = torch.Generator(device=side.weight.device).manual_seed(0)
    n = side.shape[1]
    found: list[torch.Tensor] = []
    settled = True
    for index in range(min(passes, n)):
        start = _mixed(torch.randn(n, dtype=torch.float64, device=gen.device, generator=gen),
                       starts, index)  # fmt: skip
        apply = _gram_of(fast)
        if found:
            prior = torch.stack(found)
            start = start - (prior @ start) @ prior
            apply = _deflated(apply, prior.float())
        vector, converged = _lanczos_top(
            apply, start.float(), _rough_tol(tol), basis, _ROUGH_MAX_STEPS, enough / scale**2
        )
        settled = settled and converged
        vector = vector.double()
        if found:
            vector = vector - (prior @ vector) @ prior
        found.append(vector / vector.norm())
    return torch.stack(found), settled


def _mixed(start: torch.Tensor, starts: torch.Tensor | None, index: int) -> torch.Tensor:
    """The random ``start`` plus row ``index`` of ``starts`` (each made a unit vector) where
    that row exists and is nonzero: a given start alone may lie in an invariant subspace
    without the top (one group of a grouped layer). The random start alone where the two
    nearly cancel (only on the smallest problems: one unknown, exactly opposite)."""
    if starts is None or index >= len(starts) or not bool(starts[index].any()):
        return start
    given = starts[index].reshape(-1).to(torch.float64)
    mixed = start / start.norm() + given / given.norm()
    return mixed if float(mixed.norm()) > 0.5 else start


#: Unknowns up to which :func:`_norm_lanczos`'s float32 passes run as one block (see
#: :func:`_block_pass`; ResNet-18's layers of 256 and 512 channels at 14x14 and 7x7 have
#: 50176 and 25088, those of 128 at 28x28 100352: there the block took 0.45 s against 0.35 s).
_BLOCK_PASS_MAX = 2**16


def _block_pass(
    side: ConvOperator, tol: float, starts: torch.Tensor | None,
    single: tuple[ConvOperator, float],
) -> tuple[torch.Tensor, bool]:  # fmt: skip
    """:func:`_rough_vectors`' two float32 passes as one block Lanczos of two vectors from the
    same starts (:func:`_block_lanczos`, its basis reorthogonalised): where a product of two
    vectors costs well under two of one (ResNet-18's 512-channel layers at 7x7: 1.5-1.75x)
    and the top is clustered (small grids), it resolves the top pair in fewer products
    (layer4.0.conv2: 142 against 264, 0.55 s against 1.1 s). The two top Ritz vectors in
    float64 (the top one first) and whether the block settled to :func:`_rough_tol` of
    ``tol``."""
    fast, _ = single
    gen = torch.Generator(device=side.weight.device).manual_seed(0)
    n = side.shape[1]
    rows = [_mixed(torch.randn(n, dtype=torch.float64, device=gen.device, generator=gen),
                   starts, index) for index in range(min(_BLOCK, n))]  # fmt: skip
    block, settled, _ = _block_lanczos(_gram_of(fast), torch.stack(rows).float(),
                                       _rough_tol(tol), _refine_basis(side, _BLOCK),
                                       max_steps=_BLOCK * _ROUGH_MAX_STEPS)  # fmt: skip
    block = block.double().flip(0)
    return block / block.norm(dim=1, keepdim=True), settled


def _single(side: ConvOperator) -> tuple[ConvOperator, float]:
    """``(fast, scale)``: a float32 copy of ``side`` with its weight divided by ``scale`` (its
    largest entry: norm ~1, far from float32's overflow and underflow)."""
    scale = float(side.weight.abs().max()) or 1.0
    return side.with_weight(side.weight / scale).to(torch.float32)._pinned(), scale


def _cheap_gram(single: tuple[ConvOperator, float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``X -> side.T @ (side @ X)`` by float32 products on ``single`` (:func:`_single` of
    ``side``), in float64: within ~1e-6 of the norm's square of the float64 product, at a third
    to a half of its cost."""
    fast, scale = single

    def cheap(X: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = (fast.T @ (fast @ X.float())).double() * scale**2
        return result

    return cheap


def _rough_tol(tol: float) -> float:
    """The relative accuracy (on the Gram matrix) a float32 pass aims at for ``tol``."""
    return max(2 * tol, _ROUGH_TOL)


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
    block, converged, error = _block_lanczos(gram, start, tol / (_SAFETY * _GRAM_TO_NORM), basis)
    return block[-1], converged, error * _GRAM_TO_NORM


# -- the norm methods --------------------------------------------------------------------------
def _exact_result(
    value: float, lower: float, upper: float, method: NormMethod, slack: float, width: float | None
) -> NormResult:
    """An exact method's value with its rounding interval (relative half-width ``slack``): any
    width down to ``2 slack`` is reached."""
    if width is None:
        return NormResult(value, lower, upper, method, error=slack)
    reached = width >= 2 * slack * (1 + 1e-9)
    note = "" if reached else (
        f"the {method} method's rounding interval is {2 * slack:.0e} wide; no narrower interval "
        f"is certified here")  # fmt: skip
    return NormResult(value, lower, upper, method, reached, 0.0, 2 * slack, width, reached, note)


def _norm_fft(op: ConvOperator, tol: float, width: float | None) -> NormResult:
    geo = op.geometry.matching_conv
    before = tuple(b for b, _ in geo.padding)
    value = torus_top(TorusGrams(op.weight, geo, before, geo.input_size)).value
    lower, upper = value * (1 - _TORUS_SLACK), value * (1 + _TORUS_SLACK)
    return _exact_result(value, lower, upper, "fft", _TORUS_SLACK, width)


def _matrix_norm(matrix: torch.Tensor) -> tuple[float, float, float]:
    """``(value, lower, upper)``: the spectral norm of a dense real matrix, by LAPACK's SVD
    (relative interval :data:`_DENSE_SLACK`) up to :data:`_GRAM_FROM` multiply-adds, by its
    Gram matrix beyond (:func:`~convmat.analysis.torus.gram_norm`).

    Shape:
        ``matrix``: ``(m, n)``.
    """
    m, n = matrix.shape
    return gram_norm(matrix) if m * n * min(m, n) > _GRAM_FROM else _svd_norm(matrix)


def _svd_norm(matrix: torch.Tensor) -> tuple[float, float, float]:
    """``(value, lower, upper)`` of a dense matrix's spectral norm by LAPACK's SVD, within
    :data:`_DENSE_SLACK` (relative)."""
    value = float(torch.linalg.matrix_norm(matrix.double(), ord=2))
    slack = _DENSE_SLACK * max(value, 1.0)
    return value, value - slack, value + slack


def _norm_dense(op: ConvOperator, tol: float, width: float | None) -> NormResult:
    value, lower, upper = _svd_norm(op.to_dense().cpu())
    return _exact_result(value, lower, upper, "dense", _DENSE_SLACK, width)


def _refine_basis(side: ConvOperator, blocks: int) -> int:
    """The float64 refinement's basis: small but it matters (on large layers a basis of 20
    took 4x the products of one of 48)."""
    n = side.shape[1]
    size = min(_REFINE_BASIS, _basis_size(n, side.weight.device, 2, capped=False), n)
    return max(size, 2 * blocks)


def _norm_lanczos(op: ConvOperator, tol: float, width: float | None) -> NormResult:
    """Lanczos on ``W^T W`` (or ``W W^T``, the smaller): float32 passes find the top of the
    spectrum (:func:`_rough_vectors`; as one block of two vectors up to
    :data:`_BLOCK_PASS_MAX` unknowns, :func:`_block_pass`), a float64 block refinement from
    those vectors (:func:`_block_lanczos`) resolves it to ``tol``; the value is the Rayleigh
    quotient of the final vector, the upper end the enclosing circular convolution's norm.
    With ``width``: :func:`_norm_width`."""
    if width is not None:
        return _norm_width(op, width)
    side = op if op.shape[1] <= op.shape[0] else op.T  # iterate on the smaller side
    n = side.shape[1]
    with torch.no_grad():
        enclosing = enclosing_norm(op.weight, op.geometry.matching_conv)
        upper = enclosing.upper
        single = _single(side)  # one float32 copy for the passes and the refinement
        starts = _windowed_starts(op, enclosing, side is op)
        if n <= _BLOCK_PASS_MAX:
            rough, _ = _block_pass(side, tol, starts, single)
        else:
            rough, _ = _rough_vectors(side, tol, _basis_size(n, op.weight.device, itemsize=4),
                                      starts, single=single)  # fmt: skip
        gram_tol = tol / (_SAFETY * _GRAM_TO_NORM)
        basis = _refine_basis(side, rough.shape[0])
        block, converged, error = _block_lanczos(
            lambda X: side.T @ (side @ X), rough, gram_tol, basis, cheap=_cheap_gram(single)
        )
        vector = block[-1]
        value = float((side @ vector).norm() / vector.norm())
    if not converged:
        warnings.warn(
            f"operator_norm: Lanczos did not reach tol={tol} for {op.geometry} (estimated "
            f"error {error * _GRAM_TO_NORM:.1e}); the value is a lower bound",
            stacklevel=4,
        )
    return NormResult(value, value, max(upper, value), "lanczos", converged, tol,
                      error * _GRAM_TO_NORM)  # fmt: skip


def _windowed_lower(op: ConvOperator, enclosing: Any) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The windowed lower end (:func:`~convmat.analysis.torus.windowed_vector`) of ``op``:
    ``||W x|| / ||x||`` in float64 for the better of the real and imaginary parts, that
    input ``x`` and its image ``W x``."""
    X = _windowed_inputs(op, enclosing)
    images = op @ X
    norms = X.flatten(1).norm(dim=1)
    ratios = torch.where(norms > 0, images.flatten(1).norm(dim=1) / norms.clamp_min(1e-300), 0.0)
    best = int(torch.argmax(ratios))
    return float(ratios[best]), X[best].reshape(-1), images[best].reshape(-1)


def _windowed_inputs(op: ConvOperator, enclosing: Any) -> torch.Tensor:
    """``(2, *op's input)``: the windowed vectors of ``op``
    (:func:`~convmat.analysis.torus.windowed_vector`: the real and imaginary parts of the
    enclosing circular convolution's top plane wave under a sine taper; a zero where the wave
    is real), on the device of its weight."""
    geo = op.geometry
    X = windowed_vector(enclosing, geo.matching_conv, input_side=not geo.transposed)
    return X.to(op.weight.device)


def _windowed_starts(op: ConvOperator, enclosing: Any, input_side: bool) -> torch.Tensor:
    """``(2, n)``: :func:`_windowed_inputs` (``input_side``) or their images: on a large grid
    the top pair of the Gram matrix lies close to their span."""
    X = _windowed_inputs(op, enclosing)
    return (X if input_side else op @ X).flatten(1)


def _norm_width(op: ConvOperator, width: float) -> NormResult:
    """The interval to a relative ``width``: the enclosing circular convolution's norm,
    certified to the room the width allows, above the windowed lower end; where that lower end
    is not high enough, Lanczos from its vector (float32, then float64) until it is, or until
    it has settled (the width is then out of the circular certificate's reach)."""
    with torch.no_grad():
        enclosing = enclosing_norm(op.weight, op.geometry.matching_conv, _UPPER_SHARE * width)
        upper = enclosing.upper
        target = upper / (1 + width)
        value, x, image = _windowed_lower(op, enclosing)
        method: NormMethod = "window"
        if value < target:
            method = "lanczos"
            side, start = (op, x) if op.shape[1] <= op.shape[0] else (op.T, image)
            n = side.shape[1]
            # float32 Ritz values are good to ~1e-6: aim a little above the target.
            settle = _WIDTH_SETTLED * width
            rough, settled = _rough_vectors(side, settle,
                                            _basis_size(n, op.weight.device, itemsize=4),
                                            start[None],
                                            (target * (1 + 4e-6)) ** 2, passes=1)  # fmt: skip
            vector = rough[0]
            value = max(value, float((side @ vector).norm()))
            # A pass that settled this far below the target (to the accuracy the width asks,
            # not to the float32 floor above it): the top lies within that accuracy (and
            # float32's rounding) of its value, which no refinement lifts to the target (the
            # width is out of the circular certificate's reach).
            within = _GRAM_TO_NORM * _rough_tol(settle) + _FLOAT32_RITZ
            settled = settled and _rough_tol(settle) <= 2 * settle
            if value < target and not (settled and value * (1 + within) < target):
                block, _, _ = _block_lanczos(
                    lambda X: side.T @ (side @ X),
                    rough,
                    _WIDTH_SETTLED * width,
                    _refine_basis(side, 1),
                    target**2,
                )
                value = max(value, float((side @ block[-1]).norm() / block[-1].norm()))
        # The room left above the largest eigenvalue found may be all that is missing: certify
        # again with less (the torus costs a fraction of the products already spent).
        closest = enclosing.top.value * enclosing.fold
        if value > 0 and upper > value * (1 + width) and closest < value * (1 + width):
            room = 0.5 * ((value * (1 + width) / closest) ** 2 - 1)
            enclosing = enclosing_norm(op.weight, op.geometry.matching_conv, max(room, SLACK),
                                       enclosing.grams)  # fmt: skip
            upper = enclosing.upper
    error = upper / value - 1 if value > 0 else (0.0 if upper == 0 else math.inf)
    reached = error <= width
    note = ""
    if not reached:
        why = (f"the padding's copies (norm {enclosing.fold:.3g}) multiply the circular end"
               if enclosing.fold > 1 else "the enclosing circular convolution's norm lies "
               "above this layer's (small grids)")  # fmt: skip
        note = (f"width {width:g} not reached: the circular certificate gives {error:.1e} here "
                f"({why}); certificate='tight' proves a narrower upper end")  # fmt: skip
    return NormResult(value, value, max(upper, value), method, reached, 0.0, error, width,
                      reached, note)  # fmt: skip


def _values_fft(op: ConvOperator, k: int | None) -> torch.Tensor:
    geo = op.geometry.matching_conv
    before = tuple(b for b, _ in geo.padding)
    per_freq = torus_spectrum(op.weight, geo, before, geo.input_size)
    values = torch.linalg.svdvals(per_freq).reshape(-1)
    return torch.sort(values, descending=True).values.cpu()


def _values_dense(op: ConvOperator, k: int | None) -> torch.Tensor:
    values: torch.Tensor = torch.linalg.svdvals(op.to_dense().cpu())
    return values


def _is_zero(op: ConvOperator) -> bool:
    """W is the zero matrix: |W| applied to ones is zero (every tap reads padding, is cropped
    away, or has a zero weight)."""
    magnitude = op.with_weight(op.weight.abs())
    ones = torch.ones(1, *magnitude.in_shape, dtype=torch.float64, device=op.weight.device)
    return not bool((magnitude @ ones).any())


def _values_lanczos(op: ConvOperator, k: int | None, accuracy: float = _SVDS_TOL) -> torch.Tensor:
    count = min(op.shape)
    if k is None or k >= count:
        raise ConvMatError(
            f"method='lanczos' finds the top k < {count} singular values of this "
            f"{op.shape[0]} x {op.shape[1]} W; ask for k (or method='dense' for all), got k={k!r}"
        )
    if _is_zero(op):
        return torch.zeros(k, dtype=torch.float64)
    from scipy.sparse.linalg import svds  # type: ignore[import-untyped]

    top = svds(op.to_scipy(), k=k, return_singular_vectors=False, tol=accuracy)
    return torch.sort(torch.as_tensor(top.copy(), dtype=torch.float64), descending=True).values


# -- the registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpectralMethod:
    """One spectral method: everything else (``Method``'s values, the validation of
    ``method=``, ``"auto"``'s choice, the docstrings' list) is derived from the records of
    :data:`REGISTRY`.

    Attributes:
        name: what ``method=`` names it.
        summary: one line for the documentation.
        problem: why it does not apply to an operator (``""`` where it does).
        auto: whether ``"auto"`` takes it (asked in the registry's order; ``norm_only``: only
            the norm is wanted).
        norm: the operator norm (``op, tol, width``).
        values: the singular values (``op, k``).
    """

    name: str
    summary: str
    problem: Callable[[ConvOperator], str]
    auto: Callable[[ConvOperator, bool], bool]
    norm: Callable[[ConvOperator, float, float | None], NormResult]
    values: Callable[[ConvOperator, int | None], torch.Tensor]


def _dense_is_cheap(op: ConvOperator, norm_only: bool) -> bool:
    rows, cols = op.shape
    if norm_only:
        return rows * cols * min(rows, cols) <= AUTO_DENSE_WORK or min(op.shape) < 3
    return rows * cols <= AUTO_DENSE_ENTRIES or min(op.shape) < 3


#: The spectral methods in ``"auto"``'s order of preference.
REGISTRY: dict[str, SpectralMethod] = {
    m.name: m
    for m in (
        SpectralMethod(
            "fft",
            "exact; circular padding (or none) whose windows tile the input (a transposed "
            "layer: its matching convolution's)",
            _fft_problem,
            lambda op, norm_only: not _fft_problem(op),
            _norm_fft,
            _values_fft,
        ),
        SpectralMethod(
            "dense",
            "the dense SVD of W; auto takes it while W is small",
            _dense_problem,
            _dense_is_cheap,
            _norm_dense,
            _values_dense,
        ),
        SpectralMethod(
            "lanczos",
            "Lanczos on the smaller Gram side (the norm, certified by the enclosing "
            "circular convolution) or ARPACK (the top k)",
            lambda op: "",
            lambda op, norm_only: True,
            _norm_lanczos,
            _values_lanczos,
        ),
    )
}
#: The methods by name (``"auto"`` picks one of them).
METHODS: tuple[str, ...] = tuple(REGISTRY)


def _check_method(method: Any) -> Method:
    if method != "auto" and method not in REGISTRY:
        raise ConvMatError(f"method must be one of {('auto', *METHODS)!r}, got {method!r}")
    return cast(Method, method)


def _resolve(method: str, op: ConvOperator, norm_only: bool = False) -> str:
    """The method to run: ``method`` if it applies (ConvMatError saying why not), or the first
    of :data:`REGISTRY` whose ``auto`` takes it."""
    if method == "auto":
        return next(m.name for m in REGISTRY.values() if m.auto(op, norm_only))
    problem = REGISTRY[method].problem(op)
    if problem:
        raise ConvMatError(f"method={method!r} does not apply: {problem}")
    return method


def _certified_upper(
    source: Any, input_size: Any, method: str = "auto", width: float | None = None,
    grams: TorusGrams | None = None,
) -> float:  # fmt: skip
    """The upper end :func:`operator_norm` gives (circular certificate), without the value where
    that takes an iteration: for Lanczos the enclosing circular convolution's norm, which is
    that upper end (the Lanczos value lies below it), certified to the room a ``width``
    allows (from ``grams``, its Gram matrices, where given)."""
    op = _operator(source, input_size, {})
    chosen = _resolve(_check_method(method), op, norm_only=True)
    if chosen == "lanczos":
        room = SLACK if width is None else _UPPER_SHARE * width
        return enclosing_norm(op.weight, op.geometry.matching_conv, room, grams).upper
    return REGISTRY[chosen].norm(op, _ROUGH_TOL, None).upper  # exact methods: no tol


def singular_values(
    weight: Any,
    input_size: Any = None,
    *,
    k: int | None = None,
    width: float | None = None,
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
        width: with ``k``, the relative accuracy the iterative method needs (its cost falls as
            ``width`` grows): for ``k=1`` the value of :func:`operator_norm` with that
            ``width`` (inside its certified interval), for ``k > 1`` ARPACK's tolerance.
            Exact methods ignore it.
        method: ``"fft"`` (exact; circular padding or none, windows tiling the input),
            ``"dense"`` (SVD of W), ``"lanczos"`` (ARPACK, top ``k < min(W.shape)`` only) or
            ``"auto"``: fft where it applies, dense while W is small, lanczos otherwise.
        **config: the layer's settings (stride, padding, dilation, groups, padding_mode,
            output_padding, transposed, flip); any other keyword is refused.

    Returns:
        float64 tensor on the CPU.

    Raises:
        ConvMatError: a method that does not apply (saying why), all values of a W too large to
            form (ask for ``k``), non-finite or complex weights, a bad ``k`` or ``width``
            (``width`` without ``k``), an unknown keyword.

    Shape:
        ``(min(rows, cols),)`` or ``(k,)``.

    >>> w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    >>> fft = singular_values(w, (8, 8), padding=1, padding_mode="circular", method="fft")
    >>> from convmat import conv_matrix
    >>> W = conv_matrix(w, (8, 8), padding=1, padding_mode="circular")
    >>> torch.allclose(fft, torch.linalg.svdvals(W), atol=1e-10)
    True
    """
    _check_config("singular_values", config)
    method = _check_method(method)
    width = _check_width(width)
    op = _operator(weight, input_size, config)
    k = _check_k(k, min(op.shape))
    if width is not None and k is None:
        raise ConvMatError(f"width applies to the top k singular values; give k, got "
                           f"width={width!r} with k=None")  # fmt: skip
    chosen = _resolve(method, op)
    if method == "auto" and chosen == "lanczos" and k is None:
        raise ConvMatError(
            f"W is {op.shape[0]} x {op.shape[1]}: too large for all its singular values "
            f"without an exact method; ask for the top k"
        )
    if chosen == "lanczos" and width is not None:
        with kept_pages():  # chunks and products of the same sizes again and again
            if k == 1:
                return torch.tensor([_norm_width(op, width).value], dtype=torch.float64)
            return _values_lanczos(op, k, width)
    values = REGISTRY[chosen].values(op, k)
    return values if k is None else values[:k]


def operator_norm(
    source: Any,
    input_size: Any = None,
    *,
    tol: float | None = None,
    width: float | None = None,
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

    With ``width``, the interval is the goal: the result comes as soon as ``upper / lower - 1
    <= width``, ``value`` (= ``lower``) inside it. On large grids the windowed top vector of the
    enclosing circular convolution reaches it with two convolutions (``method == "window"``);
    otherwise Lanczos starts from that vector and stops at the width. Where the circular
    certificate cannot reach the width, ``reached`` is False and ``note`` says why;
    ``certificate="tight"`` then narrows the upper end.

    Args:
        source: a weight (with ``**config``), a plain conv module, or a ConvOperator.
        input_size: spatial size of one input.
        tol: the relative accuracy Lanczos delivers on the value when it converges (checked
            against dense SVD and ARPACK on random layers at the default, ``1e-7``); the
            result's ``converged`` and ``error`` say what it reached.
        width: the certified interval's relative width ``upper / lower - 1`` to reach instead
            (``0 < width < 1``; not with ``tol``). Its cost falls as ``width`` grows.
        method: one of the registry's (:data:`REGISTRY`): ``"fft"``, ``"dense"``,
            ``"lanczos"`` or ``"auto"`` (fft where it applies, dense while its SVD is cheap
            (:data:`AUTO_DENSE_WORK`), lanczos otherwise).
        certificate: the upper end of a Lanczos value: ``"circular"`` (fast; the enclosing
            circular convolution's norm, up to a few percent above for zero padding on small
            grids, within ~1e-4 on large ones) or ``"tight"`` (an inertia test by sparse
            Cholesky, :func:`convmat.analysis.certify.certify_upper`: relative width ~5e-7, or
            ``width``; minutes and gigabytes for large layers; needs ``pip install
            "convmat[certify]"``), tried only where the circular end is wider than asked.
            Where the tight test fails, the circular end stays.
        **config: the layer's settings (stride, padding, dilation, groups, padding_mode,
            output_padding, transposed, flip); any other keyword is refused.

    Returns:
        :class:`NormResult`.

    Raises:
        ConvMatError: a method that does not apply (saying why), non-finite or complex weights,
            a ``tol`` or ``width`` outside (0, 1) (or both given), a module that is not a plain
            convolution, an unknown keyword.

    Shape:
        a scalar.

    >>> r = operator_norm(nn.Conv2d(2, 2, 3, padding=1).double(), (6, 6))
    >>> r.lower <= r.value <= r.upper, r.method, r.converged
    (True, 'dense', True)
    >>> w = torch.randn(8, 8, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> r = operator_norm(w, (64, 64), padding=1, width=1e-2, method="lanczos")
    >>> r.reached, r.upper / r.lower - 1 <= 1e-2, r.lower <= r.value <= r.upper
    (True, True, True)
    """
    _check_config("operator_norm", config)
    tol, width = _check_accuracy(tol, width)
    method = _check_method(method)
    if certificate not in _CERTIFICATES:
        raise ConvMatError(f"certificate must be one of {_CERTIFICATES!r}, got {certificate!r}")
    op = _operator(source, input_size, config)
    with kept_pages():  # chunks and products of the same sizes again and again
        result = REGISTRY[_resolve(method, op, norm_only=True)].norm(op, tol, width)
    if certificate == "tight" and result.method in ("lanczos", "window") and not (
            width is not None and result.reached):  # fmt: skip
        result = _tighten(op, result, tol, width)
    return result


def _tighten(op: ConvOperator, result: NormResult, tol: float, width: float | None
             ) -> NormResult:  # fmt: skip
    """The upper end narrowed by the inertia test (:func:`~convmat.analysis.certify.
    certify_upper`) at ``eps`` (:data:`_TIGHT_EPS`, or the width asked): with a width, the
    value is first resolved to a small part of it."""
    from .certify import certify_upper

    eps = _TIGHT_EPS
    if width is not None:
        eps = width
        if result.method == "window" or result.error > width:
            settled = _norm_lanczos(op, max(_WIDTH_SETTLED * width, _ROUGH_TOL), None)
            result = replace(result, value=max(result.value, settled.value),
                             lower=max(result.lower, settled.value), method="lanczos")  # fmt: skip
    weight = op.weight.detach().to(torch.float64)
    proof = certify_upper(weight, op.geometry, result.value**2, eps=eps)
    if proof.certified and proof.upper < result.upper:
        result = replace(result, upper=max(proof.upper, result.value))
    if width is not None:
        error = result.upper / result.lower - 1
        reached = error <= width
        result = replace(result, error=error, reached=reached, converged=reached,
                         note="" if reached else result.note + "; the tight test did not "
                         "reach it either")  # fmt: skip
    return result
