"""Channels-last block form of W, the form the matrix layers multiply by.

Reordering W's rows to ``(spatial, channel)`` and its columns likewise (a permutation, so the
same linear map) turns its non-zeros into dense ``bo x bi`` blocks: one block of kernel values
per (output position, input position, channel block). Block-sparse (BSR) storage of that form
multiplies far faster than scattered CSR entries. The public W stays in C order; this form is
internal to the matrix layers.

The structure comes from the one-channel pattern of :mod:`convmat.engine.pattern` (which output
position reads which input position through which tap), crossed with the channel blocks.

Memory: every build (the block structure, its transpose, the tap table, the block values) is
checked against the memory guard before it allocates; block patterns and tap tables live in the
one cache (owners ``"block pattern"`` and ``"tap table"``), a block pattern measured again when
its transpose is made. On the meta device a tap table is a meta tensor of the right shape, and
block patterns are refused (they are index structure, which a meta tensor does not hold).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from .cache import cached, lookup, store, tensor_bytes
from .memory import check_allocation
from .pattern import (
    INDEX,
    INSTEAD,
    PatternPlan,
    axis_taps,
    build_pattern,
    c_strides,
    plan_pattern,
    refuse_meta,
)
from .shapes import Geometry

_ITEM = 8  # bytes of one INDEX entry

__all__ = ["BlockPattern", "block_size", "get_block_pattern", "tap_table"]


def block_size(channels: int, limit: int = 8) -> int:
    """The largest divisor of ``channels`` that is at most ``limit``."""
    return max(b for b in range(1, min(channels, limit) + 1) if channels % b == 0)


@dataclass
class BlockPattern:
    """Block-CSR structure of W in channels-last order, for one geometry and block size.

    Blocks of the weight are laid out as ``(K, COB, CIB, bo, bi)`` (tap, output-channel block,
    input-channel block within the group, block rows, block columns); ``index`` picks the block
    of every stored block of W (``segment`` sums folded taps first).
    """

    geo: Geometry
    bo: int
    bi: int
    crow: torch.Tensor
    col: torch.Tensor
    index: torch.Tensor  # (nnzb,) into the flattened weight blocks, or into the folded list
    fold_gather: torch.Tensor | None  # (T,) weight block of every folded tap
    fold_segment: torch.Tensor | None  # (T,) folded entry it adds into
    n_folded: int = 0  # length of the folded list (where taps fold)
    key: Hashable = field(default=None, repr=False)  # its key in the cache
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _transpose: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(
        default=None, repr=False
    )

    @property
    def shape(self) -> tuple[int, int]:
        return self.geo.matrix_shape

    @property
    def nnzb(self) -> int:
        """Stored blocks."""
        return self.col.numel()

    @property
    def taps(self) -> torch.Tensor:
        """The tap table of the geometry (see :func:`tap_table`), from the cache."""
        return tap_table(self.geo, self.crow.device)

    def nbytes(self) -> int:
        """Bytes held (the tap table is the cache's own entry, not counted here)."""
        held = [self.crow, self.col, self.index, self.fold_gather, self.fold_segment]
        if self._transpose is not None:
            held += list(self._transpose)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def weight_blocks(self, weight_view: torch.Tensor) -> torch.Tensor:
        """``(C_rows, C_in_group * K)`` weight view -> ``(K * COB * CIB, bo, bi)`` blocks."""
        rows, _ = weight_view.shape
        k = math.prod(self.geo.kernel_size)
        cob = rows // self.bo
        blocks = weight_view.reshape(cob, self.bo, -1, self.bi, k).permute(4, 0, 2, 1, 3)
        return blocks.reshape(-1, self.bo, self.bi)

    def values(self, weight_view: torch.Tensor) -> torch.Tensor:
        """``(nnzb, bo, bi)`` stored blocks of W (their memory checked first)."""
        block = self.bo * self.bi * weight_view.element_size()
        folded = 0 if self.fold_gather is None else self.n_folded + self.fold_gather.numel()
        rows, cols = self.shape
        check_allocation(
            (self.nnzb + folded) * block,
            weight_view.device,
            f"the values of a block-sparse W of shape ({rows}, {cols})",
            INSTEAD,
        )
        blocks = self.weight_blocks(weight_view)
        if self.fold_gather is None or self.fold_segment is None:
            return blocks.index_select(0, self.index)
        out = blocks.new_zeros(self.n_folded, self.bo, self.bi)
        out.index_add_(0, self.fold_segment, blocks.index_select(0, self.fold_gather))
        return out.index_select(0, self.index)

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block-CSR of W^T: ``(crow, col, perm)`` with blocks ``values[perm].mT``, made on
        first request (its memory checked first), kept, and counted in the cache."""
        with self._lock:
            if self._transpose is None:
                n_rows = self.crow.numel() - 1
                n_cols = self.shape[1] // self.bi
                rows, cols = self.shape
                check_allocation(
                    6 * _ITEM * self.nnzb + 2 * _ITEM * (n_cols + 1),
                    self.crow.device,
                    f"the transpose of a block-sparse W of shape ({rows}, {cols})",
                    INSTEAD,
                )
                row = torch.repeat_interleave(
                    torch.arange(n_rows, device=self.crow.device), self.crow.diff()
                )
                perm = torch.argsort(self.col * n_rows + row, stable=True)
                crow = torch.zeros(n_cols + 1, dtype=INDEX, device=self.crow.device)
                torch.cumsum(torch.bincount(self.col, minlength=n_cols), 0, out=crow[1:])
                self._transpose = (crow, row[perm], perm)
                if self.key is not None:
                    store(self.key, "block pattern", self, self.nbytes())
            return self._transpose


def tap_table(geo: Geometry, device: torch.device | None = None) -> torch.Tensor:
    """The dense side of W's per-tap structure, for the weight gradient.

    For a convolution: ``(P_out, K)``, the flat input position every output position reads
    through every tap (``P_in`` where the tap reads zero padding). For a transposed
    convolution: ``(P_in, K)``, the flat output position every input position writes to through
    every tap (``P_out`` where it is cropped) - the table of the matching convolution, which
    has no holes for the stride. Cached per geometry and device (owner ``"tap table"``); on the
    meta device, a meta tensor of that shape.

    Shape:
        ``(prod(output_size), prod(kernel_size))`` of the convolution (of the matching
        convolution for a transposed one).

    >>> from convmat.engine import conv_geometry
    >>> tap_table(conv_geometry((1, 1, 3), 5)).tolist()
    [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    conv = geo.matching_conv if geo.transposed else geo
    shape = (math.prod(conv.output_size), math.prod(conv.kernel_size))
    if device.type == "meta":
        return torch.empty(shape, dtype=INDEX, device=device)
    key = ("tap table", geo, device)

    def build() -> torch.Tensor:
        # The table, its validity mask and one temporary beside it; one more for the move.
        need = math.prod(shape) * (2 * _ITEM + 1 + (_ITEM if device.type != "cpu" else 0))
        check_allocation(need, device, f"the tap table of a W of shape {geo.matrix_shape}")
        return _tap_table(geo).to(device)

    return cached(key, "tap table", build, lambda t: tensor_bytes([t]))


def _tap_table(geo: Geometry) -> torch.Tensor:
    if geo.transposed:
        geo = geo.matching_conv
    n = geo.ndim
    in_total = math.prod(geo.input_size)
    flat = torch.zeros((), dtype=INDEX)
    valid = torch.ones((), dtype=torch.bool)
    for d, st in enumerate(c_strides(geo.input_size)):
        c, ok = axis_taps(geo, d)
        shape = [1] * (2 * n)
        shape[d], shape[n + d] = c.shape
        flat = flat + (c * st).view(shape)
        valid = valid & ok.view(shape)
    flat = torch.where(valid, flat, in_total)
    return flat.reshape(math.prod(geo.output_size), math.prod(geo.kernel_size))


def _block_build_bytes(geo: Geometry, bo: int, bi: int) -> tuple[int, PatternPlan]:
    """Peak bytes of building the block pattern (an upper bound), and the spatial plan."""
    one = dataclasses.replace(geo, in_channels=1, out_channels=1, groups=1)
    plan = plan_pattern(one)
    cob, cib = geo.out_channels // bo, geo.in_channels // geo.groups // bi
    p_out = math.prod(geo.output_size)
    width = math.prod(int(a.count.max()) if a.count.numel() else 0 for a in plan.axes)
    grid = p_out * cob * width * cib
    nnzb = plan.nnz_per_channel * cob * cib
    folded = 2 * plan.taps * cob * cib if plan.folds else 0
    need = grid * (1 + 3 * _ITEM) + _ITEM * (3 * nnzb + 2 * folded + 2 * (p_out * cob + 1))
    return need + plan.pattern_bytes(), plan


def build_block_pattern(geo: Geometry, bo: int, bi: int) -> BlockPattern:
    """The block pattern of ``geo`` on the CPU, after checking that its build fits."""
    need, plan = _block_build_bytes(geo, bo, bi)
    rows, cols = geo.matrix_shape
    check_allocation(
        need,
        torch.device("cpu"),
        f"building the block pattern of a W of shape ({rows}, {cols})",
        INSTEAD,
    )
    one = dataclasses.replace(geo, in_channels=1, out_channels=1, groups=1)
    spatial = build_pattern(one, plan)
    g = geo.groups
    cob, cib = geo.out_channels // bo, geo.in_channels // g // bi
    cob_per_group = cob // g
    counts = spatial.row_counts  # entries (input positions) per output position
    p_out = counts.numel()
    start = torch.zeros(p_out, dtype=INDEX)
    torch.cumsum(counts[:-1], 0, out=start[1:])
    width = int(counts.max()) if p_out else 0
    # Grid (output position, output block, entry of that position, input block in the group).
    j = torch.arange(width, dtype=INDEX)
    mask = (j[None, :] < counts[:, None]).view(p_out, 1, width, 1)
    entry = (start[:, None] + j[None, :]).clamp(max=max(spatial.nnz_per_channel - 1, 0))
    entry = entry.view(p_out, 1, width, 1)
    ob = torch.arange(cob, dtype=INDEX).view(1, cob, 1, 1)
    ib = torch.arange(cib, dtype=INDEX).view(1, 1, 1, cib)
    grid = (p_out, cob, width, cib)
    keep = torch.nonzero(mask.expand(grid).reshape(-1)).squeeze(1)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.expand(grid).reshape(-1).index_select(0, keep)

    n_col_blocks = geo.in_channels // bi
    col = take(spatial.col_local[entry] * n_col_blocks + (ob // cob_per_group) * cib + ib)
    if spatial.segment is None:
        index = take((spatial.gather[entry] * cob + ob) * cib + ib)
        fold_gather = fold_segment = None
    else:
        # Folded entries first (entry, output block, input block), then gathered in order.
        index = take((entry * cob + ob) * cib + ib)
        t_ob = torch.arange(cob, dtype=INDEX).view(1, cob, 1)
        t_ib = torch.arange(cib, dtype=INDEX).view(1, 1, cib)
        fold_gather = ((spatial.gather.view(-1, 1, 1) * cob + t_ob) * cib + t_ib).reshape(-1)
        fold_segment = ((spatial.segment.view(-1, 1, 1) * cob + t_ob) * cib + t_ib).reshape(-1)
    crow = torch.zeros(p_out * cob + 1, dtype=INDEX)
    torch.cumsum((counts * cib).repeat_interleave(cob), 0, out=crow[1:])
    n_folded = 0 if fold_segment is None else spatial.nnz_per_channel * cob * cib
    return BlockPattern(geo, bo, bi, crow, col, index, fold_gather, fold_segment, n_folded)


def get_block_pattern(geo: Geometry, bo: int, bi: int, device: torch.device) -> BlockPattern:
    """The cached block pattern of ``geo`` with ``bo x bi`` blocks on ``device`` (built on the
    CPU, the CPU's own copy reused when cached, not kept otherwise, and moved once).

    Raises:
        ConvMatError: on the meta device, or when the build does not fit in memory.
    """
    device = torch.device(device)
    if device.type == "meta":
        refuse_meta(geo, "The block-sparse W of a matrix layer")
    cpu = torch.device("cpu")
    key = ("block pattern", geo, bo, bi, device)

    def make() -> BlockPattern:
        if device == cpu:
            made = build_block_pattern(geo, bo, bi)
        else:
            p = lookup(("block pattern", geo, bo, bi, cpu)) or build_block_pattern(geo, bo, bi)
            check_allocation(p.nbytes(), device, "a block pattern", INSTEAD)
            moved = {
                f.name: getattr(p, f.name).to(device)
                for f in dataclasses.fields(p)
                if isinstance(getattr(p, f.name), torch.Tensor)
            }
            made = dataclasses.replace(p, **moved, _lock=threading.Lock(), _transpose=None)
        made.key = key
        return made

    return cached(key, "block pattern", make, BlockPattern.nbytes)
