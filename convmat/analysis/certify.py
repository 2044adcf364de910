"""A tight, rigorous upper bound on a convolution's operator norm by an inertia test.

Given a candidate ``theta`` close to ``sigma_max(W)^2`` (a Lanczos value, a lower end), a sparse
Cholesky factorisation of ``s I - A``, with ``A`` the smaller Gram side of ``W`` and ``s`` a
little under ``theta (1 + eps)``, either succeeds, which proves ``sigma_max(W)^2 <=
theta (1 + eps)`` once every rounding error is accounted for (the argument is in
:func:`certify_upper`), or meets a non-positive pivot and proves nothing.

The factorisation is CHOLMOD's supernodal Cholesky, the library the ``cvxopt`` wheel ships (an
optional dependency: ``pip install "convmat[certify]"``), called directly by
:mod:`convmat.analysis.cholmod` (cvxopt's own interface is the fallback), in a nested-dissection
ordering of the spatial grid with each position's channels kept together, so the factor's dense
blocks are ``C x C`` or larger. The Gram of a zero-padded layer is built block by block from
products of kernel taps, without W.
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from .._errors import ConvMatError
from ..engine import (
    Geometry,
    assemble,
    check_allocation,
    check_weight,
    read_by,
    reads,
    tap_reading,
    weight_view,
)
from .cholmod import factor, load_cvxopt

__all__ = ["Certificate", "certify_upper", "nested_dissection"]

_U = 2.0**-53  # unit roundoff of float64
_ETA = 2.0**-1074  # smallest positive subnormal (underflow)
_LEAF = 64  # positions in a box left undivided


class Certificate(NamedTuple):
    """The result of :func:`certify_upper` (unpacks as ``upper, certified, info``).

    Attributes:
        upper: a proven upper bound on ``sigma_max(W)`` when ``certified``; ``inf`` otherwise.
        certified: whether ``sigma_max(W)^2 <= theta (1 + eps)`` was proven.
        info: how: ``side`` (``"input"`` for ``W^T W``, ``"output"`` for ``W W^T``), ``n``,
            ``shift`` (the ``s`` factored), ``margin`` (the rounding allowance, relative to
            ``theta``), ``row_count`` (the bound ``k`` on a row of the factor),
            ``factor_nnz_bound`` (on the factor's entries), ``failed_column`` (where a pivot
            was not positive), ``reason``, ``times`` (seconds per step), and once factored
            ``factor_nnz`` and ``factorization`` (``"direct"``, or ``"cvxopt"`` where the
            direct binding refused the library).
    """

    upper: float
    certified: bool
    info: dict[str, Any]


def _gamma(m: float) -> float:
    """Higham's ``gamma_m = m u / (1 - m u)``."""
    if m * _U >= 0.5:
        return math.inf
    return m * _U / (1.0 - m * _U)


def _up(x: float, ulps: int = 4) -> float:
    """``x`` moved up by a few units in the last place (covers the rounding of the margin's
    own arithmetic, whose relative error is a few ``u``)."""
    for _ in range(ulps):
        x = math.nextafter(x, math.inf)
    return x * (1.0 + 16.0 * _U)


