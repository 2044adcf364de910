"""Lipschitz reports: the exact operator norm of every convolution and linear layer of a model.

A forward pass with hooks finds the input size each layer sees; each layer's norm is then
:func:`convmat.operator_norm` of its matrix at that size (a linear layer's is the norm of its
weight). Beside it stands the norm of the reshaped kernel ``weight.reshape(C_out, -1)`` that
``torch.nn.utils.spectral_norm`` normalises, which is not the layer's norm.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import ConvMatError
from ..engine import available_memory
from ..layers.linear import SparseLinear
from .spectral import NormResult, operator_norm

__all__ = ["LayerNorm", "LipschitzReport", "lipschitz_report"]

_CONV = nn.modules.conv._ConvNd
_LAYERS = (_CONV, nn.Linear, SparseLinear)


@dataclass(frozen=True)
class LayerNorm:
    """One layer's row of a :class:`LipschitzReport`.

    Attributes:
        path: the module's name in the model (``"(call 2)"`` added for a second call).
        kind: the module's class name.
        config: channels, kernel, stride, padding, ... in short.
        input_shape: the shape of one input at this layer (without the batch).
        norm: the exact operator norm of the layer (bias excluded).
        lower, upper: its certified interval (:class:`convmat.NormResult`).
        method: how it was computed.
        reshaped: the spectral norm of the weight reshaped as ``spectral_norm`` does.
        seconds: time spent on this layer.
    """

    path: str
    kind: str
    config: str
    input_shape: tuple[int, ...]
    norm: float
    lower: float
    upper: float
    method: str
    reshaped: float
    seconds: float

    @property
    def ratio(self) -> float:
        """``norm / reshaped``: how far ``spectral_norm``'s figure is from the layer's norm."""
        return self.norm / self.reshaped if self.reshaped else math.nan


@dataclass(frozen=True)
class LipschitzReport:
    """Per-layer operator norms of a model; iterate it for the :class:`LayerNorm` records.

    ``str(report)`` is an aligned table. :attr:`bound`, the product of the layer norms, bounds
    the Lipschitz constant (in the 2-norm) of a model that chains these layers with 1-Lipschitz
    activations (ReLU, tanh, max pooling, ...); skip connections, normalisation and other layers
    with weights are not in it.
    """

    records: tuple[LayerNorm, ...]
    input_shape: tuple[int, ...]

    @property
    def bound(self) -> float:
        """The product of the layer norms."""
        return math.prod(r.norm for r in self.records)

    @property
    def certified_bound(self) -> float:
        """The product of the upper ends of the layers' certified intervals."""
        return math.prod(r.upper for r in self.records)

    def __iter__(self) -> Iterator[LayerNorm]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> LayerNorm:
        return self.records[index]

    def to_dicts(self) -> list[dict[str, Any]]:
        """The records as plain dicts (with the ratio), e.g. for JSON or a DataFrame."""
        return [{**dataclasses.asdict(r), "ratio": r.ratio} for r in self.records]

    def __str__(self) -> str:
        head = ["layer", "type", "config", "input", "norm", "certified upper", "reshaped",
                "ratio", "method", "time"]  # fmt: skip
        rows = [
            [r.path, r.kind, r.config, "x".join(map(str, r.input_shape)), f"{r.norm:.6f}",
             f"{r.upper:.6f}", f"{r.reshaped:.6f}", f"{r.ratio:.3f}", r.method,
             f"{r.seconds:.2f} s"]
            for r in self.records
        ]  # fmt: skip
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
        numeric = {4, 5, 6, 7, 9}

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        shape = "x".join(map(str, self.input_shape))
        out = [f"Lipschitz report for inputs of shape {shape} ({len(rows)} layers)", line(head)]
        out.append(line(["-" * w for w in widths]))
        out += [line(row) for row in rows]
        out.append(
            f"product of layer norms: {self.bound:.6g} (certified: {self.certified_bound:.6g}); "
            f"a Lipschitz bound for a chain of these layers with 1-Lipschitz activations"
        )
        return "\n".join(out)


