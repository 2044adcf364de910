"""Matrix-form twins of torch's convolution layers: ``y = x @ W.T + b``.

``MatrixConv{1,2,3}d`` and ``MatrixConvTranspose{1,2,3}d`` *are* the matching ``torch.nn``
classes (subclasses: same constructor, parameters, initialisation, state_dict), with a forward
pass that multiplies by the layer's matrix W instead of calling a convolution kernel:

- ``layout=torch.sparse_csr`` (default): W in block-compressed-sparse-row form, rows and
  columns in channels-last order. That order is a permutation of W's rows and columns (the same
  linear map) in which W's non-zeros form dense channel blocks, which multiply far faster than
  scattered entries. :meth:`weight_matrix` gives W in the public C order.
- ``layout=torch.strided``: the dense W.

W is cached per input size, device and dtype and rebuilt only when the weight has changed (an
optimizer step, ``load_state_dict``, a new tensor): the index pattern is cached per configuration,
so a rebuild only gathers kernel values. The backward pass is matrix calculus on the same
pattern: ``grad_x = W^T grad_y``, and the weight gradient sums ``grad_y x^T`` over the entries of
W that hold each kernel tap (one batched matrix product over the gathered inputs). The backward
pass is not itself differentiable (no double backward).

>>> conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", dtype=torch.float64)
>>> twin = MatrixConv2d.from_module(conv)
>>> x = torch.randn(8, 2, 10, 10, dtype=torch.float64)
>>> torch.allclose(twin(x), conv(x), atol=1e-12)
True
>>> twin.matrix_builds, type(twin.to_module()).__name__
(1, 'Conv2d')
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import ConvMatError
from ..engine import (
    BlockPattern,
    Geometry,
    assemble,
    block_size,
    check_matrix_memory,
    conv_output_size,
    get_block_pattern,
    output_padding_for,
    tap_table,
    weight_view,
)
from ..matrix import conv_matrix, to_matrix

__all__ = [
    "Conv1D",
    "MatrixConv1d",
    "MatrixConv2d",
    "MatrixConv3d",
    "MatrixConvTranspose1d",
    "MatrixConvTranspose2d",
    "MatrixConvTranspose3d",
]

_LAYER_LAYOUTS = (torch.sparse_csr, torch.strided)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, P)`` -> contiguous ``(P * C, B)``."""
    b, c, p = x.shape
    return x.reshape(b, c * p).T.contiguous().view(c, p, b).transpose(0, 1).reshape(p * c, b)


def _from_channels_last(y: torch.Tensor, channels: int) -> torch.Tensor:
    """``(P * C, B)`` -> contiguous ``(B, C, P)``."""
    b = y.shape[1]
    p = y.shape[0] // channels
    return y.view(p, channels * b).T.contiguous().view(channels, b, p).transpose(0, 1).contiguous()


