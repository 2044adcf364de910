"""A matrix-free linear operator for any convolution convmat supports, with its adjoint.

``op @ x`` runs torch's own convolution; ``op.T @ y`` (``op.H`` for complex weights) runs the
adjoint: the matching transposed convolution (with the output padding that gives the input's
size), preceded for reflect/replicate/circular padding by the adjoint of the padding, which adds
the gradient of every padded copy back onto the input it copies (exactly the folding that W does).
A transposed convolution is the adjoint of its matching convolution (``Geometry.matching_conv``),
so one pair of routines serves both.

``flip=True`` gives the true convolution of signal processing (the kernel flipped in its spatial
dims): the operator flips the kernel once, when it is made, and is from then on the
cross-correlation with the flipped kernel, which is what :attr:`ConvOperator.weight` returns.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._errors import ConvMatError
from ..engine import (
    Geometry,
    assemble,
    check_flip,
    check_weight,
    conv_geometry,
    conv_transpose_geometry,
    discard,
    flat_pads,
    lookup,
    oriented,
    same_values,
    store,
    tensor_bytes,
    weight_view,
)

__all__ = ["ConvOperator", "dottest"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
#: A strided adjoint in float32 on the CPU runs as one stride-1 correlation of its polyphase
#: kernel (:func:`_polyphase_adjoint`) while ``C_in / groups * prod(stride)`` (that
#: correlation's output channels) is below this. Measured, float32, one vector, 2 cores,
#: ``conv_transpose`` against it: 3 -> 64 7x7 stride 2 at 224x224 7.1 / 2.9 ms, 3 -> 32 3x3
#: 1.1 / 0.8 ms, 3 -> 64 4x4 stride 4 0.9 / 0.4 ms; 8 -> 64 3x3 stride 2 at 112 0.62 / 0.61 ms,
#: 16 -> 64 0.7 / 1.0 ms, 32 -> 64 1.2 / 1.6 ms. In float64 it is slower (conv1 11.6 / 103 ms).
_POLYPHASE_BELOW = 32

#: The cache owner of the flipped kernels, one per operator and its adjoints (see
#: :func:`convmat.cache_info`): ``"flipped kernel#7"``.
FLIPPED_OWNER = "flipped kernel"

_COUNTER = itertools.count()


class _Token:
    """Names the flipped-kernel entry of one operator and its adjoints in the engine's cache
    (reused only while the kernel values equal the stored copy); the entry is dropped when the
    last operator holding the token goes."""

    __slots__ = ("__weakref__", "owner", "held")

    def __init__(self) -> None:
        self.owner = f"{FLIPPED_OWNER}#{next(_COUNTER)}"
        self.held: dict[str, torch.Tensor] | None = None  # a pinned operator's kernels, by name
        weakref.finalize(self, discard, self.owner)


def _correlate(x: torch.Tensor, w: torch.Tensor, pads: tuple[tuple[int, int], ...],
               **options: Any) -> torch.Tensor:  # fmt: skip
    """``x`` zero-padded by ``pads`` (``(before, after)`` per dimension; negative crops),
    correlated with ``w`` (``options``: stride, dilation, groups): by the convolution's own
    padding where every pair is equal and non-negative (no padded copy, and a faster kernel:
    float32, 2 cores, one vector, W^T W of ResNet-18's conv1 4.5 -> 3.8 ms, 256 -> 256 3x3 at
    14x14 2.8 -> 2.4 ms), else on an explicitly padded copy."""
    if all(b == a >= 0 for b, a in pads):
        return _CONV[x.dim() - 2](x, w, padding=tuple(b for b, _ in pads), **options)
    return _CONV[x.dim() - 2](F.pad(x, flat_pads(pads)), w, **options)


def _conv_forward(geo: Geometry, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A convolution's W applied to ``(B, C_in, *input_size)``."""
    pads = geo.padding
    if geo.mode.folds:  # reflect / replicate / circular: padded by torch's own F.pad first
        x, pads = F.pad(x, geo.pad_args, mode=geo.mode.torch_pad_mode), ((0, 0),) * geo.ndim
    y = _correlate(x, w, pads, stride=geo.stride, dilation=geo.dilation, groups=geo.groups)
    # The matching convolution of a transposed layer with output_padding has fewer outputs than
    # its windows allow (the transposed layer never reads the last ones).
    return _crop(y, tuple((0, 0) for _ in geo.output_size), geo.output_size)


