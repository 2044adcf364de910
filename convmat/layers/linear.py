"""Convolutions as ``nn.Linear`` layers."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .._errors import ConvMatError
from .._typing import IntOrTuple
from ..matrix import to_matrix

__all__ = ["SparseLinear", "to_linear", "to_mlp"]


def to_linear(module: Any, input_size: IntOrTuple) -> nn.Linear:
    """An ``nn.Linear`` computing exactly what a conv or transposed conv layer computes on
    inputs of spatial size ``input_size``: ``linear(x.flatten(1)) == module(x).flatten(1)``.

    The weight is the dense W (a copy, detached from the module); the bias is the layer's bias
    repeated over the output positions.

    Args:
        module: an ``nn.Conv{1,2,3}d`` or ``nn.ConvTranspose{1,2,3}d``.
        input_size: spatial size of one input.

    Returns:
        ``nn.Linear(C_in * prod(input_size), C_out * prod(out))`` on the module's device and dtype.

    Shape:
        ``(B, C_in * prod(input_size)) -> (B, C_out * prod(out))``

    >>> conv = nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64)
    >>> lin = to_linear(conv, (5, 5))
    >>> x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    >>> torch.allclose(lin(x.flatten(1)), conv(x).flatten(1), atol=1e-12)
    True
    """
    with torch.no_grad():
        W = to_matrix(module, input_size)
        rows, cols = W.shape
        weight = module.weight
        linear = nn.Linear(
            cols, rows, bias=module.bias is not None, device=weight.device, dtype=weight.dtype
        )
        linear.weight.copy_(W)
        if module.bias is not None:
            linear.bias.copy_(module.bias.repeat_interleave(rows // module.bias.numel()))
    return linear


_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.LogSigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.PReLU,
)  # fmt: skip
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d)  # fmt: skip
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
         nn.AdaptiveAvgPool3d)  # fmt: skip
_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.Flatten, nn.Unflatten)  # fmt: skip
_SUPPORTED = _CONV + _BATCHNORM + _POOL + _IDENTITY + _ACTIVATIONS + (nn.Linear,)


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with W held as a sparse CSR matrix (a buffer, not trained).

    Shape:
        ``(B, in_features) -> (B, out_features)``
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.weight @ x.T.contiguous()).T
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The layers of nested ``nn.Sequential`` containers, in order, with their paths."""
    if not isinstance(model, nn.Sequential):
        return [(prefix or type(model).__name__, model)]
    out = []
    for name, child in model.named_children():
        out += _leaves(child, f"{prefix}.{name}" if prefix else name)
    return out


def _check_supported(path: str, m: nn.Module) -> None:
    if not isinstance(m, _SUPPORTED) or (isinstance(m, nn.PReLU) and m.num_parameters != 1):
        raise ConvMatError(
            f"{path} ({type(m).__name__}) is not supported by to_mlp: it takes nested "
            f"nn.Sequential of convolutions, transposed convolutions, BatchNorm (eval), average "
            f"pooling, Linear, Flatten/Unflatten, Dropout (eval), Identity and element-wise "
            f"activations"
        )
    if isinstance(m, _BATCHNORM) and m.running_var is None:
        raise ConvMatError(f"{path} ({type(m).__name__}) has no running statistics to fold")


def _block_diagonal(block: torch.Tensor, copies: int, sparse: bool) -> torch.Tensor:
    """``copies`` copies of ``block`` on the diagonal (one per channel)."""
    if not sparse:
        return torch.kron(torch.eye(copies, dtype=block.dtype, device=block.device), block)
    coo = block.to_sparse_coo().coalesce()
    (r, c), v = coo.indices(), coo.values()
    ch = torch.arange(copies, device=block.device)[:, None]
    rows = (ch * block.shape[0] + r).reshape(-1)
    cols = (ch * block.shape[1] + c).reshape(-1)
    shape = (copies * block.shape[0], copies * block.shape[1])
    W = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), v.repeat(copies), shape, check_invariants=False
    )
    return W.coalesce().to_sparse_csr()


