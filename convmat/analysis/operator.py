"""A matrix-free linear operator for any convolution convmat supports, with its adjoint.

``op @ x`` runs torch's own convolution; ``op.T @ y`` runs the adjoint: the matching transposed
convolution (output_padding worked out so that its output has the input's size), preceded for
reflect/replicate/circular padding by the adjoint of the padding, which adds the gradient of
every padded copy back onto the input it copies (exactly the folding that W does).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._errors import ConvMatError
from ..engine import (
    Geometry,
    assemble,
    check_weight,
    conv_geometry,
    conv_transpose_geometry,
    flat_pads,
    weight_view,
)

__all__ = ["ConvOperator", "dottest"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class ConvOperator:
    """The convolution (or transposed convolution) as a linear operator, never forming W.

    Args:
        weight: as :func:`convmat.conv_matrix` (or :func:`convmat.conv_transpose_matrix` with
            ``transposed=True``).
        input_size: spatial size of one input.
        transposed: a transposed convolution.
        **config: stride, padding, dilation, groups, padding_mode / output_padding.

    Attributes:
        shape: ``(rows, cols)`` of W.
        in_shape, out_shape: ``(C, *spatial)`` of one input and one output.

    Shape:
        ``op @ x``: ``x`` of shape ``(cols,)``, ``(B, cols)`` or ``(B, *in_shape)``; the result
        has the matching output shape.

    >>> op = ConvOperator(torch.randn(2, 1, 3, dtype=torch.float64), 8, padding=1)
    >>> op.shape, op.in_shape, op.out_shape
    ((16, 8), (1, 8), (2, 8))
    >>> dottest(op)
    True
    """

    def __init__(
        self, weight: torch.Tensor, input_size: Any, *, transposed: bool = False, **config: Any
    ) -> None:
        weight = check_weight(weight)
        make = conv_transpose_geometry if transposed else conv_geometry
        self._setup(weight, make(weight.shape, input_size, **config))

    @classmethod
    def from_module(cls, module: nn.Module, input_size: Any) -> ConvOperator:
        """The operator of an ``nn.Conv*d`` / ``nn.ConvTranspose*d`` (bias excluded)."""
        geo = Geometry.from_module(module, input_size)
        return cls._of(module.weight.detach(), geo)  # type: ignore[union-attr]

    @classmethod
    def _of(cls, weight: torch.Tensor, geo: Geometry) -> ConvOperator:
        """The operator of ``weight`` with an already validated geometry."""
        op = object.__new__(cls)
        op._setup(check_weight(weight), geo)
        return op

    def _setup(self, weight: torch.Tensor, geo: Geometry) -> None:
        self.weight = weight
        self.geometry: Geometry = geo
        self.in_shape = (geo.in_channels, *geo.input_size)
        self.out_shape = (geo.out_channels, *geo.output_size)
        self.shape = geo.matrix_shape
        self._adjoint = False
        self._cache: dict[str, Any] = {}  # shared with the adjoint

    # -- the two directions -------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *in_shape)`` -> ``(B, *out_shape)``."""
        geo, w, n = self.geometry, self.weight, self.geometry.ndim
        if geo.transposed:
            full = _CONV_T[n](x, w, stride=geo.stride, groups=geo.groups, dilation=geo.dilation)
            full = F.pad(full, flat_pads(tuple((0, op) for op in geo.output_padding)))
            return self._crop(full, geo.padding, geo.output_size)
        padded = F.pad(x, geo.pad_args, mode=geo.mode.torch_pad_mode)
        return _CONV[n](padded, w, stride=geo.stride, dilation=geo.dilation, groups=geo.groups)

    def _backward(self, y: torch.Tensor) -> torch.Tensor:
        """The adjoint: ``(B, *out_shape)`` -> ``(B, *in_shape)``."""
        geo, w, n = self.geometry, self.weight, self.geometry.ndim
        if geo.transposed:
            # Adjoint of crop is zero-extension; of the transposed convolution, the convolution.
            grown = F.pad(y, geo.pad_args)
            full = _CONV[n](grown, w, stride=geo.stride, dilation=geo.dilation, groups=geo.groups)
            index = (slice(None), slice(None), *(slice(0, i) for i in geo.input_size))
            return full[index]
        if geo.padding_mode == "zeros" and all(s == 1 for s in geo.stride):
            # Stride 1: the adjoint is a correlation with the flipped, transposed kernel over y
            # padded by d*(k-1) - pad (negative pads crop); often faster than conv_transpose.
            g = geo.groups
            flipped = self._flipped()
            spans = [d * (k - 1) for d, k in zip(geo.dilation, geo.kernel_size)]
            grown = F.pad(
                y, flat_pads(tuple((s - b, s - a) for s, (b, a) in zip(spans, geo.padding)))
            )
            return _CONV[n](grown, flipped, dilation=geo.dilation, groups=g)
        natural = [
            (o - 1) * s + d * (k - 1) + 1
            for o, s, d, k in zip(geo.output_size, geo.stride, geo.dilation, geo.kernel_size)
        ]
        out_pad = [p - q for p, q in zip(geo.padded_size, natural)]
        # output_padding may exceed what conv_transpose accepts; zero-extend instead.
        t = _CONV_T[n](y, w, stride=geo.stride, dilation=geo.dilation, groups=geo.groups)
        t = F.pad(t, flat_pads(tuple((0, p) for p in out_pad)))
        if geo.padding_mode == "zeros":
            return self._crop(t, geo.padding, geo.input_size)
        # The adjoint of reflect/replicate/circular padding, by the vector-Jacobian product of
        # the (linear) padding itself.
        shape = (t.shape[0], geo.in_channels, *geo.input_size)
        probe = torch.zeros(shape, dtype=t.dtype, device=t.device)
        vjp = torch.func.vjp(
            lambda v: F.pad(v, geo.pad_args, mode=geo.padding_mode), probe
        )[1]
        return vjp(t)[0]

    def _flipped(self) -> torch.Tensor:
        """The weight transposed per group and flipped, cached while the weight is unchanged."""
        w, cached = self.weight, self._cache.get("flipped")
        if cached is None or cached[0] is not w or cached[1] != w._version:
            g, n = self.geometry.groups, self.geometry.ndim
            flipped = w.reshape(g, w.shape[0] // g, *w.shape[1:]).transpose(1, 2)
            flipped = flipped.reshape(-1, w.shape[0] // g, *w.shape[2:]).flip(list(range(2, 2 + n)))
            cached = self._cache["flipped"] = (w, w._version, flipped)
        return cached[2]

    @staticmethod
    def _crop(t: torch.Tensor, pads: tuple[tuple[int, int], ...], size: tuple[int, ...]):
        index = (slice(None), slice(None), *(slice(b, b + s) for (b, _), s in zip(pads, size)))
        return t[index]

    # -- public ----------------------------------------------------------------------------------
    @property
    def T(self) -> ConvOperator:
        """The adjoint operator (shares the weight)."""
        adj = object.__new__(ConvOperator)
        adj.__dict__.update(self.__dict__)
        adj._adjoint = not self._adjoint
        adj.shape = (self.shape[1], self.shape[0])
        adj.in_shape, adj.out_shape = self.out_shape, self.in_shape
        return adj

    H = T  # real weights: the adjoint is the transpose

    def to(self, *args: Any, **kwargs: Any) -> ConvOperator:
        """The same operator with its weight moved or cast (``Tensor.to`` arguments)."""
        moved = object.__new__(ConvOperator)
        moved.__dict__.update(self.__dict__)
        moved.weight = self.weight.to(*args, **kwargs)
        moved._cache = {}
        return moved

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ConvMatError(f"op @ x needs a torch.Tensor, got {type(x).__name__}")
        cols = self.shape[1]
        if x.shape == (cols,):
            batch, out = x.reshape(1, *self.in_shape), lambda r: r.reshape(-1)
        elif x.dim() == 2 and x.shape[1] == cols:
            batch, out = x.reshape(-1, *self.in_shape), lambda r: r.reshape(r.shape[0], -1)
        elif tuple(x.shape[1:]) == self.in_shape:
            batch, out = x, lambda r: r
        else:
            raise ConvMatError(
                f"x must have shape ({cols},), (B, {cols}) or (B, *{self.in_shape}), got "
                f"{tuple(x.shape)!r}"
            )
        result = self._backward(batch) if self._adjoint else self._forward(batch)
        return out(result)

    def to_dense(self) -> torch.Tensor:
        """W (or W^T for the adjoint) as a dense tensor."""
        return self.to_sparse(torch.strided)

    def to_sparse(self, layout: torch.layout = torch.sparse_csr) -> torch.Tensor:
        """W (or its adjoint) in ``layout``, built by :mod:`convmat.matrix`."""
        geo = self.geometry
        view = weight_view(self.weight, geo)
        if not self._adjoint:
            return assemble(view, geo, layout)
        if layout == torch.strided:
            return assemble(view, geo, layout).T.contiguous()
        transposed = assemble(view, geo, torch.sparse_coo).t().coalesce()
        return transposed if layout == torch.sparse_coo else transposed.to_sparse_csr()

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (numpy in and out) over this operator."""
        from scipy.sparse.linalg import LinearOperator  # type: ignore[import-untyped]

        w = self.weight

        @torch.no_grad()
        def apply(op: ConvOperator, v: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.ascontiguousarray(v), dtype=w.dtype, device=w.device)
            if t.dim() == 2:  # (cols, k) block of vectors
                return (op @ t.T.contiguous()).T.cpu().numpy()
            return (op @ t).cpu().numpy()

        return LinearOperator(
            self.shape,
            matvec=lambda v: apply(self, v.reshape(-1)),
            rmatvec=lambda v: apply(self.T, v.reshape(-1)),
            matmat=lambda m: apply(self, m),
            rmatmat=lambda m: apply(self.T, m),
            dtype=np.dtype(str(w.dtype).replace("torch.", "")),
        )

    def __repr__(self) -> str:
        return f"ConvOperator(shape={self.shape}, adjoint={self._adjoint}, {self.geometry})"


def dottest(op: ConvOperator, *, tol: float | None = None, seed: int = 0) -> bool:
    """Check ``<op x, y> == <x, op.T y>`` for random ``x``, ``y``.

    Returns:
        True when the two inner products agree to ``tol`` relative (1e-10 in float64, 1e-4 in
        float32 by default); raises ``AssertionError`` with both values otherwise.

    Shape:
        ``x: op.shape[1]``, ``y: op.shape[0]``.

    >>> dottest(ConvOperator(torch.randn(3, 2, 2, 2, dtype=torch.float64), (5, 4), stride=2))
    True
    """
    w = op.weight
    gen = torch.Generator(device=w.device).manual_seed(seed)
    x = torch.randn(op.shape[1], dtype=w.dtype, device=w.device, generator=gen)
    y = torch.randn(op.shape[0], dtype=w.dtype, device=w.device, generator=gen)
    left = torch.dot(op @ x, y).item()
    right = torch.dot(x, op.T @ y).item()
    tol = tol if tol is not None else (1e-10 if w.dtype == torch.float64 else 1e-4)
    scale = max(abs(left), abs(right), math.ulp(1.0))
    assert abs(left - right) <= tol * scale, (
        f"dot test failed: <Ax, y> = {left}, <x, A^T y> = {right}"
    )
    return True
