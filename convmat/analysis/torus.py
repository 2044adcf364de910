"""The enclosing circular convolution: its exact norm (the certified upper end of every
zero-padded layer's norm) and the windowed lower end that its top singular vector gives.

A convolution reads its padded input through windows; on a torus at least as large as the
padded input (and a multiple of the stride) no window wraps, so W is a block of that circular
convolution. Split into its ``stride`` polyphase components, the circular convolution is
block-diagonal in frequency: one ``C_out/g x C_in/g * phases`` matrix ``M_f`` per frequency
``f`` and group (Sedghi, Gupta & Long 2019; Senderovich et al. 2022), and its norm is the
largest ``||M_f||``.

The maximum is certified frequency by frequency, never trusting an eigensolver's value: every
frequency's Gram matrix ``G_f`` (``M_f M_f^H`` or ``M_f^H M_f``, the smaller) must pass a
Cholesky test of ``s I - G_f`` that proves ``lambda_max(G_f) <= level`` with every rounding
error bounded (:func:`_psd_proof`). The tests run in single precision first, with a rigorous
margin that grows like ``n^2 u``, and in double precision only for the frequencies single
precision could not prove; eigenvalues are computed only for the few frequencies that may hold
the maximum (ranked by a few Lanczos steps). The ``level`` is the largest eigenvalue found, times
``1 + room``: an exact norm asks for a room of :data:`SLACK`; an interval of a requested width
allows more room, which most frequencies then pass in single precision.

The lower end (:func:`windowed_vector`): the circular convolution's top singular vector, a plane
wave at the top frequency, made compatible with zero padding by a sine taper along each axis, is
a real input whose ``||W x|| / ||x||`` lies within ``O(1/N^2)`` of the circular norm on an
``N``-wide grid: on large grids a certified interval for the price of the torus and two
convolutions.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from ..engine import (
    Geometry,
    available_memory,
    check_allocation,
    kept_pages,
    reads,
    same_values,
    tensor_bytes,
)

#: Relative room of an exact norm: the level is the largest eigenvalue found times ``1 + SLACK``
#: (far above what the rounding of double-precision Cholesky tests costs for a few thousand
#: channels, ~4 n^2 u relative; the room grows where that does not hold).
SLACK = 1e-10
#: Lanczos steps that rank the frequencies before any is decomposed (only an ordering is
#: needed; six steps cost what eight power steps did, and on 512-row tori left 0-5 frequencies
#: above the first level where power steps left 4-22).
_RANK_STEPS = 6
#: Frequencies decomposed per round (:func:`_top_pairs`), and in the first round this many
#: times more where ``eigh`` decomposes them (a few estimates of the ranking may lie above the
#: top's own). Wide Gram matrices (Lanczos) take one batch of 2 first: each decomposed costs a
#: Lanczos run, and a top missed costs one more round (512 rows, 45 frequencies: 8 first
#: 0.22-0.28 s, 2 first 0.09-0.11 s; 256 rows at 128x128 0.08 -> 0.02 s; the same levels).
_BATCH, _FIRST_BATCHES = 4, 4
#: The smallest level proven (Gram matrices of zero norm: any positive level holds).
_FLOOR = 1e-300
#: Unit roundoffs of the precisions of the Cholesky tests (complex: the torus; real: a dense
#: matrix's Gram matrix, :func:`gram_norm`).
_UNIT = {torch.complex64: 2.0**-24, torch.complex128: 2.0**-53, torch.float32: 2.0**-24,
         torch.float64: 2.0**-53}  # fmt: skip
#: Most bytes of the tap-pair products (beyond: the Gram matrices from the FFT spectrum).
_PAIRS_BYTES = 2**30
#: Most bytes of one chunk of Gram matrices (and at most 1 / _FREE_SHARE of the free memory).
_CHUNK_BYTES = 2**28
_FREE_SHARE = 4
#: Free memory assumed where none is reported.
_FREE_UNKNOWN = 2**31
#: A weight whose largest entry's binary exponent exceeds this (either way) is scaled by a
#: power of two before its Gram matrices are formed (their entries square it).
_SCALE_BITS = 256


# -- small dense problems ------------------------------------------------------------------------
@contextmanager
def serial() -> Iterator[None]:
    """Runs small dense LAPACK calls (``eigh`` of a few hundred rows at most) on one CPU thread:
    with two threads, torch's ``eigh`` of a 48 x 48 matrix took 58 ms instead of 0.2 ms (200
    x 200: 660 ms instead of 4 ms) on the 2-core machine under load. The thread count is the
    process's; it is restored on exit."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of small Hermitian matrices, serially on the CPU
    (:func:`serial`)."""
    if matrix.device.type != "cpu":
        return torch.linalg.eigh(matrix)  # type: ignore[no-any-return]
    with serial():
        return torch.linalg.eigh(matrix)  # type: ignore[no-any-return]


# -- the per-frequency matrices -------------------------------------------------------------------
def tap_shifts(
    kernel: list[int], geo: Geometry, before: tuple[int, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every tap's offset ``q = m*d - before = s*t + r`` (what output 0 reads,
    :func:`convmat.engine.reads`) split into its phase ``r`` (one flat
    index over the stride's phases) and its shift ``t`` on the small torus (one tensor per
    dimension, not reduced modulo anything), taps in C order."""
    offsets = [reads(0, torch.arange(k), s, d, b)
               for k, s, d, b in zip(kernel, geo.stride, geo.dilation, before)]  # fmt: skip
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


