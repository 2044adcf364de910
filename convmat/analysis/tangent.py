"""A function's Jacobian at one input, recorded once as a tape of ATen operations.

:func:`linearise` runs ``f(x)`` once under a dispatch mode that sees every ATen operation and
keeps, for each one reached by ``x``, what its derivative needs at ``x``: a convolution its
weight (not its bias), ReLU its mask, max pooling its indices, BatchNorm in eval mode its
per-channel scale, a product its other factor. Replaying the tape on a direction ``u`` then
costs about one forward pass without biases (``J u`` by forward-mode AD computes the values
again beside the tangents; the transpose of the pull-back costs two to three forward passes,
``convmat.lipschitz_report``'s old lower end). An operation with no rule here that ``x``
reaches raises :class:`NotLinearisable` while recording, and the caller takes another way.

The tape follows tensors by identity: a write in place (or through ``out=``) into a tensor
that a view was taken of (or into a view), or into a tensor the tape holds as a constant factor,
is refused rather than followed, as is an operation with a complex output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["NotLinearisable", "linearise"]

aten = torch.ops.aten

#: A step of the tape: the tangents so far (by slot) to this operation's tangent.
_Step = Callable[[dict[int, torch.Tensor]], torch.Tensor]
#: A rule: (operation, its arguments, keyword arguments, output, slot of a tensor or None) to
#: its step (raising :class:`NotLinearisable` where it does not apply).
_Rule = Callable[[Any, tuple[Any, ...], dict[str, Any], Any, Callable[[Any], "int | None"]], _Step]


class NotLinearisable(Exception):
    """``f`` reaches an operation with no rule here (named), or writes in place into a view."""


def _one(op: Any, args: Sequence[Any], slot: Callable[[Any], int | None]) -> int:
    """The slot of the only argument reached by the input, which must be the first."""
    slots = [slot(a) for a in args]
    first = slots[0]
    if first is None or any(s is not None for s in slots[1:]):
        raise NotLinearisable(f"{op} of the input with another argument that depends on it")
    return first


def _same(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
          slot: Callable[[Any], int | None]) -> _Step:  # fmt: skip
    """An operation linear in its first argument (views, copies, padding with zeros, linear
    pooling and resampling, sums and means, a product with a constant): itself on the
    tangent."""
    s, rest = _one(op, args, slot), args[1:]
    if op is aten.constant_pad_nd.default and len(args) > 2 and args[2] != 0:
        rest = (args[1], 0)  # a constant border has no tangent
    return lambda t: op(t[s], *rest, **kwargs)


def _cat(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
         slot: Callable[[Any], int | None]) -> _Step:  # fmt: skip
    """``cat``/``stack``: of the tangents, zeros for the parts that do not depend on the
    input."""
    parts = [(slot(a), None if slot(a) is not None else torch.zeros_like(a)) for a in args[0]]
    rest = args[1:]
    return lambda t: op([t[s] if s is not None else z for s, z in parts], *rest, **kwargs)


def _sum(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
         slot: Callable[[Any], int | None]) -> _Step:  # fmt: skip
    """``a + alpha b`` and ``a - alpha b``: the tangents' (a constant term drops out), broadcast
    to the output."""
    sign = -1 if op.__name__.startswith("sub") else 1
    scale = sign * kwargs.get("alpha", 1)
    sa, sb = slot(args[0]), slot(args[1]) if len(args) > 1 else None
    shape, dtype = out.shape, out.dtype

    def step(t: dict[int, torch.Tensor]) -> torch.Tensor:
        if sa is None:
            r = t[sb] if scale == 1 else t[sb] * scale  # type: ignore[index]
        elif sb is None:
            r = t[sa]
        else:
            r = t[sa] + t[sb] if scale == 1 else t[sa] + t[sb] * scale
        r = r.to(dtype)  # the output's (a sum promotes; a lone tangent keeps its own)
        return r if r.shape == shape else r.expand(shape).contiguous()

    return step


def _product(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
             slot: Callable[[Any], int | None]) -> _Step:  # fmt: skip
    """``a * b``: ``ta * b + a * tb`` (the recorded factors), one term where the other is
    constant."""
    a, b = args[0], args[1]
    sa, sb = slot(a), slot(b)
    if sa is not None and sb is not None:
        a, b = a.clone(), b.clone()  # in case either is written in place later
        return lambda t: t[sa] * b + a * t[sb]
    if sa is not None:
        return lambda t: op(t[sa], b)
    return lambda t: op(a, t[sb])  # type: ignore[index]


def _quotient(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
              slot: Callable[[Any], int | None]) -> _Step:  # fmt: skip
    """``a / b`` with a constant ``b``."""
    s = _one(op, args[:2], slot)
    b = args[1]
    return lambda t: op(t[s], b, **kwargs)


def _convolution(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
                 slot: Callable[[Any], int | None]) -> _Step:  # fmt: skip
    """A convolution (or ``linear``) of the input with a constant weight: the same without its
    bias."""
    s = _one(op, args[:3], slot)
    rest = (args[1], None, *args[3:])
    return lambda t: op(t[s], *rest, **kwargs)


def _matmul(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
            slot: Callable[[Any], int | None]) -> _Step:  # fmt: skip
    """``mm``/``bmm`` with one constant factor, ``addmm`` with a constant term: the product
    of the tangent (``alpha`` times it for ``addmm``)."""
    if op is aten.addmm.default:
        if slot(args[0]) is not None:
            raise NotLinearisable(f"{op} with a term that depends on the input")
        args, alpha = args[1:3], kwargs.get("alpha", 1)
    else:
        alpha = 1
    a, b = args
    sa, sb = slot(a), slot(b)
    if (sa is None) == (sb is None):
        raise NotLinearisable(f"{op} of two factors that depend on the input")
    mm = torch.bmm if a.dim() == 3 else torch.mm

    def step(t: dict[int, torch.Tensor]) -> torch.Tensor:
        r = mm(t[sa], b) if sa is not None else mm(a, t[sb])  # type: ignore[index]
        return r if alpha == 1 else r * alpha

    return step


def _batch_norm(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
                slot: Callable[[Any], int | None]) -> _Step:  # fmt: skip
    """BatchNorm with running statistics: the tangent times ``weight / sqrt(var + eps)`` per
    channel (with batch statistics it is not linear in a sample: refused)."""
    if op is not aten._native_batch_norm_legit_no_training.default:
        x, weight, _, _, var, training, _, eps = args
        if training:
            raise NotLinearisable(f"{op} with batch statistics")
    else:
        x, weight, _, _, var, _, eps = args
    s = _one(op, args[:5], slot)
    scale = torch.rsqrt(var + eps) * (1 if weight is None else weight)
    scale = scale.reshape(1, -1, *([1] * (x.dim() - 2)))
    return lambda t: t[s] * scale


def _max_pool(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
              slot: Callable[[Any], int | None]) -> _Step:  # fmt: skip
    """Max pooling: the tangent at each window's recorded maximum."""
    s = _one(op, args[:1], slot)
    dims = 2 if op is aten.max_pool2d_with_indices.default else 3
    index, shape = out[1].flatten(-dims), out[0].shape
    return lambda t: t[s].flatten(-dims).gather(-1, index).view(shape)