@dataclass(eq=False)
class _LayerMatrix:
    """W of one layer at one input size, device and dtype, for one version of the weight."""

    geo: Geometry
    layout: torch.layout
    matrix: torch.Tensor  # BSR (channels-last) or dense (C order)
    blocks: BlockPattern | None
    values: torch.Tensor | None  # the BSR blocks, kept to make W^T on demand
    taps: torch.Tensor  # (P_out, K) for the weight gradient
    _transpose: torch.Tensor | None = None

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, P_in)`` -> ``(B, C_out, P_out)``."""
        if self.blocks is None:
            return (x.reshape(x.shape[0], -1) @ self.matrix.T).view(
                x.shape[0], self.geo.out_channels, -1
            )
        return _from_channels_last(self.matrix @ _channels_last(x), self.geo.out_channels)

    def multiply_transpose(self, g: torch.Tensor) -> torch.Tensor:
        """``(B, C_out, P_out)`` -> ``(B, C_in, P_in)``: the adjoint."""
        if self.blocks is None:
            return (g.reshape(g.shape[0], -1) @ self.matrix).view(
                g.shape[0], self.geo.in_channels, -1
            )
        if self._transpose is None:
            assert self.values is not None
            crow, col, perm = self.blocks.transpose()
            values = self.values.index_select(0, perm).mT.contiguous()
            rows, cols = self.matrix.shape
            self._transpose = _bsr(crow, col, values, (cols, rows))
        return _from_channels_last(self._transpose @ _channels_last(g), self.geo.in_channels)

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Gradient for the ``(C_rows, C_in_group * K)`` weight view: for every tap, the sum of
        ``g[row] * x[col]`` over the entries of W that hold it (one batched matrix product)."""
        geo = self.geo
        b, groups = x.shape[0], geo.groups
        positions, k = self.taps.shape
        # The table runs over the side without holes (see tap_table); gather the other side,
        # with one appended zero for the taps that fall outside.
        dense_side, gathered_side = (g, x) if not geo.transposed else (x, g)
        padded = torch.cat(
            [gathered_side, gathered_side.new_zeros(b, gathered_side.shape[1], 1)], 2
        )
        gathered = padded[:, :, self.taps.reshape(-1)].view(b, groups, -1, positions, k)
        dense_side = dense_side.reshape(b, groups, -1, positions)
        if not geo.transposed:
            grad = torch.einsum("bgor,bgirk->goik", dense_side, gathered)
        else:
            grad = torch.einsum("bgir,bgork->goik", dense_side, gathered)
        return grad.reshape(geo.out_channels, -1)


def _bsr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
        return torch.sparse_bsr_tensor(crow, col, values, shape, check_invariants=False)


