"""Lipschitz reports: the operator norm of every convolution and linear layer of a model.

A forward pass with hooks finds the input size each layer sees; each plain layer's norm is then
:func:`convmat.operator_norm` of its matrix at that size (a linear layer's is the norm of its
weight), with a certified interval. A conv or linear subclass with its own ``forward`` (one that
pads inside forward, standardises its weight, scales its output, ...) is checked numerically for
linearity in its input (the bias removed: ``f(x) - f(0)``); a linear one gets its norm by Lanczos
on Jacobian-vector products (``torch.func.jvp`` / ``vjp``), a value and a lower bound with no
certified upper end; any other is refused, naming its path and class. Beside each norm stands
the norm of the reshaped kernel ``weight.reshape(C_out, -1)`` that
``torch.nn.utils.spectral_norm`` normalises, which is not the layer's norm.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import ConvMatError
from ..engine import Geometry, available_memory, plain_conv_problem
from ..layers.linear import SparseLinear
from .spectral import (
    _DENSE_SLACK,
    Method,
    NormResult,
    _check_method,
    _check_tol,
    _gram_top,
    operator_norm,
)

__all__ = ["LayerNorm", "LipschitzReport", "lipschitz_report"]

_CONV = nn.modules.conv._ConvNd
_LAYERS = (_CONV, nn.Linear, SparseLinear)
#: Modules whose linear layers' ``forward`` is ``x @ weight.T + bias`` as it is.
_TRUSTED_LINEAR = ("torch.nn.modules.linear", "convmat.layers.linear")
#: Relative tolerance of the numerical linearity check (float64; rounding is ~1e-15).
_LINEARITY_TOL = 1e-9
#: The coefficients ``a, b`` of the check ``f(a x + b y) = a f(x) + b f(y)``: neither 0 nor 1
#: nor equal in size, so that neither homogeneity nor additivity alone passes it.
_PROBE_COEFFICIENTS = (0.7, -1.3)


@dataclass(frozen=True)
class LayerNorm:
    """One layer's row of a :class:`LipschitzReport`.

    Attributes:
        path: the module's name in the model (``"(call 2)"`` added for a second call).
        kind: the module's class name.
        config: channels, kernel, stride, padding, ... in short.
        input_shape: the shape of one input at this layer (without the batch).
        norm: the operator norm of the layer (bias excluded): exact, or to ``tol`` for
            Lanczos (:class:`convmat.NormResult`).
        lower, upper: its interval; ``upper`` is ``inf`` where nothing certifies one
            (``"jvp-lanczos"``).
        method: how it was computed: ``"fft"``, ``"dense"``, ``"lanczos"`` or
            ``"jvp-lanczos"`` (a module with its own forward, linear in its input).
        reshaped: the spectral norm of the weight reshaped as ``spectral_norm`` does.
        seconds: time spent on this layer.
        converged: the iteration reached ``tol`` (True for exact methods).
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
    converged: bool = True

    @property
    def certified(self) -> bool:
        """Whether ``upper`` is a certified upper end."""
        return math.isfinite(self.upper)

    @property
    def ratio(self) -> float:
        """``norm / reshaped``: how far ``spectral_norm``'s figure is from the layer's norm."""
        return self.norm / self.reshaped if self.reshaped else math.nan