#: In-place activations and the operation computing their value (their derivative is taken
#: from the input before it is overwritten).
_IN_PLACE = {
    aten.relu_.default: aten.relu.default,
    aten.clamp_min_.default: aten.clamp_min.default,
    aten.clamp_.default: aten.clamp.default,
    aten.hardtanh_.default: aten.hardtanh.default,
    aten.threshold_.default: aten.threshold.default,
    aten.leaky_relu_.default: aten.leaky_relu.default,
    aten.silu_.default: aten.silu.default,
    aten.elu_.default: aten.elu.default,
    aten.celu_.default: aten.celu.default,
    aten.hardsigmoid_.default: aten.hardsigmoid.default,
    aten.hardswish_.default: aten.hardswish.default,
    aten.sigmoid_.default: aten.sigmoid.default,
    aten.tanh_.default: aten.tanh.default,
}


def _within(x: torch.Tensor, low: Any = None, high: Any = None) -> torch.Tensor:
    """Where ``low <= x <= high`` (a bound of None is absent): clamp's derivative, 1 or 0."""
    inside = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        inside &= x >= low
    if high is not None:
        inside &= x <= high
    return inside


#: Entry-wise activations: the derivative at the input ``x`` (the other arguments as the
#: operation takes them), by torch's own backward formulas; a mask where it is 1 or 0.
_DERIVATIVES: dict[Any, Callable[..., torch.Tensor]] = {
    aten.relu.default: lambda x: x > 0,
    aten.threshold.default: lambda x, threshold, value: x > threshold,
    aten.clamp_min.default: lambda x, low: x >= low,
    aten.clamp.default: _within,
    aten.hardtanh.default: lambda x, low=-1, high=1: (x > low) & (x < high),
    aten.leaky_relu.default: lambda x, slope=0.01: aten.leaky_relu_backward(
        torch.ones_like(x), x, slope, False),
    aten.gelu.default: lambda x, approximate="none": aten.gelu_backward(
        torch.ones_like(x), x, approximate=approximate),
    aten.silu.default: lambda x: aten.silu_backward(torch.ones_like(x), x),
    aten.mish.default: lambda x: aten.mish_backward(torch.ones_like(x), x),
    aten.hardswish.default: lambda x: aten.hardswish_backward(torch.ones_like(x), x),
    aten.hardsigmoid.default: lambda x: aten.hardsigmoid_backward(torch.ones_like(x), x),
    aten.sigmoid.default: lambda x: aten.sigmoid_backward(torch.ones_like(x), torch.sigmoid(x)),
    aten.tanh.default: lambda x: aten.tanh_backward(torch.ones_like(x), torch.tanh(x)),
    aten.elu.default: lambda x, alpha=1, scale=1, input_scale=1: aten.elu_backward(
        torch.ones_like(x), alpha, scale, input_scale, False, x),
    aten.celu.default: lambda x, alpha=1.0: aten.elu_backward(
        torch.ones_like(x), alpha, 1, 1 / alpha, False, x),
    aten.softplus.default: lambda x, beta=1, threshold=20: aten.softplus_backward(
        torch.ones_like(x), x, beta, threshold),
}  # fmt: skip


