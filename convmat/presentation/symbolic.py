"""W with labels instead of numbers: which kernel entry sits where.

>>> print(symbolic(6, 3, stride=2))
[[w1, w2, w3,  0,  0,  0],
 [ 0,  0, w1, w2, w3,  0]]
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import torch

from .._typing import IntOrTuple, PaddingArg, PaddingMode
from ..engine import (
    Geometry,
    conv_geometry,
    conv_transpose_geometry,
    get_pattern,
    ntuple,
    weight_view,
)

__all__ = ["SymbolicMatrix", "symbolic"]


def _index_label(prefix: str, index: tuple[int, ...], plain: bool) -> str:
    """``w2`` (1-based) for one channel in 1-D, ``w[o,i,k]`` (0-based) otherwise."""
    if plain:
        return f"{prefix}{index[-1] + 1}"
    return f"{prefix}[{','.join(map(str, index))}]"


@dataclass
class SymbolicMatrix:
    """W of a configuration with every entry named by the kernel taps that add up in it.

    ``rows``/``cols``/``taps`` list the structural non-zeros (``taps`` holds flat indices into
    the weight, ``-1`` past an entry's last tap); everything else is a structural zero.
    """

    geometry: Geometry
    weight_shape: tuple[int, ...]
    rows: torch.Tensor
    cols: torch.Tensor
    taps: torch.Tensor
    max_rows: int = 16
    max_cols: int = 16

    @property
    def shape(self) -> tuple[int, int]:
        return self.geometry.matrix_shape

    @property
    def _plain(self) -> bool:
        g = self.geometry
        return g.ndim == 1 and g.in_channels == 1 and g.out_channels == 1

    def weight_label(self, flat: int) -> str:
        """The name of weight entry ``flat`` (C order of the weight tensor)."""
        index = []
        for size in reversed(self.weight_shape):
            index.append(flat % size)
            flat //= size
        return _index_label("w", tuple(reversed(index)), self._plain)

    def _position_label(self, prefix: str, flat: int, channels: int, size: tuple[int, ...]) -> str:
        index = []
        for s in reversed((channels, *size)):
            index.append(flat % s)
            flat //= s
        return _index_label(prefix, tuple(reversed(index)), self._plain)

    def input_label(self, col: int) -> str:
        g = self.geometry
        return self._position_label("x", col, g.in_channels, g.input_size)

    def output_label(self, row: int) -> str:
        g = self.geometry
        return self._position_label("y", row, g.out_channels, g.output_size)

    def labels(
        self, rows: list[int] | None = None, cols: list[int] | None = None
    ) -> list[list[str]]:
        """The labels of the given rows and columns (all by default; ``"0"`` for zeros)."""
        rows = list(range(self.shape[0])) if rows is None else rows
        cols = list(range(self.shape[1])) if cols is None else cols
        row_at = {r: i for i, r in enumerate(rows)}
        col_at = {c: j for j, c in enumerate(cols)}
        out = [["0"] * len(cols) for _ in rows]
        keep = torch.isin(self.rows, torch.tensor(rows)) & torch.isin(self.cols, torch.tensor(cols))
        for r, c, taps in zip(self.rows[keep].tolist(), self.cols[keep].tolist(),
                              self.taps[keep].tolist()):  # fmt: skip
            names = [self.weight_label(t) for t in sorted(t for t in taps if t >= 0)]
            out[row_at[r]][col_at[c]] = "+".join(names)
        return out

    def depends_on(self, row: int) -> list[str]:
        """The inputs output ``row`` reads, by name (``["x1", "x2", "x3"]``)."""
        cols = sorted(self.cols[self.rows == row].tolist())
        return [self.input_label(c) for c in cols]

    def describe(self, row: int) -> str:
        """``"y1 depends on x1, x2, x3"``."""
        return f"{self.output_label(row)} depends on {', '.join(self.depends_on(row))}"

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
) -> SymbolicMatrix:
    """W of a configuration with labels: ``w1, w2, ...`` for one channel in 1-D,
    ``w[o,i,k...]`` (indices of the weight tensor) otherwise, ``0`` for structural zeros and
    sums such as ``w1+w3`` where reflect or circular padding folds two taps onto one input.

    The number of spatial dims is that of the longest of ``input_size``/``kernel_size``.

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
    """
    n = max(len(v) if isinstance(v, tuple | list) else 1 for v in (input_size, kernel_size))
    k = ntuple(kernel_size, n, "kernel_size", 1)
    if transposed:
        shape = (in_channels, out_channels // max(groups, 1), *k)
        geo = conv_transpose_geometry(shape, input_size, stride=stride, padding=padding,
                                      output_padding=output_padding, groups=groups,
                                      dilation=dilation)  # fmt: skip
    else:
        shape = (out_channels, in_channels // max(groups, 1), *k)
        geo = conv_geometry(shape, input_size, stride=stride, padding=padding, dilation=dilation,
                            groups=groups, padding_mode=padding_mode)  # fmt: skip
    if geo.in_channels != in_channels or geo.out_channels != out_channels:
        from .._errors import ConvMatError

        raise ConvMatError(
            f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
            f"by groups ({groups})"
        )
    # The weight's flat indices, viewed the way the matrix functions view the weight.
    view = weight_view(torch.arange(math.prod(shape)).reshape(shape), geo)
    pattern = get_pattern(geo, torch.device("cpu"))
    taps = view.index_select(1, pattern.gather)  # (C_rows, taps per channel)
    coo = pattern.coo_indices()
    per = pattern.nnz_per_channel
    if pattern.segment is None:
        tap_table = taps.reshape(-1, 1)
    else:
        # Entries where taps fold: collect each entry's taps into one row of the table.
        seg = pattern.segment
        order = torch.argsort(seg, stable=True)
        counts = torch.bincount(seg, minlength=per)
        width = int(counts.max())
        slot = torch.arange(seg.numel()) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        table = torch.full((geo.out_channels, per, width), -1, dtype=torch.long)
        table[:, seg[order], slot] = taps[:, order]
        tap_table = table.reshape(-1, width)
    return SymbolicMatrix(geo, shape, coo[0].clone(), coo[1].clone(), tap_table)