def nested_dissection(size: tuple[int, ...], reach: tuple[int, ...]) -> np.ndarray:
    """An elimination order of the positions of a grid by geometric nested dissection.

    Positions ``p`` and ``q`` are taken to be coupled when ``|p_d - q_d| <= reach_d`` in every
    dimension; a box is split across its longest side by a slab ``reach_d`` wide (numbered last),
    recursively, until it holds at most 64 positions. Any order is valid for the certificate:
    this one only keeps the factor small.

    Args:
        size: the spatial size of the grid.
        reach: coupling distance per dimension (0: only a position with itself).

    Returns:
        a permutation of ``range(prod(size))`` (C order positions), int64.

    Shape:
        ``(prod(size),)``.

    >>> nested_dissection((5,), (1,)).tolist()
    [0, 1, 2, 3, 4]
    >>> sorted(nested_dissection((20, 20), (1, 1)).tolist()) == list(range(400))
    True
    """
    index = np.arange(math.prod(size), dtype=np.int64).reshape(size)
    if max(reach, default=0) == 0:
        return index.ravel()
    out: list[np.ndarray] = []
    stack: list[tuple[np.ndarray, bool]] = [(index, False)]
    # An explicit stack: a box is pushed as (box, False); when popped it pushes its separator
    # as (slab, True) first, then its two halves, so both halves come out before the slab.
    while stack:
        box, done = stack.pop()
        if done or box.size <= _LEAF:
            out.append(box.ravel())
            continue
        widths = [box.shape[d] / max(reach[d], 1) for d in range(box.ndim)]
        d = int(np.argmax(widths))
        r = reach[d]
        if box.shape[d] <= 2 * r + 2:
            out.append(box.ravel())
            continue
        mid = (box.shape[d] - r) // 2
        take = [slice(None)] * box.ndim
        parts = []
        for lo, hi in ((0, mid), (mid, mid + r), (mid + r, box.shape[d])):
            take[d] = slice(lo, hi)
            parts.append(box[tuple(take)])
        left, slab, right = parts
        stack.append((slab, True))
        stack.append((right, False))
        stack.append((left, False))
    return np.concatenate(out)


def _to_scipy(t: torch.Tensor) -> Any:
    import scipy.sparse as sp  # type: ignore[import-untyped]

    return sp.csr_matrix(
        (t.values().numpy(), t.col_indices().numpy(), t.crow_indices().numpy()), shape=t.shape
    )


def _gram_side(conv: Geometry) -> tuple[str, tuple[int, ...], int, tuple[int, ...]]:
    """The smaller Gram side: its name, grid, channels and coupling reach per dimension."""
    rows, cols = conv.matrix_shape
    if rows <= cols:  # W W^T: output positions whose windows overlap
        return "output", conv.output_size, conv.out_channels, conv.gram_reach("output")
    return "input", conv.input_size, conv.in_channels, conv.gram_reach("input")