def _activation(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                slot: Callable[[Any], int | None]) -> _Step:  # fmt: skip
    """An entry-wise activation: the tangent times its derivative at the (unmodified) input,
    taken before the operation runs."""
    s = _one(op, args, slot)
    d = _DERIVATIVES[_IN_PLACE.get(op, op)](*args, **kwargs)
    if d.dtype == torch.bool:
        return lambda t: torch.where(d, t[s], 0)
    return lambda t: t[s] * d


#: The operations followed, by rule.
# fmt: off
_RULES: dict[Any, _Rule] = {
    **dict.fromkeys([
        aten.view.default, aten._unsafe_view.default, aten.reshape.default,
        aten.permute.default, aten.t.default, aten.transpose.int, aten.expand.default,
        aten.clone.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
        aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.alias.default,
        aten._to_copy.default, aten.flip.default, aten.roll.default, aten.narrow.default,
        aten.index_select.default, aten.repeat.default, aten.pixel_shuffle.default,
        aten.pixel_unshuffle.default, aten.constant_pad_nd.default,
        aten.reflection_pad1d.default, aten.reflection_pad2d.default,
        aten.reflection_pad3d.default, aten.replication_pad1d.default,
        aten.replication_pad2d.default, aten.replication_pad3d.default,
        aten.upsample_nearest1d.default, aten.upsample_nearest2d.default,
        aten.upsample_nearest3d.default, aten.upsample_linear1d.default,
        aten.upsample_bilinear2d.default, aten.upsample_trilinear3d.default,
        aten.upsample_bicubic2d.default, aten.upsample_nearest1d.vec,
        aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec, aten.upsample_linear1d.vec,
        aten.upsample_bilinear2d.vec, aten.upsample_trilinear3d.vec,
        aten.upsample_bicubic2d.vec, aten.avg_pool1d.default, aten.avg_pool2d.default,
        aten.avg_pool3d.default, aten._adaptive_avg_pool2d.default,
        aten._adaptive_avg_pool3d.default, aten.mean.dim, aten.mean.default,
        aten.sum.dim_IntList, aten.sum.default, aten.neg.default, aten.mul.Scalar,
        aten.div.Scalar,
    ], _same),
    aten.cat.default: _cat,
    aten.stack.default: _cat,
    aten.add.Tensor: _sum,
    aten.sub.Tensor: _sum,
    aten.add.Scalar: _sum,
    aten.sub.Scalar: _sum,
    aten.mul.Tensor: _product,
    aten.div.Tensor: _quotient,
    aten.convolution.default: _convolution,
    aten.linear.default: _convolution,
    aten.mm.default: _matmul,
    aten.bmm.default: _matmul,
    aten.addmm.default: _matmul,
    aten.native_batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten.cudnn_batch_norm.default: _batch_norm,
    aten.max_pool2d_with_indices.default: _max_pool,
    aten.max_pool3d_with_indices.default: _max_pool,
}
#: Products and sums in place and their out-of-place forms: their steps are made before the
#: operation overwrites its first argument, and replay out of place (a tangent is never
#: written over: it may be the caller's direction).
_OUT_OF_PLACE = {aten.mul_.Tensor: aten.mul.Tensor, aten.div_.Tensor: aten.div.Tensor,
                 aten.add_.Tensor: aten.add.Tensor, aten.sub_.Tensor: aten.sub.Tensor}
