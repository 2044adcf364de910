"""Singular values and operator norms of convolution layers, exact where a method allows.

- Circular padding whose windows tile the input (``output * stride == input``): the exact FFT
  method (Sedghi, Gupta & Long 2019), extended to stride > 1 by splitting the input into its
  ``stride`` polyphase components (Senderovich et al. 2022): the layer becomes a stride-1
  circular convolution with ``C_in * prod(stride)`` input channels on the smaller torus, whose
  singular values are those of one ``C_out x C_in * prod(stride)`` matrix per frequency.
- Otherwise: the dense SVD of W where W is small, and an iterative method (Lanczos through
  ``scipy.sparse.linalg.svds`` on the matrix-free operator) for the top ``k`` where it is large.

:func:`operator_norm` returns the largest singular value with a certified interval: the lower
end is ``||W v|| / ||v||`` for the computed vector (true for any vector), the upper end the exact
norm of a circular convolution that contains W as a block (zero padding) or that does after the
padding, times the padding's own norm (reflect/replicate/circular).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._errors import ConvMatError
from ._pattern import get_pattern
from .operator import ConvOperator
from .shapes import Geometry

__all__ = ["NormResult", "operator_norm", "singular_values"]

#: Above this many entries W is not formed densely for an SVD.
DENSE_LIMIT = 4096 * 4096


def _torus_singular_values(
    weight: torch.Tensor,
    groups: int,
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    before: tuple[int, ...],
    torus: tuple[int, ...],
) -> torch.Tensor:
    """All singular values of ``y[o, n] = sum w[o, c, m] x[c, (n*s + m*d - before) mod N]`` for
    ``n < N / s``, by polyphase components and one FFT (descending)."""
    n_dims = len(torus)
    c_out, cin_g, *kernel = weight.shape
    small = tuple(t // s for t, s in zip(torus, stride))
    phases = math.prod(stride)
    # Every tap's offset q = m*d - before = s*t + r: phase r, shift t on the small torus.
    offsets = [torch.arange(k) * d - b for k, d, b in zip(kernel, dilation, before)]
    grids = torch.meshgrid(*offsets, indexing="ij")
    r_flat = torch.zeros((), dtype=torch.long)
    t_flat = torch.zeros((), dtype=torch.long)
    for q, s, m in zip(grids, stride, small):
        r_flat = r_flat * s + torch.remainder(q, s)
        t_flat = t_flat * m + torch.remainder(torch.div(q, s, rounding_mode="floor"), m)
    column = (r_flat * math.prod(small) + t_flat).reshape(-1)
    w = weight.to(torch.float64 if not weight.is_complex() else torch.complex128)
    w = w.reshape(groups, c_out // groups, cin_g, -1)
    poly = w.new_zeros(groups, c_out // groups, cin_g, phases * math.prod(small))
    poly.index_add_(3, column.to(w.device), w)
    poly = poly.reshape(groups, c_out // groups, cin_g * phases, *small)
    spectrum = torch.fft.fftn(poly, dim=tuple(range(3, 3 + n_dims)))
    per_freq = spectrum.reshape(groups, c_out // groups, cin_g * phases, -1).permute(0, 3, 1, 2)
    values = torch.linalg.svdvals(per_freq).reshape(-1)
    return torch.sort(values, descending=True).values


def _exact_torus(geo: Geometry) -> bool:
    return (
        not geo.transposed
        and geo.padding_mode == "circular"
        and all(o * s == i for o, s, i in zip(geo.output_size, geo.stride, geo.input_size))
    )


def _conv_view(op: ConvOperator) -> tuple[torch.Tensor, Geometry]:
    """The weight as a convolution's ``(C_out, C_in/g, k)`` and the convolution's geometry
    (for a transposed layer: the matching convolution, whose W^T it is)."""
    geo = op.geometry
    if not geo.transposed:
        return op.weight, geo
    conv = Geometry(
        False, geo.out_channels, geo.in_channels, geo.groups, geo.output_size, geo.input_size,
        geo.kernel_size, geo.stride, geo.dilation, geo.padding,
    )  # fmt: skip
    return op.weight, conv


def _upper_bound(op: ConvOperator) -> float:
    """A certified upper bound on ``||W||_2`` (exact norms of circular convolutions)."""
    weight, geo = _conv_view(op)
    if _exact_torus(geo):
        before = tuple(b for b, _ in geo.padding)
        values = _torus_singular_values(
            weight, geo.groups, geo.stride, geo.dilation, before, geo.input_size
        )
        return float(values[0])
    # W reads the padded input through windows that fit in it; on a torus at least as large as
    # the padded input (and a multiple of the stride) no window wraps, so W (after the padding)
    # is a block of that circular convolution.
    padded = [i + b + a for i, (b, a) in zip(geo.input_size, geo.padding)]
    torus = tuple(s * max(o, -(-p // s)) for s, o, p in zip(geo.stride, geo.output_size, padded))
    bound = float(_torus_singular_values(weight, geo.groups, geo.stride, geo.dilation,
                                         (0,) * geo.ndim, torus)[0])  # fmt: skip
    if geo.padding_mode != "zeros":
        # times ||Pad||: sqrt of the most copies any input has in the padded input.
        copies = 1
        for i, (b, a) in zip(geo.input_size, geo.padding):
            counts = torch.zeros(i)
            p = torch.arange(-b, i + a)
            if geo.padding_mode == "reflect":
                p = torch.where(p < 0, -p, torch.where(p >= i, 2 * (i - 1) - p, p))
            elif geo.padding_mode == "replicate":
                p = p.clamp(0, i - 1)
            else:
                p = p % i
            counts.index_add_(0, p, torch.ones(p.numel()))
            copies *= int(counts.max())
        bound *= math.sqrt(copies)
    return bound


def _dense_ok(op: ConvOperator) -> bool:
    """Small enough for a dense SVD (or too small for Lanczos, which needs k < min(shape))."""
    return op.shape[0] * op.shape[1] <= DENSE_LIMIT or min(op.shape) < 3


def _is_zero(op: ConvOperator) -> bool:
    """W is the zero matrix (a zero weight, or every tap reads padding or is cropped away)."""
    return not bool(op.weight.any()) or get_pattern(op.geometry, torch.device("cpu")).nnz == 0


def _operator(source: Any, input_size: Any, config: dict[str, Any]) -> ConvOperator:
    if isinstance(source, ConvOperator):
        return source
    if isinstance(source, nn.Module):
        return ConvOperator.from_module(source, input_size)
    return ConvOperator(source, input_size, **config)


def singular_values(
    weight: Any, input_size: Any = None, *, k: int | None = None, **config: Any
) -> torch.Tensor:
    """Singular values of a convolution layer, descending (all, or the top ``k``).

    Args:
        weight: the weight (with ``**config`` as for :func:`convmat.conv_matrix`, plus
            ``transposed=True`` for a transposed convolution), a conv module, or a
            :class:`~convmat.ConvOperator`.
        input_size: spatial size of one input.
        k: only the ``k`` largest.

    Returns:
        float64 tensor on the CPU.

    Raises:
        ConvMatError: for all values of a W too large to form (ask for ``k``).

    Shape:
        ``(min(rows, cols),)`` or ``(k,)``.

    >>> w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    >>> fft = singular_values(w, (8, 8), padding=1, padding_mode="circular")
    >>> from convmat import conv_matrix
    >>> W = conv_matrix(w, (8, 8), padding=1, padding_mode="circular")
    >>> torch.allclose(fft, torch.linalg.svdvals(W), atol=1e-10)
    True
    """
    op = _operator(weight, input_size, config)
    geo = op.geometry
    count = min(op.shape)
    if k is not None and not 1 <= k <= count:
        raise ConvMatError(f"k must be between 1 and {count}, got {k!r}")
    if _exact_torus(geo):
        values = _torus_singular_values(op.weight.detach().cpu(), geo.groups, geo.stride,
                                        geo.dilation, tuple(b for b, _ in geo.padding),
                                        geo.input_size)  # fmt: skip
    elif _dense_ok(op):
        dense = op.to_dense().detach().to(torch.float64).cpu()
        values = torch.linalg.svdvals(dense)
    else:
        if k is None:
            raise ConvMatError(
                f"W is {op.shape[0]} x {op.shape[1]}: too large for all its singular values "
                f"without an exact method; ask for the top k"
            )
        from scipy.sparse.linalg import svds  # type: ignore[import-untyped]

        if _is_zero(op):
            values = torch.zeros(k, dtype=torch.float64)
        else:
            top = svds(op.to_scipy(), k=k, return_singular_vectors=False, tol=1e-12)
            values = torch.sort(torch.as_tensor(top.copy(), dtype=torch.float64), descending=True)[
                0
            ]
    return values if k is None else values[:k]


@dataclass(frozen=True)
class NormResult:
    """The operator norm with a certified interval ``lower <= norm <= upper``."""

    value: float
    lower: float
    upper: float
    method: str

    def __float__(self) -> float:
        return self.value


def operator_norm(
    source: Any, input_size: Any = None, *, tol: float = 1e-10, **config: Any
) -> NormResult:
    """The largest singular value of a convolution layer, with a certified interval.

    Exact methods (FFT, dense SVD) give an interval of rounding width; otherwise the value is
    Lanczos' to ``tol``, the lower end the Rayleigh quotient of its vector and the upper end a
    circular-convolution bound (see the module doc).

    Args:
        source: a weight (with ``**config``), a conv module, or a ConvOperator.
        input_size: spatial size of one input.
        tol: tolerance of the iterative method.

    Returns:
        :class:`NormResult`.

    Shape:
        a scalar.

    >>> r = operator_norm(nn.Conv2d(2, 2, 3, padding=1).double(), (6, 6))
    >>> r.lower <= r.value <= r.upper
    True
    """
    op = _operator(source, input_size, config)
    geo = op.geometry
    if _exact_torus(geo) or _dense_ok(op):
        value = float(singular_values(op, k=1)[0])
        slack = 1e-12 * max(value, 1.0)
        method = "fft" if _exact_torus(geo) else "dense svd"
        return NormResult(value, value - slack, value + slack, method)
    from scipy.sparse.linalg import svds

    if _is_zero(op):  # every tap reads padding: W = 0 (Lanczos cannot start)
        return NormResult(0.0, 0.0, 0.0, "zero")
    A = op.to_scipy()
    _, s, vt = svds(A, k=1, tol=tol)
    v = torch.as_tensor(vt[0].copy(), dtype=torch.float64)
    w64 = op.to("cpu", torch.float64)
    w64.weight = w64.weight.detach()
    lower = float((w64 @ v).norm() / v.norm())
    upper = max(_upper_bound(w64), lower)
    return NormResult(float(s[0]), lower, upper, "lanczos")
