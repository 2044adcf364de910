"""Index arithmetic: the sparsity pattern of W for one :class:`~convmat.engine.shapes.Geometry`.

The pattern depends only on the configuration, never on the weight values, so it is computed
once, cached, and reused; building W then only gathers kernel values into it.

How the pattern is found, without a Python loop over positions, taps or channels:

1. **One axis at a time.** Along spatial dimension ``d`` every output position ``r`` reads the
   input positions ``c = r * s + m * dil - pad`` for taps ``m`` (for a transposed convolution the
   same relation read the other way round; :meth:`Geometry.taps` owns the rule). Zero padding
   drops the taps that fall outside the input; reflect, replicate and circular padding map them
   back inside, where two taps may land on the same input (they *fold*: their weights add up).
   Per output position the distinct input positions are sorted into *slots*; this is an
   ``(R_d, k_d)`` problem, tiny next to W.
2. **The product over axes and input channels.** A row of W is ``(channel, r_1, ..., r_N)``; its
   non-zeros are the product of the slots of every axis with the input channels of its group.
   In C order ``(c_in, slot_1, ..., slot_N)`` their columns come out sorted and distinct, so CSR
   is written directly, in order. This is done for one output channel (the pattern of every
   output channel in a group is the same) and then offset per channel in one pass.
3. **Values** are a gather from the weight viewed as ``(C_rows, C_in_per_group * K)``: one
   index per non-zero of a channel, plus a segment sum where taps fold.

Memory: the per-axis tables of step 1 already give the exact number of non-zeros and the size of
every grid of step 2 (:class:`PatternPlan`), so the build is checked against the memory guard
before anything grid-sized is allocated, and so are the full index tensors a sparse layout asks
for. Patterns live in the one cache (:mod:`convmat.engine.cache`, owner ``"pattern"``) and are
measured again when they grow. The meta device holds no data, so no pattern is made for it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from .._errors import ConvMatError
from .cache import cached, lookup, store
from .memory import check_allocation
from .shapes import Geometry

__all__ = [
    "INDEX",
    "Pattern",
    "PatternPlan",
    "axis_taps",
    "build_pattern",
    "c_strides",
    "cached_pattern",
    "get_pattern",
    "pattern_nnz",
    "plan_pattern",
    "refuse_meta",
]

#: The dtype of every index tensor.
INDEX = torch.int64
_ITEM = 8  # bytes of one INDEX entry

#: Bytes per (output position, tap) of one axis while its slots are found (a dozen small tables).
_AXIS_BYTES = 128

#: What to do instead when W's index structure does not fit.
INSTEAD = "use convmat.ConvOperator, which never forms W or its index pattern, or a smaller input"


@dataclass
class _Axis:
    """The slots of one spatial axis: per output position, the distinct input positions read."""

    cols: torch.Tensor  # (R, S) input position of each slot (meaningless where ~mask)
    mask: torch.Tensor  # (R, S) slot in use
    count: torch.Tensor  # (R,) slots in use
    slot_tap: torch.Tensor  # (R, S) the tap that fills each slot (when nothing folds)
    tap_slot: torch.Tensor  # (R, k) the slot each tap lands in, -1 for zero padding
    folds: bool  # some slot receives more than one tap


def axis_taps(geo: Geometry, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input position read by every ``(output position, tap)`` of one axis, and its validity
    (:meth:`Geometry.taps`, the one home of the window rule)."""
    return geo.taps(dim)


def _axis(cols: torch.Tensor, valid: torch.Tensor) -> _Axis:
    rows, _k = cols.shape
    sentinel = torch.iinfo(INDEX).max
    key, order = torch.sort(torch.where(valid, cols, sentinel), dim=1, stable=True)
    kept = key != sentinel
    first = kept.clone()
    first[:, 1:] &= key[:, 1:] != key[:, :-1]
    rank = first.cumsum(1) - 1
    count = first.sum(1)
    slots = int(count.max()) if rows else 0
    # Scatter the first tap of every slot to its rank; the rest go to a spare column, dropped.
    target = torch.where(first, rank, slots)
    spare = torch.zeros(rows, slots + 1, dtype=INDEX)
    slot_cols = spare.scatter(1, target, key)[:, :slots]
    slot_tap = spare.scatter(1, target, order)[:, :slots]
    tap_slot = torch.empty_like(order).scatter_(1, order, torch.where(kept, rank, -1))
    return _Axis(
        cols=slot_cols,
        mask=torch.arange(slots)[None, :] < count[:, None],
        count=count,
        slot_tap=slot_tap,
        tap_slot=tap_slot,
        folds=bool((kept.sum(1) > count).any()),
    )