def _axis_masks(conv: Geometry, side: str, d: int, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Along dimension ``d``: ``pos[x, delta, a]``, whether the Gram entry between positions
    ``x`` and ``x + delta`` (``delta`` in ``-reach..reach``, stored at ``delta + reach``) takes
    tap ``a`` at a valid place, and ``partner[delta, a]``, the tap ``b`` it pairs with (-1
    where none). Zero padding: the places are the window rule's (:mod:`convmat.engine.axes`)."""
    k, s, dil = conv.kernel_size[d], conv.stride[d], conv.dilation[d]
    before = conv.padding[d][0]
    n_in, n_out = conv.input_size[d], conv.output_size[d]
    delta = np.arange(-reach, reach + 1)[:, None]
    a = np.arange(k)[None, :]
    # The place tap a of output 0 reads; the partner b reads the same place from output
    # delta (output side), or the place delta further on from output 0 (input side).
    place0 = reads(0, a, s, dil, before)
    if side == "output":  # rows are output positions o, reading o s + a dil - before
        n = n_out
        x = np.arange(n)[:, None, None]
        place = reads(x, a[None], s, dil, before)
        pos = (place >= 0) & (place < n_in)
        b, exact = tap_reading(place0, delta, s, dil, before)
    else:  # rows are input positions i, read by output (i + before - a dil) / s
        n = n_in
        x = np.arange(n)[:, None, None]
        o, hit = read_by(x, a[None], s, dil, before)
        pos = hit & (o >= 0) & (o < n_out)
        b, exact = tap_reading(place0 + delta, 0, s, dil, before)
    partner = np.where(exact & (b >= 0) & (b < k), b, -1)
    inside = (x + delta[None] >= 0) & (x + delta[None] < n)
    return pos & inside & (partner >= 0)[None], partner


def _gram_lower(
    w: torch.Tensor, conv: Geometry, side: str, reach: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The lower triangle of the Gram side, exactly as sums of tap products, without W.

    Unknowns in channels-last order ``position * C + channel``. Zero padding only (the
    coupling is local). Returns ``(rows, cols, values, p)`` (COO, exact zeros dropped) with
    ``p`` the most products summed into one entry.
    """
    g = conv.groups
    cout, cin = conv.out_channels, conv.in_channels
    taps = math.prod(conv.kernel_size)
    # The weight with its groups spelt out: (taps, C_out, C_in), zeros across groups.
    full = torch.zeros(cout, cin, taps, dtype=torch.float64)
    per_in, per_out = cin // g, cout // g
    grouped = w.reshape(g, per_out, per_in, taps)
    full.view(g, per_out, g, per_in, taps).diagonal(dim1=0, dim2=2).copy_(
        grouped.permute(1, 2, 3, 0)
    )
    taps_first = full.permute(2, 0, 1)
    if side == "input":
        taps_first = taps_first.transpose(1, 2)  # K[a, b] = w_a^T w_b
        p = per_out * taps
    else:
        p = per_in * taps
    channels = taps_first.shape[1]
    pair = torch.einsum("acj,bdj->abcd", taps_first, taps_first)  # (taps, taps, C, C)
    masks = [_axis_masks(conv, side, d, r) for d, r in enumerate(reach)]
    ndim = len(reach)
    size = tuple(m[0].shape[0] for m in masks)
    # Displacements delta <= 0 in flat (lexicographic) order: the lower triangle's blocks.
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1)
    deltas = grid.reshape(-1, ndim)[: (grid.size // ndim) // 2 + 1]
    kernel = conv.kernel_size
    # Tap index pairs per displacement: partner[delta, a] multi-dimensional.
    idx = np.stack(np.meshgrid(*[np.arange(k) for k in kernel], indexing="ij"), -1)
    idx = idx.reshape(-1, ndim)  # (taps, ndim)
    partner = np.stack(
        [masks[d][1][deltas[:, d] + reach[d]][:, idx[:, d]] for d in range(ndim)], -1
    )  # (D, taps, ndim)
    valid_pair = (partner >= 0).all(-1)
    b_flat = np.ravel_multi_index(tuple(np.maximum(partner, 0).transpose(2, 0, 1)), kernel)
    gathered = pair[np.arange(taps)[None, :], torch.from_numpy(b_flat)]  # (D, taps, C, C)
    gathered = gathered * torch.from_numpy(valid_pair)[..., None, None]
    # Position masks (P, D, taps) as a product over dimensions.
    coef = None
    for d in range(ndim):
        m = masks[d][0][:, deltas[:, d] + reach[d]][:, :, idx[:, d]]  # (n_d, D, taps)
        shape = [1] * ndim + [len(deltas), taps]
        shape[d] = size[d]
        m = m.reshape(shape)
        coef = m if coef is None else coef & m
    assert coef is not None
    coef_t = torch.from_numpy(np.ascontiguousarray(coef.reshape(-1, len(deltas), taps)))
    blocks = torch.bmm(
        coef_t.to(torch.float64).transpose(0, 1), gathered.reshape(len(deltas), taps, -1)
    )  # (D, P, C*C)
    del gathered, coef_t
    positions = math.prod(size)
    strides = np.array([math.prod(size[d + 1 :]) for d in range(ndim)])
    offset = (deltas * strides).sum(-1)  # flat position offset (<= 0)
    values = blocks.reshape(len(deltas), positions, channels, channels).numpy()
    row_pos = np.arange(positions)[None, :, None, None]
    col_pos = row_pos + offset[:, None, None, None]
    ch = np.arange(channels)
    row = row_pos * channels + ch[None, None, :, None]
    col = col_pos * channels + ch[None, None, None, :]
    # Ordered by row, then column (flat offsets grow with delta in lexicographic order): read
    # with rows and columns swapped, the upper triangle in compressed-column form.
    blocks_shape = values.shape
    order = (1, 2, 0, 3)
    values = values.transpose(order)
    row = np.broadcast_to(row, blocks_shape).transpose(order)
    col = np.broadcast_to(col, blocks_shape).transpose(order)
    keep = ((values != 0) & (row >= col)) | (row == col)
    return row[keep], col[keep], values[keep], p


def _row_count_bound(
    pattern: Any, order: np.ndarray, channels: int, cvxopt: Any
) -> tuple[int, int]:
    """Upper bounds on the number of entries in any row of the Cholesky factor of the full
    matrix and in the whole factor, from the factor of its position-level (quotient) pattern.

    The scalar pattern is contained in ``kron(Q, ones(C, C))`` with ``Q`` the pattern of
    positions; fill is monotone in the pattern, and the scalar order is the block expansion of
    ``order`` (CHOLMOD's postordering is an equivalent order: it keeps every row's set of
    earlier neighbours). So a row of the scalar factor has at most ``C`` times the entries of a
    row of ``Q``'s factor. ``Q``'s factor is computed symbolically through CHOLMOD on a
    diagonally dominant matrix with that pattern (no cancellation: all entries positive).
    """
    import scipy.sparse as sp

    q = sp.csr_matrix(pattern, dtype=np.float64)
    q.data[:] = 1.0
    q = q + q.T
    q.data[:] = 1.0
    degree = float(np.asarray(q.sum(axis=1)).max())
    q = sp.tril(q + sp.identity(q.shape[0]) * (degree + 1.0)).tocoo()
    cholmod = cvxopt.cholmod
    mat = cvxopt.spmatrix(q.data.tolist(), q.row.tolist(), q.col.tolist(), q.shape)
    saved = dict(cholmod.options)
    try:
        cholmod.options["supernodal"] = 0
        cholmod.options["postorder"] = False
        # The given order only: cvxopt's default (nmethods 0) also tries AMD and keeps the
        # order with less fill, and a bound for that order says nothing of the one factored.
        cholmod.options["nmethods"] = 1
        f = cholmod.symbolic(mat, p=cvxopt.matrix(order.astype(np.int64).tolist(), tc="i"))
        cholmod.numeric(mat, f)
        lower = cholmod.getfactor(f)
    finally:
        cholmod.options.clear()
        cholmod.options.update(saved)
    rows = np.asarray(cvxopt.matrix(lower.I), dtype=np.int64).ravel()
    counts = np.bincount(rows, minlength=q.shape[0])
    return int(counts.max()) * channels, len(rows) * channels * channels


def certify_upper(
    weight: torch.Tensor, geometry: Geometry, theta: float, *, eps: float = 1e-6
) -> Certificate:
    """Prove ``sigma_max(W)^2 <= theta (1 + eps)`` by a sparse Cholesky factorisation.

    ``A`` is the smaller Gram side of W (``W^T W`` or ``W W^T``, same non-zero spectrum) built
    exactly in float64 from :func:`convmat.conv_matrix`'s CSR W (padding other than zeros is
    folded into W, so every mode is handled alike; a transposed convolution is the adjoint of
    ``geometry.matching_conv``, same norm). ``M = s I - A`` is factored by CHOLMOD in a nested
    dissection order of the spatial grid, channels of one position kept together.

    **Why a success proves the bound (rounding included).** Write ``u = 2^-53`` and
    ``gamma_m = m u / (1 - m u)``.

    1. ``W_hat``, the float64 W, equals W for zero padding (entries are weight values); folded
       entries are sums of at most ``m = prod(kernel)`` taps, so ``|W - W_hat| <= gamma_m T``
       with ``T`` the folded W of ``|weight|``, and ``sigma(W) <= sigma(W_hat) + dW`` with
       ``dW = gamma_m ||T||_F``.
    2. ``A_hat = fl(W_hat^T W_hat)``: each entry a sum of at most ``p`` products (``p`` the most
       non-zeros in a column of ``W_hat``, or a row for ``W W^T``), in any order, so ``||A_hat -
       W_hat^T W_hat||_2 <= gamma_p || |W_hat| ||_2^2 <= gamma_p ||W_hat||_F^2 =: dA``.
    3. ``M_hat``: off the diagonal ``-A_hat`` exactly, on it ``fl(s - a_ii)``, so ``M_hat = s I
       - A_hat + D`` with ``||D||_2 <= u (s + max a_ii) =: dD``; and ``trace(M_hat) <= n s``.
    4. Cholesky completing with positive pivots on ``P M_hat P^T`` (Demmel 1989; Higham,
       *Accuracy and Stability*, Thm 10.3, with the inner products' lengths bounded by ``k``,
       the most entries in a row of the factor: terms that are structural zeros are exact zeros
       and add no rounding) gives ``L L^T = P M_hat P^T + E``, ``|E| <= gamma_{k+1} |L||L^T|``,
       hence ``||E||_2 <= gamma_{k+1} ||L||_F^2 <= gamma_{k+1} / (1 - gamma_{k+1})
       trace(M_hat) =: dE`` (Rump, *Verification of positive definiteness*, BIT 2006), plus
       ``n (k + 2) eta`` for underflow (``eta = 2^-1074``). ``k`` is bounded by ``C`` times the
       longest row of the factor of the position-level pattern, or by the longest row CHOLMOD
       stored (relaxed supernodes store exact zeros), whichever is smaller.
    5. ``L L^T`` is positive semidefinite, so ``s I - A_hat + D + E >= 0``, ``lambda_max(A_hat) <=
       s + dD + dE``, ``sigma_max(W_hat)^2 <= s + dD + dE + dA``, and
       ``sigma_max(W) <= sqrt(s + dD + dE + dA) + dW =: upper``.

    ``s`` is chosen before factoring as the largest value with ``upper <= sqrt(theta (1 +
    eps))`` (the margins are bounded a priori with ``s`` replaced by ``theta (1 + eps)``). If the
    margin exceeds the budget ``theta eps`` the test is not attempted (``certified`` is False,
    ``info["reason"]`` says so). If the factorisation fails, nothing is proven (``upper`` is
    ``inf``): either ``theta`` is too low, or it is within the margin of the true value.

    Args:
        weight: the layer's weight (``(C_out, C_in // groups, *kernel)``; of a transposed
            layer, its own ``(C_in, C_out // groups, *kernel)``).
        geometry: the convolution's :class:`~convmat.engine.Geometry`.
        theta: the candidate for ``sigma_max^2`` (e.g. the square of a Lanczos value).
        eps: the relative slack on ``theta``, in ``(0, 0.01]``; it must cover the rounding
            margin (``info["margin"]``, typically 1e-10 to 1e-7 of ``theta``).

    Returns:
        :class:`Certificate` ``(upper, certified, info)``.

    Raises:
        ConvMatError: a weight that does not fit ``geometry``, a ``theta`` that is not a finite
            positive number, ``eps`` outside ``(0, 0.01]``, or cvxopt missing (saying how to
            install it).

    Shape:
        ``n = C * prod(size)`` unknowns, ``C`` and ``size`` of the smaller side of W.

    >>> from convmat.engine import conv_geometry
    >>> w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    >>> geo = conv_geometry(w.shape, (8, 8), padding=1)
    >>> from convmat import conv_matrix
    >>> sigma = torch.linalg.matrix_norm(conv_matrix(w, 8, padding=1), 2).item()
    >>> upper, ok, info = certify_upper(w, geo, sigma**2)
    >>> ok, sigma <= upper <= sigma * (1 + 1e-6)
    (True, True)
    >>> certify_upper(w, geo, sigma**2 * (1 - 1e-4)).certified
    False
    """
    weight, conv, theta, eps = _checked(weight, geometry, theta, eps)
    cvxopt = load_cvxopt()
    times: dict[str, float] = {}
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(w).all():
        raise ConvMatError("weight must be finite, got non-finite values")
    side, size, channels, reach = _gram_side(conv)
    n = math.prod(size) * channels

    start = time.perf_counter()
    perm, k, factor_nnz_bound = _elimination_order(conv, side, size, channels, reach, cvxopt)
    times["order"] = time.perf_counter() - start
    start = time.perf_counter()
    row, col, values, on_diag, diag, p, d_w = _gram(w, conv, side, size, channels, reach)
    times["build"] = time.perf_counter() - start

    bound = _margins(diag, p, d_w, n, k, theta, eps)
    info: dict[str, Any] = {
        "side": side, "n": n, "shift": bound.shift, "margin": bound.margin / theta,
        "row_count": k, "factor_nnz_bound": factor_nnz_bound, "failed_column": None,
        "reason": "", "times": times,
    }  # fmt: skip
    if not bound.shift > theta:
        info["reason"] = (
            f"the rounding margin {bound.margin / theta:.3g} (relative) does not fit in eps={eps!r}"
        )
        return Certificate(math.inf, False, info)

    # M = s I - A, lower triangle (the Gram's values turned into M's), factored in `perm`.
    start = time.perf_counter()
    np.negative(values, out=values)
    values[on_diag] += bound.shift
    del on_diag
    times["assemble"] = time.perf_counter() - start
    failed, k_used, factor_nnz, via = factor(row, col, values, perm, n, times)
    del row, col, values
    info["factor_nnz"] = factor_nnz
    info["factorization"] = via
    if failed is not None:
        info["failed_column"] = failed
        info["reason"] = (
            "a pivot was not positive: theta (1 + eps) is below sigma_max^2 or within the margin"
        )
        return Certificate(math.inf, False, info)
    return _proven(bound, k, k_used, n, theta, info)


def _checked(
    weight: torch.Tensor, geometry: Geometry, theta: float, eps: float
) -> tuple[torch.Tensor, Geometry, float, float]:
    """The arguments of :func:`certify_upper`, checked: the weight, the convolution whose
    norm is certified (a transposed layer's matching one), ``theta`` and ``eps`` as floats."""
    if not isinstance(geometry, Geometry):
        raise ConvMatError(f"geometry must be a Geometry, got {type(geometry).__name__}")
    weight = check_weight(weight)
    conv = geometry.matching_conv
    expected = (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
    if tuple(weight.shape) != expected:
        raise ConvMatError(
            f"weight must have shape {expected!r} for this geometry, got {tuple(weight.shape)!r}"
        )
    if isinstance(theta, torch.Tensor):
        theta = theta.item()
    number = isinstance(theta, (int, float)) and not isinstance(theta, bool)
    if not (number and math.isfinite(theta) and theta > 0):
        raise ConvMatError(f"theta must be a finite number > 0, got {theta!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 0.01:
        raise ConvMatError(f"eps must be a number in (0, 0.01], got {eps!r}")
    if weight.is_complex():
        raise ConvMatError(f"weight must be real, got {weight.dtype}")
    return weight, conv, float(theta), float(eps)


def _elimination_order(
    conv: Geometry, side: str, size: tuple[int, ...], channels: int, reach: tuple[int, ...],
    cvxopt: Any,
) -> tuple[np.ndarray, int, int]:  # fmt: skip
    """The order the Gram side is factored in (nested dissection of the grid, each position's
    channels together), the bound ``k`` on a row of its factor and the bound on the factor's
    entries; refuses, before anything large is built, a Gram and factor that do not fit."""
    order = nested_dissection(size, reach)
    # The position-level pattern: one channel, an all-ones kernel.
    ones = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64)
    one = Geometry(
        False, 1, 1, 1, conv.input_size, conv.output_size, conv.kernel_size, conv.stride,
        conv.dilation, conv.padding, conv.padding_mode,
    )  # fmt: skip
    pos = _to_scipy(assemble(weight_view(ones, one), one, torch.sparse_csr))
    pattern = pos @ pos.T if side == "output" else pos.T @ pos
    k, factor_nnz = _row_count_bound(pattern, order, channels, cvxopt)
    entries = pattern.nnz * channels * channels  # the Gram's stored entries, at most
    check_allocation(
        20 * entries + 8 * factor_nnz, "cpu",
        f"the tight certificate's Gram matrix ({entries} entries) and Cholesky factor "
        f"({factor_nnz} entries)", "use the default (circular) upper bound",
    )  # fmt: skip
    perm = (order[:, None] * channels + np.arange(channels)[None, :]).ravel()
    return perm, k, factor_nnz


def _gram(
    w: torch.Tensor, conv: Geometry, side: str, size: tuple[int, ...], channels: int,
    reach: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, float]:  # fmt: skip
    """The Gram side's lower triangle ``(row, col, values)`` in channels-last order (sorted
    by row, then column, with every diagonal entry), which entries are on the diagonal, the
    diagonal itself, ``p`` (the most products summed into an entry) and ``dW`` (the bound on
    how far the float64 W is from W: 0 for zero padding, whose entries are weight values)."""
    if not conv.mode.folds:
        row, col, values, p = _gram_lower(w, conv, side, reach)
        d_w = 0.0
    else:  # folded taps couple distant positions: the Gram from W itself
        row, col, values, p, d_w = _gram_folded(w, conv, side, math.prod(size), channels)
    on_diag = row == col
    diag = np.zeros(math.prod(size) * channels)
    diag[row[on_diag]] = values[on_diag]
    return row, col, values, on_diag, diag, p, d_w


def _gram_folded(
    w: torch.Tensor, conv: Geometry, side: str, positions: int, channels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float]:
    """:func:`_gram`'s triangle, ``p`` and ``dW`` for a padding mode that folds taps: from the
    sparse W (``dW = gamma_m ||T||_F``, ``T`` the folded W of ``|weight|``)."""
    n = positions * channels
    mat = _to_scipy(assemble(weight_view(w, conv), conv, torch.sparse_csr))
    if side == "output":
        p = int(np.diff(mat.indptr).max(initial=0))
        gram = (mat @ mat.T).tocoo()
    else:
        p = int(np.bincount(mat.indices, minlength=mat.shape[1]).max(initial=0))
        gram = (mat.T @ mat).tocoo()
    del mat
    # C order (channel, position) -> channels-last (position, channel)
    row = (gram.row % positions) * channels + gram.row // positions
    col = (gram.col % positions) * channels + gram.col // positions
    keep = row >= col
    row, col, values = row[keep], col[keep], gram.data[keep]
    # a diagonal entry for every unknown (an input no tap reaches has none in W^T W)
    missing = np.setdiff1d(np.arange(n), row[row == col])
    row, col = np.concatenate([row, missing]), np.concatenate([col, missing])
    values = np.concatenate([values, np.zeros(len(missing))])
    sort = np.lexsort((col, row))
    row, col, values = row[sort], col[sort], values[sort]
    del gram
    folded = assemble(weight_view(w.abs(), conv), conv, torch.sparse_csr).values()
    d_w = _gamma(math.prod(conv.kernel_size)) * _up(
        math.sqrt(float(torch.dot(folded, folded)) / (1.0 - _gamma(folded.numel())))
    )
    return row, col, values, p, d_w


class _Margins(NamedTuple):
    """The rounding allowances of :func:`certify_upper`'s argument (steps 1 to 4), bounded a
    priori with ``s <= t = theta (1 + eps)``, and the shift ``s`` they leave."""

    t: float
    d_a: float
    d_d: float
    d_e: float
    d_w: float
    shift: float

    @property
    def margin(self) -> float:
        return self.d_a + self.d_d + self.d_e


def _factor_error(k: int, n: int, t: float) -> float:
    """``dE``: the Cholesky backward error for rows of at most ``k`` entries (step 4)."""
    g = _gamma(k + 1)
    return _up(g / (1.0 - g) * n * t + n * (k + 2) * _ETA)


def _margins(
    diag: np.ndarray, p: int, d_w: float, n: int, k: int, theta: float, eps: float
) -> _Margins:
    """The margins, and the largest ``s`` with ``upper <= sqrt(theta (1 + eps))``."""
    # ||W_hat||_F^2 = trace(W_hat^T W_hat), each diagonal entry computed within gamma_p.
    frob2 = float(diag.sum()) / (1.0 - _gamma(p)) / (1.0 - _gamma(n))
    t = theta * (1.0 + eps)
    max_diag = float(diag.max(initial=0.0))
    d_a = _up(_gamma(p) * frob2)
    d_d = _up(_U * (t + max_diag))
    d_e = _factor_error(k, n, t)
    room = math.sqrt(t) - d_w
    margin = d_a + d_d + d_e
    s = (room * room) * (1.0 - 64.0 * _U) - margin if room > 0 else -math.inf
    return _Margins(t, d_a, d_d, d_e, d_w, s)


def _proven(
    bound: _Margins, k: int, k_used: int | None, n: int, theta: float, info: dict[str, Any]
) -> Certificate:
    """The certificate of a factorisation that succeeded (step 5): the margin again with the
    factor's own longest row where that is shorter than the a priori ``k``."""
    margin = bound.margin
    if k_used is not None and k_used < k:  # the factor's own rows: a smaller k, measured
        info["row_count"] = k_used
        margin = bound.d_a + bound.d_d + _factor_error(k_used, n, bound.t)
        info["margin"] = margin / theta
    upper = _up(math.sqrt(_up(bound.shift + margin))) + _up(bound.d_w)
    info["reason"] = "proven"
    return Certificate(upper, upper <= _up(math.sqrt(bound.t)), info)