@dataclass(frozen=True)
class LipschitzReport:
    """Per-layer operator norms of a model; iterate it for the :class:`LayerNorm` records.

    ``str(report)`` is an aligned table. :attr:`certified_bound`, the product of the layers'
    certified upper ends, bounds the Lipschitz constant (in the 2-norm) of a model that chains
    these layers with 1-Lipschitz activations (ReLU, tanh, max pooling, ...); skip connections,
    normalisation and other layers with weights are not in it. :attr:`product` multiplies the
    norms themselves: an estimate, not a bound (an iterative norm may lie below the true one).
    """

    records: tuple[LayerNorm, ...]
    input_shape: tuple[int, ...]

    @property
    def product(self) -> float:
        """The product of the layer norms (point values: not a bound)."""
        return math.prod(r.norm for r in self.records)

    @property
    def certified_bound(self) -> float:
        """The product of the certified upper ends (``inf`` if a layer has none)."""
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
             f"{r.upper:.6f}" if r.certified else "none", f"{r.reshaped:.6f}", f"{r.ratio:.3f}",
             r.method + ("" if r.converged else " (not converged)"), f"{r.seconds:.2f} s"]
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
            "norm: the layer's operator norm (exact for fft/dense, to tol for lanczos; "
            "jvp-lanczos: a module with its own forward, measured on its Jacobian, not certified)"
        )
        out.append(f"product of layer norms: {self.product:.6g} (an estimate, not a bound)")
        uncertified = [r.path for r in self.records if not r.certified]
        if uncertified:
            out.append(f"no certified bound: no certified upper end for {', '.join(uncertified)}")
        else:
            out.append(
                f"certified bound: {self.certified_bound:.6g} (product of the certified upper "
                f"ends): a Lipschitz bound for a chain of these layers with 1-Lipschitz "
                f"activations"
            )
        return "\n".join(out)


def _describe(m: Any, in_shape: tuple[int, ...]) -> str:
    """``3->64 k=7x7 s=2 p=3`` and whatever else differs from the defaults (from the layer's
    :class:`~convmat.engine.Geometry`)."""
    if not isinstance(m, _CONV):
        return f"{m.in_features}->{m.out_features}"
    geo = Geometry.from_module(m, in_shape[1:])

    def fmt(v: Any) -> str:  # one value where every dimension has it
        return str(v[0]) if len(set(v)) == 1 else "x".join(map(str, v))

    pads = tuple(str(b) if b == a else f"{b}/{a}" for b, a in geo.padding)
    parts = [f"{geo.in_channels}->{geo.out_channels}", f"k={'x'.join(map(str, geo.kernel_size))}"]
    extras = [
        ("s", geo.stride, all(v == 1 for v in geo.stride)),
        ("p", pads, all(b == a == 0 for b, a in geo.padding)),
        ("d", geo.dilation, all(v == 1 for v in geo.dilation)),
        ("g", (geo.groups,), geo.groups == 1),
        ("op", geo.output_padding, not any(geo.output_padding)),
    ]
    parts += [f"{name}={fmt(v)}" for name, v, default in extras if not default]
    if geo.padding_mode != "zeros":
        parts.append(geo.padding_mode)
    return " ".join(parts)


def _own_forward_problem(m: nn.Module) -> str:
    """Why ``m`` may not compute what its weight and settings describe (``""``: it does)."""
    if isinstance(m, _CONV):
        return plain_conv_problem(m)
    owner = next((c for c in type(m).__mro__ if "forward" in c.__dict__), None)
    if owner is not None and owner.__module__ not in _TRUSTED_LINEAR:
        return "overrides forward, so it may not compute the product its weight describes"
    return ""


