"""Matrix-form twins of torch's convolution layers: ``y = x @ W.T + b``.

``MatrixConv{1,2,3}d`` and ``MatrixConvTranspose{1,2,3}d`` *are* the matching ``torch.nn``
classes (subclasses: same constructor, parameters, initialisation and state_dict), with a forward
pass that multiplies by the layer's matrix W instead of calling a convolution kernel. The
``layout`` option says how W is held:

- ``"blocks"`` (default; ``torch.sparse_csr`` is accepted as an alias): W's non-zeros as dense
  channel blocks in block-sparse rows, rows and columns in channels-last order. That order is a
  permutation of W's rows and columns (the same linear map) in which the non-zeros form dense
  blocks, which multiply far faster than scattered entries. Half and bfloat16 layers multiply
  in float32 (the sparse kernels have none for them) and round the result back.
- ``"dense"`` (``torch.strided`` is accepted as an alias): the dense W.

:meth:`~MatrixConv2d.weight_matrix` gives W in the public C order (CSR or dense).

W lives in the package's one cache (:func:`convmat.cache_info` lists it under the layer's name,
``"MatrixConv2d#3"``), one entry per input size, device, dtype and layout; the least recently used
sizes go first when the cache's budget is full, and ``.to()`` / ``.double()`` / ``.cuda()`` (all
of ``nn.Module._apply``) or deleting the layer drop its entries. Each entry keeps a copy of the
kernel values it was built from, compared on every forward (cost O(kernel)): W is rebuilt
whenever the values differ, whatever changed them (an optimizer step, ``.data`` in place,
``load_state_dict``, ``torch.func.functional_call`` with other weights). The index pattern is
cached per configuration, so a rebuild only gathers kernel values.

The backward pass is matrix calculus on the same pattern: ``grad_x = W^H grad_y`` (``W^T`` for
real layers), and the weight gradient sums ``grad_y x^H`` over the entries of W that hold each
kernel tap (one batched product over the gathered inputs). Both are differentiable again (the
product by ``W^H`` is itself a product by a matrix whose backward multiplies by W), so gradient
penalties, Hessian-vector products and any higher order work as through torch's own layers.

>>> conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", dtype=torch.float64)
>>> twin = MatrixConv2d.from_module(conv)
>>> x = torch.randn(8, 2, 10, 10, dtype=torch.float64)
>>> torch.allclose(twin(x), conv(x), atol=1e-12)
True
>>> twin.matrix_builds, type(twin.to_module()).__name__
(1, 'Conv2d')
"""

from __future__ import annotations

import itertools
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .._errors import ConvMatError
from .._typing import IntOrTuple, PaddingArg
from .._typing import PaddingMode as PaddingModeName
from ..engine import (
    BlockPattern,
    Geometry,
    assemble,
    block_size,
    conv_output_size,
    discard,
    flat_pads,
    get_block_pattern,
    lookup,
    ntuple,
    output_padding_for,
    padding_mode,
    plain_conv_problem,
    store,
    tap_table,
    tensor_bytes,
    weight_view,
)
from ..matrix import conv_matrix, to_matrix

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "Conv1D",
    "LayerLayout",
    "MatrixConv1d",
    "MatrixConv2d",
    "MatrixConv3d",
    "MatrixConvTranspose1d",
    "MatrixConvTranspose2d",
    "MatrixConvTranspose3d",
    "Pad",
]

#: How a matrix layer holds W: channels-last block-sparse rows, or the dense matrix.
LayerLayout = Literal["blocks", "dense"]

#: Every accepted ``layout`` value and the layout it names (the torch layouts are aliases kept
#: from earlier versions: ``torch.sparse_csr`` meant the block form, ``torch.strided`` the dense).
_LAYOUT_NAMES: dict[Any, LayerLayout] = {
    "blocks": "blocks",
    "dense": "dense",
    torch.sparse_csr: "blocks",
    torch.strided: "dense",
}

#: Dtypes the block-sparse kernels lack; the block layout multiplies them in float32.
_WIDENED = {torch.float16: torch.float32, torch.bfloat16: torch.float32}

#: Torch unpacks sizes into int64 and refuses anything larger ("Overflow").
_INT64_MAX = 2**63 - 1