def _affine(
    m: Any,
    shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    sparse: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` of an affine layer on flattened inputs of ``shape`` (no batch)."""
    layout = torch.sparse_csr if sparse else torch.strided
    if isinstance(m, _CONV):
        b = None if m.bias is None else m.bias.repeat_interleave(math.prod(out_shape[1:]))
        return to_matrix(m, shape[1:], layout=layout), b
    if isinstance(m, _BATCHNORM):
        var: Any = m.running_var
        mean: Any = m.running_mean
        scale = torch.rsqrt(var + m.eps)
        shift = -mean * scale
        if m.weight is not None:
            scale, shift = scale * m.weight, shift * m.weight + m.bias
        positions = math.prod(shape[1:])
        diag = scale.repeat_interleave(positions)
        W = torch.diag(diag)
        return (W.to_sparse_csr() if sparse else W), shift.repeat_interleave(positions)
    if isinstance(m, _POOL):
        # Average pooling acts on every channel alike: its matrix on one channel is found by
        # applying it to all unit inputs at once (exact for every pooling option).
        positions = math.prod(shape[1:])
        probe = torch.eye(positions, dtype=dtype, device=device)
        block = m(probe.view(positions, 1, *shape[1:])).reshape(positions, -1).T.contiguous()
        return _block_diagonal(block, shape[0], sparse), None
    assert isinstance(m, nn.Linear)
    return (m.weight.to_sparse_csr() if sparse else m.weight), m.bias


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

    Args:
        model: nested ``nn.Sequential`` of supported layers, in eval mode.
        input_shape: ``(C, *spatial)`` of one input (no batch).
        sparse: hold the merged maps as :class:`SparseLinear` (CSR) instead of ``nn.Linear``.
        dtype: of the result; by default that of the model's parameters (torch's default
            dtype for a model without parameters).

    Returns:
        ``nn.Sequential(nn.Flatten(), ...)`` on the model's dtype and device.

    Raises:
        ConvMatError: naming the path of the first unsupported layer (max pooling, a module
            with its own forward such as a residual block, Linear on a non-flat input), or
            when the model is in training mode.

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
    layers = _leaves(model)
    for path, m in layers:
        _check_supported(path, m)
    if model.training:
        raise ConvMatError(
            f"{type(model).__name__} is in training mode; to_mlp needs model.eval() (BatchNorm "
            f"and Dropout act differently while training)"
        )
    param = next(model.parameters(), None)
    if dtype is None:
        dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    # Shapes at every layer, from one forward pass with hooks.
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    hooks = [
        m.register_forward_hook(
            lambda _m, i, o: shapes.append((tuple(i[0].shape[1:]), tuple(o.shape[1:])))
        )
        for _, m in layers
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=dtype, device=device))
    finally:
        for h in hooks:
            h.remove()

    out: list[nn.Module] = [nn.Flatten()]
    pending: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def flush() -> None:
        nonlocal pending
        if pending is None:
            return
        W, b = pending
        if sparse:
            out.append(SparseLinear(W, b))
        else:
            lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=dtype, device=device)
            with torch.no_grad():
                lin.weight.copy_(W)
                if b is not None:
                    lin.bias.copy_(b)
            out.append(lin)
        pending = None

    with torch.no_grad():
        for (path, m), (shape, out_shape) in zip(layers, shapes):
            if isinstance(m, _ACTIVATIONS):
                flush()
                out.append(copy.deepcopy(m))
                continue
            if isinstance(m, _IDENTITY):
                continue
            if isinstance(m, nn.Linear) and len(shape) != 1:
                raise ConvMatError(
                    f"{path} (Linear) is applied to a non-flat input of shape {shape!r}; "
                    f"to_mlp needs an nn.Flatten before it"
                )
            W, b = _affine(m, shape, out_shape, sparse, dtype, device)
            if pending is not None:
                W0, b0 = pending
                b = (
                    (W @ b0 if b0 is not None else None)
                    if b is None
                    else (b + W @ b0 if b0 is not None else b)
                )
                W = W @ W0
            pending = (W, b)
        flush()
    return nn.Sequential(*out)