def _crop(t: torch.Tensor, pads: Any, size: tuple[int, ...]) -> torch.Tensor:
    index = (slice(None), slice(None), *(slice(b, b + s) for (b, _), s in zip(pads, size)))
    return t[index]


def _conv_adjoint(geo: Geometry, w: torch.Tensor, y: torch.Tensor, flipped: Any,
                  phased: Any = None) -> torch.Tensor:  # fmt: skip
    """A convolution's W^T applied to ``(B, C_out, *output_size)``; ``flipped()`` gives the
    kernel transposed per group and flipped (used for stride 1 with zero padding), ``phased()``
    its polyphase form (:func:`_polyphase_kernel`; for strides where it pays,
    :func:`_polyphase_pays`)."""
    n = geo.ndim
    # padded positions no window reads
    unread = [p - q for p, q in zip(geo.padded_size, geo.natural_size)]
    if not geo.mode.folds and all(s == 1 for s in geo.stride):
        # Stride 1: the adjoint is a correlation with the flipped, transposed kernel over y
        # padded by d*(k-1) - pad (negative pads crop); often faster than conv_transpose.
        pads = tuple((s - b, s - a + u) for s, (b, a), u in zip(geo.spans, geo.padding, unread))
        return _correlate(y, flipped(), pads, dilation=geo.dilation, groups=geo.groups)
    if not geo.mode.folds and phased is not None and _polyphase_pays(geo, y):
        return _polyphase_adjoint(geo, y, phased())
    # output_padding may exceed what conv_transpose accepts; zero-extend instead.
    t = _CONV_T[n](y, w, stride=geo.stride, dilation=geo.dilation, groups=geo.groups)
    t = F.pad(t, flat_pads(tuple((0, u) for u in unread)))
    if not geo.mode.folds:
        return _crop(t, geo.padding, geo.input_size)
    # The adjoint of reflect/replicate/circular padding: the vector-Jacobian product of the
    # (linear) padding itself.
    probe = t.new_zeros((t.shape[0], geo.in_channels, *geo.input_size))
    vjp = torch.func.vjp(lambda v: F.pad(v, geo.pad_args, mode=geo.mode.torch_pad_mode), probe)[1]
    adjoint: torch.Tensor = vjp(t)[0]
    return adjoint


