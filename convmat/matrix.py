"""The matrix W of a convolution: ``conv(x).flatten() == W @ x.flatten()``.

Pure functions over tensors: each normalises its arguments into a
:class:`~convmat.engine.Geometry` and asks the engine to assemble W (the index pattern is cached
per configuration and device; only the kernel values are gathered).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._errors import ConvMatError
from ._typing import IntOrTuple, PaddingArg, PaddingMode
from .engine import (
    Geometry,
    assemble,
    check_flip,
    check_int,
    check_weight,
    conv_geometry,
    conv_transpose_geometry,
    oriented,
)
from .engine import weight_view as _weight_view

__all__ = ["conv2d_as_conv1d", "conv_matrix", "conv_transpose_matrix", "to_matrix"]


def conv_matrix(
    weight: torch.Tensor,
    input_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: PaddingMode = "zeros",
    layout: torch.layout = torch.strided,
    flip: bool = False,
) -> torch.Tensor:
    """The matrix W of ``torch.nn.functional.conv{1,2,3}d`` for one input size.

    For any ``x`` of shape ``(B, C_in, *input_size)``,
    ``nn.Conv{N}d(...)(x).reshape(B, -1) == x.reshape(B, -1) @ W.T`` (bias excluded).
    Non-zero padding modes fold into W: taps that land on the same input add up.
    Gradients flow from W back to ``weight`` in every layout, to any order: a sparse W's
    backward gathers the incoming gradient at W's non-zeros with a differentiable gather, so
    second derivatives equal the dense layout's wherever torch's operation on W has them
    (``W @ x`` and ``W.to_dense()`` in both sparse layouts; torch's own ``torch.sparse.mm`` of a
    CSR matrix has none).

    Args:
        weight: ``(C_out, C_in // groups, *kernel)``; 1, 2 or 3 kernel dims.
        input_size: spatial size of one input, an int or one int per dimension.
        stride: step between windows.
        padding: an int, a tuple of ints, ``"valid"``, ``"same"`` (stride 1; the odd extra zero
            goes to the end) or one ``(before, after)`` pair per dimension.
        dilation: spacing between kernel taps.
        groups: blocked connections from input to output channels.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        layout: ``torch.strided`` (dense), ``torch.sparse_coo`` (coalesced) or ``torch.sparse_csr``.
            The sparse layouts share their index tensors with a per-configuration cache.
        flip: ``False`` (default) for the cross-correlation torch computes,
            ``y[n] = sum_m x[n + m] w[m]``; ``True`` for the true convolution, whose kernel is
            flipped, ``y[n] = sum_m x[n + k - 1 - m] w[m]``: ``conv_matrix(w, ..., flip=True) ==
            conv_matrix(w.flip(spatial dims), ...)``. With padding ``k - 1`` on both sides it is
            ``numpy.convolve(x, w, "full")``, with none ``"valid"``, and with ``(k // 2,
            (k - 1) // 2)`` ``"same"`` (scipy's centring, per dimension).

    Returns:
        W, with the dtype and device of ``weight``; rows and columns in C order of
        ``(channels, *spatial)``.

    Raises:
        ConvMatError: for any configuration torch rejects, or a W larger than free memory.

    Shape:
        ``W: (C_out * prod(out), C_in * prod(input_size))`` with
        ``out = floor((in + pad_before + pad_after - dilation * (k - 1) - 1) / stride) + 1``.

    >>> w = torch.tensor([[[1.0, 2.0, 3.0]]])
    >>> conv_matrix(w, 5)
    tensor([[1., 2., 3., 0., 0.],
            [0., 1., 2., 3., 0.],
            [0., 0., 1., 2., 3.]])
    >>> conv_matrix(w, 5, stride=2, padding=1)
    tensor([[2., 3., 0., 0., 0.],
            [0., 1., 2., 3., 0.],
            [0., 0., 0., 1., 2.]])
    >>> conv_matrix(w, 3, padding=1, padding_mode="circular")
    tensor([[2., 3., 1.],
            [1., 2., 3.],
            [3., 1., 2.]])
    >>> conv_matrix(w, 5, flip=True)
    tensor([[3., 2., 1., 0., 0.],
            [0., 3., 2., 1., 0.],
            [0., 0., 3., 2., 1.]])
    """
    weight = check_weight(weight)
    check_flip(flip)
    geo = conv_geometry(
        weight.shape,
        input_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
    return assemble(_weight_view(oriented(weight, flip), geo), geo, layout)


def conv_transpose_matrix(
    weight: torch.Tensor,
    input_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
    layout: torch.layout = torch.strided,
    flip: bool = False,
) -> torch.Tensor:
    """The matrix of ``torch.nn.functional.conv_transpose{1,2,3}d`` for one input size.

    It is the transpose of the :func:`conv_matrix` of the matching convolution (same weight,
    stride, padding and dilation, applied to an input of this layer's output size): the
    transposed convolution is the adjoint of that convolution.

    Args:
        weight: ``(C_in, C_out // groups, *kernel)``; 1, 2 or 3 kernel dims.
        input_size: spatial size of one input, an int or one int per dimension.
        stride: stride of the matching convolution.
        padding: an int, a tuple of ints, ``"valid"`` or one ``(before, after)`` pair per dimension.
        output_padding: size added to the end of each dimension,
            ``0 <= output_padding < max(stride, dilation)`` as torch requires.
        groups: blocked connections from input to output channels.
        dilation: spacing between kernel taps.
        layout: ``torch.strided``, ``torch.sparse_coo`` or ``torch.sparse_csr``.
        flip: ``True`` for the kernel flipped in its spatial dimensions (the transpose of the
            true convolution's matrix): ``conv_transpose_matrix(w, ..., flip=True) ==
            conv_transpose_matrix(w.flip(spatial dims), ...)``, as in :func:`conv_matrix`.

    Returns:
        W with the dtype and device of ``weight``.

    Raises:
        ConvMatError: for any configuration torch rejects, or a W larger than free memory.

    Shape:
        ``W: (C_out * prod(out), C_in * prod(input_size))`` with ``out = (in - 1) * stride
        - pad_before - pad_after + dilation * (k - 1) + output_padding + 1``.

    >>> w = torch.tensor([[[1.0, 2.0, 3.0]]])
    >>> conv_transpose_matrix(w, 2, stride=2)
    tensor([[1., 0.],
            [2., 0.],
            [3., 1.],
            [0., 2.],
            [0., 3.]])
    >>> conv_transpose_matrix(w, 2, stride=2, flip=True)[:, 0]
    tensor([3., 2., 1., 0., 0.])
    """
    weight = check_weight(weight)
    check_flip(flip)
    geo = conv_transpose_geometry(
        weight.shape,
        input_size,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
    )
    return assemble(_weight_view(oriented(weight, flip), geo), geo, layout)


def to_matrix(
    module: nn.Module, input_size: IntOrTuple, *, layout: torch.layout = torch.strided
) -> torch.Tensor:
    """W of an ``nn.Conv{1,2,3}d`` or ``nn.ConvTranspose{1,2,3}d``, honouring all its settings.

    The bias is not part of W: ``module(x).flatten(1) == x.flatten(1) @ W.T + bias`` spread
    over positions.

    Args:
        module: the convolution layer.
        input_size: spatial size of one input.
        layout: ``torch.strided``, ``torch.sparse_coo`` or ``torch.sparse_csr``.

    Returns:
        W with the dtype and device of ``module.weight``.

    Shape:
        as :func:`conv_matrix` or :func:`conv_transpose_matrix`.

    >>> conv = nn.Conv1d(1, 1, 3, padding=1, padding_mode="reflect", bias=False).double()
    >>> x = torch.randn(2, 1, 6, dtype=torch.float64)
    >>> W = to_matrix(conv, 6)
    >>> torch.allclose(conv(x).flatten(1), x.flatten(1) @ W.T, atol=1e-12)
    True
    """
    geo = Geometry.from_module(module, input_size)
    weight = check_weight(module.weight)
    return assemble(_weight_view(weight, geo), geo, layout)


def _as_size(value: object) -> int:
    """``value`` as an int where it is one (else 1: the checks that follow name it)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def conv2d_as_conv1d(
    weight: torch.Tensor,
    input_height: int,
    *,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    dilation: IntOrTuple = 1,
) -> torch.Tensor:
    """The Conv1d weight that computes a 2-D convolution with the image rows as channels.

    A ``(C_out, C_in, kh, kw)`` kernel over an ``H x W`` image becomes a 1-D kernel sliding along
    the width; its input channels are the ``C_in * H`` (channel, row) pairs and its output
    channels the ``C_out * H_out`` (channel, output row) pairs. The height-direction stride,
    padding and dilation are folded into which rows each output channel reads (the height
    matrix of :func:`conv_matrix`); the width-direction ones stay with ``F.conv1d``. Only zero
    padding in height has this form. A 2-tuple argument is ``(height, width)``; only its height
    part is used here.

    Args:
        weight: ``(C_out, C_in, kh, kw)``.
        input_height: ``H``.
        stride, padding, dilation: of the 2-D convolution (the height part is used).

    Returns:
        The Conv1d weight, same dtype and device; differentiable in ``weight``.

    Shape:
        ``(C_out * H_out, C_in * H, kw)`` with ``H_out`` from :func:`conv_output_size`.

    >>> import torch.nn.functional as F
    >>> x = torch.arange(1.0, 21.0, dtype=torch.float64).view(1, 1, 4, 5)
    >>> w = torch.arange(1, 10, dtype=torch.float64).view(1, 1, 3, 3) / 10
    >>> w1 = conv2d_as_conv1d(w, 4)
    >>> F.conv1d(x.view(1, 4, 5), w1).view(2, 3)
    tensor([[41.1000, 45.6000, 50.1000],
            [63.6000, 68.1000, 72.6000]], dtype=torch.float64)
    >>> F.conv2d(x, w).view(2, 3)
    tensor([[41.1000, 45.6000, 50.1000],
            [63.6000, 68.1000, 72.6000]], dtype=torch.float64)
    """
    weight = check_weight(weight)
    if weight.dim() != 4:
        raise ConvMatError(
            f"weight must be a 2-D convolution's (C_out, C_in, kh, kw), got shape "
            f"{tuple(weight.shape)!r}"
        )
    c_out, c_in, kh, kw = weight.shape
    input_height = check_int(input_height, "input_height")
    if input_height < 1:
        raise ConvMatError(f"input_height must be >= 1, got {input_height!r}")
    if isinstance(padding, str):
        raise ConvMatError(f"padding must be an int or a (height, width) tuple, got {padding!r}")

    def pair(value: Any, name: str) -> tuple[Any, Any]:
        if isinstance(value, tuple | list):
            if len(value) != 2:
                raise ConvMatError(
                    f"{name} must be an int or a (height, width) tuple, got {value!r}"
                )
            return value[0], value[1]
        return value, value

    parts = [pair(v, n) for v, n in ((stride, "stride"), (padding, "padding"),
                                      (dilation, "dilation"))]  # fmt: skip
    # The whole 2-D configuration is checked as conv_matrix would check it (the width part
    # included), on the narrowest input width the kernel fits in.
    width = _as_size(parts[2][1]) * (kw - 1) + 1
    conv_geometry(weight.shape, (input_height, width), stride=stride, padding=padding,
                  dilation=dilation)  # fmt: skip
    height = [p[0] for p in parts]  # the height-direction stride, padding, dilation
    # Rows (co, kw, h_out) x columns (ci, h): the height matrix of every kernel column.
    columns = weight.permute(0, 3, 1, 2).reshape(c_out * kw, c_in, kh)
    rows = conv_matrix(
        columns,
        input_height,
        stride=height[0],
        padding=(height[1],),
        dilation=height[2],
    )
    h_out = rows.shape[0] // (c_out * kw)
    per = rows.view(c_out, kw, h_out, c_in * input_height).permute(0, 2, 3, 1)
    return per.reshape(c_out * h_out, c_in * input_height, kw)