@dataclass
class PatternPlan:
    """The per-axis slots of a geometry and what its pattern will hold, known before it is built.

    ``grid`` is the ``(R_1..R_N, C_in_group, S_1..S_N)`` grid of step 2, ``taps`` the number of
    ``(row, input channel, tap)`` triples that read the input (one per non-zero where nothing
    folds). Both counts are exact.
    """

    geo: Geometry
    axes: list[_Axis]
    nnz_per_channel: int
    taps: int

    @property
    def folds(self) -> bool:
        return any(a.folds for a in self.axes)

    @property
    def grid(self) -> tuple[int, ...]:
        cg = self.geo.in_channels // self.geo.groups
        return (*(a.cols.shape[0] for a in self.axes), cg, *(a.cols.shape[1] for a in self.axes))

    @property
    def nnz(self) -> int:
        return self.geo.out_channels * self.nnz_per_channel

    def pattern_bytes(self) -> int:
        """Bytes of the built :class:`Pattern` (before any full index tensor is made)."""
        spatial_rows = math.prod(self.geo.output_size)
        gathered = self.taps * (2 if self.folds else 1)  # gather, and segment where taps fold
        return _ITEM * (2 * self.nnz_per_channel + gathered + spatial_rows + self.geo.out_channels)

    def build_bytes(self) -> int:
        """Peak bytes while building the pattern (an upper bound): the grid-sized index and mask
        tensors of step 2 beside the per-channel results."""
        grid = math.prod(self.grid)
        peak = grid * (_ITEM + 1) + 5 * _ITEM * self.nnz_per_channel
        if self.folds:
            spatial_rows = math.prod(self.geo.output_size)
            cg = self.geo.in_channels // self.geo.groups
            tap_grid = spatial_rows * cg * math.prod(self.geo.kernel_size)
            peak += grid * _ITEM + tap_grid * (3 * _ITEM + 1) + 3 * _ITEM * self.taps
        return peak


def plan_pattern(geo: Geometry) -> PatternPlan:
    """The per-axis slots of ``geo`` and the exact size of its pattern (small: one table of
    ``(output positions, taps)`` per axis, itself checked against the memory guard)."""
    axis_bytes = _AXIS_BYTES * sum(r * k for r, k in zip(geo.output_size, geo.kernel_size))
    check_allocation(axis_bytes, torch.device("cpu"), "the per-axis taps of W's pattern", INSTEAD)
    axes = [_axis(*axis_taps(geo, d)) for d in range(geo.ndim)]
    cg = geo.in_channels // geo.groups
    nnz, taps = cg, cg
    for a in axes:
        nnz *= int(a.count.sum())
        taps *= int((a.tap_slot >= 0).sum())
    return PatternPlan(geo, axes, nnz, taps)


def refuse_meta(geo: Geometry, what: str) -> None:
    """Raise :class:`ConvMatError`: ``what`` (index structure) asked for on the meta device."""
    raise ConvMatError(
        f"{what} cannot be made on the meta device: it is index structure, which a meta tensor "
        f"does not hold; use layout=torch.strided for a meta W of shape {geo.matrix_shape}, "
        f"or a real device"
    )