class _MatrixFunction(torch.autograd.Function):
    """``y = W x`` with W cached; gradients by matrix calculus on W's pattern."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight_view: torch.Tensor, op: _LayerMatrix):
        ctx.op = op
        ctx.save_for_backward(x, weight_view)
        return op.multiply(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, _ = ctx.saved_tensors
        op: _LayerMatrix = ctx.op
        g = g.contiguous()
        gx = op.multiply_transpose(g) if ctx.needs_input_grad[0] else None
        gw = op.weight_grad(x, g) if ctx.needs_input_grad[1] else None
        return gx, gw, None


class _MatrixConvMixin:
    """The matrix forward shared by all six layers (mixed into the torch classes)."""

    _ndim: int
    _torch_class: type[nn.Module]
    _transposed_layer = False
    weight: torch.Tensor
    bias: torch.Tensor | None

    def _init_matrix(self, layout: torch.layout) -> None:
        if layout not in _LAYER_LAYOUTS:
            raise ConvMatError(f"layout must be torch.sparse_csr or torch.strided, got {layout!r}")
        self.layout = layout
        self._matrices: dict[tuple, tuple[tuple, _LayerMatrix]] = {}
        #: How many times W was built from the weight (for any input size).
        self.matrix_builds = 0

    # -- the matrix ------------------------------------------------------------------------
    def _geometry(self, input_size: tuple[int, ...], output_padding: Any = None) -> Geometry:
        return Geometry.from_module(self, input_size, output_padding=output_padding)

    def _weight_view(self, geo: Geometry) -> torch.Tensor:
        return weight_view(self.weight, geo)

    def _layer_matrix(self, geo: Geometry) -> _LayerMatrix:
        w = self.weight
        key = (geo, w.device, w.dtype)
        version = (id(w), w._version, w.data_ptr())
        cached = self._matrices.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        with torch.no_grad():
            view = self._weight_view(geo).contiguous()
            if self.layout == torch.strided:
                op = _LayerMatrix(
                    geo,
                    self.layout,
                    assemble(view, geo, torch.strided),
                    None,
                    None,
                    tap_table(geo, w.device),
                )
            else:
                check_matrix_memory(geo, torch.sparse_csr, view.dtype, view.device)
                # Square blocks (what the sparse kernels take) dividing both channel counts.
                side = block_size(
                    math.gcd(geo.out_channels // geo.groups, geo.in_channels // geo.groups)
                )
                blocks = get_block_pattern(geo, side, side, w.device)
                values = blocks.values(view)
                op = _LayerMatrix(
                    geo,
                    self.layout,
                    _bsr(blocks.crow, blocks.col, values, blocks.shape),
                    blocks,
                    values,
                    blocks.taps,
                )
        self._matrices[key] = (version, op)
        self.matrix_builds += 1
        return op

    def weight_matrix(self, input_size: Any) -> torch.Tensor:
        """W of this layer for inputs of spatial size ``input_size``, in C order of
        ``(channels, *spatial)``: CSR for the sparse layout, dense otherwise (bias excluded).

        Shape:
            ``(C_out * prod(out), C_in * prod(input_size))``

        >>> MatrixConv1d(1, 2, 3).weight_matrix(5).shape
        torch.Size([6, 5])
        """
        layout = torch.sparse_csr if self.layout == torch.sparse_csr else torch.strided
        return to_matrix(self, input_size, layout=layout)  # type: ignore[arg-type]

    def _matrix_forward(self, input: torch.Tensor, output_padding: Any = None) -> torch.Tensor:
        n = self._ndim
        if input.dim() not in (n + 1, n + 2):
            raise ConvMatError(
                f"input must have {n + 1} (unbatched) or {n + 2} (batched) dimensions for a "
                f"{n}-D convolution, got shape {tuple(input.shape)!r}"
            )
        batched = input.dim() == n + 2
        x = input if batched else input.unsqueeze(0)
        in_channels = self.in_channels  # type: ignore[attr-defined]
        if x.shape[1] != in_channels:
            raise ConvMatError(
                f"input must have {in_channels} channels, got shape {tuple(input.shape)!r}"
            )
        geo = self._geometry(tuple(x.shape[2:]), output_padding)
        op = self._layer_matrix(geo)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        y = _MatrixFunction.apply(flat, self._weight_view(geo), op)
        y = y.view(x.shape[0], geo.out_channels, *geo.output_size)
        if self.bias is not None:
            y = y + self.bias.view(-1, *(1,) * n)
        return y if batched else y.squeeze(0)

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, **kwargs: Any):
        """The matrix twin of a torch layer, with copies of its parameters (sharing nothing)."""
        base = cls._torch_class
        if type(module) is not base and not isinstance(module, _MatrixConvMixin):
            raise ConvMatError(f"module must be an {base.__name__}, got {type(module).__name__}")
        twin: Any = cls(**_constructor_args(module), **kwargs)
        twin.load_state_dict(module.state_dict())
        return twin

    def to_module(self) -> nn.Module:
        """The plain torch layer with copies of this layer's parameters."""
        layer = self._torch_class(**_constructor_args(self))  # type: ignore[arg-type]
        layer.load_state_dict(self.state_dict())  # type: ignore[attr-defined]
        return layer


def _constructor_args(m: Any) -> dict[str, Any]:
    args = dict(
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        kernel_size=m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        dilation=m.dilation,
        groups=m.groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
        device=m.weight.device,
        dtype=m.weight.dtype,
    )
    if m.transposed:
        args["output_padding"] = m.output_padding
    return args