def _unravel(flat: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """``(len(flat), ndim)``: the coordinates of C-order flat indices (the inverse of
    :func:`_flat`; ``torch.unravel_index`` imports sympy on its first call, ~1 s)."""
    coords = []
    for n in reversed(sizes):
        coords.append(torch.remainder(flat, n))
        flat = torch.div(flat, n, rounding_mode="floor")
    return torch.stack(coords[::-1], 1)


def _polyphase(weight: torch.Tensor, geo: Geometry, column: torch.Tensor, phases: int,
               positions: int) -> torch.Tensor:  # fmt: skip
    """``(groups, C_out/g, C_in/g * phases, positions)``: the weight with tap ``j`` added at
    ``column[j] = phase * positions + position``."""
    groups, (c_out, cin_g) = geo.groups, weight.shape[:2]
    w = weight.detach().to(torch.float64).reshape(groups, c_out // groups, cin_g, -1)
    poly = w.new_zeros(groups, c_out // groups, cin_g, phases * positions)
    poly.index_add_(3, column.to(w.device), w)
    return poly.reshape(groups, c_out // groups, cin_g * phases, positions)


def torus_spectrum(
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
    r_flat, shifts = tap_shifts(list(weight.shape[2:]), geo, before)
    phases = math.prod(geo.stride)
    if top_only:  # number the phases that are read 0, 1, ...
        read, r_flat = torch.unique(r_flat, return_inverse=True)
        phases = read.numel()
    t_flat = _flat([torch.remainder(t, m) for t, m in zip(shifts, small)], small)
    poly = _polyphase(weight, geo, r_flat * math.prod(small) + t_flat, phases, math.prod(small))
    poly = poly.reshape(*poly.shape[:3], *small)
    axes = tuple(range(3, 3 + len(small)))
    spectrum = torch.fft.rfftn(poly, dim=axes) if top_only else torch.fft.fftn(poly, dim=axes)
    result: torch.Tensor = spectrum.reshape(*spectrum.shape[:3], -1).permute(0, 3, 1, 2)
    return result


class TorusGrams:
    """The Gram matrices ``M M^H`` or ``M^H M`` (the smaller) of :func:`torus_spectrum`'s
    per-frequency matrices ``M`` (``top_only``), numbered ``0 .. count - 1`` (group-major), made
    on demand in chunks of bounded memory: :meth:`at` gives ``(len(index), side, side)``. Axes
    along which they do not vary (every tap at one shift) keep frequency 0 only.

    With ``A_t`` the real matrix of the taps at shift ``t`` (``M_f = sum_t A_t e^{-i w_f t}``),
    ``M_f M_f^H = sum_delta B_delta e^{-i w_f delta}`` where ``B_delta = sum_{t - t' = delta}
    A_t A_t'^T``: all tap pairs in one real product, then a short sum over the offsets
    ``delta`` per frequency (for a 3x3 kernel 81 real products per channel block in all, where
    forming each frequency's Gram matrix takes four complex products per frequency). Where the
    pairs outnumber the frequencies (large kernels on small tori) the Gram matrices are formed
    from the FFT spectrum, all at once, after a memory check.

    :meth:`form_error` bounds (in spectral norm) how far a Gram matrix formed in a precision may
    lie from the true one. A weight whose largest entry lies beyond ``2^+-`` :data:`_SCALE_BITS`
    is divided by a power of two (exactly) first, ``scale``, so that its Gram matrices neither
    overflow nor vanish in float64: they, and :meth:`matrix`, are then those of ``weight /
    scale`` (:func:`torus_top` gives norms of ``weight``).
    """

    def __init__(
        self, weight: torch.Tensor, geo: Geometry, before: tuple[int, ...], torus: tuple[int, ...]
    ) -> None:
        exponent = math.frexp(float(weight.abs().max()) if weight.numel() else 0.0)[1]
        self.scale = 1.0
        if abs(exponent) > _SCALE_BITS:  # (frexp(0) has exponent 0)
            self.scale = math.ldexp(1.0, exponent - 1)  # entries below 2
            weight = weight / self.scale
        small = tuple(t // s for t, s in zip(torus, geo.stride))
        r_flat, shifts = tap_shifts(list(weight.shape[2:]), geo, before)
        read, r_flat = torch.unique(r_flat, return_inverse=True)
        low = [int(t.min()) for t in shifts]
        box = [int(t.max()) - lo + 1 for t, lo in zip(shifts, low)]
        taps, groups = math.prod(box), geo.groups
        rows, cols = weight.shape[0] // groups, weight.shape[1] * read.numel()
        self.rows, self.cols, self.read = rows, cols, read
        self.side = side = min(rows, cols)
        self.freq_shape = (*small[:-1], small[-1] // 2 + 1)
        self.small, self.groups, self.device = small, groups, weight.device
        self.freqs = math.prod(self.freq_shape)
        self.count = groups * self.freqs
        t_flat = _flat([t - lo for t, lo in zip(shifts, low)], box)
        # poly[g, :, :, j]: the taps at shift low + unravel(j) (for M_f at a single frequency).
        self._poly = _polyphase(weight, geo, r_flat * taps + t_flat, read.numel(), taps)
        coords = [c.reshape(-1) for c in torch.meshgrid(*map(torch.arange, box), indexing="ij")]
        self._shifts = torch.stack(coords, 1) + torch.tensor(low)
        free = available_memory(weight.device) or _FREE_UNKNOWN
        budget = min(_CHUNK_BYTES, free // _FREE_SHARE)
        self._cast: dict[torch.dtype, torch.Tensor] = {}
        if taps * taps > 4 * self.freqs or 2 * groups * (taps * side) ** 2 * 8 > _PAIRS_BYTES:
            need = self.count * (rows * cols + side * side) * 16
            check_allocation(need, weight.device, "the enclosing circular convolution's "
                             "per-frequency matrices")  # fmt: skip
            M = torus_spectrum(weight, geo, before, torus, top_only=True).flatten(0, 1)
            self._all: torch.Tensor | None = M @ M.mH if rows <= cols else M.mH @ M
            self.chunk = self.count
            self.terms = 0  # (formed already)
            self.ranking = _unranked(self.count)
            # The FFT's error (~log2(F) u per entry of M, M bounded by sum_t ||A_t||_F), the
            # product's (~side u) and the cast: generously, u (4 log2 F + 4 side + 16) ||M||^2.
            self._frob = frob = float(self._poly.norm(dim=(1, 2)).sum(-1).max()) ** 2
            self._form = (4 * math.log2(max(self.freqs, 2)) + 4 * side + 16) * frob
            return
        self._all = None
        # Along an axis where every tap has the same shift (kernel 1 there, or kernel = stride:
        # one tap per phase) the Gram matrices do not depend on the frequency: frequency 0
        # stands for all (U-Net's 2x2 up-convolutions at 112x112: 6384 -> 1 matrix to prove).
        self.freq_shape = tuple(1 if b == 1 else f for b, f in zip(box, self.freq_shape))
        self.freqs = math.prod(self.freq_shape)
        self.count = groups * self.freqs
        # A[g, t] = the taps at shift t as a side x other matrix.
        poly = self._poly
        A = poly.permute(0, 3, 1, 2) if rows <= cols else poly.permute(0, 3, 2, 1)
        # The pairs t <= t' only: the pair (t', t) is the transpose of (t, t').
        first, second = torch.triu_indices(taps, taps, device=A.device)
        pairs = A[:, first] @ A[:, second].mT
        # delta = t - t' for M M^H, t' - t for M^H M; B[g, j] sums the pairs at offset j.
        sign = 1 if rows <= cols else -1
        delta = torch.stack([sign * (c[:, None] - c[None, :]).reshape(-1) for c in coords], 1)
        self.offsets, which = torch.unique(delta, dim=0, return_inverse=True)
        which = which.to(A.device)
        B = A.new_zeros(groups, len(self.offsets), side, side)
        B.index_add_(1, which[first * taps + second], pairs)
        apart = first != second
        B.index_add_(1, which[second[apart] * taps + first[apart]], pairs[:, apart].mT)
        # Pairs delta, -delta: B_delta e^{-i theta} + B_{-delta} e^{i theta} = cos theta (B_delta
        # + B_{-delta}) - i sin theta (B_delta - B_{-delta}), all real: the real part from the
        # zero offset and the symmetric sums, the imaginary part from the antisymmetric
        # differences (a quarter of the complex products' work).
        negative = torch.stack([torch.nonzero((self.offsets == -o).all(1))[0, 0]
                                for o in self.offsets])  # fmt: skip
        zero = torch.nonzero((self.offsets == 0).all(1))[0, 0]
        keys = [tuple(o) for o in self.offsets.tolist()]
        half = torch.tensor([j for j, k in enumerate(keys) if k > tuple(-v for v in k)],
                            dtype=torch.long)  # fmt: skip
        half_on = half.to(B.device)
        self._half = torch.cat([zero.reshape(1), half])
        self._real_terms = torch.cat(
            [B[:, zero, None], B[:, half_on] + B[:, negative[half].to(B.device)]], 1
        ).reshape(groups, len(half) + 1, side * side)
        self._imag_terms = (B[:, half_on] - B[:, negative[half].to(B.device)]).reshape(
            groups, len(half), side * side)  # fmt: skip
        # The casts of the terms and of cos/sin (2u each per term) and the sums of K terms (K u),
        # taken four times over, against sum_delta ||B_delta||_F.
        self._frob = frob = float(B.norm(dim=(2, 3)).sum(1).max())
        self._form = 4 * (len(self.offsets) + 4) * frob
        per_matrix = side * side * 16 * (len(self.offsets) if groups > 1 else 3)
        self.chunk = max(1, budget // per_matrix)
        self.terms = len(self.offsets)
        self.ranking = _unranked(self.count)

    def scaled(self, scale: torch.Tensor) -> TorusGrams | None:
        """The Gram matrices of the weight with output channel ``c`` scaled by ``scale[c]`` (a
        BatchNorm folded in), from these: ``S M M^H S``, each term (or matrix) scaled on both
        sides, nothing formed again. ``None`` where these are ``M^H M`` (the input side: the
        scale sits inside) or a weight was divided by a power of two (:attr:`scale`).

        The scaling rounds each entry twice more (``2 u`` relative): the bound on the forming
        error grows by ``2 u`` times the terms' Frobenius norms, and both scale by ``max
        scale^2``.

        Shape:
            ``scale``: ``(C_out,)``.
        """
        if self.rows > self.cols or self.scale != 1.0:
            return None
        s = scale.detach().to(device=self.device, dtype=torch.float64)
        s = s.reshape(self.groups, self.rows)
        poly = self._poly * s[:, :, None, None]
        largest = float(poly.abs().max()) if poly.numel() else 0.0
        if abs(math.frexp(largest)[1]) > _SCALE_BITS:
            return None
        new = copy.copy(self)
        outer = s[:, :, None] * s[:, None, :]  # (groups, side, side)
        top2 = float(s.abs().max()) ** 2 if s.numel() else 0.0
        new._poly, new._cast, new.ranking = poly, {}, _unranked(self.count)
        if self._all is not None:
            sizes = (self.groups, -1, self.side, self.side)
            new._all = (self._all.view(sizes) * outer[:, None]).reshape(self._all.shape)
        else:
            flat = outer.reshape(self.groups, 1, -1)
            new._real_terms, new._imag_terms = self._real_terms * flat, self._imag_terms * flat
        new._frob = top2 * self._frob
        new._form = top2 * (self._form + 2 * self._frob)
        return new

    def nbytes(self) -> int:
        """The bytes of the tensors these Gram matrices keep."""
        kept = [self._poly, self._shifts, self.ranking, *self._cast.values()]
        kept += [self._all] if self._all is not None else [self._real_terms, self._imag_terms]
        return tensor_bytes(kept)

    def form_error(self, dtype: torch.dtype) -> float:
        """A bound on ``||G~ - G||_2`` for a Gram matrix ``G~`` made by :meth:`at` in ``dtype``."""
        return float(self._form * _UNIT[dtype])

    def _coefficients(self, dtype: torch.dtype) -> torch.Tensor:
        """``(groups, K_real + K_imag, 2 side^2)`` in the real dtype of ``dtype``: the real terms
        in the even columns, the imaginary ones in the odd (zeros elsewhere), so that one real
        product of ``[cos | sin]`` with it is the complex Gram matrices, interleaved, with no
        copy to assemble them."""
        real = torch.empty((), dtype=dtype).real.dtype
        if real not in self._cast:
            g, kr, kk = self.groups, self._real_terms.shape[1], self._imag_terms.shape[1]
            terms = self._real_terms.new_zeros(g, kr + kk, self.side * self.side, 2)
            terms[:, :kr, :, 0] = self._real_terms
            terms[:, kr:, :, 1] = self._imag_terms
            self._cast[real] = terms.reshape(g, kr + kk, -1).to(real)
        return self._cast[real]

    def coords(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The group and the frequency coordinates ``(len(index), ndim)`` of frequencies
        numbered ``index``."""
        g, f = index.div(self.freqs, rounding_mode="floor"), index.remainder(self.freqs)
        return g, _unravel(f, self.freq_shape)

    def _turns(self, coords: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """``(len(coords), len(shifts))`` float64: ``sum_d f_d t_d / N_d`` reduced mod 1 in
        integers first (so that the angle is exact to float64 rounding)."""
        turns = torch.zeros(len(coords), len(shifts), dtype=torch.float64)
        for d, n in enumerate(self.small):
            turns += torch.remainder(coords[:, d, None] * shifts[None, :, d], n).double() / n
        return turns

    def at(self, index: torch.Tensor, dtype: torch.dtype = torch.complex128) -> torch.Tensor:
        """The Gram matrices numbered ``index``, ``(len(index), side, side)`` (fresh memory)."""
        if self._all is not None:
            return self._all[index].to(dtype)
        g, coords = self.coords(index)
        angle = -2 * math.pi * self._turns(coords, self.offsets[self._half])
        terms = self._coefficients(dtype)
        trig = torch.cat([torch.cos(angle), torch.sin(angle[:, 1:])], 1)
        trig = trig.to(device=self.device, dtype=terms.dtype)
        if self.groups == 1:
            flat = trig @ terms[0]
        else:
            flat = torch.einsum("cj,cjk->ck", trig, terms[g.to(self.device)])
        return torch.view_as_complex(flat.view(-1, self.side, self.side, 2))

    def matrix(self, index: int) -> torch.Tensor:
        """``M_f`` of frequency ``index``: ``(C_out/g, C_in/g * read phases)`` complex128."""
        g, coords = self.coords(torch.tensor([index]))
        turns = self._turns(coords, self._shifts)[0]
        phase = torch.polar(torch.ones_like(turns), -2 * math.pi * turns).to(self.device)
        return self._poly[int(g)].to(torch.complex128) @ phase

    def chunks(
        self, index: torch.Tensor, dtype: torch.dtype = torch.complex128, size: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(part, at(part))`` for consecutive parts of ``index`` of at most ``size``
        (default and at most: ``chunk``)."""
        for part in torch.split(index, min(size or self.chunk, self.chunk)):
            yield part, self.at(part, dtype)

    def warm(self, dtype: torch.dtype) -> None:
        """Makes what :meth:`at` keeps per dtype, before threads call it."""
        if self._all is None:
            self._coefficients(dtype)


# -- the certified maximum ------------------------------------------------------------------------
def _rounding(n: int, dtype: torch.dtype) -> float:
    """``alpha`` of the Cholesky test: a Cholesky factorisation of the Hermitian ``A`` that
    completes in this precision proves ``lambda_min(A) >= -alpha * trace(A)`` (Demmel's bound
    ``|E| <= gamma_{n+1} |R^H| |R|`` of the factor's backward error, with ``|| |R^H||R| || <=
    trace(R^H R)``, as in Rump's test of positive definiteness; ``gamma`` taken at ``4(n+1)``
    for complex arithmetic)."""
    gamma = 4 * (n + 1) * _UNIT[dtype]
    return gamma / (1 - 2 * gamma)


def _below(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64 ``value`` rounded down to the real ``dtype`` (at most ``value``), as float64.

    >>> float(_below(torch.tensor([1 + 2.0**-30], dtype=torch.float64), torch.float32)[0])
    1.0
    >>> float(_below(torch.tensor([1 - 2.0**-30], dtype=torch.float64), torch.float32)[0])
    0.9999999403953552
    """
    cast = value.to(dtype)
    down = torch.nextafter(cast, torch.full_like(cast, -math.inf))
    return torch.where(cast.double() > value, down, cast).double()


def _psd_proof(G: torch.Tensor, level: float, form_error: float) -> torch.Tensor:
    """Which of the Gram matrices ``G`` (``(b, n, n)``, formed within ``form_error`` of the
    true ones) are proven to have no eigenvalue above ``level``, by a Cholesky factorisation of
    ``S = fl(s I - G)`` in ``G``'s precision, with ``s`` below ``level`` by every rounding error.

    ``S = s I - G + D`` with ``D`` the rounding of the diagonal's subtraction (``|d_ii| <= u (s +
    max |g_ii|)``, ``s`` rounded down to the test's precision first: a single-precision ``s``
    rounded to nearest could lie ``u s`` above); a factorisation that completes proves
    ``lambda_min(S) >= -alpha trace(S)`` (:func:`_rounding`), so ``lambda_max(G_true) <= s +
    ||D|| + alpha trace(S) + form_error``, which ``s`` keeps at or below ``level``. Overwrites
    ``G``."""
    n, u = G.shape[-1], _UNIT[G.dtype]
    alpha = _rounding(n, G.dtype)
    diagonal = G.diagonal(dim1=-2, dim2=-1).real.to(torch.float64)
    trace, largest = diagonal.sum(-1), diagonal.abs().amax(-1)
    # s (1 + u + alpha n (1 + u)) + u largest (1 + alpha n) - alpha trace + form_error <= level,
    # solved for s, then rounded down (float64's own rounding here is ~1e-16 relative).
    s = (level - u * largest * (1 + alpha * n) + alpha * trace - form_error) / (
        1 + u + alpha * n * (1 + u)
    )
    s = s * (1 - 1e-13) - torch.finfo(torch.float64).tiny
    S = G.neg_()
    shift = _below(s, S.real.dtype)[:, None].to(S.device, S.real.dtype)
    S.diagonal(dim1=-2, dim2=-1).add_(shift)
    result: torch.Tensor = _cholesky_completes(S).cpu() & (s > 0).cpu()
    return result


#: Sides from which the CPU's batched Cholesky factorisation is blocked by hand (LAPACK's, one
#: matrix at a time, is slow on small ones), and the block (measured on 2 cores, complex64 /
#: complex128, per matrix: 128 rows 311-396 / 660-721 us -> 194-202 / 406-477 us with blocks of
#: 32; 256 rows 0.9-1.2 / 1.4-1.7 ms -> 0.8 / 1.2-1.4 ms with 64; 64 rows no faster); from
#: ``_SINGLE_FROM`` rows one LAPACK call per matrix instead, which threads within the matrix
#: (complex128 at 256 / 384 / 512 rows: 2.1-2.5 / 4.5-4.8 / 8.5-9.7 ms by batch or blocks ->
#: 1.4 / 3.0 / 5.8-6.5 ms; complex64 no slower).
_BLOCKED_FROM, _BLOCK_SMALL, _BLOCK_LARGE, _SINGLE_FROM = 96, 32, 64, 256


#: The CPU's batch is split between threads (each running LAPACK on one core) from this much
#: work, ``b n^3``: MKL's factorisation of one small matrix barely uses a second core (64 rows,
#: complex64, 2 cores: 70 us a matrix batched, 36-44 us in two threads of one core each; 96
#: rows 127 -> 77 us; complex128 at 128 rows 349 -> 242 us, 384 rows 3.3 -> 2.3 ms).
_SPLIT_WORK = 2**22
#: Bytes of the Gram matrices a thread forms and tests at once (they stay in its cache).
_CACHED_BYTES = 2**22


_Part = TypeVar("_Part")


def _threads(count: int, work: int, device: torch.device) -> int:
    """Threads (of one core each) to share ``count`` small dense problems of ``work`` in all
    (:data:`_SPLIT_WORK`): 1 off the CPU, for little work, or where torch runs one thread."""
    if device.type != "cpu" or work < _SPLIT_WORK:
        return 1
    return max(1, min(torch.get_num_threads(), count))


def _mapped(run: Callable[[_Part], list[torch.Tensor]], parts: list[_Part]) -> list[torch.Tensor]:
    """``run`` over ``parts``, each in its own thread of one core where there are several (see
    :func:`_threads`), in order."""
    if len(parts) == 1:
        return run(parts[0])
    with serial(), ThreadPoolExecutor(len(parts)) as pool:
        return list(itertools.chain.from_iterable(pool.map(run, parts)))


def _cached(side: int, dtype: torch.dtype) -> int:
    """How many ``side x side`` matrices of ``dtype`` make :data:`_CACHED_BYTES`."""
    return max(1, _CACHED_BYTES // (side * side * dtype.itemsize))


def _cholesky_completes(S: torch.Tensor) -> torch.Tensor:
    """Whether the Cholesky factorisation of each Hermitian ``S`` (``(b, n, n)``, overwritten)
    completes: on the CPU, parts of the batch at once in threads of one core each
    (:data:`_SPLIT_WORK`)."""
    threads = _threads(S.shape[0], S.shape[0] * S.shape[-1] ** 3, S.device)
    return torch.cat(_mapped(lambda part: [_completes(part)], list(S.tensor_split(threads))))


def _completes(S: torch.Tensor) -> torch.Tensor:
    """:func:`_cholesky_completes` in this thread. On the CPU, from :data:`_BLOCKED_FROM` rows:
    right-looking by blocks, LAPACK on the diagonal blocks, a batched triangular solve for the
    panel and a batched product for the update (the same sums as any Cholesky factorisation, in
    another order: the same rounding bound, :func:`_rounding`)."""
    n = S.shape[-1]
    if S.device.type != "cpu" or n < _BLOCKED_FROM:
        completes: torch.Tensor = torch.linalg.cholesky_ex(S).info == 0
        return completes
    if n >= _SINGLE_FROM:
        infos = [torch.linalg.cholesky_ex(matrix).info for matrix in S]
        return torch.stack(infos) == 0 if infos else torch.ones(0, dtype=torch.bool)
    block = _BLOCK_SMALL if n < 2 * _BLOCKED_FROM else _BLOCK_LARGE
    completes = torch.ones(S.shape[0], dtype=torch.bool)
    for k in range(0, n, block):
        end = min(k + block, n)
        factor, info = torch.linalg.cholesky_ex(S[:, k:end, k:end])
        completes &= info == 0
        if end < n:  # the panel L21 = A21 L11^-H, then A22 -= L21 L21^H
            panel = torch.linalg.solve_triangular(factor.mH, S[:, end:, k:end], upper=True,
                                                  left=False)  # fmt: skip
            S[:, end:, end:].baddbmm_(panel, panel.mH, alpha=-1)
    return completes


@dataclass(frozen=True)
class TorusTop:
    """The certified maximum over frequencies.

    Attributes:
        upper: ``sqrt(level)``: no frequency's ``||M_f||`` exceeds it (certified).
        value: the largest ``||M_f||`` computed (an eigenvalue, not certified).
        index: the frequency that holds it.
        vector: the unit eigenvector of its Gram matrix (:meth:`TorusGrams.at`) for it.
    """

    upper: float
    value: float
    index: int
    vector: torch.Tensor | None = None


#: Every frequency is ranked (Lanczos steps) where the Gram matrices are at least this wide
#: (single precision's rounding margin, ~4 n^2 u, then keeps many from a test they would fail)
#: or where there are at most ``_RANK_ALL_COUNT``; otherwise about 1 / ``_SAMPLE_SHARE`` of
#: them, on a regular grid, and the neighbourhoods of its best ``_CLIMB_FROM`` (128 rows at
#: 112x112: ranking all took 2.9 of 5.3 s, a step being ~34 us a matrix; 256 rows at
#: 128x128, 8,580 frequencies: 13.6 of 23.3 s, the float32 tests avoided by it 9; with the
#: sample and its best neighbourhoods 12.6-14.6 s; 128 rows at 56x56 1.46 -> 0.93 s).
_RANK_ALL_SIDE, _RANK_ALL_COUNT, _SAMPLE_SHARE, _CLIMB_FROM = 384, 1024, 16, 16
#: Sides up to this are decomposed by ``eigh``; larger ones by :func:`_top_pairs`'s Lanczos
#: (a dense Hermitian eigensolver takes seconds on a few 512 x 512 matrices).
_EIGH_SIDE = 128
#: Most Lanczos steps of :func:`_top_pairs` (full reorthogonalisation), and its stopping
#: residual, relative: the eigenvalue's error is then ~its square over the gap, far below the
#: room of an exact norm.
_LANCZOS_STEPS = 160
_RITZ_TOL = 1e-9
#: Steps between Rayleigh-Ritz checks.
_CHECK_EVERY = 8


def _top_pairs(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest eigenvalue of each Hermitian ``G`` (``(b, n, n)``), as a Rayleigh quotient
    (at most the true one, up to rounding), and its unit vector: ``eigh`` for small ``n``, a
    batched Lanczos with full reorthogonalisation and Rayleigh-Ritz on its basis otherwise,
    until every top Ritz pair's residual is below :data:`_RITZ_TOL` of its value. The
    certificate never rests on these values: they only set the level that is then proven."""
    b, n = G.shape[:2]
    if n <= _EIGH_SIDE:
        values, vectors = eigh(G)
        return values[:, -1].cpu(), vectors[..., -1]
    steps = min(n, _LANCZOS_STEPS)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(b, n, 1, dtype=torch.float64, generator=gen).to(G)
    V, AV = G.new_zeros(b, steps, n), G.new_zeros(b, steps, n)
    scale = float(G.diagonal(dim1=1, dim2=2).real.abs().max())
    for j in range(steps):
        v = v / v.norm(dim=1, keepdim=True)
        V[:, j], AV[:, j] = v[..., 0], (G @ v)[..., 0]
        basis = V[:, : j + 1]
        w = AV[:, j, :, None]
        for _ in range(2):  # classical Gram-Schmidt twice
            w = w - basis.mT @ (basis.conj() @ w)
        invariant = float(w.norm(dim=1).min()) <= 1e-13 * scale  # Ritz pairs exact
        if invariant or j % _CHECK_EVERY == _CHECK_EVERY - 1 or j == steps - 1:
            H = basis.conj() @ AV[:, : j + 1].mT
            values, S = eigh((H + H.mH) / 2)
            top = S[..., -1:].mT  # (b, 1, j + 1)
            vector, image = (top @ basis)[:, 0], (top @ AV[:, : j + 1])[:, 0]
            residual = (image - values[:, -1:] * vector).norm(dim=1)
            if invariant or bool((residual <= _RITZ_TOL * values[:, -1].abs()).all()):
                break
        v = w
    return values[:, -1].cpu(), vector / vector.norm(dim=1, keepdim=True)


#: From this side on the CPU, :func:`_estimates` steps one matrix at a time (a 2-D product
#: threads within the matrix, which stays in cache across the steps: 512 rows 1.2-1.4 ms a
#: matrix against 2.5-4.5 ms batched, 384 rows 0.8-0.9 against 1.9 ms; 256 rows no faster).
_SINGLE_RANK_FROM = 384


def _estimates(grams: TorusGrams, index: torch.Tensor) -> torch.Tensor:
    """The largest Ritz value of a few Lanczos steps in single precision (:func:`_lanczos`),
    per frequency: an estimate of the largest eigenvalue, used only to order the frequencies
    and to send those near the top straight to double precision."""
    gen = torch.Generator().manual_seed(0)
    single = grams.device.type == "cpu" and grams.side >= _SINGLE_RANK_FROM
    out = []
    for _, G in grams.chunks(index, torch.complex64):
        v = torch.randn(G.shape[:2], dtype=torch.float32, generator=gen).to(G).unsqueeze(-1)
        # Entries at most 1 (|g_ij| <= max g_ii): the steps' squares stay in float32's range.
        scale = float(G.diagonal(dim1=-2, dim2=-1).real.amax()) or 1.0
        G /= scale
        for matrix, vector in zip(G, v) if single else [(G, v)]:  # the same steps
            steps = _lanczos(matrix, vector, _RANK_STEPS).reshape(-1, _RANK_STEPS, 2)
            out.append(steps.double().cpu() * scale)
    if not out:
        return torch.zeros(0, dtype=torch.float64)
    coefficients = torch.cat(out)
    a, b = coefficients[..., 0], coefficients[..., 1:, 1]
    T = torch.diag_embed(a) + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
    with serial():
        top: torch.Tensor = torch.linalg.eigvalsh(T)[:, -1]
    return top


#: A ranking step's remainder below this (on Gram matrices scaled to entries at most 1: ~100
#: units of single precision's rounding) ends its Lanczos recurrence.
_EXHAUSTED = 1e-5


def _lanczos(G: torch.Tensor, v: torch.Tensor, steps: int) -> torch.Tensor:
    """``(..., steps, 2)``: the diagonal and the subdiagonal (shifted by one: ``[..., j, 1]``
    is the entry left of the ``j``-th diagonal one, ``[..., 0, 1]`` zero) of the tridiagonal
    matrix of ``steps`` Lanczos steps on each Hermitian ``G`` from ``v`` (``(..., n, n)`` and
    ``(..., n, 1)``; ``G`` scaled to entries at most 1), without reorthogonalisation. Its
    largest eigenvalue lies far closer to ``G``'s than power steps' estimate over the same
    products where the top is not well separated (512-row tori: the first frequency decomposed
    after power steps lay below 22 of the 45 others).

    >>> G = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.complex64))
    >>> T = _lanczos(G, torch.ones(3, 1, dtype=torch.complex64), 3).double()
    >>> a, b = T[:, 0], T[1:, 1]
    >>> M = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
    >>> [round(x, 4) for x in torch.linalg.eigvalsh(M).tolist()]
    [1.0, 2.0, 3.0]
    """
    tiny = torch.finfo(v.real.dtype).tiny
    v = v / v.norm(dim=(-2, -1), keepdim=True).clamp_min(tiny)
    previous, beta = torch.zeros_like(v), v.new_zeros(*v.shape[:-2], 1, 1).real
    out = v.new_zeros(*v.shape[:-2], steps, 2).real
    for j in range(steps):
        w = G @ v
        alpha = (v.mH @ w).real
        w = torch.addcmul(torch.addcmul(w, v, -alpha), previous, -beta)
        out[..., j, 0], out[..., j, 1] = alpha[..., 0, 0], beta[..., 0, 0]
        beta = w.norm(dim=(-2, -1), keepdim=True)
        # The Krylov space exhausted (a side below the steps, or an invariant start): the
        # remainder is rounding, and the steps stop there (zeros below).
        beta = torch.where(beta > _EXHAUSTED, beta, 0.0)
        previous, v = v, torch.where(beta > 0, w / beta.clamp_min(tiny), 0.0)
    return out


def _unranked(count: int) -> torch.Tensor:
    """A ranking of ``count`` frequencies none of which is ranked yet."""
    return torch.full((count,), -math.inf, dtype=torch.float64)


def _sample(grams: TorusGrams) -> torch.Tensor:
    """The frequencies ranked before any is proven: all of them where a ranking step is cheap
    against a Cholesky test (wide Gram matrices) or where they are few; otherwise every
    ``step``-th along each frequency axis, about 1 / :data:`_SAMPLE_SHARE` of them (the rest
    are ranked when they fail a test)."""
    everything = torch.arange(grams.count)
    if grams.side >= _RANK_ALL_SIDE or grams.count <= _RANK_ALL_COUNT:
        return everything
    _, coords = grams.coords(everything)
    return everything[(coords % _sample_step(grams) == 0).all(1)]


def _sample_step(grams: TorusGrams) -> int:
    """The step of :func:`_sample`'s grid along each frequency axis."""
    step: float = _SAMPLE_SHARE ** (1 / len(grams.freq_shape))
    return max(1, round(step))


def _around(grams: TorusGrams, index: torch.Tensor, reach: int) -> torch.Tensor:
    """The frequencies within ``reach`` steps along every axis of those numbered ``index``
    (in their group; around the periodic axes, up to the ends of the last, the half
    spectrum's), each once.

    >>> import types
    >>> grams = types.SimpleNamespace(freq_shape=(4, 3), freqs=12, coords=lambda i: (
    ...     i // 12, torch.stack([i % 12 // 3, i % 3], 1)))
    >>> _around(grams, torch.tensor([0]), 1).tolist()  # (0, 0): rows 3, 0, 1; columns 0, 1
    [0, 1, 3, 4, 9, 10]
    """
    group, coords = grams.coords(index)
    shape = grams.freq_shape
    spans = [min(reach, n // 2) for n in shape[:-1]] + [min(reach, shape[-1] - 1)]
    steps = torch.cartesian_prod(*[torch.arange(-r, r + 1) for r in spans])
    steps = steps.reshape(-1, len(shape))
    near = coords[:, None, :] + steps[None]
    last = near[..., -1]
    inside = (last >= 0) & (last < shape[-1])
    near = torch.remainder(near, torch.tensor(shape))  # (the last axis: only where inside)
    flat = group[:, None] * grams.freqs + _flat(list(near.unbind(-1)), shape)
    result: torch.Tensor = torch.unique(flat[inside])
    return result


def _widened(room: float, floor: float, what: str) -> tuple[float, float]:
    """The next ``(room, floor)`` of a level that rounding kept from being proven (an error
    once the room would pass 1: the proof is not settling)."""
    room, floor = 4 * room, floor * 2.0**40
    if room > 1:
        raise RuntimeError(f"{what} did not settle (room {room})")
    return room, floor


def torus_top(grams: TorusGrams, room: float = SLACK) -> TorusTop:
    """The largest ``||M_f||`` over every frequency, with an upper end certified within a
    relative ``room`` (on the Gram matrices' eigenvalue) of the largest one computed.

    The frequencies (or a regular sample of them, :func:`_sample`) are ranked by a few
    single-precision Lanczos steps (:func:`_estimates`); the best few are decomposed
    (:func:`_top_pairs`); every frequency, those included, is then proven below ``level =
    lambda (1 + room)`` by :func:`_psd_proof`, in single precision where its margin allows, in
    double precision otherwise; the best few of those that fail both are decomposed next.
    """
    everything = torch.arange(grams.count)
    ranking = grams.ranking  # filled in place: a later call with another room reuses it

    def rank(index: torch.Tensor) -> None:
        unknown = index[ranking[index] == -math.inf]
        if unknown.numel():
            ranking[unknown] = _estimates(grams, unknown)

    sample = _sample(grams)
    rank(sample)
    if sample.numel() < grams.count:  # around the best of a sample: where the top lies
        leaders = sample[torch.argsort(ranking[sample], descending=True)[:_CLIMB_FROM]]
        rank(_around(grams, leaders, _sample_step(grams) - 1))
    # Double precision proves nothing closer to lambda than its own margin (~4 n^2 u); single
    # precision nothing closer than ~4 n^2 u in its unit (frequencies ranked above that go
    # straight to double precision).
    room = max(room, 8 * _rounding(grams.side, torch.complex128) * grams.side)
    margin32 = 2 * _rounding(grams.side, torch.complex64) * grams.side
    lam, best, floor, vector = 0.0, 0, _FLOOR, None
    pending = everything
    # Wide Gram matrices cost a Lanczos run each: decompose fewer at a time.
    narrow = grams.side <= _EIGH_SIDE
    batch = _BATCH if narrow else 2
    # The estimates only bound each from below: more of the best are decomposed first.
    chosen = torch.argsort(ranking, descending=True)[: (_FIRST_BATCHES if narrow else 1) * batch]
    while True:
        values, vectors = _top_pairs(grams.at(chosen))
        top = int(torch.argmax(values))
        if float(values[top]) > lam:
            lam, best, vector = float(values[top]), int(chosen[top]), vectors[top]
        elif pending.numel() < everything.numel():
            # Below lam by its eigenvalue, yet not proven: rounding needs more room (or, for
            # Gram matrices of zero or tiny norm, a larger floor).
            room, floor = _widened(room, floor, "the circular certificate")
        level = lam * (1 + room) + floor
        hopeless = ranking[pending] > level * (1 - margin32)
        pending = torch.cat([
            _prove(grams, pending[~hopeless], level, torch.complex64),
            pending[hopeless],
        ])  # fmt: skip
        rank(pending)
        pending = _prove(grams, pending, level, torch.complex128)
        if not pending.numel():
            scale = grams.scale
            root = math.sqrt(max(lam, 0.0))
            return TorusTop(math.sqrt(level) * scale, root * scale, best, vector)
        chosen = pending[torch.argsort(ranking[pending], descending=True)[:batch]]


#: :func:`_gram` forms the lower triangle in this many row blocks (8: 56% of the full product's
#: work; the 4096 x 25088 classifier of VGG-11 in float64, 2 cores: 11.3 -> 7.6 s).
_GRAM_BLOCKS = 8


def _gram(A: torch.Tensor) -> torch.Tensor:
    """``A A^T`` from its lower triangle, by row blocks (each entry the same dot product as in
    the full product: the same rounding bound), mirrored.

    Shape:
        ``A``: ``(m, n)``; the result ``(m, m)``.

    >>> A = torch.randn(5, 7, dtype=torch.float64)
    >>> torch.allclose(_gram(A), A @ A.T)
    True
    """
    m = A.shape[0]
    G = A.new_zeros(m, m)
    edges = [round(i * m / _GRAM_BLOCKS) for i in range(_GRAM_BLOCKS + 1)]
    for a, b in itertools.pairwise(edges):
        G[a:b, :b] = A[a:b] @ A[:b].mT
    G = G.tril_()
    return G.add_(G.tril(-1).mT)


def gram_norm(matrix: torch.Tensor, room: float = SLACK) -> tuple[float, float, float]:
    """``(value, lower, upper)``: the spectral norm of a dense real matrix from its Gram matrix
    ``G = A A^T`` (or ``A^T A``, the smaller), formed in float64: the value from the top
    eigenvalue found (:func:`_top_pairs`), the upper end proven by a Cholesky test of
    ``s I - G`` (:func:`_psd_proof`) within ``room`` of it, allowing for the product's
    rounding (``|fl(G) - G| <= gamma_K |A| |A|^T``, ``K`` the inner dimension, whose spectral
    norm is at most ``gamma_K ||A||_F^2``), the lower end ``||A^T v|| / ||v||`` of its
    eigenvector with its own rounding bounded (:func:`_vector_lower`).

    Where LAPACK's SVD of a 4096 x 25088 matrix reduces all of it to bidiagonal form, this is
    one matrix product, a few hundred products with the 4096 x 4096 Gram matrix and one
    Cholesky factorisation.

    Shape:
        ``matrix``: ``(m, n)``.
    """
    A = matrix.double()
    m, n = A.shape
    B = A if m <= n else A.mT  # G = B B^T
    G = _gram(B)
    inner, u = max(m, n), _UNIT[torch.float64]
    gamma = inner * u / (1 - inner * u)
    form = gamma * float(A.norm()) ** 2 * (1 + 1e-10)  # the norm's own rounding: far below
    values, vectors = _top_pairs(G[None])
    lam = max(float(values[0]), 0.0)
    room = max(room, 8 * _rounding(G.shape[0], torch.float64) * G.shape[0])
    floor = _FLOOR
    while True:
        level = (lam + form) * (1 + room) + floor
        if bool(_psd_proof(G[None].clone(), level, form)[0]):
            break
        room, floor = _widened(room, floor, "the Gram certificate")
    return math.sqrt(lam), _vector_lower(B, vectors[0]), math.sqrt(level)


def _vector_lower(B: torch.Tensor, v: torch.Tensor) -> float:
    """A lower bound on ``||B||_2`` from the vector ``v``: ``||B^T v|| / ||v||`` in float64,
    less the product's rounding (``|fl(B^T v) - B^T v| <= gamma_m |B|^T |v|``) and lowered by
    the norms' and the quotient's (a few units each; an eigenvalue's own rounding is not
    trusted)."""
    m, n = B.shape
    u = _UNIT[torch.float64]
    gamma = m * u / (1 - m * u)
    v = v.to(B.dtype)
    image = float((B.mT @ v).norm())
    rows = max(1, 2**24 // max(n, 1))  # |B| a block of rows at a time (no copy of all of B)
    bound = sum((B[a : a + rows].abs().mT @ v[a : a + rows].abs() for a in range(0, m, rows)),
                torch.zeros(n, dtype=B.dtype, device=B.device))  # fmt: skip
    error = gamma * float(bound.norm()) * (1 + 2 * (n + m + 2) * u)
    lower = max(image - error, 0.0) / (float(v.norm()) * (1 + 2 * (m + 2) * u))
    return lower * (1 - 2 * (n + 4) * u)


def _prove(grams: TorusGrams, index: torch.Tensor, level: float, dtype: torch.dtype
           ) -> torch.Tensor:  # fmt: skip
    """The frequencies among ``index`` not proven below ``level`` in ``dtype``."""
    error = grams.form_error(dtype)
    threads = _threads(len(index), len(index) * grams.side**3, grams.device)
    # Each thread forms a few at a time (they stay in its cache), yet enough that reading the
    # terms (one per offset) costs less than writing the matrices.
    size = grams.chunk if threads == 1 else max(_cached(grams.side, dtype), 2 * grams.terms)

    def failed(which: torch.Tensor) -> list[torch.Tensor]:
        return [part[~_psd_proof(G, level, error)] for part, G in grams.chunks(which, dtype, size)]

    grams.warm(dtype)
    parts = _mapped(failed, list(index.tensor_split(threads)))
    return torch.cat(parts) if parts else index


# -- the enclosing torus of a layer ---------------------------------------------------------------
def enclosing_torus(geo: Geometry) -> tuple[int, ...]:
    """The smallest torus (a multiple of the stride, per axis) on which none of ``geo``'s
    windows wraps: ``geo`` is then a block of that circular convolution."""
    return tuple(
        s * max(o, -(-p // s)) for s, o, p in zip(geo.stride, geo.output_size, geo.padded_size)
    )


@dataclass(frozen=True)
class Enclosing:
    """The enclosing circular convolution of a layer: a certified upper end of ``||W||``, and
    what the windowed lower end needs."""

    upper: float
    grams: TorusGrams
    top: TorusTop
    fold: float


def enclosing_norm(weight: torch.Tensor, geo: Geometry, room: float = SLACK,
                   grams: TorusGrams | None = None) -> Enclosing:  # fmt: skip
    """A certified upper bound on ``||W||_2`` for the convolution ``geo`` (a transposed layer's
    matching convolution: W^T has the same norm).

    W (after the padding) is a block of the circular convolution on :func:`enclosing_torus`,
    whose norm is certified by :func:`torus_top` within ``room``. The padding of
    reflect/replicate/circular has norm sqrt(most copies any input has in the padded input).
    ``grams``: an earlier call's (:attr:`Enclosing.grams`, the same weight and geometry), to
    certify again with another room without forming or ranking the frequencies again.
    """
    with kept_pages():  # chunks of Gram matrices of the same sizes again and again
        fresh = grams is None
        if grams is None:
            grams = TorusGrams(weight, geo, (0,) * geo.ndim, enclosing_torus(geo))
        top = torus_top(grams, room)
    if fresh:
        _keep(weight, geo, grams)
    fold = 1.0
    if geo.mode.folds:
        pairs = zip(geo.input_size, geo.padding)
        fold = math.sqrt(math.prod(geo.mode.copies(i, b, a) for i, (b, a) in pairs))
    return Enclosing(top.upper * fold, grams, top, fold)


@dataclass
class _Kept:
    """What :func:`keeping_grams` keeps: ``(geometry, weight, Gram matrices, their bytes)``,
    and the bytes of all."""

    budget: int
    entries: list[tuple[Geometry, torch.Tensor, TorusGrams, int]] = field(default_factory=list)
    nbytes: int = 0


_KEEPING: ContextVar[_Kept | None] = ContextVar("_KEEPING", default=None)
#: Most bytes of Gram matrices :func:`keeping_grams` keeps (and at most 1 / _FREE_SHARE of the
#: free memory when each is kept): ResNet-18's take ~0.5 GB.
_KEPT_BYTES = 2**30


@contextmanager
def keeping_grams() -> Iterator[None]:
    """Within it, the Gram matrices :func:`enclosing_norm` forms are kept (up to
    :data:`_KEPT_BYTES`) with the weight and geometry they belong to, for :func:`folded_grams`
    (a model's report: each layer's norm, then the same layer with its BatchNorm folded in)."""
    token = _KEEPING.set(_Kept(_KEPT_BYTES))
    try:
        yield
    finally:
        _KEEPING.reset(token)


def _keep(weight: torch.Tensor, geo: Geometry, grams: TorusGrams) -> None:
    """Keeps ``grams`` within :func:`keeping_grams`, where the budget and free memory allow."""
    kept = _KEEPING.get()
    if kept is None:
        return
    grams = copy.copy(grams)  # without its casts (made again on demand; scaled makes its own)
    grams._cast = {}
    size = grams.nbytes() + tensor_bytes([weight])
    free = available_memory(weight.device) or _FREE_UNKNOWN
    if kept.nbytes + size <= min(kept.budget, free // _FREE_SHARE):
        kept.entries.append((geo, weight, grams, size))
        kept.nbytes += size


def folded_grams(weight: torch.Tensor, scale: torch.Tensor, geo: Geometry) -> TorusGrams | None:
    """The Gram matrices of ``weight`` with output channel ``c`` scaled by ``scale[c]``, made
    from those kept (:func:`keeping_grams`) for ``weight`` and ``geo`` (then let go):
    :meth:`TorusGrams.scaled`; ``None`` where none are kept or they do not scale.

    Shape:
        ``weight``: ``(C_out, C_in/g, *kernel)``; ``scale``: ``(C_out,)``.

    >>> from convmat.engine import Geometry
    >>> w = torch.randn(4, 4, 3, dtype=torch.float64)
    >>> geo = Geometry.from_module(torch.nn.Conv1d(4, 4, 3, padding=1), 16)
    >>> with keeping_grams():
    ...     _ = enclosing_norm(w, geo)
    ...     grams = folded_grams(w, torch.full((4,), 2.0, dtype=torch.float64), geo)
    >>> folded = enclosing_norm(2 * w, geo)
    >>> abs(enclosing_norm(2 * w, geo, grams=grams).upper / folded.upper - 1) < 1e-9
    True
    """
    kept = _KEEPING.get()
    if kept is None:
        return None
    for i, (g, w, grams, size) in enumerate(kept.entries):
        if g == geo and same_values(w, weight):
            del kept.entries[i]
            kept.nbytes -= size
            return grams.scaled(scale)
    return None


# -- the windowed lower end -----------------------------------------------------------------------
def _taper(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``sin(pi (n + 1) / (size + 1))``, ``n < size``: vanishes one step outside either end."""
    n = torch.arange(1, size + 1, dtype=dtype, device=device)
    return torch.sin(math.pi * n / (size + 1))


def windowed_vector(enclosing: Enclosing, geo: Geometry, input_side: bool) -> torch.Tensor:
    """Two real vectors (the real and imaginary parts of one complex one), ``(2, C, *size)``,
    on the input side of the convolution ``geo`` (``input_side``) or on its output side: the
    top singular vector of the enclosing circular convolution, a plane wave at its frequency,
    tapered by a sine window along each axis of the real input (or output) grid.

    ``y[n] = sum_t A_t x[n + t]`` maps the plane wave ``x_r[j] = v_r e^{-i w j}`` on the
    polyphase components to ``e^{-i w n} M v``: the input side carries the top right singular
    vector ``v`` of ``M``, the output side the top left one."""
    grams, top = enclosing.grams, enclosing.top
    M = grams.matrix(top.index)
    if top.vector is None:
        _, vector = _top_pairs(grams.at(torch.tensor([top.index])))
    else:
        vector = top.vector[None]  # found by torus_top
    if grams.rows <= grams.cols:  # the Gram side is the output side: vector is u
        left, right = vector[0], M.mH @ vector[0]
    else:
        left, right = M @ vector[0], vector[0]
    g, coords = grams.coords(torch.tensor([top.index]))
    group, freq = int(g), coords[0]
    if input_side:
        channels, per_group = geo.in_channels, geo.in_channels // geo.groups
        amplitude = (right / right.norm()).reshape(per_group, -1)  # (C_in/g, read phases)
        sizes, offset = geo.input_size, tuple(b for b, _ in geo.padding)
        phases = [int(p) for p in grams.read]
        stride = geo.stride
    else:
        channels, per_group = geo.out_channels, geo.out_channels // geo.groups
        amplitude = (left / left.norm()).reshape(per_group, 1)
        sizes, offset = geo.output_size, (0,) * geo.ndim
        phases, stride = [0], (1,) * geo.ndim
    device = amplitude.device
    # The wave over the grid, in padded coordinates p = n + offset: phase r = p mod s (its
    # flat index), torus position j = p div s.
    wave = torch.ones(1, dtype=torch.complex128, device=device)
    phase_index = torch.zeros(1, dtype=torch.long, device=device)
    for d, (size, off, s) in enumerate(zip(sizes, offset, stride)):
        p = torch.arange(size, device=device) + off
        turns = (torch.remainder(freq[d] * torch.div(p, s, rounding_mode="floor"),
                                 grams.small[d]).double() / grams.small[d]).to(device)  # fmt: skip
        axis_wave = torch.polar(_taper(size, torch.float64, device), -2 * math.pi * turns)
        wave = (wave[..., None] * axis_wave).reshape(-1)
        phase_index = (phase_index[..., None] * s + torch.remainder(p, s)).reshape(-1)
    # Which column of the amplitude each grid point's phase is (phases no tap reads: zero).
    lookup = torch.full((math.prod(stride),), -1, dtype=torch.long, device=device)
    lookup[torch.tensor(phases, device=device)] = torch.arange(len(phases), device=device)
    column = lookup[phase_index]
    amp = torch.cat([amplitude, amplitude.new_zeros(per_group, 1)], 1)
    x = torch.zeros(channels, wave.numel(), dtype=torch.complex128, device=device)
    x[group * per_group : (group + 1) * per_group] = amp[:, column] * wave
    x = x.reshape(channels, *sizes)
    return torch.stack([x.real, x.imag])