def _describe(m: Any) -> str:
    """``3->64 k=7x7 s=2 p=3`` and whatever else differs from the defaults."""
    if not isinstance(m, _CONV):
        return f"{m.in_features}->{m.out_features}"

    def fmt(v: Any) -> str:  # one value where every dimension has it
        return v if isinstance(v, str) else str(v[0]) if len(set(v)) == 1 else "x".join(map(str, v))

    parts = [f"{m.in_channels}->{m.out_channels}", f"k={'x'.join(map(str, m.kernel_size))}"]
    padding = m.padding if isinstance(m.padding, str) else m._reversed_padding_repeated_twice
    extras = [
        ("s", m.stride, all(v == 1 for v in m.stride)),
        ("p", m.padding, padding == "valid" or (not isinstance(padding, str) and not any(padding))),
        ("d", m.dilation, all(v == 1 for v in m.dilation)),
        ("g", (m.groups,), m.groups == 1),
        ("op", m.output_padding, not m.transposed or not any(m.output_padding)),
    ]
    parts += [f"{name}={fmt(v)}" for name, v, default in extras if not default]
    if m.padding_mode != "zeros":
        parts.append(m.padding_mode)
    return " ".join(parts)


def _reshaped_norm(m: Any) -> float:
    """The spectral norm of the matrix ``torch.nn.utils.spectral_norm`` divides by: the weight
    with ``dim`` (1 for transposed convolutions, else 0) first, flattened after it."""
    w = m.weight.detach()
    if w.layout != torch.strided:
        w = w.to_dense()
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        w = w.transpose(0, 1)
    return float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1).double(), ord=2))


def _calls(
    model: nn.Module, input_shape: tuple[int, ...]
) -> list[tuple[str, Any, tuple[int, ...]]]:
    """``(path, module, input shape)`` for every call of a conv or linear layer, in order."""
    calls: list[tuple[str, Any, tuple[int, ...]]] = []
    count: dict[str, int] = {}

    def hook(path: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        count[path] = count.get(path, 0) + 1
        name = path if count[path] == 1 else f"{path} (call {count[path]})"
        calls.append((name, module, tuple(args[0].shape[1:])))

    handles = [
        m.register_forward_pre_hook(lambda mod, args, path=path: hook(path, mod, args))
        for path, m in model.named_modules()
        if isinstance(m, _LAYERS)
    ]
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    needed = math.prod(input_shape) * torch.empty((), dtype=dtype).element_size()
    free = available_memory(device)
    if free is not None and needed > free // 4:
        raise ConvMatError(
            f"input_shape {input_shape!r} needs {needed / 2**30:.1f} GiB for one input, more than "
            f"a quarter of the {free / 2**30:.1f} GiB free"
        )
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no batch statistics updated, one sample is enough
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=dtype, device=device))
    except (RuntimeError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConvMatError(
            f"the model does not run on an input of shape {(1, *input_shape)!r}: {first}"
        ) from None
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    return calls


def lipschitz_report(
    model: nn.Module,
    input_shape: Any,
    *,
    tol: float = 1e-7,
    progress: bool | None = None,
) -> LipschitzReport:
    """The exact operator norm of every convolution and linear layer of ``model``.

    Args:
        model: any ``nn.Module``; its conv (``nn.Conv*d``, ``nn.ConvTranspose*d`` and convmat's
            matrix-form twins) and linear layers are measured, at the input size each sees.
        input_shape: the shape of one input without the batch, e.g. ``(3, 32, 32)``.
        tol: relative accuracy for the iterative method (see :func:`convmat.operator_norm`).
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        :class:`LipschitzReport`; ``print`` it for the table.

    Shape:
        the model takes ``(1, *input_shape)``.

    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
    ...                       nn.Linear(32, 3)).double()
    >>> report = lipschitz_report(model, (1, 4, 4), progress=False)
    >>> [(r.path, r.input_shape) for r in report]
    [('0', (1, 4, 4)), ('3', (32,))]
    >>> report.bound == report[0].norm * report[1].norm
    True
    """
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    if not isinstance(model, nn.Module):
        raise ConvMatError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise ConvMatError(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
    if not shape or any(v < 1 for v in shape):
        raise ConvMatError(f"input_shape must be positive sizes, got {input_shape!r}")
    records = []
    bar = tqdm(_calls(model, shape), desc="operator norms", unit="layer",
               disable=None if progress is None else not progress, leave=False)  # fmt: skip
    for path, m, in_shape in bar:
        bar.set_postfix_str(path)
        start = time.perf_counter()
        reshaped = _reshaped_norm(m)
        if isinstance(m, _CONV):
            r = operator_norm(m, in_shape[1:], tol=tol)
        else:  # a linear layer's matrix is its weight
            slack = 1e-12 * max(reshaped, 1.0)
            r = NormResult(reshaped, reshaped - slack, reshaped + slack, "dense svd")
        seconds = time.perf_counter() - start
        records.append(LayerNorm(path, type(m).__name__, _describe(m), in_shape, r.value, r.lower,
                                 r.upper, r.method, reshaped, seconds))  # fmt: skip
    return LipschitzReport(tuple(records), shape)
