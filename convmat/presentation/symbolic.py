"""W with labels instead of numbers: which kernel entry sits where.

Nothing is built up front. :func:`symbolic` only validates the configuration into a
:class:`~convmat.engine.Geometry`; the labels of the rows and columns asked for are computed
when asked for, one spatial axis at a time (a row position reads ``k`` input positions per
axis). Printing shows the corners of a large W, so printing costs the same at any size; only
:attr:`SymbolicMatrix.rows` / ``cols`` / ``taps`` (every non-zero at once) build W's pattern, after
the memory guard has agreed.

Indices (rows, columns) follow Python's sequence rules: negative values count from the end,
anything outside ``-n .. n - 1`` raises :class:`IndexError`.

>>> print(symbolic(6, 3, stride=2))
[[w1, w2, w3,  0,  0,  0],
 [ 0,  0, w1, w2, w3,  0]]

``flip=True`` labels the true convolution's W: every entry names the tap of the flipped kernel,
so putting the weight's values in gives ``conv_matrix(w, ..., flip=True)``.
"""

from __future__ import annotations

import html
import itertools
import math
import operator
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import torch

from .._errors import ConvMatError
from .._typing import IntOrTuple, PaddingArg, PaddingMode
from ..engine import (
    Geometry,
    check_allocation,
    check_flip,
    get_pattern,
    weight_view,
)

__all__ = ["SymbolicMatrix", "symbolic"]

#: Indices of W must stay well inside int64 (positions are multiplied by strides).
_INDEX_LIMIT = 2**62

#: Bytes one label takes in Python (the str object and its slot in a list), for the guard.
_LABEL_BYTES = 80

#: Bytes per structural non-zero of the full tap table (its row, column, taps and the pattern).
_ENTRY_BYTES = 96

_CPU = torch.device("cpu")


def _index_label(prefix: str, index: tuple[int, ...], plain: bool) -> str:
    """``w2`` (1-based) for one channel in 1-D, ``w[o,i,k]`` (0-based) otherwise."""
    if plain:
        return f"{prefix}{index[-1] + 1}"
    return f"{prefix}[{','.join(map(str, index))}]"


