"""W from a weight and a :class:`~convmat.engine.shapes.Geometry`: gather the kernel values
into the cached pattern and assemble the requested layout."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .._errors import ConvMatError
from .memory import check_allocation
from .pattern import INDEX, Pattern, PatternPlan, cached_pattern, get_pattern, plan_pattern
from .shapes import Geometry

__all__ = [
    "LAYOUTS",
    "assemble",
    "check_matrix_memory",
    "check_weight",
    "oriented",
    "weight_view",
]

#: The layouts W can be assembled in.
LAYOUTS = (torch.strided, torch.sparse_coo, torch.sparse_csr)


def check_weight(weight: object) -> torch.Tensor:
    """``weight`` if it is a dense numeric tensor; :class:`ConvMatError` otherwise."""
    if not isinstance(weight, torch.Tensor):
        raise ConvMatError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype == torch.bool:
        raise ConvMatError(f"weight must have a numeric dtype, got {weight.dtype}")
    if "float8" in str(weight.dtype):
        raise ConvMatError(
            f"weight must have a dtype torch's convolutions compute in (not float8), got "
            f"{str(weight.dtype).removeprefix('torch.')}; cast it first, e.g. "
            f"weight.to(torch.float32)"
        )
    if weight.layout != torch.strided:
        raise ConvMatError(f"weight must be a dense (strided) tensor, got layout {weight.layout}")
    return weight


def check_layout(layout: object) -> torch.layout:
    """``layout`` if W can be assembled in it; :class:`ConvMatError` otherwise."""
    if layout not in LAYOUTS:
        raise ConvMatError(
            f"layout must be torch.strided, torch.sparse_coo or torch.sparse_csr, got {layout!r}"
        )
    return layout


def check_matrix_memory(
    geo: Geometry, layout: torch.layout, dtype: torch.dtype, device: torch.device
) -> None:
    """Refuse, before allocating, a W that cannot fit in the memory of ``device``.

    Counts W itself (dense: every entry; sparse: the exact number of non-zeros, from the cached
    pattern or the per-axis tables), its values and index tensors, and the pattern's build where
    the cache does not hold it yet. Nothing is checked on the meta device.

    Raises:
        ConvMatError: naming the size needed, the limit found and what to do instead.
    """
    device = torch.device(device)
    pattern = None if device.type == "meta" else cached_pattern(geo, device)
    _need(geo, layout, dtype, device, pattern)


def _need(
    geo: Geometry,
    layout: torch.layout,
    dtype: torch.dtype,
    device: torch.device,
    pattern: Pattern | None,
) -> PatternPlan | None:
    """Check W's memory (see check_matrix_memory); the pattern's plan where it had to be made."""
    if device.type == "meta":
        return None
    rows, cols = geo.matrix_shape
    item = dtype.itemsize
    described = f"W of shape ({rows}, {cols}) and dtype {dtype}"
    if layout == torch.strided:
        what = f"a dense {described}"
        instead = "use layout=torch.sparse_csr or torch.sparse_coo, which store only the non-zeros"
        dense = rows * cols * item
        if pattern is None:
            check_allocation(dense, device, what, instead)  # before any planning
    else:
        what = f"a sparse {described}"
        instead = "use convmat.ConvOperator, which never forms W, or a smaller input"
        dense = 0
    plan = None
    if pattern is not None:
        nnz, build, growth = pattern.nnz, 0, pattern.growth_bytes(layout)
    else:
        plan = plan_pattern(geo)
        nnz = plan.nnz
        growth = 16 * nnz if layout != torch.strided else 0  # CSR or COO indices (upper)
        # Built on the CPU (that build checks the CPU's memory itself), then moved.
        build = plan.build_bytes() if device.type == "cpu" else plan.pattern_bytes()
    # Dense: the values and their positions in W, scattered; sparse: the values and indices.
    extra = nnz * (item + 16) if layout == torch.strided else nnz * item + growth
    check_allocation(dense + extra + build, device, what, instead)
    return plan


def oriented(weight: torch.Tensor, flip: bool) -> torch.Tensor:
    """``weight`` flipped in its spatial dimensions for ``flip=True`` (the true convolution's
    kernel; differentiable), else ``weight`` itself.

    Shape:
        ``weight``'s.

    >>> oriented(torch.tensor([[[1.0, 2.0, 3.0]]]), True)
    tensor([[[3., 2., 1.]]])
    """
    return weight.flip(tuple(range(2, weight.dim()))) if flip else weight


def weight_view(weight: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """The weight as ``(C_rows, C_in_per_group * prod(kernel))``: row ``c`` holds the kernel
    values that W's rows of output channel ``c`` take (for a transposed convolution, whose
    weight is ``(C_in, C_out // groups, *kernel)``, the in- and out-channels swap places)."""
    if not geo.transposed:
        return weight.reshape(geo.out_channels, -1)
    g = geo.groups
    view = weight.reshape(g, geo.in_channels // g, geo.out_channels // g, -1).transpose(1, 2)
    return view.reshape(geo.out_channels, -1)


def _meta_matrix(weight_view: torch.Tensor, geo: Geometry, layout: torch.layout) -> torch.Tensor:
    """W on the meta device: its shape, layout, number of non-zeros and dtype, no data."""
    rows, cols = geo.matrix_shape
    tie = weight_view.sum() * 0  # keeps W in the weight's autograd graph, as on other devices
    if layout == torch.strided:
        return weight_view.new_zeros((rows, cols)) + tie
    nnz = plan_pattern(geo).nnz
    values = weight_view.new_zeros(nnz) + tie
    meta: dict[str, Any] = {"dtype": INDEX, "device": weight_view.device}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        if layout == torch.sparse_csr:
            crow, col = torch.empty(rows + 1, **meta), torch.empty(nnz, **meta)
            return torch.sparse_csr_tensor(crow, col, values, (rows, cols), check_invariants=False)
        indices = torch.empty(2, nnz, **meta)
        return torch.sparse_coo_tensor(
            indices, values, (rows, cols), is_coalesced=True, check_invariants=False
        )


def assemble(weight_view: torch.Tensor, geo: Geometry, layout: torch.layout) -> torch.Tensor:
    """W from the weight viewed as ``(C_rows, C_in_per_group * prod(kernel))``.

    The memory it needs is checked first (:func:`check_matrix_memory`). On the meta device W
    is a meta tensor of the right shape and layout (a sparse one with its exact number of
    non-zeros, counted from the per-axis tables); no pattern is built, nothing large allocated.
    """
    check_layout(layout)
    if weight_view.device.type == "meta":
        return _meta_matrix(weight_view, geo, layout)
    device = weight_view.device
    rows, cols = geo.matrix_shape
    pattern = cached_pattern(geo, device)
    plan = _need(geo, layout, weight_view.dtype, device, pattern)
    if pattern is None:
        pattern = get_pattern(geo, device, plan)
    values = pattern.values(weight_view)
    if layout == torch.strided:
        dense = weight_view.new_zeros(pattern.row_channels, rows * cols // pattern.row_channels)
        return dense.scatter_(1, pattern.dense_index(), values).view(rows, cols)
    if not (values.requires_grad and torch.is_grad_enabled()):  # no graph: no Function
        return _sparse(pattern, values.reshape(-1), layout)
    matrix: torch.Tensor = _SparseMatrix.apply(values.reshape(-1), pattern, layout)
    return matrix


def _sparse(pattern: Pattern, values: torch.Tensor, layout: torch.layout) -> torch.Tensor:
    """W in a sparse layout: the pattern's cached indices with ``values`` (``(nnz,)``, CSR
    order, which is also the coalesced COO order)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly")
        if layout == torch.sparse_csr:
            return torch.sparse_csr_tensor(
                pattern.crow(), pattern.col(), values, pattern.shape, check_invariants=False
            )
        return torch.sparse_coo_tensor(
            pattern.coo_indices(), values, pattern.shape, is_coalesced=True,
            check_invariants=False,
        )  # fmt: skip


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two index tensors hold the same entries (at once where they share memory)."""
    if a.shape != b.shape:
        return False
    shared = a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype
    return shared or torch.equal(a, b)


def _values_at(pattern: Pattern, matrix: torch.Tensor) -> torch.Tensor:
    """The entries of a W-shaped ``matrix`` (any layout) at the pattern's non-zeros, ``(nnz,)``
    in CSR order (zero where a sparse ``matrix`` stores nothing)."""
    if matrix.layout == torch.strided:
        view = matrix.reshape(pattern.row_channels, -1)
        return view.gather(1, pattern.dense_index()).reshape(-1)
    if matrix.layout == torch.sparse_csr:  # W's own indices, or go through COO
        crow, col = matrix.crow_indices(), matrix.col_indices()
        if _same(crow, pattern.crow()) and _same(col, pattern.col()):
            return matrix.values()
    coo = matrix if matrix.layout == torch.sparse_coo else matrix.to_sparse_coo()
    coo = coo.coalesce()
    indices, values = coo.indices(), coo.values()
    target = pattern.coo_indices()
    if _same(indices, target):
        return values
    # Other stored positions: match flat keys (both sorted: coalesced and CSR order).
    cols = pattern.shape[1]
    keys = indices[0] * cols + indices[1]
    wanted = target[0] * cols + target[1]
    if keys.numel() == 0:
        return values.new_zeros(wanted.numel())
    at = torch.searchsorted(keys, wanted).clamp_(max=keys.numel() - 1)
    return torch.where(keys[at] == wanted, values[at], values.new_zeros(()))


def _dense(pattern: Pattern, values: torch.Tensor) -> torch.Tensor:
    """Dense W from its ``(nnz,)`` values (differentiable in ``values``)."""
    rows, cols = pattern.shape
    flat = values.new_zeros(pattern.row_channels, rows * cols // pattern.row_channels)
    per_channel = values.view(pattern.row_channels, -1)
    return flat.scatter(1, pattern.dense_index(), per_channel).view(rows, cols)


class _SparseMatrix(torch.autograd.Function):
    """Sparse W from its values. Its backward gathers the gradient's entries at the pattern
    (:class:`_PatternValues`, whose own backward is this one, or a dense scatter): derivatives
    of every order are exact, whatever layout the gradient comes in."""

    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, pattern: Pattern, layout: torch.layout
    ) -> torch.Tensor:
        ctx.pattern = pattern
        return _sparse(pattern, values, layout)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        return _PatternValues.apply(grad, ctx.pattern), None, None


class _PatternValues(torch.autograd.Function):
    """The entries of a W-shaped matrix at W's non-zeros; the adjoint of :class:`_SparseMatrix`
    (or of the dense scatter, for a dense matrix)."""

    @staticmethod
    def forward(ctx: Any, matrix: torch.Tensor, pattern: Pattern) -> torch.Tensor:
        ctx.pattern, ctx.layout = pattern, matrix.layout
        return _values_at(pattern, matrix)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if ctx.layout == torch.strided:
            return _dense(ctx.pattern, grad), None
        layout = ctx.layout if ctx.layout == torch.sparse_csr else torch.sparse_coo
        return _SparseMatrix.apply(grad, ctx.pattern, layout), None