def _conv_class(base: type[nn.Module], ndim: int) -> type:
    doc = f"""Matrix-form twin of :class:`torch.nn.{base.__name__}`: the same constructor
    (plus ``layout``), parameters, initialisation and state_dict; the forward pass multiplies
    by W. See :mod:`convmat.nn`.

    Args:
        *args, **kwargs: those of :class:`torch.nn.{base.__name__}`.
        layout: ``torch.sparse_csr`` (default; block-sparse rows, channels-last order inside)
            or ``torch.strided`` (dense W).

    Shape:
        as :class:`torch.nn.{base.__name__}`; W is ``(C_out * prod(out), C_in * prod(in))``.
    """

    def __init__(self, *args: Any, layout: torch.layout = torch.sparse_csr, **kwargs: Any):
        base.__init__(self, *args, **kwargs)
        self._init_matrix(layout)

    if "Transpose" in base.__name__:

        def forward(self, input: torch.Tensor, output_size: list[int] | None = None):
            output_padding = None
            if output_size is not None:
                n = self._ndim
                spatial = tuple(output_size)[-n:]
                output_padding = output_padding_for(
                    tuple(input.shape[-n:]),
                    spatial,
                    self.kernel_size,
                    self.stride,
                    self.padding,
                    self.dilation,
                )
            return self._matrix_forward(input, output_padding)

    else:

        def forward(self, input: torch.Tensor):  # type: ignore[misc]
            return self._matrix_forward(input)

    name = "Matrix" + base.__name__
    namespace = dict(
        __init__=__init__,
        forward=forward,
        __doc__=doc,
        __module__=__name__,
        __qualname__=name,
        _ndim=ndim,
        _torch_class=base,
        _transposed_layer="Transpose" in base.__name__,
    )
    return type(name, (_MatrixConvMixin, base), namespace)


MatrixConv1d = _conv_class(nn.Conv1d, 1)
MatrixConv2d = _conv_class(nn.Conv2d, 2)
MatrixConv3d = _conv_class(nn.Conv3d, 3)
MatrixConvTranspose1d = _conv_class(nn.ConvTranspose1d, 1)
MatrixConvTranspose2d = _conv_class(nn.ConvTranspose2d, 2)
MatrixConvTranspose3d = _conv_class(nn.ConvTranspose3d, 3)


class Conv1D(nn.Module):
    """One signal, one kernel: the convolution of the tutorial, written as ``y = x @ W.T``.

    W is the ``(output_dim, input_dim)`` matrix with the kernel on its bands, made from the
    learnable ``kernel`` on every call (its index pattern is cached, so only the kernel values
    are placed), so gradients reach the kernel through W.

    Args:
        kernel_size: taps of the kernel.
        input_dim: length of the signal.
        stride: step between windows.
        dilation: spacing between taps.
        padding: zeros added to both ends (an int), or a ``(before, after)`` pair.
        bias: add one learnable scalar to every output.

    Shape:
        ``(batch, input_dim)`` or ``(input_dim,)`` -> ``(batch, output_dim)`` or
        ``(output_dim,)``, ``output_dim = floor((input_dim + pads - dilation * (k - 1) - 1) /
        stride) + 1``.

    >>> layer = Conv1D(3, 10)
    >>> with torch.no_grad():
    ...     _ = layer.kernel.copy_(torch.tensor([1.0, 2.0, 3.0]))
    >>> layer.output_dim
    8
    >>> layer(torch.arange(1.0, 11.0)).detach()
    tensor([14., 20., 26., 32., 38., 44., 50., 56.])
    """

    def __init__(
        self,
        kernel_size: int,
        input_dim: int,
        stride: int = 1,
        dilation: int = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        pads = (padding,) if isinstance(padding, tuple) else padding
        self.kernel_size, self.input_dim = kernel_size, input_dim
        self.stride, self.dilation, self.padding = stride, dilation, pads
        (self.output_dim,) = conv_output_size(input_dim, kernel_size, stride, pads, dilation)
        bound = 1 / math.sqrt(kernel_size)
        self.kernel = nn.Parameter(torch.empty(kernel_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(1).uniform_(-bound, bound)) if bias else None

    def weight_matrix(self) -> torch.Tensor:
        """The ``(output_dim, input_dim)`` matrix with the kernel on its bands."""
        return conv_matrix(
            self.kernel.view(1, 1, -1),
            self.input_dim,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_dim or x.dim() not in (1, 2):
            raise ConvMatError(
                f"input must be (batch, {self.input_dim}) or ({self.input_dim},), got shape "
                f"{tuple(x.shape)!r}"
            )
        y = x @ self.weight_matrix().T
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, input_dim={self.input_dim}, "
            f"output_dim={self.output_dim}, stride={self.stride}, dilation={self.dilation}, "
            f"padding={self.padding}, bias={self.bias is not None}"
        )