def _unravel(flat: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """C-order multi-index of ``flat`` in ``sizes`` (Python ints: W may exceed any tensor)."""
    index = []
    for size in reversed(sizes):
        flat, rest = divmod(flat, size)
        index.append(rest)
    return tuple(reversed(index))


def _index(value: Any, size: int, name: str, of: str) -> int:
    """``value`` as an index into ``size`` items (``of``), with Python's rules for sequences."""
    try:
        i = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if not -size <= i < size:
        raise IndexError(
            f"{name} {value!r} is out of range for {of} ({size}; allowed: -{size} to {size - 1})"
        )
    return i + size if i < 0 else i


def _indices(values: Any, size: int, name: str, of: str) -> range | list[int]:
    """Every index (``None``) or each of ``values`` checked by :func:`_index`."""
    if values is None:
        return range(size)
    return [_index(v, size, name, of) for v in values]


def _axis_taps(
    geo: Geometry, dim: int, positions: set[int], flip: bool = False
) -> dict[tuple[int, int], list[int]]:
    """``{(output position, input position): taps}`` along axis ``dim`` for the given output
    positions; taps in ascending order (two or more where padding folds them together). With
    ``flip``, the taps of the flipped kernel: the window's tap ``m`` is its tap ``k - 1 - m``."""
    pos = torch.tensor(sorted(positions), dtype=torch.int64)
    cols, valid = geo.taps(dim, pos)
    k = geo.kernel_size[dim]
    order = range(k - 1, -1, -1) if flip else range(k)  # so that the taps named ascend
    table: dict[tuple[int, int], list[int]] = {}
    for r, row_cols, row_valid in zip(pos.tolist(), cols.tolist(), valid.tolist()):
        for m in order:
            if row_valid[m]:
                table.setdefault((r, row_cols[m]), []).append(k - 1 - m if flip else m)
    return table


class SymbolicMatrix:
    """W of a configuration with every entry named by the kernel taps that add up in it.

    Labels are computed on demand for the rows and columns asked for (:meth:`labels`,
    :meth:`depends_on`, printing); :attr:`rows` / :attr:`cols` / :attr:`taps` list every
    structural non-zero at once (``taps`` holds flat indices into the weight, ascending, ``-1``
    past an entry's last tap) and are guarded by the memory check. With ``flip`` (the true
    convolution) every entry names the taps of the flipped kernel.

    Shape:
        :attr:`shape` is ``(out_channels * prod(output_size), in_channels * prod(input_size))``.
    """

    def __init__(
        self,
        geometry: Geometry,
        weight_shape: tuple[int, ...],
        max_rows: int = 16,
        max_cols: int = 16,
        flip: bool = False,
    ) -> None:
        self.geometry = geometry
        self.weight_shape = weight_shape
        self.max_rows = max_rows
        self.max_cols = max_cols
        self.flip = check_flip(flip)

    @property
    def shape(self) -> tuple[int, int]:
        return self.geometry.matrix_shape

    @property
    def _plain(self) -> bool:
        g = self.geometry
        return g.ndim == 1 and g.in_channels == 1 and g.out_channels == 1

    # -- names ----------------------------------------------------------------------------

    def weight_label(self, flat: int) -> str:
        """The name of weight entry ``flat`` (C order of the weight tensor)."""
        flat = _index(flat, math.prod(self.weight_shape), "weight entry", "the weight's entries")
        return _index_label("w", _unravel(flat, self.weight_shape), self._plain)

    def input_label(self, col: int) -> str:
        """The name of the input W's column ``col`` multiplies (``x3``, ``x[c,i,j]``)."""
        g = self.geometry
        col = _index(col, self.shape[1], "column", "W's columns")
        return _index_label("x", _unravel(col, (g.in_channels, *g.input_size)), self._plain)

    def output_label(self, row: int) -> str:
        """The name of the output W's row ``row`` computes (``y1``, ``y[c,i,j]``)."""
        g = self.geometry
        row = _index(row, self.shape[0], "row", "W's rows")
        return _index_label("y", _unravel(row, (g.out_channels, *g.output_size)), self._plain)

    # -- entries on demand ----------------------------------------------------------------

    def labels(
        self, rows: Sequence[int] | None = None, cols: Sequence[int] | None = None
    ) -> list[list[str]]:
        """The labels of the given rows and columns (all by default; ``"0"`` for zeros).

        Only the cells asked for are computed; asking for every cell of a large W is refused
        (:class:`ConvMatError`) when its labels would not fit in memory.

        Shape:
            ``len(rows) x len(cols)`` strings.

        >>> symbolic(4, 3, padding=1, padding_mode="circular").labels([0], [0, 3])
        [['w2', 'w1']]
        """
        n_rows, n_cols = self.shape
        rows = _indices(rows, n_rows, "row", "W's rows")
        cols = _indices(cols, n_cols, "column", "W's columns")
        check_allocation(
            len(rows) * len(cols) * _LABEL_BYTES, _CPU,
            f"the labels of {len(rows)} x {len(cols)} entries of W",
            "ask for some rows and columns: labels(rows=[...], cols=[...]), or print the "
            "SymbolicMatrix, which shows its corners",
        )  # fmt: skip
        g = self.geometry
        row_index = [_unravel(r, (g.out_channels, *g.output_size)) for r in rows]
        col_index = [_unravel(c, (g.in_channels, *g.input_size)) for c in cols]
        tables = [_axis_taps(g, d, {ri[1 + d] for ri in row_index}, self.flip)
                  for d in range(g.ndim)]  # fmt: skip
        return [[self._cell(tables, ri, ci) for ci in col_index] for ri in row_index]

    def _cell(
        self,
        tables: list[dict[tuple[int, int], list[int]]],
        row: tuple[int, ...],
        col: tuple[int, ...],
    ) -> str:
        """The label of one entry from its row ``(o, r_1..r_N)`` and column ``(i, c_1..c_N)``."""
        g = self.geometry
        out_group, in_group = g.out_channels // g.groups, g.in_channels // g.groups
        o, i = row[0], col[0]
        group = o // out_group
        if i // in_group != group:
            return "0"
        taps = [tables[d].get((row[1 + d], col[1 + d])) for d in range(g.ndim)]
        if any(t is None for t in taps):
            return "0"
        # The weight is (C_out, C_in / groups, *k), or (C_in, C_out / groups, *k) transposed.
        lead = (i, o - group * out_group) if g.transposed else (o, i - group * in_group)
        return "+".join(
            _index_label("w", (*lead, *m), self._plain)
            for m in itertools.product(*taps)  # type: ignore[arg-type]
        )

    def depends_on(self, row: int) -> list[str]:
        """The inputs output ``row`` reads, by name (``["x1", "x2", "x3"]``).

        Raises:
            IndexError: ``row`` outside ``-rows .. rows - 1``.
            TypeError: ``row`` not an int.

        >>> symbolic(10, 3, stride=2).depends_on(-1)
        ['x7', 'x8', 'x9']
        """
        g = self.geometry
        row = _index(row, self.shape[0], "row", "W's rows")
        o, *position = _unravel(row, (g.out_channels, *g.output_size))
        in_group = g.in_channels // g.groups
        group = o // (g.out_channels // g.groups)
        # The columns: input channels of the group times the positions read on every axis.
        axes = []
        for d, r in enumerate(position):
            read, valid = g.taps(d, torch.tensor([r], dtype=torch.int64))
            axes.append(torch.unique(read[valid]))
        count = in_group * math.prod(a.numel() for a in axes)
        check_allocation(count * _LABEL_BYTES, _CPU, f"the names of the {count} inputs of a row")
        flat = torch.arange(group * in_group, (group + 1) * in_group, dtype=torch.int64)
        flat = flat * math.prod(g.input_size)
        for d, read in enumerate(axes):
            stride = math.prod(g.input_size[d + 1 :])
            flat = (flat[:, None] + read[None, :] * stride).reshape(-1)
        return [self.input_label(c) for c in flat.tolist()]

    def describe(self, row: int) -> str:
        """``"y1 depends on x1, x2, x3"``."""
        return f"{self.output_label(row)} depends on {', '.join(self.depends_on(row))}"

    # -- every non-zero at once -----------------------------------------------------------

    @cached_property
    def _entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.geometry
        n_rows, n_cols = self.shape
        bound = n_rows * (g.in_channels // g.groups) * math.prod(g.kernel_size)
        check_allocation(
            bound * _ENTRY_BYTES, _CPU,
            f"the tap table of every non-zero of a W of shape ({n_rows}, {n_cols})",
            "print the SymbolicMatrix or ask labels() for some rows and columns, which need "
            "no table",
        )  # fmt: skip
        shape = self.weight_shape
        index = torch.arange(math.prod(shape)).reshape(shape)
        if self.flip:  # W gathers the flipped kernel: each slot names the tap it holds
            index = index.flip(tuple(range(2, len(shape))))
        view = weight_view(index, g)
        pattern = get_pattern(g, _CPU)
        taps = view.index_select(1, pattern.gather)  # (C_rows, taps per channel)
        coo = pattern.coo_indices()
        if pattern.segment is None:
            return coo[0].clone(), coo[1].clone(), taps.reshape(-1, 1)
        # Entries where taps fold: collect each entry's taps into one row of the table.
        per = pattern.nnz_per_channel
        seg = pattern.segment
        order = torch.argsort(seg, stable=True)
        counts = torch.bincount(seg, minlength=per)
        width = int(counts.max())
        slot = torch.arange(seg.numel()) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        table = torch.full((g.out_channels, per, width), -1, dtype=torch.long)
        table[:, seg[order], slot] = taps[:, order]
        table = table.reshape(-1, width)
        if self.flip:  # ascending within each entry, -1 still last
            last = torch.iinfo(torch.long).max
            table = torch.where(table < 0, last, table).sort(1).values
            table[table == last] = -1
        return coo[0].clone(), coo[1].clone(), table

    @property
    def rows(self) -> torch.Tensor:
        """``(nnz,)`` row of every structural non-zero (builds W's pattern)."""
        return self._entries[0]

    @property
    def cols(self) -> torch.Tensor:
        """``(nnz,)`` column of every structural non-zero (builds W's pattern)."""
        return self._entries[1]

    @property
    def taps(self) -> torch.Tensor:
        """``(nnz, most taps in one entry)`` flat weight indices, ``-1`` past an entry's last."""
        return self._entries[2]

    # -- rendering ------------------------------------------------------------------------

    def _shown(self, n: int, most: int) -> list[int]:
        if n <= most:
            return list(range(n))
        half = most // 2
        return [*range(half), -1, *range(n - (most - half), n)]

    def __str__(self) -> str:
        rows = self._shown(self.shape[0], self.max_rows)
        cols = self._shown(self.shape[1], self.max_cols)
        grid = self.labels([r for r in rows if r >= 0], [c for c in cols if c >= 0])
        width = max(len(x) for line in grid for x in line)
        lines = []
        it = iter(grid)
        for r in rows:
            if r < 0:
                lines.append(" ...")
                continue
            cells = iter(next(it))
            lines.append(", ".join("..." if c < 0 else next(cells).rjust(width) for c in cols))
        body = ",\n".join(line if line == " ..." else f" [{line}]" for line in lines)
        text = "[" + body[1:] + "]"
        if -1 in rows or -1 in cols:
            text += (
                f"\n({self.shape[0]} x {self.shape[1]}: showing {len([r for r in rows if r >= 0])}"
                f" rows and {len([c for c in cols if c >= 0])} columns; '...' marks the rest)"
            )
        return text

    def __repr__(self) -> str:
        return f"SymbolicMatrix(shape={self.shape})\n{self}"

    def _repr_html_(self) -> str:
        rows = [r for r in self._shown(self.shape[0], self.max_rows) if r >= 0]
        cols = [c for c in self._shown(self.shape[1], self.max_cols) if c >= 0]
        grid = self.labels(rows, cols)
        head = "".join(f"<th>{html.escape(self.input_label(c))}</th>" for c in cols)
        body = "".join(
            f"<tr><th>{html.escape(self.output_label(r))}</th>"
            + "".join(
                '<td style="color:#bbb">0</td>' if x == "0" else f"<td>{html.escape(x)}</td>"
                for x in line
            )
            + "</tr>"
            for r, line in zip(rows, grid)
        )
        return f"<table><tr><th></th>{head}</tr>{body}</table>"


def symbolic(
    input_size: IntOrTuple,
    kernel_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    dilation: IntOrTuple = 1,
    in_channels: int = 1,
    out_channels: int = 1,
    groups: int = 1,
    padding_mode: PaddingMode = "zeros",
    transposed: bool = False,
    output_padding: IntOrTuple = 0,
    flip: bool = False,
) -> SymbolicMatrix:
    """W of a configuration with labels: ``w1, w2, ...`` for one channel in 1-D,
    ``w[o,i,k...]`` (indices of the weight tensor) otherwise, ``0`` for structural zeros and
    sums such as ``w1+w3`` where reflect or circular padding folds two taps onto one input.

    The number of spatial dims is that of the longest of ``input_size``/``kernel_size``.
    Only the configuration is checked here; labels are computed for what is shown or asked
    for, so a W of any size can be printed.

    Args:
        input_size: spatial input size.
        kernel_size: kernel size.
        stride, padding, dilation, groups, padding_mode: as ``nn.Conv{N}d``.
        in_channels: input channels (an int >= 1, divisible by ``groups``).
        out_channels: output channels (an int >= 1, divisible by ``groups``).
        transposed: ``True`` for a transposed convolution (``nn.ConvTranspose{N}d``).
        output_padding: of a transposed convolution.
        flip: ``True`` for the true convolution (the kernel flipped in its spatial dims), as
            :func:`convmat.conv_matrix`: each entry is named by the tap of the flipped kernel,
            so the labels evaluated at ``w`` give ``conv_matrix(w, ..., flip=True)`` (and, with
            ``transposed=True``, ``conv_transpose_matrix(w.flip(spatial dims), ...)``).

    Returns:
        A :class:`SymbolicMatrix`.

    Raises:
        ConvMatError: naming the argument, its value and what is allowed.

    Shape:
        as :func:`convmat.conv_matrix` (or :func:`convmat.conv_transpose_matrix`).

    >>> s = symbolic(4, 3, padding=1, padding_mode="reflect")
    >>> print(s)
    [[   w2, w1+w3,     0,     0],
     [   w1,    w2,    w3,     0],
     [    0,    w1,    w2,    w3],
     [    0,     0, w1+w3,    w2]]
    >>> s.describe(0)
    'y1 depends on x1, x2'
    >>> print(symbolic(5, 3, flip=True))
    [[w3, w2, w1,  0,  0],
     [ 0, w3, w2, w1,  0],
     [ 0,  0, w3, w2, w1]]
    """
    if not isinstance(transposed, bool):
        raise ConvMatError(f"transposed must be True or False, got {transposed!r}")
    check_flip(flip)
    geo = Geometry.from_channels(
        input_size, kernel_size, in_channels=in_channels, out_channels=out_channels,
        groups=groups, stride=stride, padding=padding, dilation=dilation,
        padding_mode=padding_mode, transposed=transposed, output_padding=output_padding,
    )  # fmt: skip
    if max(*geo.matrix_shape, geo.index_bound) >= _INDEX_LIMIT:
        raise ConvMatError(
            f"W of shape {geo.matrix_shape} is too large to label: its indices must stay below "
            f"2**62 (convmat.conv_output_size gives its sizes)"
        )
    return SymbolicMatrix(geo, geo.weight_shape, flip=flip)