def c_strides(sizes: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for v in reversed(sizes):
        strides.append(acc)
        acc *= v
    return strides[::-1]


@dataclass
class Pattern:
    """Cached index structure of W for one geometry on one device.

    Stored per row channel (the pattern of every row channel is the same up to a column
    offset): the non-zeros of row channel ``c`` are ``nnz_per_channel`` entries in CSR order,
    at columns ``col_local + offsets[c]`` of spatial rows ``row_pos``, with values
    ``weight_view[c, gather]`` (summed into ``segment`` where taps fold). The full index
    tensors of a layout are made on first request and kept.
    """

    shape: tuple[int, int]
    col_local: torch.Tensor  # (nnz_per_channel,) column within the channel's group
    row_pos: torch.Tensor  # (nnz_per_channel,) spatial row of each entry
    row_counts: torch.Tensor  # (spatial rows,) non-zeros per spatial row
    offsets: torch.Tensor  # (row channels,) column offset of each row channel's group
    gather: torch.Tensor  # index into weight_view's second dim
    segment: torch.Tensor | None  # where folded taps add up, or None
    key: Hashable = field(default=None, repr=False)  # its key in the cache
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _crow: torch.Tensor | None = field(default=None, repr=False)
    _col: torch.Tensor | None = field(default=None, repr=False)
    _coo: torch.Tensor | None = field(default=None, repr=False)

    @property
    def row_channels(self) -> int:
        return self.offsets.numel()

    @property
    def nnz_per_channel(self) -> int:
        return self.col_local.numel()

    @property
    def nnz(self) -> int:
        return self.row_channels * self.nnz_per_channel

    def nbytes(self) -> int:
        """Bytes held by the cached tensors (``_col`` is a view into ``_coo`` once that exists)."""
        held = [
            self.col_local,
            self.row_pos,
            self.row_counts,
            self.offsets,
            self.gather,
            self.segment,
            self._crow,
            self._coo if self._coo is not None else self._col,
        ]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def _grown(self) -> None:
        """Tell the cache this pattern's new size (its full index tensors were just made)."""
        if self.key is not None:
            store(self.key, "pattern", self, self.nbytes())

    def _check(self, nbytes: int, what: str) -> None:
        rows, cols = self.shape
        check_allocation(
            nbytes,
            self.offsets.device,
            f"the {what} of a sparse W of shape ({rows}, {cols})",
            INSTEAD,
        )

    def growth_bytes(self, layout: torch.layout) -> int:
        """Bytes the index tensors of ``layout`` still need (0 once made, or for dense W)."""
        if layout == torch.sparse_csr:
            crow = 0 if self._crow is not None else 2 * _ITEM * (self.shape[0] + 1)
            col = 0 if self._col is not None else _ITEM * self.nnz
            return crow + col
        if layout == torch.sparse_coo:
            return 0 if self._coo is not None else 2 * _ITEM * self.nnz
        return 0

    def values(self, weight_view: torch.Tensor) -> torch.Tensor:
        """The non-zeros of W in CSR order, shaped ``(row_channels, nnz_per_channel)``."""
        taps = weight_view.index_select(1, self.gather)
        if self.segment is None:
            return taps
        out = weight_view.new_zeros(self.row_channels, self.nnz_per_channel)
        return out.index_add_(1, self.segment, taps)

    def _full_cols(self, out: torch.Tensor) -> torch.Tensor:
        """Write the ``(nnz,)`` column indices into ``out`` and return it."""
        torch.add(
            self.col_local[None, :], self.offsets[:, None], out=out.view(self.row_channels, -1)
        )
        return out

    def crow(self) -> torch.Tensor:
        """``(rows + 1,)`` CSR row pointers, cached."""
        with self._lock:
            if self._crow is None:
                self._check(2 * _ITEM * (self.shape[0] + 1), "row pointers")
                crow = torch.zeros(self.shape[0] + 1, dtype=INDEX, device=self.offsets.device)
                torch.cumsum(self.row_counts.repeat(self.row_channels), 0, out=crow[1:])
                self._crow = crow
                self._grown()
            return self._crow

    def col(self) -> torch.Tensor:
        """``(nnz,)`` column indices, rows in order and sorted within each row, cached."""
        with self._lock:
            if self._col is None:
                self._check(_ITEM * self.nnz, "column indices")
                self._col = self._full_cols(
                    torch.empty(self.nnz, dtype=INDEX, device=self.offsets.device)
                )
                self._grown()
            return self._col

    def coo_indices(self) -> torch.Tensor:
        """``(2, nnz)`` row and column indices in coalesced order, cached."""
        with self._lock:
            if self._coo is None:
                self._check(2 * _ITEM * self.nnz, "indices")
                coo = torch.empty(2, self.nnz, dtype=INDEX, device=self.offsets.device)
                spatial_rows = self.row_counts.numel()
                channel = torch.arange(self.row_channels, device=coo.device)[:, None]
                torch.add(
                    self.row_pos[None, :],
                    channel * spatial_rows,
                    out=coo[0].view(self.row_channels, -1),
                )
                if self._col is None:
                    self._full_cols(coo[1])
                else:
                    coo[1].copy_(self._col)
                self._coo, self._col = coo, coo[1]
                self._grown()
            return self._coo

    def dense_index(self) -> torch.Tensor:
        """``(row_channels, nnz_per_channel)`` positions in W viewed as ``(row_channels, -1)``."""
        local = self.col_local + self.row_pos * self.shape[1]
        return local[None, :] + self.offsets[:, None]

    def to(self, device: torch.device) -> Pattern:
        """The same pattern on ``device`` (the full index tensors are made again on request)."""
        check_allocation(self.nbytes(), device, "W's index pattern", INSTEAD)
        segment = None if self.segment is None else self.segment.to(device)
        return Pattern(
            self.shape,
            self.col_local.to(device),
            self.row_pos.to(device),
            self.row_counts.to(device),
            self.offsets.to(device),
            self.gather.to(device),
            segment,
        )


def _place(t: torch.Tensor, ndim: int, dim: int, inner: tuple[int, ...]) -> torch.Tensor:
    """View an ``(R_d, X_d)`` axis table on axes ``dim`` and ``ndim + 1 + dim`` of the grid
    ``(R_1..R_N, C, X_1..X_N)``."""
    shape = [1] * (2 * ndim + 1)
    shape[dim] = t.shape[0]
    shape[ndim + 1 + dim] = inner[dim]
    return t.view(shape)


def _affine(
    base: torch.Tensor, tables: list[torch.Tensor], strides: list[int], inner: tuple[int, ...]
) -> torch.Tensor:
    """``base + sum_d tables[d] * strides[d]`` on the grid ``(R_1..R_N, C, X_1..X_N)``,
    accumulated in place (one grid-sized tensor, no temporaries)."""
    n = len(tables)
    grid = [*(t.shape[0] for t in tables), base.shape[n], *inner]
    out = base.expand(grid).clone()
    for d, (t, st) in enumerate(zip(tables, strides)):
        out += _place(t * st, n, d, inner)
    return out


def _flat_nonzero(mask: torch.Tensor, grid: torch.Size) -> torch.Tensor:
    """C-order positions in ``grid`` where the (broadcast) ``mask`` holds, ascending."""
    return torch.nonzero(mask.expand(grid).reshape(-1)).squeeze(1)


def _take(values: torch.Tensor, grid: torch.Size, index: torch.Tensor) -> torch.Tensor:
    """``values`` broadcast to ``grid``, flattened, at ``index``."""
    return values.expand(grid).reshape(-1).index_select(0, index)


def build_pattern(geo: Geometry, plan: PatternPlan | None = None) -> Pattern:
    """Compute the pattern of ``geo`` on the CPU (no loop over positions, taps or channels),
    after checking that its build fits in memory (:class:`ConvMatError` otherwise)."""
    plan = plan_pattern(geo) if plan is None else plan
    rows, cols = geo.matrix_shape
    check_allocation(
        plan.build_bytes(),
        torch.device("cpu"),
        f"building the index pattern of a W of shape ({rows}, {cols})",
        INSTEAD,
    )
    n = geo.ndim
    axes = plan.axes
    cg = geo.in_channels // geo.groups
    k_total = math.prod(geo.kernel_size)
    in_total = math.prod(geo.input_size)
    slots = tuple(a.cols.shape[1] for a in axes)
    chan = [1] * (2 * n + 1)
    chan[n] = cg
    ci = torch.arange(cg, dtype=INDEX).view(chan)

    # Grid (R_1..R_N, C_in_group, S_1..S_N): column and gather index of every slot.
    grid = torch.Size([*(a.cols.shape[0] for a in axes), cg, *slots])
    mask = torch.ones((), dtype=torch.bool)
    for d, a in enumerate(axes):
        mask = mask & _place(a.mask, n, d, slots)
    keep = _flat_nonzero(mask, grid)
    in_strides = c_strides(geo.input_size)
    col_local = _take(_affine(ci * in_total, [a.cols for a in axes], in_strides, slots), grid, keep)

    k_strides = c_strides(geo.kernel_size)
    if not any(a.folds for a in axes):
        gather = _affine(ci * k_total, [a.slot_tap for a in axes], k_strides, slots)
        gather, segment = _take(gather, grid, keep), None
    else:
        # Grid (R_1..R_N, C_in_group, k_1..k_N): every tap, and the slot it adds into.
        compressed = torch.full((math.prod(grid),), -1, dtype=INDEX)
        compressed[keep] = torch.arange(keep.numel(), dtype=INDEX)
        grid_strides = c_strides(grid)
        pos = ci * grid_strides[n]
        tap = ci * k_total
        valid = torch.ones((), dtype=torch.bool)
        for d, a in enumerate(axes):
            r = torch.arange(a.tap_slot.shape[0], dtype=INDEX)[:, None] * grid_strides[d]
            slot = a.tap_slot.clamp(min=0) * grid_strides[n + 1 + d]
            pos = pos + _place(r + slot, n, d, geo.kernel_size)
            taps = torch.arange(geo.kernel_size[d], dtype=INDEX) * k_strides[d]
            tap = tap + _place(taps.expand_as(a.tap_slot), n, d, geo.kernel_size)
            valid = valid & _place(a.tap_slot >= 0, n, d, geo.kernel_size)
        tap_grid = torch.broadcast_shapes(pos.shape, tap.shape, valid.shape)
        used = _flat_nonzero(valid, tap_grid)
        segment = compressed[_take(pos, tap_grid, used)]
        gather = _take(tap, tap_grid, used)

    # Non-zeros per spatial row, and the spatial row of each entry (the leading part of its
    # C-order position in the grid).
    row_counts = torch.full((), cg, dtype=INDEX)
    for d, a in enumerate(axes):
        shape = [1] * n
        shape[d] = -1
        row_counts = row_counts * a.count.view(shape)
    row_counts = row_counts.reshape(-1)
    row_pos = torch.div(keep, cg * math.prod(slots), rounding_mode="floor")

    rows_c = geo.out_channels
    group = torch.div(
        torch.arange(rows_c, dtype=INDEX), rows_c // geo.groups, rounding_mode="floor"
    )
    offsets = group * (cg * in_total)
    return Pattern(geo.matrix_shape, col_local, row_pos, row_counts, offsets, gather, segment)


def cached_pattern(geo: Geometry, device: torch.device) -> Pattern | None:
    """The pattern of ``geo`` on ``device`` if the cache holds it (marked as used), else None."""
    held: Pattern | None = lookup(("pattern", geo, device))
    return held


def pattern_nnz(geo: Geometry, device: torch.device | None = None) -> int:
    """The exact number of non-zeros of W: the cached pattern's, or found from the per-axis
    tables (no grid-sized work)."""
    held = None if device is None else cached_pattern(geo, device)
    if held is None:
        held = cached_pattern(geo, torch.device("cpu"))
    return held.nnz if held is not None else plan_pattern(geo).nnz


def get_pattern(geo: Geometry, device: torch.device, plan: PatternPlan | None = None) -> Pattern:
    """The cached pattern of ``geo`` on ``device``: built on the CPU (the CPU's own copy reused
    when cached, not kept otherwise) and moved once. ``plan``, if given, is reused.

    Raises:
        ConvMatError: on the meta device, or when the build does not fit in memory.
    """
    if device.type == "meta":
        refuse_meta(geo, "W's index pattern")
    cpu = torch.device("cpu")
    key = ("pattern", geo, device)

    def build() -> Pattern:
        if device == cpu:
            made = build_pattern(geo, plan)
        else:
            held = cached_pattern(geo, cpu)
            made = (held if held is not None else build_pattern(geo, plan)).to(device)
        made.key = key
        return made

    return cached(key, "pattern", build, Pattern.nbytes)