#: Numbers the layers' cache owners (``"MatrixConv2d#3"``); never reused, unlike ``id()``.
_OWNER_NUMBERS = itertools.count(1)


def _layer_layout(layout: object) -> LayerLayout:
    name = _LAYOUT_NAMES.get(layout) if isinstance(layout, str | torch.layout) else None
    if name is None:
        raise ConvMatError(
            f"layout must be 'blocks' or 'dense' (or their aliases torch.sparse_csr and "
            f"torch.strided), got {layout!r}"
        )
    return name


# -- W of one layer at one input size ----------------------------------------------------------
def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, P)`` -> contiguous ``(P * C, B)``."""
    b, c, p = x.shape
    return x.reshape(b, c * p).T.contiguous().view(c, p, b).transpose(0, 1).reshape(p * c, b)


def _from_channels_last(y: torch.Tensor, channels: int) -> torch.Tensor:
    """``(P * C, B)`` -> contiguous ``(B, C, P)``."""
    b = y.shape[1]
    p = y.shape[0] // channels
    return y.view(p, channels * b).T.contiguous().view(channels, b, p).transpose(0, 1).contiguous()


def _bsr(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Block-sparse rows; 1 x 1 blocks as plain CSR (the same matrix; CUDA's block kernels
    refuse blocks of one column)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (BSR|CSR) tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly")
        if values.shape[1:] == (1, 1):
            return torch.sparse_csr_tensor(
                crow, col, values.reshape(-1), shape, check_invariants=False
            )
        return torch.sparse_bsr_tensor(crow, col, values, shape, check_invariants=False)


@dataclass(eq=False)
class _LayerMatrix:
    """W of one layer at one input size, device, dtype and layout, with the kernel values it
    was built from (``source``, compared with the weight on every forward)."""

    geo: Geometry
    source: torch.Tensor
    matrix: torch.Tensor  # BSR (channels-last) or dense (C order)
    blocks: BlockPattern | None
    values: torch.Tensor | None  # the BSR blocks, kept to make W^T on demand
    taps: torch.Tensor  # see tap_table: the weight gradient's gather
    _transpose: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes this entry holds (W^T of the block form counted ahead; the shared index
        tensors are counted by the pattern caches)."""
        if self.values is None:
            return tensor_bytes([self.source, self.matrix])
        return tensor_bytes([self.source]) + 2 * tensor_bytes([self.values])

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, P_in)`` -> ``(B, C_out, P_out)``: ``W x``."""
        b, rows = x.shape[0], self.geo.out_channels
        if self.blocks is None:
            out, cols = self.matrix.shape
            return (x.reshape(b, cols) @ self.matrix.T).view(b, rows, out // rows)
        return _from_channels_last(self.matrix @ _channels_last(x), rows)

    def multiply_adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """``(B, C_out, P_out)`` -> ``(B, C_in, P_in)``: ``W^H g`` (``W^T g`` for real W)."""
        if self.matrix.dtype.is_complex:
            return self._multiply_transpose(g.conj().resolve_conj()).conj().resolve_conj()
        return self._multiply_transpose(g)

    def _multiply_transpose(self, g: torch.Tensor) -> torch.Tensor:
        b, cols = g.shape[0], self.geo.in_channels
        if self.blocks is None:
            out, columns = self.matrix.shape
            return (g.reshape(b, out) @ self.matrix).view(b, cols, columns // cols)
        if self._transpose is None:
            assert self.values is not None
            crow, col, perm = self.blocks.transpose()
            values = self.values.index_select(0, perm).mT.contiguous()
            rows, columns = self.matrix.shape
            self._transpose = _bsr(crow, col, values, (columns, rows))
        return _from_channels_last(self._transpose @ _channels_last(g), cols)

    def weight_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Gradient of ``<g, W x>`` for the ``(C_rows, C_in_group * K)`` weight view: for every
        tap, the sum of ``g[row] * conj(x[col])`` over the entries of W that hold it (one
        batched product; torch's convention for complex values). Written with differentiable
        torch ops, so it has gradients in ``x`` and ``g``."""
        x = x.conj()  # a no-op for real x
        geo = self.geo
        b, groups = x.shape[0], geo.groups
        positions, k = self.taps.shape
        # The table runs over the side without holes (see tap_table); gather the other side,
        # with one appended zero for the taps that fall outside.
        dense_side, gathered_side = (g, x) if not geo.transposed else (x, g)
        padded = torch.cat(
            [gathered_side, gathered_side.new_zeros(b, gathered_side.shape[1], 1)], 2
        )
        per_group = gathered_side.shape[1] // groups
        gathered = padded[:, :, self.taps.reshape(-1)].view(b, groups, per_group, positions, k)
        dense_side = dense_side.reshape(b, groups, dense_side.shape[1] // groups, positions)
        if not geo.transposed:
            grad = torch.einsum("bgor,bgirk->goik", dense_side, gathered)
        else:
            grad = torch.einsum("bgir,bgork->goik", dense_side, gathered)
        return grad.reshape(geo.out_channels, -1)


class _Multiply(torch.autograd.Function):
    """``y = W x``. Its backward is ``W^H g`` (:class:`_MultiplyAdjoint`, whose own backward
    is this one) and the weight gradient in differentiable ops: every order of derivative is
    exact. A first-order backward (grad mode off) multiplies directly."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, view: torch.Tensor, op: _LayerMatrix) -> torch.Tensor:
        ctx.op = op
        ctx.save_for_backward(x, view)
        return op.multiply(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, view = ctx.saved_tensors
        op: _LayerMatrix = ctx.op
        g = g.contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph: a product that has a backward itself
                gx = _MultiplyAdjoint.apply(g, view, op)
            else:
                gx = op.multiply_adjoint(g)
        if ctx.needs_input_grad[1]:
            gw = op.weight_grad(x, g)
        return gx, gw, None


class _MultiplyAdjoint(torch.autograd.Function):
    """``x = W^H g``, the adjoint of :class:`_Multiply`; its backward mirrors that one's."""

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, view: torch.Tensor, op: _LayerMatrix) -> torch.Tensor:
        ctx.op = op
        ctx.save_for_backward(g, view)
        return op.multiply_adjoint(g)

    @staticmethod
    def backward(ctx: Any, gg: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g, view = ctx.saved_tensors
        op: _LayerMatrix = ctx.op
        gg = gg.contiguous()
        dg = dview = None
        if ctx.needs_input_grad[0]:
            dg = _Multiply.apply(gg, view, op) if torch.is_grad_enabled() else op.multiply(gg)
        if ctx.needs_input_grad[1]:
            # <gg, W^H g> = <W gg, g>: the weight gradient of a product with input gg.
            dview = op.weight_grad(gg, g)
        return dg, dview, None


# -- to_module's helper ------------------------------------------------------------------------
class Pad(nn.Module):
    """``torch.nn.functional.pad`` as a module; negative pads crop (constant mode).

    :meth:`MatrixConv2d.to_module` puts it before a convolution whose padding torch cannot
    express (different pads before and after), or after a transposed one to crop.

    Args:
        pads: in ``F.pad``'s order (last dimension first, ``before, after`` each).
        mode: ``"constant"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Shape:
        ``(*, *spatial)`` -> ``(*, *(spatial + before + after))``.

    >>> Pad((1, 2)).forward(torch.ones(1, 1, 2))
    tensor([[[0., 1., 1., 0., 0.]]])
    """

    def __init__(self, pads: Sequence[int], mode: str = "constant") -> None:
        super().__init__()
        self.pads = tuple(int(p) for p in pads)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads, mode=self.mode)

    def extra_repr(self) -> str:
        return f"pads={self.pads}, mode={self.mode!r}"