def _polyphase_pays(geo: Geometry, y: torch.Tensor) -> bool:
    """Whether a strided adjoint runs as a polyphase correlation (:data:`_POLYPHASE_BELOW`)."""
    phases = math.prod(geo.stride)
    return (phases > 1 and y.dtype == torch.float32 and y.device.type == "cpu"
            and geo.in_channels // geo.groups * phases < _POLYPHASE_BELOW)  # fmt: skip


def _polyphase_kernel(w: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """The kernel of a strided convolution's adjoint as one stride-1 correlation: tap ``m`` at
    offset ``m d = j s + r`` (per axis) goes to phase ``r``, position ``j``; transposed per
    group and flipped, ``(C_in * prod(s), C_out / groups, *J)``, ``J = (k - 1) d // s + 1``.

    Shape:
        ``w``: ``(C_out, C_in / groups, *kernel_size)``.
    """
    g, stride, kernel = geo.groups, geo.stride, w.shape[2:]
    cout, cin_g = w.shape[:2]
    offsets = [torch.arange(k, device=w.device) * d for k, d in zip(kernel, geo.dilation)]
    span = [int(o[-1]) // s + 1 for o, s in zip(offsets, stride)]
    grids = torch.meshgrid(*offsets, indexing="ij")
    phase = [grid % s for grid, s in zip(grids, stride)]
    place = [grid // s for grid, s in zip(grids, stride)]
    phased = w.new_zeros(cout, cin_g, *stride, *span)
    index: tuple[Any, ...] = (slice(None), slice(None), *phase, *place)
    phased[index] = w
    n = geo.ndim
    phased = phased.reshape(g, cout // g, cin_g, *stride, *span)
    order = [0, 2, *range(3, 3 + n), 1, *range(3 + n, 3 + 2 * n)]
    phased = phased.permute(order).reshape(-1, cout // g, *span)
    return phased.flip(list(range(2, 2 + n))).contiguous()


def _polyphase_adjoint(geo: Geometry, y: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``W^T y`` of a strided convolution with zero padding: the polyphase ``kernel``
    (:func:`_polyphase_kernel`) correlated with ``y`` padded by ``J - 1`` at stride 1, its
    phases interleaved (position ``u s + r`` of the padded input), then the padding cut off."""
    n, stride = geo.ndim, geo.stride
    span = kernel.shape[2:]
    z = _correlate(y, kernel, tuple((j - 1, j - 1) for j in span), groups=geo.groups)
    batch, size = y.shape[0], z.shape[2:]
    z = z.reshape(batch, geo.in_channels, *stride, *size)
    order = [0, 1, *(p for d in range(n) for p in (2 + n + d, 2 + d))]
    z = z.permute(order).reshape(batch, geo.in_channels, *(u * s for u, s in zip(size, stride)))
    # Every position a window reads lies within u * s (the rest of the padded input: zeros).
    short = [max(0, p - u * s) for p, u, s in zip(geo.padded_size, size, stride)]
    z = F.pad(z, flat_pads(tuple((0, m) for m in short)))
    return _crop(z, geo.padding, geo.input_size)


class ConvOperator:
    """The convolution (or transposed convolution) as a linear operator, never forming W.

    Args:
        weight: as :func:`convmat.conv_matrix` (or :func:`convmat.conv_transpose_matrix` with
            ``transposed=True``).
        input_size: spatial size of one input.
        transposed: a transposed convolution.
        flip: ``True`` for the true convolution (the kernel flipped in its spatial dims), as
            ``conv_matrix(weight, ..., flip=True)``: the operator is then the cross-correlation
            (or transposed convolution) with ``weight.flip(spatial dims)``.
        **config: stride, padding, dilation, groups, padding_mode / output_padding.

    Attributes:
        weight: the kernel the operator correlates with, as given, or flipped in its spatial
            dims where it was made with ``flip=True`` (read-only: use :meth:`with_weight` for
            another one).
        geometry: the validated configuration (:class:`convmat.engine.Geometry`).
        shape: ``(rows, cols)`` of W (of W^T for the adjoint).
        in_shape, out_shape: ``(C, *spatial)`` of one input and one output.
        is_adjoint: this is the adjoint of the operator the geometry describes.

    The adjoint is an operator too: ``op.H`` (``op.T``, the same for real weights) shares the
    weight and the geometry; ``op.H.H`` is ``op`` again.

    Shape:
        ``op @ x``: ``x`` of shape ``(cols,)``, ``(B, cols)`` or ``(B, *in_shape)`` (``B`` may be
        0); the result has the matching output shape.

    >>> op = ConvOperator(torch.randn(2, 1, 3, dtype=torch.float64), 8, padding=1)
    >>> op.shape, op.in_shape, op.out_shape, op.T.shape
    ((16, 8), (1, 8), (2, 8), (8, 16))
    >>> dottest(op)
    True
    >>> conv = ConvOperator(torch.tensor([[[1.0, 2.0, 3.0]]]), 5, flip=True)
    >>> conv.to_dense()
    tensor([[3., 2., 1., 0., 0.],
            [0., 3., 2., 1., 0.],
            [0., 0., 3., 2., 1.]])
    >>> conv.weight
    tensor([[[3., 2., 1.]]])
    """

    def __init__(
        self,
        weight: torch.Tensor,
        input_size: Any,
        *,
        transposed: bool = False,
        flip: bool = False,
        **config: Any,
    ) -> None:
        weight = check_weight(weight)
        check_flip(flip)
        make = conv_transpose_geometry if transposed else conv_geometry
        geo = make(weight.shape, input_size, **config)
        self._init(oriented(weight, flip), geo, False, _Token())

    def _init(self, weight: torch.Tensor, geo: Geometry, adjoint: bool, token: _Token) -> None:
        self._weight = weight
        self._geometry = geo
        self._is_adjoint = adjoint
        self._token = token  # shared by an operator and its adjoints (same weight)

    @classmethod
    def from_geometry(
        cls, weight: torch.Tensor, geometry: Geometry, *, flip: bool = False
    ) -> ConvOperator:
        """The operator of ``weight`` on a validated :class:`~convmat.engine.Geometry`
        (``flip=True``: of the true convolution, as in the constructor).

        >>> geo = ConvOperator(torch.zeros(2, 1, 3), 8).geometry
        >>> ConvOperator.from_geometry(torch.ones(2, 1, 3), geo).shape
        (12, 8)
        """
        if not isinstance(geometry, Geometry):
            raise ConvMatError(f"geometry must be a Geometry, got {type(geometry).__name__}")
        check_flip(flip)
        weight = cls._matching(check_weight(weight), geometry)
        op = object.__new__(cls)
        op._init(oriented(weight, flip), geometry, False, _Token())
        return op

    @staticmethod
    def _matching(weight: torch.Tensor, geo: Geometry) -> torch.Tensor:
        """``weight`` if its shape fits ``geo``; ConvMatError otherwise."""
        conv = geo.matching_conv
        expected = (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
        if tuple(weight.shape) != expected:
            raise ConvMatError(
                f"weight must have shape {expected!r} for this operator, got "
                f"{tuple(weight.shape)!r}"
            )
        return weight

    @classmethod
    def from_module(cls, module: nn.Module, input_size: Any) -> ConvOperator:
        """The operator of a plain ``nn.Conv*d`` / ``nn.ConvTranspose*d`` (bias excluded).

        Raises:
            ConvMatError: for a module that is not a plain convolution (its class and why).

        >>> ConvOperator.from_module(nn.Conv1d(1, 2, 3), 5).shape
        (6, 5)
        """
        geo = Geometry.from_module(module, input_size)
        weight = cast(torch.Tensor, module.weight)  # a convolution's (from_module checked it)
        return cls.from_geometry(weight.detach(), geo)

    def with_weight(self, weight: torch.Tensor, *, flip: bool = False) -> ConvOperator:
        """The same operator (geometry, adjointness) with another kernel of the same shape.

        ``weight`` is taken as :attr:`weight` gives it, the kernel the operator correlates
        with, whether or not this operator was made with ``flip=True`` (so
        ``op.with_weight(op.weight)`` is ``op`` again); ``flip=True`` flips it first.

        >>> op = ConvOperator(torch.ones(1, 1, 2), 3)
        >>> op.with_weight(2 * op.weight) @ torch.ones(3)
        tensor([4., 4.])
        """
        check_flip(flip)
        weight = self._matching(check_weight(weight), self._geometry)
        op = object.__new__(type(self))
        op._init(oriented(weight, flip), self._geometry, self._is_adjoint, _Token())
        return op

    def _pinned(self) -> ConvOperator:
        """This operator with its flipped kernel made once and held, never checked against the
        weight again: for a caller's own operator whose weight nothing changes while it lives
        (the check costs ~2 ms a product for 512 channels, a fifth of a 7x7 product)."""
        op = object.__new__(type(self))
        op._init(self._weight, self._geometry, self._is_adjoint, _Token())
        op._token.held = {"flipped": self._flip(self._weight.detach())}
        return op

    # -- read-only state -------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The kernel the operator correlates with: the weight given, or, for an operator made
        with ``flip=True``, that weight flipped in its spatial dims: the operator is the
        cross-correlation (or transposed convolution) with ``op.weight`` and ``flip=False``."""
        return self._weight

    @property
    def geometry(self) -> Geometry:
        """The configuration of the (non-adjoint) layer."""
        return self._geometry

    @property
    def is_adjoint(self) -> bool:
        """Whether this operator is the adjoint of the layer's W."""
        return self._is_adjoint

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        rows, cols = self._geometry.matrix_shape
        return (cols, rows) if self._is_adjoint else (rows, cols)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """``(C, *spatial)`` of one input."""
        return self._shapes()[0]

    @property
    def out_shape(self) -> tuple[int, ...]:
        """``(C, *spatial)`` of one output."""
        return self._shapes()[1]

    def _shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        geo = self._geometry
        shapes = ((geo.in_channels, *geo.input_size), (geo.out_channels, *geo.output_size))
        return (shapes[1], shapes[0]) if self._is_adjoint else shapes

    # -- the adjoint -----------------------------------------------------------------------
    def adjoint(self) -> ConvOperator:
        """The adjoint operator (conjugate transpose), sharing weight and geometry."""
        if self._weight.is_complex():
            return self.with_weight(self._weight.conj()).transpose()
        return self.transpose()

    def transpose(self) -> ConvOperator:
        """The transposed operator, sharing weight and geometry."""
        op = object.__new__(type(self))
        op._init(self._weight, self._geometry, not self._is_adjoint, self._token)
        return op

    H = property(adjoint)
    T = property(transpose)

    def to(self, *args: Any, **kwargs: Any) -> ConvOperator:
        """A new operator with the weight moved or cast (``Tensor.to`` arguments)."""
        return self.with_weight(self._weight.to(*args, **kwargs))

    # -- applying it ---------------------------------------------------------------------------
    def _flipped(self) -> torch.Tensor:
        """The kernel transposed per group and flipped (:meth:`_kept`)."""
        return self._kept("flipped", self._flip)

    def _phased(self) -> torch.Tensor:
        """The polyphase kernel of a strided adjoint (:func:`_polyphase_kernel`, :meth:`_kept`)."""
        return self._kept("polyphase", lambda w: _polyphase_kernel(w, self._geometry.matching_conv))

    def _kept(self, name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``make(weight)``, kept in the engine's cache while the kernel's values equal the
        copy it was made from (whatever changed them), or held by a pinned operator once made.
        Not kept where autograd records it (its graph belongs to one backward pass)."""
        w = self._weight
        if w.requires_grad and torch.is_grad_enabled():
            return make(w)
        held = self._token.held
        if held is not None:
            if name not in held:
                held[name] = make(w.detach())
            return held[name]
        owner = self._token.owner
        key = (FLIPPED_OWNER, owner, name)
        hit: tuple[torch.Tensor, torch.Tensor] | None = lookup(key)
        if hit is not None:
            copy, kernel = hit
            if same_values(copy, w):
                return kernel
        kernel = make(w.detach())
        copy = w.detach().clone()
        store(key, owner, (copy, kernel), tensor_bytes([copy, kernel]))
        return kernel

    def _flip(self, w: torch.Tensor) -> torch.Tensor:
        g, n = self._geometry.groups, self._geometry.ndim
        flipped = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2)
        flipped = flipped.reshape(-1, w.shape[0] // g, *w.shape[2:]).flip(list(range(2, 2 + n)))
        # Contiguous: a convolution with the strided view ran 5x slower (512 channels at 7x7).
        return flipped.contiguous()

    def _apply(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, *in_shape)`` -> ``(B, *out_shape)``."""
        geo = self._geometry
        conv, w = geo.matching_conv, self._weight
        # A transposed layer's W is its matching convolution's W transposed.
        if self._is_adjoint != geo.transposed:
            return _conv_adjoint(conv, w, batch, self._flipped, self._phased)
        return _conv_forward(conv, w, batch)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"op @ x needs x to be a torch.Tensor, got {type(x).__name__}")
        w = self._weight
        if x.dtype != w.dtype:
            raise ConvMatError(
                f"x must have the operator's dtype {w.dtype}, got {x.dtype} (cast one of them: "
                f"x.to({w.dtype}) or op.to({x.dtype}))"
            )
        if x.device != w.device:
            raise ConvMatError(f"x must be on the operator's device {w.device}, got {x.device}")
        rows, cols = self.shape
        if x.shape == (cols,):
            result = self._apply(x.reshape(1, *self.in_shape))
            return result.reshape(rows)
        if x.dim() == 2 and x.shape[1] == cols:
            return self._apply(x.reshape(x.shape[0], *self.in_shape)).reshape(x.shape[0], rows)
        if tuple(x.shape[1:]) == self.in_shape:
            return self._apply(x)
        raise ConvMatError(
            f"x must have shape ({cols},), (B, {cols}) or (B, *{self.in_shape}), got "
            f"{tuple(x.shape)!r}"
        )

    # -- other forms ---------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """W (or W^T for the transpose) as a dense tensor."""
        return self.to_sparse(torch.strided)

    def to_sparse(self, layout: torch.layout = torch.sparse_csr) -> torch.Tensor:
        """W (or its transpose) in ``layout``, built by :mod:`convmat.matrix`."""
        geo = self._geometry
        view = weight_view(self._weight, geo)
        if not self._is_adjoint:
            return assemble(view, geo, layout)
        if layout == torch.strided:
            return assemble(view, geo, layout).T.contiguous()
        transposed = assemble(view, geo, torch.sparse_coo).t().coalesce()
        return transposed if layout == torch.sparse_coo else transposed.to_sparse_csr()

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (numpy in and out) over this operator."""
        from scipy.sparse.linalg import LinearOperator  # type: ignore[import-untyped]

        w = self._weight
        adjoint = self.H

        @torch.no_grad()
        def apply(op: ConvOperator, v: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.ascontiguousarray(v), dtype=w.dtype, device=w.device)
            if t.dim() == 2:  # (cols, k) block of vectors
                return (op @ t.T.contiguous()).T.cpu().numpy()
            return (op @ t).cpu().numpy()

        return LinearOperator(
            self.shape,
            matvec=lambda v: apply(self, v.reshape(-1)),
            rmatvec=lambda v: apply(adjoint, v.reshape(-1)),
            matmat=lambda m: apply(self, m),
            rmatmat=lambda m: apply(adjoint, m),
            dtype=np.dtype(str(w.dtype).replace("torch.", "")),
        )

    def __repr__(self) -> str:
        return f"ConvOperator(shape={self.shape}, adjoint={self._is_adjoint}, {self._geometry})"


def dottest(
    op: ConvOperator, *, tol: float | None = None, seed: int = 0, raise_error: bool = True
) -> bool:
    """The dot test: ``<op x, y> == <x, op.H y>`` for random ``x``, ``y``.

    Args:
        op: the operator.
        tol: relative tolerance (1e-10 in float64 / complex128, 1e-4 otherwise by default).
        seed: of the random vectors.
        raise_error: raise ``ValueError`` on failure (else return False).

    Returns:
        True when the two inner products agree to ``tol`` relative.

    Raises:
        TypeError: ``op`` is not a :class:`ConvOperator`.
        ValueError: the test failed and ``raise_error`` is set, with both values.

    Shape:
        ``x: op.shape[1]``, ``y: op.shape[0]``.

    >>> dottest(ConvOperator(torch.randn(3, 2, 2, 2, dtype=torch.float64), (5, 4), stride=2))
    True
    """
    if not isinstance(op, ConvOperator):
        raise TypeError(
            f"dottest needs op to be a ConvOperator, got {type(op).__name__} (wrap a weight "
            f"with ConvOperator(weight, input_size, ...))"
        )
    w = op.weight
    if not (w.is_floating_point() or w.is_complex()):
        raise ConvMatError(f"dottest needs a floating-point or complex weight, got {w.dtype}")
    gen = torch.Generator(device=w.device).manual_seed(seed)
    x = torch.randn(op.shape[1], dtype=w.dtype, device=w.device, generator=gen)
    y = torch.randn(op.shape[0], dtype=w.dtype, device=w.device, generator=gen)
    left = complex(torch.vdot(y, op @ x).item())
    right = complex(torch.vdot(op.H @ y, x).item())
    if tol is None:
        tol = 1e-10 if w.dtype in (torch.float64, torch.complex128) else 1e-4
    scale = max(abs(left), abs(right), math.ulp(1.0))
    if abs(left - right) <= tol * scale:
        return True
    if raise_error:
        raise ValueError(
            f"dot test failed: <op x, y> = {left}, <x, op.H y> = {right} (relative difference "
            f"{abs(left - right) / scale:.2e} > tol={tol})"
        )
    return False
