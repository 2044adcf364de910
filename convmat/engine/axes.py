"""The per-axis rules of a sliding window: which input a tap of an output reads, and the sizes
that follow from it. Every other module asks these (directly, or through
:class:`~convmat.engine.shapes.Geometry`); nothing else writes ``o * s + m * d - before``.

Along one spatial axis a convolution with kernel size ``k``, stride ``s``, dilation ``d`` and
``before`` padded positions at the start reads, through tap ``m`` of output ``o``, the input at

    ``reads(o, m) = o * s + m * d - before``

(a position of the unpadded input: below 0 or past its end it lies in the padding, which the
padding mode maps back inside or drops). A transposed convolution runs the same relation the other
way round: its output ``r`` receives input ``n`` through tap ``m`` exactly when
``reads(n, m) == r`` (:func:`read_by`). The rules are plain arithmetic (``+ - * // %`` and
comparisons), so they take Python ints, numpy arrays and torch integer tensors alike, broadcast as
their arguments do, and need no torch to import.

>>> reads(2, 1, stride=2, dilation=3, before=1)
6
>>> read_by(6, 1, stride=2, dilation=3, before=1)
(2, True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "adaptive_window",
    "coupling_reach",
    "most_reads",
    "natural_size",
    "output_length",
    "read_by",
    "reads",
    "span",
    "tap_reading",
    "transposed_output_length",
]

#: An int, a numpy integer array or a torch integer tensor: the rules broadcast over any of them
#: (the result is of the broadest kind among the arguments).
Index = Any


def reads(output: Index, tap: Index, stride: int, dilation: int, before: int) -> Index:
    """The input position that tap ``tap`` of output ``output`` reads: ``o * s + m * d - before``.

    Args:
        output: output position(s) ``o``.
        tap: kernel tap(s) ``m`` (``0 <= m < kernel``).
        stride: ``s``.
        dilation: ``d``.
        before: padded positions before the input.

    Returns:
        The position in the unpadded input (negative or ``>= size`` where it is padding).

    Shape:
        ``output`` and ``tap`` broadcast: ``(R, 1)`` and ``(1, k)`` give ``(R, k)``.

    >>> import torch
    >>> reads(torch.arange(3)[:, None], torch.arange(2)[None, :], 2, 1, 1)
    tensor([[-1,  0],
            [ 1,  2],
            [ 3,  4]])
    """
    return output * stride + tap * dilation - before


def read_by(
    position: Index, tap: Any, stride: int, dilation: int, before: int
) -> tuple[Index, Any]:
    """The output whose tap ``tap`` reads input ``position`` (the inverse of :func:`reads`):
    ``n = (position + before - m * d) / s``, and whether the division is exact (whether any
    output does; check ``0 <= n < outputs`` beside it).

    This is the rule of a transposed convolution: its output ``r`` receives input ``n`` of the
    transposed layer through tap ``m`` exactly when ``read_by(r, m, ...) == (n, True)``.

    Shape:
        ``position`` and ``tap`` broadcast, as in :func:`reads`; both results have their shape.

    >>> read_by(5, 0, stride=2, dilation=1, before=1)
    (3, True)
    >>> read_by(4, 0, stride=2, dilation=1, before=1)[1]
    False
    """
    num = position + before - tap * dilation
    return num // stride, num % stride == 0


def tap_reading(
    position: Index, output: Any, stride: int, dilation: int, before: int
) -> tuple[Index, Any]:
    """The tap through which output ``output`` reads input ``position`` (:func:`reads` solved
    for the tap): ``m = (position + before - o * s) / d``, and whether the division is exact
    (check ``0 <= m < kernel`` beside it).

    Shape:
        ``position`` and ``output`` broadcast, as in :func:`reads`.

    >>> tap_reading(6, 2, stride=2, dilation=3, before=1)
    (1, True)
    """
    num = position + before - output * stride
    return num // dilation, num % dilation == 0


def span(kernel: int, dilation: int) -> int:
    """How far the last tap of a window lies from its first: ``d * (k - 1)``.

    >>> span(3, 2)
    4
    """
    return dilation * (kernel - 1)


def natural_size(outputs: int, kernel: int, stride: int, dilation: int) -> int:
    """The padded length that ``outputs`` windows read, from the first padded position to the
    last one read: ``(outputs - 1) * s + d * (k - 1) + 1`` (the padded input may be longer; its
    tail is read by no window).

    Shape:
        one axis: an int.

    >>> natural_size(4, 3, stride=2, dilation=1)
    9
    """
    return (outputs - 1) * stride + span(kernel, dilation) + 1


def output_length(
    size: int, kernel: int, stride: int, dilation: int, before: int, after: int
) -> int:
    """How many windows fit in the padded input: the output size of a convolution along one axis
    (Dumoulin & Visin, relationship 6). The caller checks that one window fits.

    Shape:
        ``out = floor((size + before + after - d * (k - 1) - 1) / s) + 1``

    >>> output_length(10, 3, stride=2, dilation=1, before=0, after=0)
    4
    """
    return (size + before + after - span(kernel, dilation) - 1) // stride + 1


def transposed_output_length(
    size: int, kernel: int, stride: int, dilation: int, before: int, after: int, output_padding: int
) -> int:
    """The output size of a transposed convolution along one axis (Dumoulin & Visin, relationship
    14): the input size of its matching convolution. The caller checks that it is >= 1.

    Shape:
        ``out = (size - 1) * s - before - after + d * (k - 1) + output_padding + 1``

    >>> transposed_output_length(4, 3, stride=2, dilation=1, before=0, after=0, output_padding=0)
    9
    """
    return natural_size(size, kernel, stride, dilation) - before - after + output_padding


def coupling_reach(
    kernel: int, stride: int, dilation: int, side: Literal["input", "output"]
) -> int:
    """How far apart two positions of one side can be and still meet a common position of the
    other side (the band of the Gram matrix ``W^T W`` for ``"input"``, ``W W^T`` for
    ``"output"``), padding aside: two inputs read by one output are at most ``d * (k - 1)`` apart;
    two outputs that read one input at most ``d * (k - 1) // s``.

    >>> coupling_reach(3, 2, 2, "input"), coupling_reach(3, 2, 2, "output")
    (4, 2)
    """
    reach = span(kernel, dilation)
    return reach if side == "input" else reach // stride


def adaptive_window(output: Index, size: int, outputs: int) -> tuple[Index, Index]:
    """The window ``[start, end)`` of output ``output`` of an adaptive pooling of ``size``
    inputs into ``outputs`` (torch's rule):
    ``[floor(o * size / outputs), ceil((o + 1) * size / outputs))``.

    Shape:
        both ends have the shape of ``output``.

    >>> adaptive_window(1, 5, 3)
    (1, 4)
    """
    return output * size // outputs, -((-(output + 1) * size) // outputs)


def most_reads(positions: torch.Tensor, size: int) -> int:
    """The most times any one of ``size`` input positions occurs in ``positions`` (the reads of
    every window, those outside ``0 .. size - 1`` ignored): how many windows share one input at
    most; 0 when none is read.

    Shape:
        ``positions``: any shape of integers.

    >>> import torch
    >>> most_reads(reads(torch.arange(4)[:, None], torch.arange(3), 1, 1, 1), 4)
    3
    """
    import torch  # here: the rules above need no torch

    p = positions.reshape(-1)
    p = p[(p >= 0) & (p < size)]
    return int(torch.bincount(p, minlength=size).max()) if p.numel() else 0