def _pad_pairs(padding: Any) -> tuple[tuple[int, int], ...] | None:
    """A module's padding as ``(before, after)`` pairs, or None for a string (torch's own)."""
    if isinstance(padding, str):
        return None
    return tuple(
        (int(p[0]), int(p[1])) if isinstance(p, Sequence) else (int(p), int(p)) for p in padding
    )


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


def _check_size_arguments(n: int, **values: Any) -> None:
    """Refuse, at construction, sizes torch would refuse at the first forward."""
    for name in ("kernel_size", "stride", "dilation"):
        ntuple(values[name], n, name, 1)
    if "output_padding" in values:
        ntuple(values["output_padding"], n, "output_padding", 0)
        if isinstance(values["padding"], str):
            raise ConvMatError(
                f"padding must be an int, a tuple of {n} ints or {n} (before, after) pairs for a "
                f"transposed convolution (torch's take no string), got {values['padding']!r}"
            )
    for name, value in values.items():
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, Sequence) and not isinstance(v, str):
                stack.extend(v)
            elif isinstance(v, int) and abs(v) > _INT64_MAX:
                raise ConvMatError(
                    f"{name} must fit in a 64-bit integer in every dimension (as in torch, "
                    f"which refuses larger values with 'Overflow'), got {value!r}"
                )