def _jacobian_norm(
    path: str, m: nn.Module, in_shape: tuple[int, ...], tol: float, problem: str
) -> tuple[NormResult, tuple[int, ...]]:
    """The norm of a module with its own forward that is linear in its input, by Lanczos on
    its Jacobian products (float64 copy of the module), and the shape of one output;
    ConvMatError naming the path and class if it is not linear."""
    where = f"module {path} ({type(m).__name__})"
    param = next(iter(m.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        f = copy.deepcopy(m).to(torch.float64)
    except Exception as err:  # any failure to copy means: it cannot be measured
        raise ConvMatError(f"{where} {problem}, and could not be copied to measure it: "
                           f"{err}") from None  # fmt: skip
    f.eval()
    zero = torch.zeros(1, *in_shape, dtype=torch.float64, device=device)

    with torch.no_grad():
        offset = f(zero)  # the bias part: f is affine if it is linear after this
        gen = torch.Generator(device=device).manual_seed(0)
        x, y = (torch.randn(1, *in_shape, dtype=torch.float64, device=device, generator=gen)
                for _ in range(2))  # fmt: skip
        a, b = _PROBE_COEFFICIENTS
        fx, fy = f(x) - offset, f(y) - offset
        mixed = f(a * x + b * y) - offset
    gap = float((mixed - a * fx - b * fy).norm())
    scale = abs(a) * float(fx.norm()) + abs(b) * float(fy.norm())
    if not gap <= _LINEARITY_TOL * max(scale, torch.finfo(torch.float64).tiny):
        raise ConvMatError(
            f"{where} {problem}, and it is not linear in its input (f(a x + b y) - f(0) differs "
            f"from a (f(x) - f(0)) + b (f(y) - f(0)) by {gap:.2e} relative to {scale:.2e}): "
            f"its operator norm is not defined; replace it by a plain layer or leave it out"
        )

    def linear(v: torch.Tensor) -> torch.Tensor:
        return f(v) - offset

    n = math.prod(in_shape)

    def gram(block: torch.Tensor) -> torch.Tensor:
        V = block.reshape(-1, *in_shape)
        base = torch.zeros_like(V)
        jv = torch.func.jvp(lambda t: f(t) - offset, (base,), (V,))[1]
        _, pull = torch.func.vjp(lambda t: f(t) - offset, base)
        return pull(jv)[0].reshape(block.shape[0], n)

    with torch.no_grad():
        vector, converged, error = _gram_top(gram, n, tol, device)
        value = float(linear(vector.reshape(1, *in_shape)).norm() / vector.norm())
    result = NormResult(value, value, math.inf, "jvp-lanczos", converged, tol, error)
    return result, tuple(offset.shape[1:])


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
    method: Method = "auto",
) -> LipschitzReport:
    """The operator norm of every convolution and linear layer of ``model``.

    Args:
        model: any ``nn.Module``; its conv (``nn.Conv*d``, ``nn.ConvTranspose*d`` and convmat's
            matrix-form twins) and linear layers are measured, at the input size each sees.
            Subclasses with their own forward are measured on their Jacobian if linear in
            their input (``"jvp-lanczos"``, not certified), refused otherwise.
        input_shape: the shape of one input without the batch, e.g. ``(3, 32, 32)``.
        tol: relative accuracy for the iterative method (see :func:`convmat.operator_norm`).
        progress: show a progress bar (``None``: only on a terminal).
        method: for every plain conv layer (see :func:`convmat.operator_norm`); an explicit one
            that does not apply to a layer raises.

    Returns:
        :class:`LipschitzReport`; ``print`` it for the table.

    Raises:
        ConvMatError: a layer with its own forward that is not linear in its input (naming its
            path and class), a model that does not run on the input, a bad ``tol``.

    Shape:
        the model takes ``(1, *input_shape)``.

    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
    ...                       nn.Linear(32, 3)).double()
    >>> report = lipschitz_report(model, (1, 4, 4), progress=False)
    >>> [(r.path, r.input_shape) for r in report]
    [('0', (1, 4, 4)), ('3', (32,))]
    >>> report.product == report[0].norm * report[1].norm
    True
    >>> report.certified_bound >= report.product
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
    tol = _check_tol(tol)
    method = _check_method(method)
    records = []
    bar = tqdm(_calls(model, shape), desc="operator norms", unit="layer",
               disable=None if progress is None else not progress, leave=False)  # fmt: skip
    for path, m, in_shape in bar:
        bar.set_postfix_str(path)
        start = time.perf_counter()
        reshaped = _reshaped_norm(m)
        problem = _own_forward_problem(m)
        if problem:
            r, out_shape = _jacobian_norm(path, m, in_shape, tol, problem)
            config = f"{in_shape[0]}->{out_shape[0]} own forward, linear"
        elif isinstance(m, _CONV):
            r = operator_norm(m, in_shape[1:], tol=tol, method=method)
            config = _describe(m, in_shape)
        else:  # a linear layer's matrix is its weight
            slack = _DENSE_SLACK * max(reshaped, 1.0)
            r = NormResult(reshaped, reshaped - slack, reshaped + slack, "dense")
            config = _describe(m, in_shape)
        seconds = time.perf_counter() - start
        records.append(LayerNorm(path, type(m).__name__, config, in_shape, r.value, r.lower,
                                 r.upper, r.method, reshaped, seconds, r.converged))  # fmt: skip
    return LipschitzReport(tuple(records), shape)
