"""Convolutions as ``nn.Linear`` layers: one layer (:func:`to_linear`) or a whole feed-forward CNN
(:func:`to_mlp`).

:func:`to_mlp` folds consecutive affine layers into one matrix without ever forming more than the
result needs: BatchNorm is a diagonal (it scales the rows of the matrix before it, or the columns
of the one after it), average pooling is built sparse from its windows, and every product is
sized and checked against free memory before it is formed.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import Any

import torch
from torch import nn

from .._errors import ConvMatError
from .._typing import IntOrTuple
from ..engine import Geometry, adaptive_window, check_allocation, check_shape, ntuple, reads
from ..matrix import to_matrix

__all__ = ["SparseLinear", "to_linear", "to_mlp"]

#: What to do instead when a dense matrix does not fit.
_DENSE_INSTEAD = (
    "pass sparse=True to to_mlp, which holds only the non-zeros, or use a smaller input_shape"
)
_SPARSE_INSTEAD = "use convmat.ConvOperator, which never forms W, or a smaller input_shape"
_INDEX_BYTES = 8  # int64 column index per stored value


def _check_not_meta(module: nn.Module, where: str) -> None:
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "meta":
            raise ConvMatError(
                f"{where} has tensors on the meta device (shapes without values); load or "
                f"initialise its weights first"
            )


def to_linear(module: Any, input_size: IntOrTuple) -> nn.Linear:
    """An ``nn.Linear`` computing exactly what a conv or transposed conv layer computes on
    inputs of spatial size ``input_size``: ``linear(x.flatten(1)) == module(x).flatten(1)``.

    The weight is the dense W (a copy, detached from the module); the bias is the layer's bias
    repeated over the output positions.

    Args:
        module: an ``nn.Conv{1,2,3}d`` or ``nn.ConvTranspose{1,2,3}d`` running torch's own
            forward (a subclass with its own ``forward`` is refused: it may compute something
            else).
        input_size: spatial size of one input.

    Returns:
        ``nn.Linear(C_in * prod(input_size), C_out * prod(out))`` on the module's device and dtype.

    Raises:
        ConvMatError: for anything but a plain convolution (naming its class and why), a bad
            ``input_size``, or a W that does not fit in free memory (before allocating it).

    Shape:
        ``(B, C_in * prod(input_size)) -> (B, C_out * prod(out))``

    >>> conv = nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64)
    >>> lin = to_linear(conv, (5, 5))
    >>> x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    >>> torch.allclose(lin(x.flatten(1)), conv(x).flatten(1), atol=1e-12)
    True
    """
    geo = Geometry.from_module(module, input_size)
    _check_not_meta(module, f"module ({type(module).__name__})")
    weight = module.weight
    rows, cols = geo.matrix_shape
    check_allocation(
        rows * cols * weight.element_size(),
        weight.device,
        f"to_linear: a dense W of shape ({rows}, {cols}) and dtype {weight.dtype}",
        "to_mlp(module, (C, *input_size), sparse=True) holds only the non-zeros, and "
        "convmat.ConvOperator never forms W",
    )
    with torch.no_grad():
        W = to_matrix(module, geo.input_size)
        linear = nn.Linear(cols, rows, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(W)
        if module.bias is not None:
            b = module.bias.detach().repeat_interleave(rows // module.bias.numel())
            linear.bias = nn.Parameter(b)
    return linear


_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.LogSigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.PReLU,
)  # fmt: skip
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d)  # fmt: skip
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_POOL = _AVGPOOL + _ADAPTIVE
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_IDENTITY = (nn.Identity, nn.Flatten, nn.Unflatten, *_DROPOUT)
_SUPPORTED = _CONV + _BATCHNORM + _POOL + _IDENTITY + _ACTIVATIONS + (nn.Linear,)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: Any) -> torch.Tensor:
    """A CSR tensor on the given index tensors (shared, not copied)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, tuple(shape), check_invariants=False)


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with W held as a sparse CSR matrix (a buffer, not trained).

    Args:
        weight: ``(out_features, in_features)``, dense or sparse (stored as CSR).
        bias: ``(out_features,)`` or None.

    Shape:
        ``(*, in_features) -> (*, out_features)``

    >>> layer = SparseLinear(torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([0.5]))
    >>> layer(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]))
    tensor([[3.5000],
            [2.5000]])
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ConvMatError(
                f"input must have shape (*, {self.in_features}), got {tuple(x.shape)!r}"
            )
        if x.dtype != self.weight.dtype:
            raise ConvMatError(
                f"input dtype must be the layer's {self.weight.dtype}, got {x.dtype}"
            )
        flat = x.reshape(-1, self.in_features)
        y = (self.weight @ flat.T.contiguous()).T
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def _runs_torch_forward(m: nn.Module) -> bool:
    """Whether ``m`` runs the ``forward`` of a torch.nn class (not one of its own)."""
    owner = next((c for c in type(m).__mro__ if "forward" in c.__dict__), None)
    return owner is not None and owner.__module__.startswith("torch.nn.")


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The layers of nested ``nn.Sequential`` containers, in order, with their paths (a
    Sequential subclass with its own forward is a layer, not a container)."""
    if not (isinstance(model, nn.Sequential) and _runs_torch_forward(model)):
        return [(prefix or type(model).__name__, model)]
    out = []
    for name, child in model.named_children():
        out += _leaves(child, f"{prefix}.{name}" if prefix else name)
    return out


def _check_supported(path: str, m: nn.Module) -> None:
    name = type(m).__name__
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        raise ConvMatError(
            f"{path} ({name}) has uninitialised parameters; run the model on one input first"
        )
    if isinstance(m, _CONV):
        return  # Geometry.from_module reads it (and refuses a subclass with its own forward)
    if not isinstance(m, _SUPPORTED) or (isinstance(m, nn.PReLU) and m.num_parameters != 1):
        raise ConvMatError(
            f"{path} ({name}) is not supported by to_mlp: it takes nested "
            f"nn.Sequential of convolutions, transposed convolutions, BatchNorm (eval), average "
            f"pooling, Linear, Flatten/Unflatten, Dropout (eval), Identity and element-wise "
            f"activations"
        )
    if not _runs_torch_forward(m):
        raise ConvMatError(
            f"{path} ({name}) overrides forward, so it may not compute what a "
            f"{type(m).__mro__[1].__name__} computes; to_mlp takes torch's own layers"
        )
    if isinstance(m, _BATCHNORM) and m.running_var is None:
        raise ConvMatError(f"{path} ({name}) has no running statistics to fold")


def _check_eval(path: str, m: nn.Module) -> None:
    if m.training and isinstance(m, _BATCHNORM + _DROPOUT):
        raise ConvMatError(
            f"{path} ({type(m).__name__}) is in training mode; to_mlp needs model.eval() "
            f"(BatchNorm and Dropout act differently while training)"
        )


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    return check_shape(
        input_shape,
        "input_shape",
        "a tuple (C, *spatial) of ints >= 1: the shape of one input, without the batch",
    )


def _spatial_dims(m: nn.Module, kinds: tuple[type, ...]) -> int:
    """1, 2 or 3: which of the 1-D, 2-D, 3-D kinds ``m`` is."""
    return next(i for i, k in enumerate(kinds) if isinstance(m, k)) + 1


def _expected_dims(m: nn.Module) -> tuple[tuple[int, ...], int | None, str]:
    """Allowed numbers of per-sample dims, the channels a layer takes, and how it names them."""
    if isinstance(m, _CONV):
        n = m.weight.dim() - 2
        return (n + 1,), m.in_channels, f"(C={m.in_channels}, {n} spatial sizes)"
    if isinstance(m, _BATCHNORM):
        n, c = _spatial_dims(m, _BATCHNORM), m.num_features
        if n == 1:
            return (1, 2), c, f"(C={c},) or (C={c}, L)"
        return (n + 1,), c, f"(C={c}, {n} spatial sizes)"
    for kinds in (_AVGPOOL, _ADAPTIVE):
        if isinstance(m, kinds):
            n = _spatial_dims(m, kinds)
            return (n + 1,), None, f"(C, {n} spatial sizes)"
    if isinstance(m, nn.Linear):
        return (1,), m.in_features, f"(in_features={m.in_features},)"
    return (), None, ""


def _check_layer_input(path: str, m: nn.Module, shape: tuple[int, ...], first: bool) -> None:
    dims, channels, form = _expected_dims(m)
    if not dims:
        return
    source = " (input_shape)" if first else ""
    if isinstance(m, nn.Linear) and len(shape) != 1:
        raise ConvMatError(
            f"{path} (Linear) is applied to a non-flat input of shape {shape!r}{source}; "
            f"to_mlp needs an nn.Flatten before it"
        )
    if len(shape) not in dims or (channels is not None and shape[0] != channels):
        raise ConvMatError(
            f"{path} ({type(m).__name__}) takes inputs of shape {form} per sample, got "
            f"{shape!r}{source}"
        )


def _sparse_bytes(nnz: int, rows: int, dtype: torch.dtype) -> int:
    return nnz * (_itemsize(dtype) + _INDEX_BYTES) + (rows + 1) * _INDEX_BYTES


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _check_matrix(
    rows: int,
    cols: int,
    nnz: int | None,
    dtype: torch.dtype,
    device: torch.device,
    what: str,
    *,
    estimate: bool = False,
    working: int = 1,
) -> None:
    """Refuse a matrix that does not fit: dense when ``nnz`` is None, else CSR with at most
    (or, ``estimate``, about) ``nnz`` non-zeros; ``working`` times its bytes are asked for."""
    if nnz is None:
        need = rows * cols * _itemsize(dtype)
        desc, instead = "dense", _DENSE_INSTEAD
    else:
        need = _sparse_bytes(nnz, rows, dtype)
        desc = f"sparse ({'about' if estimate else 'at most'} {nnz:,} non-zeros)"
        instead = _SPARSE_INSTEAD
    check_allocation(
        working * need,
        device,
        f"to_mlp: {what}, a {desc} ({rows}, {cols}) matrix of {dtype},",
        instead,
    )


def _conv_geometry(path: str, m: Any, shape: tuple[int, ...], sparse: bool) -> Geometry:
    """The conv layer's geometry; its W checked against free memory."""
    geo = Geometry.from_module(m, shape[1:], path=path)
    rows, cols = geo.matrix_shape
    nnz = rows * (geo.in_channels // geo.groups) * math.prod(geo.kernel_size)
    dtype = m.weight.dtype
    _check_matrix(
        rows,
        cols,
        nnz if sparse else None,
        dtype,
        m.weight.device,
        f"the W of {path} ({type(m).__name__})",
    )
    return geo


class _Diagonal:
    """A diagonal matrix held as its diagonal (BatchNorm's scale over every position)."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d = d
        self.shape = (d.numel(), d.numel())


_Matrix = torch.Tensor | _Diagonal


#: Non-zeros scaled per step: bounds the per-entry temporaries of a row or column scaling.
_CHUNK = 2**18


def _chunks(crow: torch.Tensor) -> list[tuple[int, int]]:
    """Row ranges of a CSR matrix holding about ``_CHUNK`` non-zeros each."""
    nnz = int(crow[-1])
    marks = torch.arange(0, nnz, _CHUNK, dtype=crow.dtype, device=crow.device)
    starts = torch.searchsorted(crow, marks, right=True).sub_(1).tolist()
    bounds = sorted({*starts, crow.numel() - 1})
    return list(itertools.pairwise(bounds))


def _scale_rows(W: _Matrix, d: torch.Tensor) -> _Matrix:
    """``diag(d) @ W``, in place (W is always a matrix this function's caller owns)."""
    if isinstance(W, _Diagonal):
        return _Diagonal(W.d * d)
    if W.layout == torch.sparse_csr:
        crow, values = W.crow_indices(), W.values()
        for r0, r1 in _chunks(crow):
            lo, hi = int(crow[r0]), int(crow[r1])
            values[lo:hi].mul_(torch.repeat_interleave(d[r0:r1], crow[r0 : r1 + 1].diff()))
        return W
    return W.mul_(d[:, None])


def _scale_cols(W: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``W @ diag(d)``, in place."""
    if W.layout == torch.sparse_csr:
        col, values = W.col_indices(), W.values()
        for lo in range(0, values.numel(), _CHUNK):
            hi = min(lo + _CHUNK, values.numel())
            values[lo:hi].mul_(d.index_select(0, col[lo:hi]))
        return W
    return W.mul_(d[None, :])


def _product(
    A: _Matrix, B: _Matrix, dtype: torch.dtype, device: torch.device, path: str
) -> _Matrix:
    """``A @ B`` (A the later layer), sized and checked before it is formed."""
    if isinstance(A, _Diagonal):
        return _scale_rows(B, A.d)
    if isinstance(B, _Diagonal):
        return _scale_cols(A, B.d)
    rows, cols = A.shape[0], B.shape[1]
    what = f"the product of {path} and the layers merged before it"
    if A.layout == torch.sparse_csr:
        nnz, exact = _product_nnz(A, B)
        # Measured: forming a CSR product peaks at about 2.5x its bytes beside its factors.
        _check_matrix(rows, cols, nnz, dtype, device, what, estimate=not exact, working=3)
        return A @ B
    _check_matrix(rows, cols, None, dtype, device, what)
    return A @ B


#: Rows of the left factor multiplied to estimate a product's non-zeros.
_SAMPLE_ROWS = 1024


def _csr_rows(A: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows ``rows`` (sorted) of a CSR matrix, as a CSR matrix."""
    crow = A.crow_indices()
    starts, counts = crow[rows], crow[rows + 1] - crow[rows]
    new_crow = torch.zeros(rows.numel() + 1, dtype=crow.dtype, device=crow.device)
    torch.cumsum(counts, 0, out=new_crow[1:])
    total = int(new_crow[-1])
    offset = torch.repeat_interleave(starts - new_crow[:-1], counts)
    take = torch.arange(total, device=crow.device) + offset
    return _csr(new_crow, A.col_indices()[take], A.values()[take], (rows.numel(), A.shape[1]))


def _product_nnz(A: torch.Tensor, B: torch.Tensor) -> tuple[int, bool]:
    """The non-zeros of the CSR product ``A @ B`` and whether that is a bound (else an
    estimate). Each stored ``(i, k)`` of A meets row k of B: the sum of those rows' counts
    bounds the product (it counts every column a row reaches once per path). Where the bound
    is large, a random sample of A's rows is multiplied out and scaled, with a margin."""
    bound = int(B.crow_indices().diff().index_select(0, A.col_indices()).sum())
    rows = A.shape[0]
    bound = min(bound, rows * B.shape[1])
    if rows <= 4 * _SAMPLE_ROWS or bound <= 2**22:
        return bound, True
    gen = torch.Generator().manual_seed(0)
    sample = torch.randperm(rows, generator=gen)[:_SAMPLE_ROWS].sort().values
    sampled = (_csr_rows(A, sample.to(A.device)) @ B).values().numel()
    estimate = math.ceil(1.25 * sampled * rows / _SAMPLE_ROWS) + rows
    return min(bound, estimate), estimate >= bound


def _apply(A: _Matrix, b: torch.Tensor) -> torch.Tensor:
    return A.d * b if isinstance(A, _Diagonal) else A @ b


def _batchnorm(
    m: Any, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[_Diagonal, torch.Tensor]:
    var = m.running_var.to(dtype)
    scale = torch.rsqrt(var + m.eps)
    shift = -m.running_mean.to(dtype) * scale
    if m.weight is not None:
        weight, bias = m.weight.to(dtype), m.bias.to(dtype)
        scale, shift = scale * weight, shift * weight + bias
    positions = math.prod(shape[1:])
    return _Diagonal(scale.repeat_interleave(positions)), shift.repeat_interleave(positions)


def _avgpool_axes(
    m: Any, spatial: tuple[int, ...], out: tuple[int, ...]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per axis of an ``AvgPool{N}d``: the input positions of every window slot ``(out, k)``,
    which slots read the input, and the window's count (torch's ``pool_size`` with
    ``count_include_pad``, the positions inside the input without)."""
    n = len(spatial)
    ks = ntuple(m.kernel_size, n, "kernel_size", 1)
    ss = ntuple(m.stride if m.stride else m.kernel_size, n, "stride", 1)
    ps = ntuple(m.padding, n, "padding", 0)
    axes = []
    for size, o, k, s, p in zip(spatial, out, ks, ss, ps):
        r = torch.arange(o, dtype=torch.int64)
        cols = reads(r[:, None], torch.arange(k, dtype=torch.int64)[None, :], s, 1, p)
        start = cols[:, 0]
        end = torch.clamp(start + k, max=size + p)  # windows never reach past the padding
        lo, hi = start.clamp(min=0), end.clamp(max=size)
        valid = (cols >= lo[:, None]) & (cols < hi[:, None])
        count = end - start if m.count_include_pad else (hi - lo).clamp(min=0)
        axes.append((cols, valid, count))
    return axes


def _adaptive_axes(
    spatial: tuple[int, ...], out: tuple[int, ...]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per axis of an adaptive average pooling: window ``o`` reads
    ``[floor(o * in / out), ceil((o + 1) * in / out))``."""
    axes = []
    for size, o in zip(spatial, out):
        start, end = adaptive_window(torch.arange(o, dtype=torch.int64), size, o)
        width = int((end - start).max())
        cols = start[:, None] + torch.arange(width, dtype=torch.int64)[None, :]
        axes.append((cols, cols < end[:, None], end - start))
    return axes


def _pool_channel(
    axes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    spatial: tuple[int, ...],
    divisor: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR ``(crow, col, values)`` (float64) of a pooling on one channel from its axis tables:
    the windows are the product of the axes' windows, each row divided by its count."""
    n = len(axes)
    outs = [a[0].shape[0] for a in axes]
    widths = [a[0].shape[1] for a in axes]
    grid = (*outs, *widths)
    col = torch.zeros(grid, dtype=torch.int64)
    valid = torch.ones(grid, dtype=torch.bool)
    count = torch.ones(outs, dtype=torch.int64)
    kept = torch.ones(outs, dtype=torch.int64)
    stride = 1
    for d in reversed(range(n)):
        cols, ok, cnt = axes[d]
        view = [1] * (2 * n)
        view[d], view[n + d] = outs[d], widths[d]
        col += (cols * stride).view(view)
        valid &= ok.view(view)
        count *= cnt.view(view[:n])
        kept *= ok.sum(1).view(view[:n])
        stride *= spatial[d]
    flat_valid = valid.reshape(-1)
    col = col.reshape(-1)[flat_valid]
    counts = kept.reshape(-1)
    crow = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=crow[1:])
    if divisor is not None:
        count = torch.full_like(count, divisor)
    inverse = 1.0 / count.reshape(-1).clamp(min=1).to(torch.float64)
    return crow, col, torch.repeat_interleave(inverse, counts)


def _probe_channel(
    m: nn.Module, spatial: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of a per-channel layer on one channel, found by applying it to the unit inputs in
    chunks (exact for any such layer; the fallback when the window formula disagrees)."""
    positions = math.prod(spatial)
    chunk = max(1, min(positions, 2**22 // positions))
    rows_, cols_, vals_ = [], [], []
    for first in range(0, positions, chunk):
        b = min(chunk, positions - first)
        x = torch.zeros(b, positions, dtype=torch.float64, device=device)
        x[torch.arange(b), first + torch.arange(b)] = 1.0
        y = m(x.view(b, 1, *spatial)).reshape(b, -1)
        c, r = torch.nonzero(y, as_tuple=True)
        rows_.append(r)
        cols_.append(c + first)
        vals_.append(y[c, r])
    out_positions = y.shape[1]
    coo = torch.sparse_coo_tensor(
        torch.stack([torch.cat(rows_), torch.cat(cols_)]),
        torch.cat(vals_),
        (out_positions, positions),
        check_invariants=False,
    ).coalesce()
    csr = coo.to_sparse_csr()
    return csr.crow_indices(), csr.col_indices(), csr.values()


def _pool(
    m: Any,
    shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    sparse: bool,
    dtype: torch.dtype,
    device: torch.device,
    path: str,
) -> torch.Tensor:
    """The matrix of an average pooling (every channel alike): built from its windows, checked
    on one random input against the layer itself (probed unit by unit if they disagree)."""
    channels, spatial, out = shape[0], shape[1:], out_shape[1:]
    p_in, p_out = math.prod(spatial), math.prod(out)
    if isinstance(m, _AVGPOOL):
        nnz = p_out * math.prod(ntuple(m.kernel_size, len(spatial), "kernel_size", 1))
        axes = _avgpool_axes(m, spatial, out)
        divisor = getattr(m, "divisor_override", None)
    else:
        widths = [-(-i // o) + 1 for i, o in zip(spatial, out)]
        nnz = p_out * math.prod(widths)
        axes, divisor = _adaptive_axes(spatial, out), None
    rows, cols = channels * p_out, channels * p_in
    _check_matrix(
        rows,
        cols,
        channels * nnz,
        torch.float64,
        device,
        f"the matrix of {path} ({type(m).__name__})",
    )
    crow, col, values = (t.to(device) for t in _pool_channel(axes, spatial, divisor))
    # A fixed generator: the caller's random state is left as it was.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, *spatial, dtype=torch.float64, generator=gen).to(device)
    ref = m(x).reshape(-1)
    mine = _csr(crow, col, values, (p_out, p_in)) @ x.reshape(-1)
    if ref.shape != mine.shape or not torch.allclose(mine, ref, rtol=1e-12, atol=1e-12):
        crow, col, values = _probe_channel(m, spatial, device)
    # The same block on every channel's diagonal.
    ch = torch.arange(channels, device=device)[:, None]
    nnz1 = col.numel()
    full_col = (col[None, :] + ch * p_in).reshape(-1)
    full_crow = torch.cat([crow[:1], (crow[None, 1:] + ch * nnz1).reshape(-1)])
    W = _csr(full_crow, full_col, values.to(dtype).repeat(channels), (rows, cols))
    if sparse:
        return W
    _check_matrix(rows, cols, None, dtype, device, f"the matrix of {path} ({type(m).__name__})")
    return W.to_dense()


def _affine(
    path: str,
    m: Any,
    shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    sparse: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[_Matrix, torch.Tensor | None]:
    """``(W, b)`` of an affine layer on flattened inputs of ``shape`` (no batch), in ``dtype``,
    owned by the caller (never sharing values with the model)."""
    if isinstance(m, _CONV):
        geo = _conv_geometry(path, m, shape, sparse)
        b = None if m.bias is None else m.bias.to(dtype).repeat_interleave(math.prod(out_shape[1:]))
        layout = torch.sparse_csr if sparse else torch.strided
        # Fresh values (only the index pattern is cached and shared): later scaled in place.
        W = to_matrix(m, geo.input_size, layout=layout)
        if W.dtype != dtype and sparse:
            W = _csr(W.crow_indices(), W.col_indices(), W.values().to(dtype), W.shape)
        return W.to(dtype), b
    if isinstance(m, _BATCHNORM):
        return _batchnorm(m, shape, dtype)
    if isinstance(m, _POOL):
        return _pool(m, shape, out_shape, sparse, dtype, device, path), None
    assert isinstance(m, nn.Linear)
    weight = m.weight.detach()
    bias = None if m.bias is None else m.bias.detach().to(dtype, copy=True)
    if sparse:
        rows, cols = weight.shape
        _check_matrix(rows, cols, rows * cols, dtype, device, f"the weight of {path} (Linear)")
        return weight.to(dtype).to_sparse_csr(), bias
    return weight.to(dtype, copy=True), bias


def _model_dtype(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _probe(
    layers: list[tuple[str, nn.Module]],
    input_shape: tuple[int, ...],
    sparse: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shape (no batch) of every layer. Each layer's input is checked first;
    a conv's output size comes from its geometry (its W sized against free memory), a Linear's
    from its features, BatchNorm and PReLU keep the shape; the layers without parameters run on
    one zero input in the model's dtype (no larger than the activation the model makes there)."""
    shapes = []
    shape = input_shape
    for i, (path, m) in enumerate(layers):
        _check_layer_input(path, m, shape, i == 0)
        if isinstance(m, _CONV):
            geo = _conv_geometry(path, m, shape, sparse)
            out: tuple[int, ...] = (geo.out_channels, *geo.output_size)
        elif isinstance(m, nn.Linear):
            out = (m.out_features,)
        elif isinstance(m, (*_BATCHNORM, nn.PReLU)):
            out = shape
        else:
            check_allocation(
                math.prod(shape) * _itemsize(dtype),
                device,
                f"to_mlp: one input of shape {shape!r} and dtype {dtype} for {path}",
                "use a smaller input_shape",
            )
            try:
                out = tuple(m(torch.zeros(1, *shape, dtype=dtype, device=device)).shape[1:])
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                text = str(err).strip()
                first = text.splitlines()[0] if text else type(err).__name__
                source = " (input_shape)" if i == 0 else ""
                raise ConvMatError(
                    f"{path} ({type(m).__name__}) cannot run on an input of shape {shape!r}"
                    f"{source}: torch says {first!r}"
                ) from None
        shapes.append((shape, out))
        shape = out
    return shapes


def to_mlp(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    sparse: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """A feed-forward CNN as ``nn.Flatten`` followed only by linear and element-wise layers,
    computing the same function for inputs of ``input_shape``.

    Convolutions, transposed convolutions, BatchNorm in eval mode and average pooling are
    affine maps: consecutive ones (with no activation between them) are merged into one
    ``nn.Linear``; Flatten, Unflatten, Identity and Dropout in eval mode are the identity on
    the flattened vector; element-wise activations are kept as they are.

    Memory: BatchNorm scales the rows of the matrix before it (or the columns of the one after
    it) and is never formed as a matrix unless it stands alone; average pooling is built from
    its windows (sparse); every matrix and product is sized before it is formed and refused with
    :class:`ConvMatError` if it does not fit. With ``sparse=True`` the peak is a small multiple
    of the result's bytes.

    Args:
        model: nested ``nn.Sequential`` of supported layers, in eval mode.
        input_shape: ``(C, *spatial)`` of one input (no batch).
        sparse: hold the merged maps as :class:`SparseLinear` (CSR) instead of ``nn.Linear``.
        dtype: of the result; by default that of the model's parameters (torch's default
            dtype for a model without parameters). The model is run in its own dtype; the
            matrices are merged in the wider of the two (at least float32) and converted.

    Returns:
        ``nn.Sequential(nn.Flatten(), ...)`` on the model's device, in ``dtype``.

    Raises:
        ConvMatError: naming the path and class of the first layer that is not supported (max
            pooling, a module with its own forward such as a residual block or a conv subclass
            that standardises its weight, Linear on a non-flat input), that does not take the
            shape reaching it, or whose matrix does not fit in memory; or when the model is in
            training mode, or ``input_shape`` / ``dtype`` is not valid.
        TypeError: if ``model`` is not an ``nn.Module`` or ``sparse`` is not a bool.

    Shape:
        ``(B, *input_shape) -> (B, prod(output shape of the model))``

    >>> cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
    ...                     nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    >>> mlp = to_mlp(cnn, (1, 6, 6))
    >>> [type(m).__name__ for m in mlp]
    ['Flatten', 'Linear', 'ReLU', 'Linear']
    >>> x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    >>> torch.allclose(mlp(x), cnn(x), atol=1e-12)
    True
    """
    layers, input_shape = _checked_arguments(model, input_shape, sparse, dtype)
    model_dtype, dtype, work, device = _dtypes(model, dtype, sparse)
    with torch.no_grad():
        shapes = _probe(layers, input_shape, sparse, model_dtype, device)
        merged = _merged(layers, shapes, sparse, dtype, work, device)
    return nn.Sequential(nn.Flatten(), *merged)


def _checked_arguments(
    model: nn.Module, input_shape: Any, sparse: bool, dtype: torch.dtype | None
) -> tuple[list[tuple[str, nn.Module]], tuple[int, ...]]:
    """:func:`to_mlp`'s arguments checked: the model's leaves (each supported, off the meta
    device, in eval mode) and the input shape."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(sparse, bool):
        raise TypeError(f"sparse must be a bool, got {sparse!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConvMatError(
            f"dtype must be None or a floating-point torch.dtype (torch.float64, ...), got "
            f"{dtype!r}"
        )
    input_shape = _check_input_shape(input_shape)
    layers = _leaves(model)
    for path, m in layers:
        _check_supported(path, m)
        _check_not_meta(m, f"{path} ({type(m).__name__})")
    if model.training:
        raise ConvMatError(
            f"{type(model).__name__} is in training mode; to_mlp needs model.eval() (BatchNorm "
            f"and Dropout act differently while training)"
        )
    for path, m in layers:
        _check_eval(path, m)
    return layers, input_shape


def _dtypes(
    model: nn.Module, dtype: torch.dtype | None, sparse: bool
) -> tuple[torch.dtype, torch.dtype, torch.dtype, torch.device]:
    """The model's dtype, the result's, the one the matrices are merged in (the wider of the
    two, at least float32, so nothing is rounded twice) and the model's device."""
    model_dtype, device = _model_dtype(model)
    if dtype is None:
        dtype = model_dtype
    if sparse and device.type == "cpu" and _itemsize(dtype) < 4:
        raise ConvMatError(
            f"dtype {dtype} with sparse=True on the CPU: torch has no sparse CSR product for it "
            f"there; pass dtype=torch.float32 (or sparse=False)"
        )
    work = torch.promote_types(torch.promote_types(model_dtype, dtype), torch.float32)
    return model_dtype, dtype, work, device


def _merged(
    layers: list[tuple[str, nn.Module]],
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]],
    sparse: bool,
    dtype: torch.dtype,
    work: torch.dtype,
    device: torch.device,
) -> list[nn.Module]:
    """The layers after Flatten: each run of affine layers multiplied into one matrix (in
    ``work``, the previous product dropped as soon as it is used), activations copied."""
    out: list[nn.Module] = []
    pending: tuple[_Matrix, torch.Tensor | None] | None = None
    for (path, m), (shape, out_shape) in zip(layers, shapes):
        if isinstance(m, _ACTIVATIONS):
            if pending is not None:
                out.append(_linear_layer(*pending, sparse, dtype, work, device))
                pending = None
            out.append(copy.deepcopy(m).to(dtype))
            continue
        if isinstance(m, _IDENTITY):
            continue
        W, b = _affine(path, m, shape, out_shape, sparse, work, device)
        if pending is not None:
            W0, b0 = pending
            if b0 is not None:
                b = _apply(W, b0) if b is None else b + _apply(W, b0)
            pending = None
            W = _product(W, W0, work, device, f"{path} ({type(m).__name__})")
            del W0
        pending = (W, b)
    if pending is not None:
        out.append(_linear_layer(*pending, sparse, dtype, work, device))
    return out


def _linear_layer(
    W: _Matrix,
    b: torch.Tensor | None,
    sparse: bool,
    dtype: torch.dtype,
    work: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """One merged affine map as a layer: :class:`SparseLinear` or ``nn.Linear`` in ``dtype``
    (a BatchNorm standing alone, held as its diagonal, formed as a matrix here)."""
    if isinstance(W, _Diagonal):
        n = W.shape[0]
        if sparse:
            index = torch.arange(n + 1, device=device)
            W = _csr(index, index[:-1], W.d, (n, n))
        else:
            _check_matrix(n, n, None, work, device, "a BatchNorm standing alone")
            W = torch.diag(W.d)
    b = None if b is None else b.to(dtype)
    if sparse:
        if W.dtype != dtype:
            W = _csr(W.crow_indices(), W.col_indices(), W.values().to(dtype), W.shape)
        return SparseLinear(W, b)
    lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(W.to(dtype))
    if b is not None:
        lin.bias = nn.Parameter(b)
    return lin