# -- the layers --------------------------------------------------------------------------------
class _MatrixConvNd(_ConvNd):
    """The matrix forward, caching and conversions shared by the six layers."""

    _ndim: int
    _torch_class: type[_ConvNd]
    layout: LayerLayout
    #: How many times W was built from the weight (for any input size).
    matrix_builds: int
    _cache_owner: str

    def _init_matrix(self, layout: LayerLayout) -> None:
        self.layout = layout
        self.matrix_builds = 0
        self._claim_cache_owner()

    def _claim_cache_owner(self) -> None:
        """Name this layer's cache entries, and drop them when the layer is collected."""
        owner = f"{type(self).__name__}#{next(_OWNER_NUMBERS)}"
        self._cache_owner = owner
        weakref.finalize(self, discard, owner).atexit = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy (deepcopy, pickle) holds its own cache entries.
        super().__setstate__(state)  # type: ignore[no-untyped-call]  # torch's, unannotated
        self._claim_cache_owner()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # .to(), .double(), .half(), .cuda(), ...: the cached W's are of the old tensors.
        owner = self.__dict__.get("_cache_owner")
        if owner is not None:
            discard(owner)
        return super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch's

    def extra_repr(self) -> str:
        base: str = super().extra_repr()  # type: ignore[no-untyped-call]  # torch's
        return f"{base}, layout={self.layout!r}"

    # -- the matrix ------------------------------------------------------------------------
    def _geometry(self, input_size: tuple[int, ...], output_padding: Any = None) -> Geometry:
        return Geometry.from_module(self, input_size, output_padding=output_padding)

    def _compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return _WIDENED.get(dtype, dtype) if self.layout == "blocks" else dtype

    def _layer_matrix(self, geo: Geometry) -> _LayerMatrix:
        """W at ``geo`` for the weight's current values: the cached one if it was built from
        equal values, else a new one (stored in the cache under this layer's name)."""
        w = self.weight
        key = ("layer matrix", self._cache_owner, geo, w.device, w.dtype, self.layout)
        op: _LayerMatrix | None = lookup(key)
        if op is not None and torch.equal(op.source, w):
            return op
        with torch.no_grad():
            source = w.detach().clone()
            view = weight_view(source, geo).to(self._compute_dtype(w.dtype)).contiguous()
            if self.layout == "dense":
                matrix = assemble(view, geo, torch.strided)
                op = _LayerMatrix(geo, source, matrix, None, None, tap_table(geo, w.device))
            else:
                # Square blocks (what the sparse kernels take) dividing both channel counts.
                side = block_size(
                    math.gcd(geo.out_channels // geo.groups, geo.in_channels // geo.groups)
                )
                blocks = get_block_pattern(geo, side, side, w.device)
                values = blocks.values(view)
                matrix = _bsr(blocks.crow, blocks.col, values, blocks.shape)
                op = _LayerMatrix(geo, source, matrix, blocks, values, blocks.taps)
        store(key, self._cache_owner, op, op.nbytes())
        self.matrix_builds += 1
        return op

    def weight_matrix(self, input_size: IntOrTuple) -> torch.Tensor:
        """W of this layer for inputs of spatial size ``input_size``, in C order of
        ``(channels, *spatial)``: CSR for the block layout, dense otherwise (bias excluded).

        Args:
            input_size: spatial size of one input.

        Returns:
            W, differentiable in the weight.

        Shape:
            ``(C_out * prod(out), C_in * prod(input_size))``

        >>> MatrixConv1d(1, 2, 3).weight_matrix(5).shape
        torch.Size([6, 5])
        """
        layout = torch.sparse_csr if self.layout == "blocks" else torch.strided
        return to_matrix(self, input_size, layout=layout)

    def _check_input(self, input: Any) -> torch.Tensor:
        """``input`` as a batch, after the checks torch makes (with clearer messages)."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        n = self._ndim
        if input.dim() not in (n + 1, n + 2):
            raise ConvMatError(
                f"input must have {n + 1} (unbatched) or {n + 2} (batched) dimensions for a "
                f"{n}-D convolution, got shape {tuple(input.shape)!r}"
            )
        if input.layout != torch.strided:
            raise ConvMatError(f"input must be a dense (strided) tensor, got {input.layout}")
        w = self.weight
        if not (w.dtype.is_complex or (w.dtype.is_floating_point and w.dtype.itemsize >= 2)):
            raise ConvMatError(
                f"the layer's dtype must be a floating point type of 16 bits or more, or "
                f"complex, got {w.dtype} (torch has no convolution for it either); convert the "
                f"layer with .to(torch.float32)"
            )
        if input.dtype != w.dtype:
            raise ConvMatError(
                f"input dtype must be the layer's dtype {w.dtype}, got {input.dtype} (torch "
                f"refuses it too: 'Input type and weight type should be the same'); convert the "
                f"input with .to({w.dtype}) or the layer with .to(dtype)"
            )
        if input.device != w.device:
            raise ConvMatError(
                f"input must be on the layer's device {w.device}, got {input.device}; move one "
                f"of them with .to(device)"
            )
        x = input if input.dim() == n + 2 else input.unsqueeze(0)
        if x.shape[1] != self.in_channels:
            raise ConvMatError(
                f"input must have {self.in_channels} channels, got shape {tuple(input.shape)!r}"
            )
        return x

    def _matrix_forward(self, input: Any, output_size: Sequence[int] | None = None) -> torch.Tensor:
        x = self._check_input(input)
        n = self._ndim
        spatial = tuple(x.shape[2:])
        output_padding = None
        if output_size is not None:
            output_padding = output_padding_for(
                spatial, tuple(output_size)[-n:], self.kernel_size, self.stride,
                cast(PaddingArg, self.padding), self.dilation,
            )  # fmt: skip
        geo = self._geometry(spatial, output_padding)
        batch, w = x.shape[0], self.weight
        flat = x.reshape(batch, geo.in_channels, math.prod(spatial))
        view = weight_view(w, geo)
        if w.is_meta:
            # Shapes only, as torch's layers on the meta device (connected for backward).
            y = flat.new_zeros(batch, geo.out_channels, math.prod(geo.output_size))
            y = y + 0 * (flat.sum() + view.sum())
        else:
            op = self._layer_matrix(geo)
            compute = self._compute_dtype(w.dtype)
            y = _Multiply.apply(flat.to(compute), view.to(compute), op).to(w.dtype)
        y = y.view(batch, geo.out_channels, *geo.output_size)
        if self.bias is not None:
            y = y + self.bias.view(-1, *(1,) * n)
        return y if input.dim() == n + 2 else y.squeeze(0)

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def from_module(
        cls, module: nn.Module, *, layout: LayerLayout | torch.layout = "blocks"
    ) -> Self:
        """The matrix twin of a torch layer, with copies of its parameters (sharing nothing).

        Args:
            module: a plain ``nn.Conv{N}d`` / ``nn.ConvTranspose{N}d`` of this class's kind
                (a subclass that overrides ``forward`` or ``_conv_forward`` is refused: it may
                compute something else).
            layout: ``"blocks"`` or ``"dense"``, as in the constructor.

        Raises:
            ConvMatError: naming the module's class and why it is refused.
        """
        base = cls._torch_class
        if not isinstance(module, base):
            raise ConvMatError(
                f"module must be a torch.nn.{base.__name__} (or a plain subclass), got "
                f"{type(module).__name__}"
            )
        problem = plain_conv_problem(module)
        if problem:
            raise ConvMatError(f"module ({type(module).__name__}) {problem}")
        make: Callable[..., Self] = cls  # each layer's constructor takes layout=
        twin = make(**_constructor_args(module), layout=layout)
        twin.load_state_dict(module.state_dict())
        return twin

    def to_module(self) -> nn.Module:
        """The plain torch layer with copies of this layer's parameters.

        Padding that differs before and after (which torch's layers cannot take) comes back as
        ``nn.Sequential(Pad(...), conv)`` with the conv unpadded, or for a transposed layer
        ``nn.Sequential(conv_transpose, Pad(...))`` with negative pads (a crop): the same
        function either way.
        """
        args = _constructor_args(self)
        pairs = _pad_pairs(args["padding"])
        if pairs is not None:
            if all(b == a for b, a in pairs):
                args["padding"] = tuple(b for b, _ in pairs)
                pairs = None
            else:
                args["padding"], args["padding_mode"] = 0, "zeros"
        layer: nn.Module = self._torch_class(**args)
        layer.load_state_dict(self.state_dict())
        if pairs is None:
            return layer
        if self.transposed:
            return nn.Sequential(layer, Pad([-v for v in flat_pads(pairs)]))
        mode = padding_mode(self.padding_mode).torch_pad_mode
        return nn.Sequential(Pad(flat_pads(pairs), mode), layer)


class MatrixConv1d(_MatrixConvNd, nn.Conv1d):
    """:class:`torch.nn.Conv1d` computed as ``y = W x + b`` with the layer's matrix W.

    The same constructor, parameters, initialisation and state_dict as ``nn.Conv1d`` (it is a
    subclass), plus ``layout``; padding may also be one ``(before, after)`` pair. See
    :mod:`convmat.layers.nn`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as :class:`torch.nn.Conv1d`.
        layout: ``"blocks"`` (default; block-sparse rows in channels-last order; alias
            ``torch.sparse_csr``) or ``"dense"`` (alias ``torch.strided``).

    Shape:
        ``(N, C_in, L)`` or ``(C_in, L)`` -> ``(N, C_out, L_out)`` or ``(C_out, L_out)``,
        ``L_out = floor((L + pad_before + pad_after - dilation * (kernel - 1) - 1) / stride) + 1``;
        W is ``(C_out * L_out, C_in * L)``.

    >>> layer = MatrixConv1d(2, 3, 3, padding=1, dtype=torch.float64)
    >>> x = torch.randn(4, 2, 9, dtype=torch.float64)
    >>> torch.allclose(layer(x), layer.to_module()(x), atol=1e-12)
    True
    """

    _ndim = 1
    _torch_class = nn.Conv1d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: PaddingArg = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: PaddingModeName = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        layout: LayerLayout | torch.layout = "blocks",
    ) -> None:
        name = _layer_layout(layout)
        _check_size_arguments(
            1, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation
        )
        nn.Conv1d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding,  # type: ignore[arg-type]
            dilation, groups, bias, padding_mode, device, dtype,  # type: ignore[arg-type]
        )  # fmt: skip
        self._init_matrix(name)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._matrix_forward(input)


class MatrixConv2d(_MatrixConvNd, nn.Conv2d):
    """:class:`torch.nn.Conv2d` computed as ``y = W x + b`` with the layer's matrix W.

    The same constructor, parameters, initialisation and state_dict as ``nn.Conv2d`` (it is a
    subclass), plus ``layout``; padding may also be ``(before, after)`` pairs. See
    :mod:`convmat.layers.nn`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as :class:`torch.nn.Conv2d`.
        layout: ``"blocks"`` (default; block-sparse rows in channels-last order; alias
            ``torch.sparse_csr``) or ``"dense"`` (alias ``torch.strided``).

    Shape:
        ``(N, C_in, H, W)`` or ``(C_in, H, W)`` -> ``(N, C_out, H_out, W_out)`` or unbatched,
        each ``out = floor((in + pad_before + pad_after - dilation * (kernel - 1) - 1) / stride)
        + 1``; W is ``(C_out * H_out * W_out, C_in * H * W)``.

    >>> layer = MatrixConv2d(2, 4, 3, stride=2, padding=((1, 0), (0, 1)), dtype=torch.float64)
    >>> x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    >>> layer(x).shape
    torch.Size([3, 4, 4, 4])
    >>> torch.allclose(layer(x), layer.to_module()(x), atol=1e-12)
    True
    """

    _ndim = 2
    _torch_class = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: PaddingArg = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: PaddingModeName = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        layout: LayerLayout | torch.layout = "blocks",
    ) -> None:
        name = _layer_layout(layout)
        _check_size_arguments(
            2, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation
        )
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding,  # type: ignore[arg-type]
            dilation, groups, bias, padding_mode, device, dtype,  # type: ignore[arg-type]
        )  # fmt: skip
        self._init_matrix(name)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._matrix_forward(input)


class MatrixConv3d(_MatrixConvNd, nn.Conv3d):
    """:class:`torch.nn.Conv3d` computed as ``y = W x + b`` with the layer's matrix W.

    The same constructor, parameters, initialisation and state_dict as ``nn.Conv3d`` (it is a
    subclass), plus ``layout``; padding may also be ``(before, after)`` pairs. See
    :mod:`convmat.layers.nn`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device, dtype: as :class:`torch.nn.Conv3d`.
        layout: ``"blocks"`` (default; block-sparse rows in channels-last order; alias
            ``torch.sparse_csr``) or ``"dense"`` (alias ``torch.strided``).

    Shape:
        ``(N, C_in, D, H, W)`` or unbatched -> ``(N, C_out, D_out, H_out, W_out)``, each
        ``out = floor((in + pad_before + pad_after - dilation * (kernel - 1) - 1) / stride) + 1``;
        W is ``(C_out * D_out * H_out * W_out, C_in * D * H * W)``.

    >>> MatrixConv3d(1, 2, 2)(torch.randn(1, 3, 3, 3)).shape
    torch.Size([2, 2, 2, 2])
    """

    _ndim = 3
    _torch_class = nn.Conv3d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: PaddingArg = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: PaddingModeName = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        layout: LayerLayout | torch.layout = "blocks",
    ) -> None:
        name = _layer_layout(layout)
        _check_size_arguments(
            3, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation
        )
        nn.Conv3d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding,  # type: ignore[arg-type]
            dilation, groups, bias, padding_mode, device, dtype,  # type: ignore[arg-type]
        )  # fmt: skip
        self._init_matrix(name)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._matrix_forward(input)


class MatrixConvTranspose1d(_MatrixConvNd, nn.ConvTranspose1d):
    """:class:`torch.nn.ConvTranspose1d` computed as ``y = W x + b``: W is the transpose of
    the matching convolution's matrix (the transposed convolution is that convolution's
    adjoint, the gradient of ``nn.Conv1d`` with respect to its input).

    The same constructor, parameters, initialisation and state_dict as ``nn.ConvTranspose1d``
    (it is a subclass), plus ``layout``. See :mod:`convmat.layers.nn`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
            dilation, padding_mode, device, dtype: as :class:`torch.nn.ConvTranspose1d`.
        layout: ``"blocks"`` (default; alias ``torch.sparse_csr``) or ``"dense"`` (alias
            ``torch.strided``).

    Shape:
        ``(N, C_in, L)`` or ``(C_in, L)`` -> ``(N, C_out, L_out)`` or ``(C_out, L_out)``,
        ``L_out = (L - 1) * stride - pad_before - pad_after + dilation * (kernel - 1)
        + output_padding + 1``; W is ``(C_out * L_out, C_in * L)``.

    >>> layer = MatrixConvTranspose1d(2, 1, 3, stride=2, dtype=torch.float64)
    >>> x = torch.randn(2, 2, 4, dtype=torch.float64)
    >>> torch.allclose(layer(x), layer.to_module()(x), atol=1e-12)
    True
    """

    _ndim = 1
    _torch_class = nn.ConvTranspose1d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: PaddingArg = 0,
        output_padding: IntOrTuple = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: IntOrTuple = 1,
        padding_mode: Literal["zeros"] = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        layout: LayerLayout | torch.layout = "blocks",
    ) -> None:
        name = _layer_layout(layout)
        _check_size_arguments(
            1, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
            output_padding=output_padding,
        )  # fmt: skip
        nn.ConvTranspose1d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding,  # type: ignore[arg-type]
            output_padding, groups, bias, dilation, padding_mode, device, dtype,  # type: ignore[arg-type]
        )  # fmt: skip
        self._init_matrix(name)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return self._matrix_forward(input, output_size)


class MatrixConvTranspose2d(_MatrixConvNd, nn.ConvTranspose2d):
    """:class:`torch.nn.ConvTranspose2d` computed as ``y = W x + b``: W is the transpose of
    the matching convolution's matrix (the transposed convolution is that convolution's
    adjoint, the gradient of ``nn.Conv2d`` with respect to its input).

    The same constructor, parameters, initialisation and state_dict as ``nn.ConvTranspose2d``
    (it is a subclass), plus ``layout``. ``forward(input, output_size=...)`` works as torch's.
    See :mod:`convmat.layers.nn`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
            dilation, padding_mode, device, dtype: as :class:`torch.nn.ConvTranspose2d`.
        layout: ``"blocks"`` (default; alias ``torch.sparse_csr``) or ``"dense"`` (alias
            ``torch.strided``).

    Shape:
        ``(N, C_in, H, W)`` or unbatched -> ``(N, C_out, H_out, W_out)``, each
        ``out = (in - 1) * stride - pad_before - pad_after + dilation * (kernel - 1)
        + output_padding + 1``; W is ``(C_out * H_out * W_out, C_in * H * W)``.

    >>> layer = MatrixConvTranspose2d(4, 2, 2, stride=2)
    >>> layer(torch.randn(1, 4, 5, 5)).shape
    torch.Size([1, 2, 10, 10])
    """

    _ndim = 2
    _torch_class = nn.ConvTranspose2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: PaddingArg = 0,
        output_padding: IntOrTuple = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: IntOrTuple = 1,
        padding_mode: Literal["zeros"] = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        layout: LayerLayout | torch.layout = "blocks",
    ) -> None:
        name = _layer_layout(layout)
        _check_size_arguments(
            2, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
            output_padding=output_padding,
        )  # fmt: skip
        nn.ConvTranspose2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding,  # type: ignore[arg-type]
            output_padding, groups, bias, dilation, padding_mode, device, dtype,  # type: ignore[arg-type]
        )  # fmt: skip
        self._init_matrix(name)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return self._matrix_forward(input, output_size)


class MatrixConvTranspose3d(_MatrixConvNd, nn.ConvTranspose3d):
    """:class:`torch.nn.ConvTranspose3d` computed as ``y = W x + b``: W is the transpose of
    the matching convolution's matrix (the transposed convolution is that convolution's
    adjoint, the gradient of ``nn.Conv3d`` with respect to its input).

    The same constructor, parameters, initialisation and state_dict as ``nn.ConvTranspose3d``
    (it is a subclass), plus ``layout``. See :mod:`convmat.layers.nn`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
            dilation, padding_mode, device, dtype: as :class:`torch.nn.ConvTranspose3d`.
        layout: ``"blocks"`` (default; alias ``torch.sparse_csr``) or ``"dense"`` (alias
            ``torch.strided``).

    Shape:
        ``(N, C_in, D, H, W)`` or unbatched -> ``(N, C_out, D_out, H_out, W_out)``, each
        ``out = (in - 1) * stride - pad_before - pad_after + dilation * (kernel - 1)
        + output_padding + 1``; W is ``(C_out * D_out * H_out * W_out, C_in * D * H * W)``.

    >>> MatrixConvTranspose3d(2, 1, 2)(torch.randn(2, 2, 2, 2)).shape
    torch.Size([1, 3, 3, 3])
    """

    _ndim = 3
    _torch_class = nn.ConvTranspose3d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: PaddingArg = 0,
        output_padding: IntOrTuple = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: IntOrTuple = 1,
        padding_mode: Literal["zeros"] = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        layout: LayerLayout | torch.layout = "blocks",
    ) -> None:
        name = _layer_layout(layout)
        _check_size_arguments(
            3, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
            output_padding=output_padding,
        )  # fmt: skip
        nn.ConvTranspose3d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding,  # type: ignore[arg-type]
            output_padding, groups, bias, dilation, padding_mode, device, dtype,  # type: ignore[arg-type]
        )  # fmt: skip
        self._init_matrix(name)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return self._matrix_forward(input, output_size)


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
