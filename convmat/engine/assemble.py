"""W from a weight and a :class:`~convmat.engine.shapes.Geometry`: gather the kernel values
into the cached pattern and assemble the requested layout."""

from __future__ import annotations

import math
import warnings

import torch

from .._errors import ConvMatError
from .memory import check_allocation
from .pattern import Pattern, get_pattern
from .shapes import Geometry

__all__ = ["LAYOUTS", "assemble", "check_matrix_memory", "check_weight", "weight_view"]

#: The layouts W can be assembled in.
LAYOUTS = (torch.strided, torch.sparse_coo, torch.sparse_csr)


def check_weight(weight: object) -> torch.Tensor:
    """``weight`` if it is a dense numeric tensor; :class:`ConvMatError` otherwise."""
    if not isinstance(weight, torch.Tensor):
        raise ConvMatError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype == torch.bool:
        raise ConvMatError(f"weight must have a numeric dtype, got {weight.dtype}")
    if weight.layout != torch.strided:
        raise ConvMatError(f"weight must be a dense (strided) tensor, got layout {weight.layout}")
    return weight


def check_layout(layout: object) -> torch.layout:
    """``layout`` if W can be assembled in it; :class:`ConvMatError` otherwise."""
    if layout not in LAYOUTS:
        raise ConvMatError(
            f"layout must be torch.strided, torch.sparse_coo or torch.sparse_csr, got {layout!r}"
        )
    return layout  # type: ignore[return-value]


def check_matrix_memory(
    geo: Geometry, layout: torch.layout, dtype: torch.dtype, device: torch.device
) -> None:
    """Refuse, before allocating, a W that cannot fit in the memory of ``device``."""
    rows, cols = geo.matrix_shape
    item = torch.empty((), dtype=dtype).element_size()
    if layout == torch.strided:
        need, what = rows * cols * item, "dense"
        instead = "use layout=torch.sparse_csr or torch.sparse_coo, which store only the non-zeros"
    else:
        # An upper bound: every row reads at most C_in/groups * prod(kernel) inputs.
        nnz = rows * (geo.in_channels // geo.groups) * math.prod(geo.kernel_size)
        index_bytes = 16 if layout == torch.sparse_coo else 8
        need, what = nnz * (item + index_bytes), "sparse"
        instead = "use convmat.ConvOperator, which never forms W, or a smaller input"
    check_allocation(
        need, device, f"a {what} W of shape ({rows}, {cols}) and dtype {dtype}", instead
    )


def weight_view(weight: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """The weight as ``(C_rows, C_in_per_group * prod(kernel))``: row ``c`` holds the kernel
    values that W's rows of output channel ``c`` take (for a transposed convolution, whose
    weight is ``(C_in, C_out // groups, *kernel)``, the in- and out-channels swap places)."""
    if not geo.transposed:
        return weight.reshape(geo.out_channels, -1)
    g = geo.groups
    view = weight.reshape(g, geo.in_channels // g, geo.out_channels // g, -1).transpose(1, 2)
    return view.reshape(geo.out_channels, -1)


def assemble(weight_view: torch.Tensor, geo: Geometry, layout: torch.layout) -> torch.Tensor:
    """W from the weight viewed as ``(C_rows, C_in_per_group * prod(kernel))``."""
    check_layout(layout)
    check_matrix_memory(geo, layout, weight_view.dtype, weight_view.device)
    pattern: Pattern = get_pattern(geo, weight_view.device)
    values = pattern.values(weight_view)
    rows, cols = pattern.shape
    if layout == torch.strided:
        dense = weight_view.new_zeros(pattern.row_channels, rows * cols // pattern.row_channels)
        return dense.scatter_(1, pattern.dense_index(), values).view(rows, cols)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        if layout == torch.sparse_csr:
            return torch.sparse_csr_tensor(
                pattern.crow(),
                pattern.col(),
                values.reshape(-1),
                (rows, cols),
                check_invariants=False,
            )
        return torch.sparse_coo_tensor(
            pattern.coo_indices(),
            values.reshape(-1),
            (rows, cols),
            is_coalesced=True,
            check_invariants=False,
        )