#: Operations whose output does not depend on the input's values.
_CONSTANT = {aten.detach.default, aten.zeros_like.default, aten.ones_like.default,
             aten.empty_like.default, aten.full_like.default, aten.new_empty.default,
             aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
             aten.new_empty_strided.default}
#: Max pooling without indices (what a no-grad forward may run) and the form with them.
_WITH_INDICES = {aten.max_pool2d.default: aten.max_pool2d_with_indices.default,
                 aten.max_pool3d.default: aten.max_pool3d_with_indices.default}
# fmt: on


#: BatchNorm operations whose schema writes the running statistics (only when ``training``,
#: their sixth argument).
_RUNNING_STATISTICS = {aten.native_batch_norm.default, aten.cudnn_batch_norm.default}


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors ``func`` writes into (in place, or through ``out=``), by its schema
    (BatchNorm's running statistics only with batch statistics)."""
    if func in _RUNNING_STATISTICS and len(args) > 5 and not args[5]:
        return []
    written = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = kwargs.get(argument.name) if argument.kwarg_only or i >= len(args) else args[i]
        written += [a for a in tree_leaves(value) if isinstance(a, torch.Tensor)]
    return written


class _Tape(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records the steps of ``J u`` while ``f(x)`` runs: each tensor reached by ``x`` gets a
    slot (tensors are kept alive while recording, so that identities stay unique), each step
    the slots it reads."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.slots: dict[int, int] = {}
        self.alive: list[torch.Tensor] = []
        self.steps: list[tuple[_Step, int, list[int]]] = []
        self.viewed: set[int | None] = set()  # storages a view of a reached tensor shares
        self.held: set[int | None] = set()  # storages of the constants the steps may hold
        self.constants: list[torch.Tensor] = []  # kept while recording: addresses stay unique

    def slot(self, a: Any) -> int | None:
        return self.slots.get(id(a)) if isinstance(a, torch.Tensor) else None

    def add(self, tensor: torch.Tensor) -> int:
        self.alive.append(tensor)
        self.slots[id(tensor)] = len(self.alive) - 1
        return len(self.alive) - 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:  # fmt: skip
        kwargs = kwargs or {}
        leaves = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        reads = [s for a in leaves if (s := self.slot(a)) is not None]
        written = _written(func, args, kwargs)
        if any(self._storage(a) in self.held for a in written):
            raise NotLinearisable(f"{func} writes in place into a constant the tape holds")
        if not reads or func in _CONSTANT:
            return func(*args, **kwargs)
        if any(self._into_view(a) for a in written):
            raise NotLinearisable(f"{func} writes in place into a view")
        early = None  # steps made before an in-place operation overwrites what they read
        if _IN_PLACE.get(func, func) in _DERIVATIVES:
            early = _activation(func, args, kwargs, self.slot)
        elif func in _OUT_OF_PLACE:
            if self.slot(args[0]) is None:
                raise NotLinearisable(f"{func} writes the input into a constant")
            plain = _OUT_OF_PLACE[func]
            early = _RULES[plain](plain, args, kwargs, args[0], self.slot)
        out = _WITH_INDICES.get(func, func)(*args, **kwargs)
        first = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(first, torch.Tensor) and first.is_complex():
            raise NotLinearisable(f"{func} has a complex output")
        if not isinstance(first, torch.Tensor) or not first.is_floating_point():
            return out  # comparisons, indices, shapes: no tangent
        if early is not None:
            step = early
        elif func in _WITH_INDICES:
            step = _max_pool(_WITH_INDICES[func], args, kwargs, out, self.slot)
            out = first  # what the forward asked for
        elif func in _RULES:
            step = _RULES[func](func, args, kwargs, out, self.slot)
        else:
            raise NotLinearisable(f"{func} has no rule")
        if func.is_view:  # (the output's view flag is set only after the mode returns)
            self.viewed.add(self._storage(first))
        constants = [a for a in leaves if self.slot(a) is None]
        if isinstance(out, (tuple, list)):  # max pooling's indices, BatchNorm's statistics
            constants += [a for a in out[1:] if isinstance(a, torch.Tensor)]
        self.held.update(self._storage(a) for a in constants)
        self.constants += constants
        self.steps.append((step, self.add(first), reads))
        return out

    @staticmethod
    def _storage(target: Any) -> int | None:
        """The address of ``target``'s storage (None: not a tensor)."""
        if not isinstance(target, torch.Tensor):
            return None
        address: int = target.untyped_storage().data_ptr()
        return address

    def _into_view(self, target: Any) -> bool:
        """Whether ``target`` is a view, or shares its storage with a view of a reached
        tensor."""
        return isinstance(target, torch.Tensor) and (
            target._is_view() or self._storage(target) in self.viewed
        )


def linearise(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``f(x)`` and the map ``u -> J(x) u`` of ``f``'s Jacobian at ``x``, from one recorded
    run of ``f``.

    Args:
        f: a function of one tensor to one tensor, built of the ATen operations followed here
            (convolutions, linear layers, BatchNorm in eval mode, activations, pooling,
            resampling, padding, views, sums, products, concatenation).
        x: the input at which ``J`` is taken.

    Returns:
        ``(f(x), push)``: ``push(u)`` is ``J(x) u``, in the dtype and on the device of ``x``
        (``u`` itself, or a view of it, where ``f`` only reshapes its input).

    Raises:
        NotLinearisable: ``f`` reaches an operation with no rule here (named), or writes in
            place into a view of a tensor it reached.

    Shape:
        ``u`` has ``x``'s shape; ``push(u)`` has ``f(x)``'s.

    >>> f = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.ReLU()).double()
    >>> x, u = torch.randn(1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 8, dtype=torch.float64)
    >>> y, push = linearise(f, x)
    >>> torch.allclose(push(u), torch.func.jvp(f, (x,), (u,))[1])
    True
    """
    tape = _Tape()
    start = x.detach().clone()
    first = tape.add(start)
    with torch.no_grad(), tape:
        y = f(start)
    last = tape.slot(y)
    # Each step with the slots whose last read it is (freed after it: J u holds no more
    # tangents at once than the forward held values).
    final = {s: i for i, (_, _, reads) in enumerate(tape.steps) for s in reads}
    frees: list[list[int]] = [[] for _ in tape.steps]
    for s, i in final.items():
        if s != last:
            frees[i].append(s)
    steps = [(step, s, free) for (step, s, _), free in zip(tape.steps, frees)]
    del tape  # the recorded tensors; the steps hold only what the derivative needs

    def push(u: torch.Tensor) -> torch.Tensor:
        if last is None:  # f does not depend on x
            return torch.zeros_like(y)
        tangents = {first: u}
        with torch.no_grad():
            for step, s, free in steps:
                tangents[s] = step(tangents)
                for gone in free:
                    del tangents[gone]
        return tangents[last]

    return y, push
