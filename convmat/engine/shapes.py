"""Every shape rule of the package: argument normalisation, output sizes and padding forms.

Other modules ask this one; nothing else derives an output size, a padded size or a module's
configuration. The public entry points validate their arguments and return a frozen
:class:`Geometry` that everything else (the index arithmetic, the layers, the operator, the
spectra, the pictures) takes as its description of a convolution. :meth:`Geometry.from_module`
is the one place a module is read.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._errors import ConvMatError
from .._typing import IntOrTuple, PaddingArg, Pads
from . import axes
from .padding import PADDING_MODES, PaddingMode
from .padding import padding_mode as _mode

if TYPE_CHECKING:
    import torch

__all__ = [
    "Geometry",
    "check_count",
    "check_int",
    "check_shape",
    "conv_geometry",
    "conv_output_size",
    "conv_transpose_geometry",
    "conv_transpose_output_size",
    "output_padding_for",
    "plain_conv_problem",
    "same_padding",
]


@dataclass(frozen=True)
class Geometry:
    """A validated, normalised convolution configuration (hashable, used as a cache key).

    Sizes are spatial (no batch, no channels). For a transposed convolution ``input_size`` and
    ``output_size`` are those of the transposed layer itself, and ``padding`` holds the pads of
    the matching (adjoint) convolution.
    """

    transposed: bool
    in_channels: int
    out_channels: int
    groups: int
    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: Pads
    padding_mode: str = "zeros"
    output_padding: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions."""
        return len(self.input_size)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out_channels * prod(output_size), in_channels * prod(input_size))``."""
        return (
            self.out_channels * math.prod(self.output_size),
            self.in_channels * math.prod(self.input_size),
        )

    @property
    def mode(self) -> PaddingMode:
        """The padding mode object (its index map, its name in ``F.pad``)."""
        return PADDING_MODES[self.padding_mode]

    @property
    def padded_size(self) -> tuple[int, ...]:
        """Spatial size of the padded input of a convolution: ``in + before + after``."""
        return tuple(i + b + a for i, (b, a) in zip(self.input_size, self.padding))

    @property
    def pad_args(self) -> list[int]:
        """The padding as ``torch.nn.functional.pad`` takes it (last dimension first)."""
        return flat_pads(self.padding)

    @property
    def matching_conv(self) -> Geometry:
        """The convolution whose W is this transposed convolution's W transposed (its
        adjoint); a convolution is its own."""
        if not self.transposed:
            return self
        return Geometry(
            False, self.out_channels, self.in_channels, self.groups, self.output_size,
            self.input_size, self.kernel_size, self.stride, self.dilation, self.padding,
        )  # fmt: skip

    # -- the per-axis rules (engine/axes.py), asked of this geometry ----------------------------

    @property
    def spans(self) -> tuple[int, ...]:
        """How far the last tap of a window lies from its first, per dimension: ``d * (k - 1)``.

        >>> conv_geometry((1, 1, 3), 8, dilation=2).spans
        (4,)
        """
        return tuple(axes.span(k, d) for k, d in zip(self.kernel_size, self.dilation))

    @property
    def natural_size(self) -> tuple[int, ...]:
        """The padded length the windows of a convolution read, per dimension:
        ``(out - 1) * s + d * (k - 1) + 1`` (``padded_size`` may be longer; no window reads the
        rest). For a transposed geometry, that of its input as the matching convolution's output.

        Shape:
            ``natural[d] <= padded_size[d]``.

        >>> conv_geometry((1, 1, 3), 10, stride=2).natural_size, (10,)
        ((9,), (10,))
        """
        conv = self.matching_conv
        return tuple(
            axes.natural_size(o, k, s, d)
            for o, k, s, d in zip(conv.output_size, conv.kernel_size, conv.stride, conv.dilation)
        )

    def reads(self, dim: int, output: Any, tap: Any) -> Any:
        """The input position (of the matching convolution, unpadded) that tap ``tap`` of output
        ``output`` reads along dimension ``dim``: ``o * s + m * d - before``
        (:func:`convmat.engine.axes.reads`; ints, numpy arrays or torch tensors, broadcast).

        >>> conv_geometry((1, 1, 3), 8, stride=2, padding=1).reads(0, 3, 2)
        7
        """
        return axes.reads(output, tap, self.stride[dim], self.dilation[dim], self.padding[dim][0])

    def taps(
        self, dim: int, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The input position each tap of each output position adds into along dimension
        ``dim``, and whether it adds into any: the padding mode maps a padded position to the
        input it copies (zero padding drops it); a transposed convolution's output ``r``
        receives input ``n`` through tap ``m`` where the matching convolution's output ``n``
        reads ``r`` through it (:func:`convmat.engine.axes.read_by`).

        Args:
            dim: the spatial dimension.
            positions: output positions (int64); every one by default.

        Returns:
            ``(input position, valid)``, where the position is meaningful only where valid.

        Shape:
            both ``(len(positions), kernel_size[dim])``.

        >>> geo = conv_geometry((1, 1, 3), 4, padding=1, padding_mode="reflect")
        >>> geo.taps(0)[0]
        tensor([[1, 0, 1],
                [0, 1, 2],
                [1, 2, 3],
                [2, 3, 2]])
        """
        import torch  # here: the shape rules need no torch

        k, s, d = self.kernel_size[dim], self.stride[dim], self.dilation[dim]
        before, size = self.padding[dim][0], self.input_size[dim]
        if positions is None:
            positions = torch.arange(self.output_size[dim], dtype=torch.int64)
        r = positions[:, None]
        m = torch.arange(k, dtype=torch.int64)[None, :]
        if self.transposed:
            n, exact = axes.read_by(r, m, s, d, before)
            return n, exact & (n >= 0) & (n < size)
        p, valid = self.mode.source(axes.reads(r, m, s, d, before), size)
        return p, torch.ones_like(p, dtype=torch.bool) if valid is None else valid

    def gram_reach(self, side: Literal["input", "output"]) -> tuple[int, ...]:
        """How far apart two positions of ``side`` (of this convolution) can be and still share
        a position of the other side through zero padding, per dimension, at most the side's
        size less one: the half-bandwidth of ``W^T W`` (``"input"``) or ``W W^T`` (``"output"``).

        >>> conv_geometry((1, 1, 5), 9, stride=2).gram_reach("output")
        (2,)
        """
        size = self.input_size if side == "input" else self.output_size
        return tuple(
            min(axes.coupling_reach(k, s, d, side), n - 1)
            for k, s, d, n in zip(self.kernel_size, self.stride, self.dilation, size)
        )

    @property
    def index_bound(self) -> int:
        """A bound on every position and numerator the per-axis rules compute for this geometry
        (``|o * s + m * d - before|`` and ``|r + before - m * d|``, on either side), to check
        that they stay far inside int64.

        >>> conv_geometry((1, 1, 3), 8).index_bound
        17
        """
        bound: int = max(
            (i + o) * s + k * d + b + a
            for i, o, s, k, d, (b, a) in zip(self.input_size, self.output_size, self.stride,
                                             self.kernel_size, self.dilation, self.padding)
        )  # fmt: skip
        return bound

    @classmethod
    def from_channels(
        cls,
        input_size: IntOrTuple,
        kernel_size: IntOrTuple,
        *,
        in_channels: int = 1,
        out_channels: int = 1,
        groups: int = 1,
        stride: IntOrTuple = 1,
        padding: PaddingArg = 0,
        dilation: IntOrTuple = 1,
        padding_mode: str = "zeros",
        transposed: bool = False,
        output_padding: IntOrTuple = 0,
    ) -> Geometry:
        """The geometry of a configuration given by its channel counts (no weight), with the
        weight shape it implies (``(C_out, C_in // groups, *kernel)``, or ``(C_in, C_out //
        groups, *kernel)`` transposed). The number of spatial dimensions is that of the longer
        of ``input_size`` and ``kernel_size``.

        Raises:
            ConvMatError: a count that is not an int >= 1, channels not divisible by ``groups``,
                or anything :func:`conv_geometry` / :func:`conv_transpose_geometry` refuse.

        Shape:
            ``matrix_shape = (out_channels * prod(output_size), in_channels * prod(input_size))``

        >>> Geometry.from_channels(6, 3, in_channels=2, out_channels=4, groups=2).matrix_shape
        (16, 12)
        """
        if not isinstance(transposed, bool):
            raise ConvMatError(f"transposed must be True or False, got {transposed!r}")
        in_channels = check_count(in_channels, "in_channels")
        out_channels = check_count(out_channels, "out_channels")
        groups = check_count(groups, "groups")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value % groups:
                raise ConvMatError(
                    f"{name} must be divisible by groups, got {name}={value} with groups={groups}"
                )
        n = max(len(v) if isinstance(v, tuple | list) else 1 for v in (input_size, kernel_size))
        k = ntuple(kernel_size, n, "kernel_size", 1)
        if transposed:
            return conv_transpose_geometry(
                (in_channels, out_channels // groups, *k), input_size, stride=stride,
                padding=padding, output_padding=output_padding, groups=groups, dilation=dilation,
            )  # fmt: skip
        return conv_geometry(
            (out_channels, in_channels // groups, *k), input_size, stride=stride,
            padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode,
        )  # fmt: skip

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight: ``(C_out, C_in // groups, *kernel)``, or transposed
        ``(C_in, C_out // groups, *kernel)``.

        >>> Geometry.from_channels(6, 3, in_channels=2, out_channels=4).weight_shape
        (4, 2, 3)
        """
        if self.transposed:
            return (self.in_channels, self.out_channels // self.groups, *self.kernel_size)
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @classmethod
    def from_module(
        cls, module: Any, input_size: IntOrTuple, *, path: str = "", output_padding: Any = None
    ) -> Geometry:
        """The geometry of a convolution layer on inputs of spatial size ``input_size``.

        The one place a module is read. Only a plain convolution counts: an ``nn.Conv{N}d`` /
        ``nn.ConvTranspose{N}d`` (or a subclass, convmat's matrix twins included) that runs
        torch's own forward; a subclass that overrides ``forward`` or ``_conv_forward`` may
        compute something else (pad inside forward, standardise its weight) and is refused.

        Args:
            module: the layer.
            input_size: spatial size of one input.
            path: the layer's name in its model, for messages.
            output_padding: of a transposed layer, in place of the module's own (what
                ``forward(x, output_size=...)`` asks for).

        Raises:
            ConvMatError: naming the path, the class and why, for anything else.

        >>> from torch import nn
        >>> Geometry.from_module(nn.Conv1d(2, 3, 3, stride=2), 9).output_size
        (4,)
        """
        problem = plain_conv_problem(module)
        if problem:
            where = f"{path} " if path else ""
            raise ConvMatError(f"module {where}({type(module).__name__}) {problem}")
        m: Any = module
        if m.transposed:
            if m.padding_mode != "zeros":
                raise ConvMatError(
                    f"padding_mode must be 'zeros' for a transposed convolution (as in torch), "
                    f"got {m.padding_mode!r}"
                )
            return conv_transpose_geometry(
                m.weight.shape, input_size, stride=m.stride, padding=m.padding,
                output_padding=m.output_padding if output_padding is None else output_padding,
                groups=m.groups, dilation=m.dilation,
            )  # fmt: skip
        return conv_geometry(
            m.weight.shape, input_size, stride=m.stride, padding=m.padding,
            dilation=m.dilation, groups=m.groups, padding_mode=m.padding_mode,
        )  # fmt: skip


def flat_pads(pairs: Pads) -> list[int]:
    """``((b1, a1), (b2, a2))`` -> ``[b2, a2, b1, a1]``, the order of ``F.pad``."""
    return [v for pair in reversed(pairs) for v in pair]


#: Modules whose ``forward`` / ``_conv_forward`` run torch's convolution as it is.
_TRUSTED_MODULES = ("torch.nn.modules.conv", "convmat.layers.nn")


def plain_conv_problem(module: object) -> str:
    """Why ``module`` is not a plain convolution, or ``""`` if it is one.

    >>> from torch import nn
    >>> plain_conv_problem(nn.Conv2d(1, 1, 3))
    ''
    >>> class Scaled(nn.Conv2d):
    ...     def forward(self, x):
    ...         return 2 * super().forward(x)
    >>> plain_conv_problem(Scaled(1, 1, 3))
    'overrides forward, so it may not compute the convolution its settings describe'
    """
    from torch import nn  # here, not at the top: the shape rules need no torch

    if not isinstance(module, nn.modules.conv._ConvNd):
        return (
            "is not a convolution layer: one of nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d or "
            "their convmat matrix twins is needed"
        )
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "has uninitialised parameters; run it on one input first"
    for name in ("forward", "_conv_forward"):
        owner = next((c for c in type(module).__mro__ if name in c.__dict__), None)
        if owner is not None and owner.__module__ not in _TRUSTED_MODULES:
            return f"overrides {name}, so it may not compute the convolution its settings describe"
    return ""


#: torch keeps sizes and strides in 64-bit integers and refuses larger ones ("Overflow").
_INT64_MAX = 2**63 - 1


def check_flip(flip: object) -> bool:
    """``flip`` if it is a bool: the one check of every ``flip=`` (true convolution).

    Raises:
        ConvMatError: for anything but ``True`` or ``False``.

    Shape:
        not applicable (a flag).

    >>> check_flip(True)
    True
    """
    if not isinstance(flip, bool):
        raise ConvMatError(f"flip must be True or False, got {flip!r}")
    return flip


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int (a bool, a float or a str is refused), within ``minimum`` and
    ``maximum`` where given: the one check of every integer argument.

    Raises:
        ConvMatError: ``"{name} must be an int >= 1, got 0"`` (``an int``, ``an int >= m`` or
            ``an int from m to M``); ``"... must fit in a 64-bit integer"`` past torch's range.

    Shape:
        not applicable (a number).

    >>> check_int(3, "groups", 1)
    3
    >>> check_int(0, "fps", 1, 60)
    Traceback (most recent call last):
    ...
    convmat._errors.ConvMatError: fps must be an int from 1 to 60, got 0
    """
    if minimum is None:
        allowed = "an int"
    elif maximum is None:
        allowed = f"an int >= {minimum}"
    else:
        allowed = f"an int from {minimum} to {maximum}"
    if isinstance(value, bool):
        raise ConvMatError(f"{name} must be {allowed}, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise ConvMatError(f"{name} must be {allowed}, got {value!r}") from None
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        raise ConvMatError(f"{name} must be {allowed}, got {value!r}")
    if abs(out) > _INT64_MAX:
        raise ConvMatError(f"{name} must fit in a 64-bit integer (as in torch), got {value!r}")
    return out


def check_count(value: Any, name: str) -> int:
    """A channel, group or iteration count: an int >= 1 (:func:`check_int`).

    Shape:
        not applicable (a number).

    >>> check_count(4, "in_channels")
    4
    """
    return check_int(value, name, 1)


def check_shape(value: Any, name: str, allowed: str) -> tuple[int, ...]:
    """A shape: a non-empty sequence of ints >= 1 (no bools, floats or strings), the one check
    of every shape argument; its message says ``"{name} must be {allowed}, got {value!r}"``.

    Shape:
        the shape given, as a tuple.

    >>> check_shape([3, 8, 8], "input_shape", "a tuple of ints >= 1")
    (3, 8, 8)
    """
    message = f"{name} must be {allowed}, got {value!r}"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise ConvMatError(message)
    out = []
    for v in value:
        if isinstance(v, bool):
            raise ConvMatError(message)
        try:
            out.append(operator.index(v))
        except TypeError:
            raise ConvMatError(message) from None
    if any(v < 1 for v in out):
        raise ConvMatError(message)
    return tuple(out)


def _as_int(value: Any, name: str) -> int:
    return check_int(value, name)


def ntuple(value: Any, n: int, name: str, minimum: int | None = None) -> tuple[int, ...]:
    """Normalise an int-or-sequence argument to ``n`` ints, each at least ``minimum``.

    >>> ntuple(3, 2, "stride")
    (3, 3)
    """
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ConvMatError(
                f"{name} must be an int or a tuple of {n} ints (one per spatial dimension), "
                f"got {value!r}"
            )
        out = tuple(_as_int(v, name) for v in value)
    else:
        out = (_as_int(value, name),) * n
    if minimum is not None and any(v < minimum for v in out):
        raise ConvMatError(f"{name} must be >= {minimum} in every dimension, got {value!r}")
    return out


def _spatial_dims(input_size: Any, *values: Any) -> int:
    """The number of spatial dims implied by int-or-tuple arguments (ints broadcast)."""
    if isinstance(input_size, Sequence) and not isinstance(input_size, str) and not input_size:
        raise ConvMatError(
            f"input_size must be an int or a tuple of 1, 2 or 3 ints, got {input_size!r}"
        )
    values = (input_size, *values)
    lengths = {len(v) for v in values if isinstance(v, Sequence) and not isinstance(v, str)}
    if len(lengths) > 1:
        raise ConvMatError(
            f"sizes must agree on the number of spatial dimensions, got lengths {sorted(lengths)}"
        )
    return lengths.pop() if lengths else 1


def _sizes(
    n: int, input_size: Any, kernel_size: Any, stride: Any, dilation: Any
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Normalise input size, kernel size, stride and dilation to ``n`` ints each (all >= 1)."""
    return (
        ntuple(input_size, n, "input_size", 1),
        ntuple(kernel_size, n, "kernel_size", 1),
        ntuple(stride, n, "stride", 1),
        ntuple(dilation, n, "dilation", 1),
    )


def _padding_pairs(
    padding: Any,
    n: int,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    *,
    transposed: bool = False,
) -> Pads:
    """Normalise every padding form to one ``(before, after)`` pair per dimension."""
    allowed = f"an int, a tuple of {n} ints, a tuple of {n} (before, after) pairs" + (
        " or 'valid'" if transposed else ", 'valid' or 'same'"
    )
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n
        if padding == "same" and not transposed:
            if any(s != 1 for s in stride):
                raise ConvMatError(
                    f"padding='same' is only defined for stride 1 (as in torch), got stride "
                    f"{stride!r}; use same_padding() for the (before, after) pads of a strided "
                    f"'SAME' convolution"
                )
            totals = [axes.span(k, d) for k, d in zip(kernel_size, dilation)]
            return tuple((t // 2, t - t // 2) for t in totals)
        raise ConvMatError(f"padding must be {allowed}, got {padding!r}")
    if isinstance(padding, Sequence):
        if len(padding) != n:
            raise ConvMatError(f"padding must be {allowed}, got {padding!r}")
        pairs = []
        for p in padding:
            if isinstance(p, Sequence) and not isinstance(p, str):
                if len(p) != 2:
                    raise ConvMatError(f"padding must be {allowed}, got {padding!r}")
                pairs.append((_as_int(p[0], "padding"), _as_int(p[1], "padding")))
            else:
                v = _as_int(p, "padding")
                pairs.append((v, v))
    else:
        v = _as_int(padding, "padding")
        pairs = [(v, v)] * n
    if any(b < 0 or a < 0 for b, a in pairs):
        raise ConvMatError(f"padding must be >= 0 in every dimension, got {padding!r}")
    return tuple(pairs)


def _check_kernel_fits(
    input_size: tuple[int, ...], kernel_size: tuple[int, ...], dilation: tuple[int, ...], pads: Pads
) -> None:
    for dim, (i, k, d, (b, a)) in enumerate(zip(input_size, kernel_size, dilation, pads)):
        span = axes.span(k, d) + 1
        if span > i + b + a:
            raise ConvMatError(
                f"kernel_size {k} with dilation {d} spans {span} elements, more than the padded "
                f"input in dimension {dim} (input {i} + padding {b}+{a} = {i + b + a}); the "
                f"kernel must fit in the padded input"
            )


def _conv_out(i: int, k: int, s: int, d: int, pad: tuple[int, int]) -> int:
    return axes.output_length(i, k, s, d, *pad)


def _check_output_padding(
    output_padding: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...], raw: Any
) -> None:
    for op, s, d in zip(output_padding, stride, dilation):
        if op < 0 or op >= max(s, d):
            raise ConvMatError(
                f"output_padding must be >= 0 and smaller than either stride or dilation in "
                f"every dimension (as in torch), got output_padding={raw!r} with stride "
                f"{stride!r} and dilation {dilation!r}"
            )


def _transpose_out(
    input_size: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    pads: Pads,
    output_padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[int, ...]:
    out = tuple(
        axes.transposed_output_length(i, k, s, d, b, a, op)
        for i, k, s, (b, a), op, d in zip(
            input_size, kernel_size, stride, pads, output_padding, dilation
        )
    )
    if any(o < 1 for o in out):
        raise ConvMatError(
            f"the transposed convolution's output size (i-1)*s - pad_before - pad_after + "
            f"d*(k-1) + output_padding + 1 must be >= 1 in every dimension, got {out!r} for "
            f"input {input_size!r}, kernel {kernel_size!r}, stride {stride!r}, padding "
            f"{pads!r}, dilation {dilation!r}, output_padding {output_padding!r}"
        )
    return out


def conv_output_size(
    input_size: IntOrTuple,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    dilation: IntOrTuple = 1,
) -> tuple[int, ...]:
    """Spatial output size of a convolution (Dumoulin & Visin, relationship 6).

    Ints apply to every dimension; the number of dimensions comes from the tuples.

    Args:
        input_size: spatial input size.
        kernel_size: kernel size.
        stride: step between windows.
        padding: an int, a tuple, ``"valid"``, ``"same"`` or ``(before, after)`` pairs.
        dilation: spacing between kernel taps.

    Returns:
        One output size per spatial dimension.

    Shape:
        ``out = floor((in + pad_before + pad_after - dilation * (kernel - 1) - 1) / stride) + 1``

    >>> conv_output_size(10, 3, stride=2)
    (4,)
    >>> conv_output_size((32, 32), 3, padding=1)
    (32, 32)
    >>> conv_output_size(10, 4, padding="same")
    (10,)
    """
    n = _spatial_dims(input_size, kernel_size, stride, dilation)
    i, k, s, d = _sizes(n, input_size, kernel_size, stride, dilation)
    pads = _padding_pairs(padding, n, k, s, d)
    _check_kernel_fits(i, k, d, pads)
    return tuple(_conv_out(*args) for args in zip(i, k, s, d, pads))


def conv_transpose_output_size(
    input_size: IntOrTuple,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    output_padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
) -> tuple[int, ...]:
    """Spatial output size of a transposed convolution (Dumoulin & Visin, relationship 14).

    Args:
        input_size: spatial input size of the transposed convolution.
        kernel_size: kernel size.
        stride: stride of the matching convolution.
        padding: an int, a tuple, ``"valid"`` or ``(before, after)`` pairs (the padding of the
            matching convolution; ``"same"`` has no meaning here).
        output_padding: extra size added to the end,
            ``0 <= output_padding < max(stride, dilation)``.
        dilation: spacing between kernel taps.

    Returns:
        One output size per spatial dimension.

    Shape:
        ``out = (in - 1) * stride - pad_before - pad_after + dilation * (kernel - 1)
        + output_padding + 1``

    >>> conv_transpose_output_size(4, 3, stride=2)
    (9,)
    >>> conv_transpose_output_size((16, 16), 2, stride=2)
    (32, 32)
    """
    n = _spatial_dims(input_size, kernel_size, stride, output_padding, dilation)
    i, k, s, d = _sizes(n, input_size, kernel_size, stride, dilation)
    op = ntuple(output_padding, n, "output_padding")
    pads = _padding_pairs(padding, n, k, s, d, transposed=True)
    _check_output_padding(op, s, d, output_padding)
    return _transpose_out(i, k, s, pads, op, d)


def same_padding(
    input_size: IntOrTuple,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
) -> Pads:
    """The ``(before, after)`` pads that make the output size ``ceil(input / stride)``.

    This is TensorFlow's ``"SAME"``, defined for every stride and dilation; the odd extra zero
    goes to the end. For stride 1 it equals torch's ``padding="same"``.

    Args:
        input_size: spatial input size.
        kernel_size: kernel size.
        stride: step between windows.
        dilation: spacing between kernel taps.

    Returns:
        One ``(before, after)`` pair per spatial dimension.

    Shape:
        ``total = max((ceil(in / s) - 1) * s + d * (k - 1) + 1 - in, 0)``,
        ``before = total // 2``, ``after = total - before``

    >>> same_padding(10, 3, stride=2)
    ((0, 1),)
    >>> conv_output_size(10, 3, stride=2, padding=same_padding(10, 3, stride=2))
    (5,)
    """
    n = _spatial_dims(input_size, kernel_size, stride, dilation)
    i, k, s, d = _sizes(n, input_size, kernel_size, stride, dilation)
    pads = []
    for ii, kk, ss, dd in zip(i, k, s, d):
        total = max(axes.natural_size(-(-ii // ss), kk, ss, dd) - ii, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def _weight_dims(weight_shape: Sequence[int], what: str) -> int:
    if len(weight_shape) not in (3, 4, 5):
        raise ConvMatError(
            f"weight must have 3, 4 or 5 dimensions {what} for a 1-D, 2-D or 3-D convolution, "
            f"got shape {tuple(weight_shape)!r}"
        )
    if any(v < 1 for v in weight_shape):
        raise ConvMatError(
            f"weight must have no empty dimension, got shape {tuple(weight_shape)!r}"
        )
    return len(weight_shape) - 2


def _check_groups(groups: Any, channels: int, which: str) -> int:
    g = _as_int(groups, "groups")
    if g < 1:
        raise ConvMatError(f"groups must be >= 1, got {groups!r}")
    if channels % g:
        raise ConvMatError(
            f"{which} ({channels}) must be divisible by groups, got groups={groups!r}"
        )
    return g


def _check_padding_mode(
    padding_mode: Any, input_size: tuple[int, ...], pads: Pads, raw: Any
) -> None:
    mode = _mode(padding_mode)
    for dim, (i, (b, a)) in enumerate(zip(input_size, pads)):
        mode.check(i, b, a, dim, raw)


def output_padding_for(
    input_size: IntOrTuple,
    output_size: IntOrTuple,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    dilation: IntOrTuple = 1,
) -> tuple[int, ...]:
    """The ``output_padding`` that makes a transposed convolution produce ``output_size``
    (the ``output_size`` argument of ``nn.ConvTranspose{N}d.forward``).

    Torch accepts output sizes from the size with no output_padding up to ``stride - 1`` more.

    >>> output_padding_for(4, 8, 3, stride=2, padding=1)
    (1,)
    """
    n = _spatial_dims(input_size, output_size, kernel_size, stride, dilation)
    i = ntuple(input_size, n, "input_size", 1)
    out = ntuple(output_size, n, "output_size", 1)
    k = ntuple(kernel_size, n, "kernel_size", 1)
    s = ntuple(stride, n, "stride", 1)
    d = ntuple(dilation, n, "dilation", 1)
    pads = _padding_pairs(padding, n, k, s, d, transposed=True)
    smallest = _transpose_out(i, k, s, pads, (0,) * n, d)
    if any(not lo <= o < lo + ss for o, lo, ss in zip(out, smallest, s)):
        raise ConvMatError(
            f"output_size must be between {smallest!r} and "
            f"{tuple(lo + ss - 1 for lo, ss in zip(smallest, s))!r} for input size {i!r} "
            f"(as in torch), got {output_size!r}"
        )
    return tuple(o - lo for o, lo in zip(out, smallest))


def conv_geometry(
    weight_shape: Sequence[int],
    input_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> Geometry:
    """Validate a convolution's arguments and normalise them into a :class:`Geometry`.

    >>> g = conv_geometry((4, 2, 3, 3), (8, 8), padding=1)
    >>> g.output_size, g.matrix_shape
    ((8, 8), (256, 128))
    """
    n = _weight_dims(weight_shape, "(C_out, C_in // groups, *kernel)")
    out_channels, cin_g, *kernel = (int(v) for v in weight_shape)
    g = _check_groups(groups, out_channels, "out_channels (weight.shape[0])")
    i, k, s, d = _sizes(n, input_size, kernel, stride, dilation)
    pads = _padding_pairs(padding, n, k, s, d)
    _check_padding_mode(padding_mode, i, pads, padding)
    _check_kernel_fits(i, k, d, pads)
    out = tuple(_conv_out(*args) for args in zip(i, k, s, d, pads))
    return Geometry(False, cin_g * g, out_channels, g, i, out, k, s, d, pads, padding_mode)


def conv_transpose_geometry(
    weight_shape: Sequence[int],
    input_size: IntOrTuple,
    *,
    stride: IntOrTuple = 1,
    padding: PaddingArg = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
) -> Geometry:
    """Validate a transposed convolution's arguments and normalise them into a :class:`Geometry`.

    >>> conv_transpose_geometry((4, 2, 2, 2), (8, 8), stride=2).output_size
    (16, 16)
    """
    n = _weight_dims(weight_shape, "(C_in, C_out // groups, *kernel)")
    in_channels, cout_g, *kernel = (int(v) for v in weight_shape)
    g = _check_groups(groups, in_channels, "in_channels (weight.shape[0])")
    i, k, s, d = _sizes(n, input_size, kernel, stride, dilation)
    op = ntuple(output_padding, n, "output_padding")
    pads = _padding_pairs(padding, n, k, s, d, transposed=True)
    _check_output_padding(op, s, d, output_padding)
    out = _transpose_out(i, k, s, pads, op, d)
    return Geometry(True, in_channels, cout_g * g, g, i, out, k, s, d, pads, "zeros", op)
