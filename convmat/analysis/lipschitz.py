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

The whole model: traced with ``torch.fx``, its graph carries a certified Lipschitz bound from
the input to every node (a dynamic program in execution order: composition multiplies, sums
add, concatenations add in quadrature, BatchNorm folded into the layer before it, pooling,
resampling and activations with their own constants), and an empirical lower end comes from
Lanczos on the model's Jacobian at random inputs (see :func:`lipschitz_report`).
Limits: the bound is for the model in eval mode; a write in place into a view of another
tensor is not followed back to that tensor.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx
from torch import nn

from .._errors import ConvMatError
from ..engine import (
    Geometry,
    adaptive_window,
    available_memory,
    cached,
    kept_pages,
    most_reads,
    ntuple,
    plain_conv_problem,
    reads,
)
from ..layers import SparseLinear
from .spectral import (
    Method,
    NormResult,
    _basis_size,
    _certified_upper,
    _check_accuracy,
    _check_method,
    _gram_top,
    _lanczos_top,
    _matrix_norm,
    operator_norm,
)
from .tangent import NotLinearisable, linearise
from .torus import folded_grams, keeping_grams

__all__ = ["GraphFactor", "LayerNorm", "LipschitzReport", "layer_calls", "lipschitz_report"]

_CONV = nn.modules.conv._ConvNd
_LAYERS = (_CONV, nn.Linear, SparseLinear)
#: Modules whose linear layers' ``forward`` is ``x @ weight.T + bias`` as it is.
_TRUSTED_LINEAR = ("torch.nn.modules.linear", "convmat.layers.linear")
#: With ``width``, a layer measured on its Jacobian (no certified interval) runs to this
#: fraction of the width as its ``tol``.
_WIDTH_TO_TOL = 0.25
#: Relative tolerance of the numerical linearity check (float64; rounding is ~1e-15).
_LINEARITY_TOL = 1e-9
#: The coefficients ``a, b`` of the check ``f(a x + b y) = a f(x) + b f(y)``: neither 0 nor 1
#: nor equal in size, so that neither homogeneity nor additivity alone passes it.
_PROBE_COEFFICIENTS = (0.7, -1.3)
#: The lower end's Lanczos steps stop before ``iterations`` once the top Ritz value's estimated
#: error is this far below it (float32's precision; the direction is measured in float64).
_LOWER_TOL = 1e-6
#: The ways the lower end's Lanczos steps take ``J u``, the first that applies: ``"tape"``
#: replays the model's Jacobian recorded as ATen operations (:mod:`.tangent`; a forward pass
#: without biases), ``"transposed"`` transposes the pull-back (two to three forward passes);
#: where neither applies, forward mode (see :func:`_empirical_lower`).
_PUSHES: tuple[str, ...] = ("tape", "transposed")
#: ... which must give forward mode's ``||J v||`` within this relative difference (float32
#: against float64), or every probe they ran is run again by forward mode.
_PUSH_AGREEMENT = 1e-3
#: A probe whose float32 estimate lies this far (relative) below the best float64 measurement
#: is not measured (the estimates are good to ~1e-6; a float64 forward-mode product through
#: U-Net at 224 takes 6-8 s).
_ESTIMATE_SLACK = 1e-4


class _BeyondRange(ArithmeticError):
    """A product with ``J^T J`` left float32's range, or was 0 there (its steps run again in
    float64)."""


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
    """Per-layer operator norms of a model and a certified Lipschitz bound of the whole model;
    iterate it for the :class:`LayerNorm` records.

    ``str(report)`` prints ``[lower, upper]`` for the model, the per-layer table, the graph's
    other factors and what was not certified. :attr:`upper` (also :attr:`certified_bound`)
    bounds the Lipschitz constant of the model in eval mode, in the 2-norm: the certified upper
    ends combined along the model's ``torch.fx`` graph (composition multiplies, an addition
    adds, a concatenation adds in quadrature; BatchNorm folded into the layer before it,
    pooling and activations with their own constants); ``inf`` where some node on the way has
    no certified constant (:attr:`not_certified` says which and why) or the model could not be
    traced. :attr:`lower` is the largest ``||J v|| / ||v||`` found for the model's Jacobian at
    random inputs: a local value, so ``lower <= Lipschitz constant <= upper``; the input and
    direction reaching it are :attr:`witness_input` and :attr:`witness_direction`.
    :attr:`product` multiplies the layer norms: an estimate of nothing in particular.
    """

    records: tuple[LayerNorm, ...]
    input_shape: tuple[int, ...]
    upper: float = math.inf
    lower: float = 0.0
    graph: str = ""
    factors: tuple[GraphFactor, ...] = ()
    not_certified: tuple[str, ...] = ()
    lower_note: str = ""
    witness_input: torch.Tensor | None = field(default=None, repr=False, compare=False)
    witness_direction: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def product(self) -> float:
        """The product of the layer norms (point values: not a bound)."""
        return math.prod(r.norm for r in self.records)

    @property
    def certified_bound(self) -> float:
        """The certified Lipschitz bound of the whole model (:attr:`upper`; ``inf``: none)."""
        return self.upper

    @property
    def certified(self) -> bool:
        """Whether :attr:`upper` is a certified bound."""
        return math.isfinite(self.upper)

    def __iter__(self) -> Iterator[LayerNorm]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> LayerNorm:
        return self.records[index]

    def to_dicts(self) -> list[dict[str, Any]]:
        """The records as plain dicts (with the ratio), e.g. for JSON or a DataFrame."""
        return [{**dataclasses.asdict(r), "ratio": r.ratio} for r in self.records]

    def model_dict(self) -> dict[str, Any]:
        """The whole-model figures as plain data (the witness as its norms, not its entries)."""
        witness = None
        if self.witness_input is not None and self.witness_direction is not None:
            witness = {"input_norm": float(self.witness_input.norm()),
                       "direction_norm": float(self.witness_direction.norm()),
                       "value": self.lower}  # fmt: skip
        return {
            "lower": self.lower, "upper": self.upper, "certified": self.certified,
            "graph": self.graph, "not_certified": list(self.not_certified),
            "lower_note": self.lower_note, "witness": witness,
            "factors": [dataclasses.asdict(f) for f in self.factors],
        }  # fmt: skip

    def __str__(self) -> str:
        head = ["layer", "type", "config", "input", "norm", "certified upper", "reshaped",
                "ratio", "method", "time"]  # fmt: skip
        rows = [
            [r.path, r.kind, r.config, "x".join(map(str, r.input_shape)), f"{r.norm:.6f}",
             f"{r.upper:.6f}" if r.certified else "none", f"{r.reshaped:.6f}", f"{r.ratio:.3f}",
             r.method + ("" if r.converged else " (not converged)"), f"{r.seconds:.2f} s"]
            for r in self.records
        ]  # fmt: skip
        shape = "x".join(map(str, self.input_shape))
        upper = f"{self.upper:.6g}" if self.certified else "none certified"
        out = [f"Lipschitz report for inputs of shape {shape} ({len(rows)} layers)",
               f"model Lipschitz constant (2-norm, eval mode): [{self.lower:.6g}, {upper}]",
               ""]  # fmt: skip
        out += _table(head, rows, {4, 5, 6, 7, 9})
        out.append(
            "norm: the layer's operator norm (exact for fft/dense, to tol for lanczos; with a "
            "width, the lower end of an interval that narrow, window: from the enclosing "
            "circular convolution's top vector; jvp-lanczos: a module with its own forward, "
            "measured on its Jacobian, not certified)"
        )
        out.append(f"product of layer norms: {self.product:.6g} (an estimate, not a bound)")
        uncertified = [r.path for r in self.records if not r.certified]
        if uncertified:
            out.append(f"no certified bound: no certified upper end for {', '.join(uncertified)}")
        paths = {r.path.split(" ")[0] for r in self.records}
        others = [
            f
            for f in self.factors
            if f.target not in paths
            and (f.factor != 1 or f.rule.startswith(("sum", "concatenation")))
        ]
        if others:
            out += ["", f"other factors along the {self.graph}:"]
            out += _table(
                ["node", "target", "kind", "input", "factor", "rule", "bound so far"],
                [[f.node, f.target, f.kind, "x".join(map(str, f.input_shape)),
                  f"{f.factor:.6g}", f.rule, f"{f.lipschitz:.6g}"] for f in others],
                {4, 6},
            )  # fmt: skip
        out.append("")
        if self.certified:
            out.append(f"certified bound: {self.upper:.6g}, the Lipschitz constant of the model "
                       f"in eval mode along its {self.graph}")  # fmt: skip
        else:
            out.append("not certified: " + "; ".join(self.not_certified or ("no bound",)))
        out.append(f"lower end {self.lower:.6g}: {self.lower_note}")
        return "\n".join(out)


def _table(head: list[str], rows: list[list[str]], numeric: set[int]) -> list[str]:
    """The lines of an aligned table (``numeric`` columns right-aligned)."""
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return [line(head), line(["-" * w for w in widths]), *(line(row) for row in rows)]


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
    if geo.mode.folds:
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
        offset: torch.Tensor = f(zero)  # the bias part: f is affine if it is linear after this
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
        out: torch.Tensor = f(v)
        return out - offset

    n = math.prod(in_shape)
    # J is constant (f is affine): its products are recorded once per block size, J u from
    # the tape (a forward pass without the bias) where it can follow f, else forward mode.
    recorded: dict[int, tuple[Callable[..., Any], Callable[..., Any] | None]] = {}

    def products(size: int) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
        if size not in recorded:
            base = torch.zeros(size, *in_shape, dtype=torch.float64, device=device)
            pull = torch.func.vjp(lambda t: f(t) - offset, base)[1]
            try:
                push: Callable[..., Any] | None = linearise(f, base)[1]
            except NotLinearisable:
                push = None
            recorded[size] = (pull, push)
        return recorded[size]

    def gram(block: torch.Tensor) -> torch.Tensor:
        V = block.reshape(-1, *in_shape)
        pull, push = products(V.shape[0])
        if push is None:
            jv = torch.func.jvp(lambda t: f(t) - offset, (torch.zeros_like(V),), (V,))[1]
        else:
            jv = push(V)
        out: torch.Tensor = pull(jv)[0]
        return out.reshape(block.shape[0], n)

    with torch.no_grad():
        vector, converged, error = _gram_top(gram, n, tol, device)
        value = float(linear(vector.reshape(1, *in_shape)).norm() / vector.norm())
    result = NormResult(value, value, math.inf, "jvp-lanczos", converged, tol, error)
    return result, tuple(offset.shape[1:])


def _reshaped_norm(m: Any) -> tuple[float, float, float]:
    """The spectral norm of the matrix ``torch.nn.utils.spectral_norm`` divides by: the weight
    with ``dim`` (1 for transposed convolutions, else 0) first, flattened after it; as
    ``(value, lower, upper)`` (a linear layer's norm and interval)."""
    w = m.weight.detach()
    if w.layout != torch.strided:
        w = w.to_dense()
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        w = w.transpose(0, 1)
    return _matrix_norm(w.reshape(w.shape[0], -1))


def layer_calls(
    model: nn.Module, input_shape: tuple[int, ...], kinds: tuple[type[nn.Module], ...] = _LAYERS
) -> list[tuple[str, Any, tuple[int, ...], tuple[int, ...]]]:
    """``(path, module, input shape, output shape)`` of every call of a module of ``kinds``, in
    order (a second call of one module is ``"path (call 2)"``), from one forward pass on zeros
    in eval mode (training flags restored, no batch statistics updated).

    Raises:
        ConvMatError: an input that would take more than a quarter of the free memory, or a
            model that does not run on it.

    Shape:
        the model takes ``(1, *input_shape)``; shapes are without the batch.

    >>> net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Conv1d(2, 2, 3), nn.Flatten())
    >>> [(p, i, o) for p, _, i, o in layer_calls(net, (1, 8), (nn.Conv1d,))]
    [('0', (1, 8), (2, 6)), ('2', (2, 6), (2, 4))]
    """
    calls: list[tuple[str, Any, tuple[int, ...]]] = []
    outputs: list[tuple[int, ...]] = []
    count: dict[str, int] = {}

    def before(path: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        count[path] = count.get(path, 0) + 1
        name = path if count[path] == 1 else f"{path} (call {count[path]})"
        calls.append((name, module, tuple(args[0].shape[1:])))

    def after(module: nn.Module, args: tuple[Any, ...], result: Any) -> None:
        outputs.append(tuple(result.shape[1:]))

    chosen = [(path, m) for path, m in model.named_modules() if isinstance(m, kinds)]
    handles = [m.register_forward_pre_hook(lambda mod, args, path=path: before(path, mod, args))
               for path, m in chosen]  # fmt: skip
    handles += [m.register_forward_hook(after) for _, m in chosen]
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
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConvMatError(
            f"the model does not run on an input of shape {(1, *input_shape)!r}: {first}"
        ) from None
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    return [(p, m, i, o) for (p, m, i), o in zip(calls, outputs)]


def lipschitz_report(
    model: nn.Module,
    input_shape: Any,
    *,
    tol: float | None = None,
    width: float | None = None,
    progress: bool | None = None,
    method: Method = "auto",
    probes: int = 3,
    iterations: int = 10,
    seed: int = 0,
) -> LipschitzReport:
    """The operator norm of every convolution and linear layer of ``model``, and a certified
    Lipschitz bound of the whole model with an empirical lower end.

    The bound: the model is traced with ``torch.fx`` (conv and linear layers kept whole) and
    run once in eval mode on zeros; along the graph each node gets a bound ``L`` from the
    model's input: a layer multiplies by its certified upper end, an addition adds
    (``L(f + g) <= L(f) + L(g)``), a concatenation (``torch.cat``/``stack``) combines in
    quadrature (``||[f(x); g(x)] - [f(y); g(y)]||^2 <= (L_f^2 + L_g^2) ||x - y||^2``), a
    constant counts 0. Factors: a BatchNorm in eval mode whose input is a conv or linear layer
    used nowhere else is folded into it (the certified norm of the layer with its output
    channels scaled by ``gamma / sqrt(var + eps)``), alone it is ``max |gamma / sqrt(var +
    eps)|``; average pooling (plain or adaptive, any padding, ``ceil_mode``,
    ``count_include_pad``, ``divisor_override``) the exact norm of its matrix, a Kronecker
    product of 1-D pooling matrices; upsampling and ``F.interpolate`` (every mode) likewise; max
    pooling ``sqrt(k)``, ``k`` the most windows any input
    entry belongs to; ``mean`` over ``n`` entries ``1/sqrt(n)``, ``sum`` ``sqrt(n)``; ReLU,
    ReLU6, Tanh, Hardtanh, Softplus, CELU, Dropout (eval), Identity, Flatten, reshapes and
    slices 1; LeakyReLU ``max(1, |slope|)``; ELU ``max(1, |alpha|)``; Sigmoid 1/4; Hardswish
    3/2; GELU, SiLU, Mish the sup of ``|f'|`` on a fine grid plus a margin (GELU 1.1291, SiLU
    1.0998, Mish 1.0885). A node with no rule (LayerNorm, a product of two tensors, ...) makes
    the bound ``inf``, named in ``not_certified``; a model fx cannot trace gets no bound, said so.

    Args:
        model: any ``nn.Module``; its conv (``nn.Conv*d``, ``nn.ConvTranspose*d`` and convmat's
            matrix-form twins) and linear layers are measured, at the input size each sees.
            Subclasses with their own forward are measured on their Jacobian if linear in
            their input (``"jvp-lanczos"``, not certified), refused otherwise.
        input_shape: the shape of one input without the batch, e.g. ``(3, 32, 32)``.
        tol: relative accuracy for the iterative method (see :func:`convmat.operator_norm`;
            default ``1e-7``).
        width: instead of ``tol``, the relative width ``upper / lower - 1`` each conv layer's
            certified interval is to reach (:func:`convmat.operator_norm`'s ``width``): far
            cheaper on large inputs; the folded layers' upper ends are certified to the same
            room. A layer that cannot reach it has ``converged`` False.
        progress: show a progress bar (``None``: only on a terminal).
        method: for every plain conv layer (see :func:`convmat.operator_norm`); an explicit one
            that does not apply to a layer raises.
        probes: random inputs at which the lower end is sought (0: none).
        iterations: Lanczos steps (products with ``J^T J``) at each, fewer where the top
            converges first: the direction is the best in the Krylov space of the random
            start they span, which holds power iteration's direction after one step fewer (1:
            the start itself). Ten find a larger ``||J v||`` than twenty power steps did on
            ResNet-18, VGG-11 and a U-Net at 224x224 (benchmarks/README.md).
        seed: of the random inputs and starting directions.

    Returns:
        :class:`LipschitzReport`; ``print`` it for the table.

    Raises:
        ConvMatError: a layer with its own forward that is not linear in its input (naming its
            path and class), a model that does not run on the input, a bad ``tol`` or
            ``width`` (or both given).

    Shape:
        the model takes ``(1, *input_shape)``.

    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
    ...                       nn.Linear(32, 3)).double()
    >>> report = lipschitz_report(model, (1, 4, 4), progress=False)
    >>> [(r.path, r.input_shape) for r in report]
    [('0', (1, 4, 4)), ('3', (32,))]
    >>> report.product == report[0].norm * report[1].norm
    True
    >>> report.lower <= report.product <= report.upper  # a chain: the product of the uppers
    True
    """
    shape, tol, width, method = _checked_report_arguments(
        model, input_shape, tol, width, method, probes, iterations
    )
    modes = {m: m.training for m in model.modules()}
    try:
        # Each layer's Gram matrices are kept from its norm for its BatchNorm's folded norm.
        with keeping_grams():
            records = _layer_norms(model, shape, tol, width, method, progress)
            model.eval()
            upper, graph, factors, reasons = _graph_bound(model, shape, records, method, width)
        lower, x, v, note = _empirical_lower(model, shape, probes, iterations, seed)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return LipschitzReport(tuple(records), shape, upper, lower, graph, factors, reasons, note,
                           x, v)  # fmt: skip


def _checked_report_arguments(
    model: nn.Module, input_shape: Any, tol: float | None, width: float | None, method: Method,
    probes: int, iterations: int,
) -> tuple[tuple[int, ...], float, float | None, Method]:  # fmt: skip
    """:func:`lipschitz_report`'s arguments checked: the input shape, ``tol`` or ``width``, and
    ``method``."""
    if not isinstance(model, nn.Module):
        raise ConvMatError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        # operator.index: a float or a bool size is a mistake, not something to truncate.
        if any(isinstance(v, bool) for v in input_shape):
            raise TypeError
        shape = tuple(operator.index(v) for v in input_shape)
    except TypeError:
        raise ConvMatError(f"input_shape must be a tuple of ints, got {input_shape!r}") from None
    if not shape or any(v < 1 for v in shape):
        raise ConvMatError(f"input_shape must be positive sizes, got {input_shape!r}")
    tol, width = _check_accuracy(tol, width)
    method = _check_method(method)
    for name, value, least in (("probes", probes, 0), ("iterations", iterations, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConvMatError(f"{name} must be an int >= {least}, got {value!r}")
    return shape, tol, width, method


def _layer_norms(
    model: nn.Module, shape: tuple[int, ...], tol: float, width: float | None, method: Method,
    progress: bool | None,
) -> list[LayerNorm]:  # fmt: skip
    """The record of every conv and linear layer call, at the input size it sees, behind a
    progress bar."""
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    records = []
    calls = [(path, m, in_shape) for path, m, in_shape, _ in layer_calls(model, shape)]
    bar = tqdm(calls, desc="operator norms", unit="layer",
               disable=None if progress is None else not progress, leave=False)  # fmt: skip
    for path, m, in_shape in bar:
        bar.set_postfix_str(path)
        records.append(_layer_norm(path, m, in_shape, tol, width, method))
    return records


def _layer_norm(
    path: str, m: nn.Module, in_shape: tuple[int, ...], tol: float, width: float | None,
    method: Method,
) -> LayerNorm:  # fmt: skip
    """One layer's operator norm: a conv's by :func:`operator_norm`, a linear layer's from its
    weight, a layer with its own forward on its Jacobian."""
    start = time.perf_counter()
    reshaped, lower, upper = _reshaped_norm(m)
    problem = _own_forward_problem(m)
    if problem:
        accuracy = tol if width is None else _WIDTH_TO_TOL * width
        r, out_shape = _jacobian_norm(path, m, in_shape, accuracy, problem)
        config = f"{in_shape[0]}->{out_shape[0]} own forward, linear"
    elif isinstance(m, _CONV):
        if width is None:
            r = operator_norm(m, in_shape[1:], tol=tol, method=method)
        else:
            r = operator_norm(m, in_shape[1:], width=width, method=method)
        config = _describe(m, in_shape)
    else:  # a linear layer's matrix is its weight
        r = NormResult(reshaped, lower, upper, "dense")
        config = _describe(m, in_shape)
    seconds = time.perf_counter() - start
    return LayerNorm(path, type(m).__name__, config, in_shape, r.value, r.lower, r.upper,
                     r.method, reshaped, seconds, r.converged)  # fmt: skip


# -- the whole model: a Lipschitz bound along the traced graph --------------------------------


@dataclass(frozen=True)
class GraphFactor:
    """One node of the traced graph in a :class:`LipschitzReport`, with its Lipschitz factor.

    Attributes:
        node: the node's name in the ``torch.fx`` graph.
        target: the module path, or the function or method called.
        kind: the module's class or the function's name.
        input_shape: the shape of its first tensor input, without the batch (``()``: none).
        factor: the op's own Lipschitz constant in the 2-norm (``inf``: none certified); for
            an addition or a concatenation, how its inputs' constants combine.
        rule: where the factor comes from.
        lipschitz: the certified bound from the model's input to this node's output.
        seconds: time spent on the factor.
    """

    node: str
    target: str
    kind: str
    input_shape: tuple[int, ...]
    factor: float
    rule: str
    lipschitz: float
    seconds: float


class _Tracer(torch.fx.Tracer):
    """fx's tracer, keeping every conv and linear layer (subclasses included) as one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LAYERS) or super().is_leaf_module(m, qualname)


#: Activations with a closed-form Lipschitz constant (the sup of |f'|), by class.
_UNIT = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
         nn.CELU, nn.Softplus, nn.Identity, nn.Flatten, nn.Unflatten,
         nn.modules.dropout._DropoutNd, nn.AlphaDropout)  # fmt: skip
#: Activations whose constant is the sup of |f'| found on a grid (see :func:`_derivative_sup`).
_NUMERIC = (nn.GELU, nn.SiLU, nn.Mish)
#: Shape and copy operations: a permutation or a projection of the entries (norm 1).
_SHAPE_OPS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze",
              "unsqueeze", "t", "clone", "float", "double", "to", "type_as", "movedim",
              "swapaxes", "chunk", "split", "unbind", "tensor_split", "narrow", "detach_copy",
              "clamp", "clip", "clamp_", "unflatten", "ravel", "view_as", "reshape_as"}  # fmt: skip
_ADD = {"add", "add_", "iadd", "sub", "sub_", "isub"}
_MUL = {"mul", "mul_", "imul"}
_DIV = {"truediv", "div", "div_", "itruediv"}
_CAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"}
#: Functional forms and methods that are a module: name -> (module class, argument names).
_AS_MODULE: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    **{f"avg_pool{d}d": (getattr(nn, f"AvgPool{d}d"), (
        "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
        "divisor_override")[: 5 if d == 1 else 6]) for d in (1, 2, 3)},
    **{f"max_pool{d}d": (getattr(nn, f"MaxPool{d}d"), (
        "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"))
       for d in (1, 2, 3)},
    **{f"adaptive_avg_pool{d}d": (getattr(nn, f"AdaptiveAvgPool{d}d"), ("output_size",))
       for d in (1, 2, 3)},
    **{f"adaptive_max_pool{d}d": (getattr(nn, f"AdaptiveMaxPool{d}d"),
                                  ("output_size", "return_indices")) for d in (1, 2, 3)},
    "relu": (nn.ReLU, ("inplace",)), "relu_": (nn.ReLU, ()), "relu6": (nn.ReLU6, ("inplace",)),
    "hardtanh": (nn.Hardtanh, ("min_val", "max_val", "inplace")),
    "tanh": (nn.Tanh, ()), "sigmoid": (nn.Sigmoid, ()), "hardsigmoid": (nn.Hardsigmoid, ()),
    "leaky_relu": (nn.LeakyReLU, ("negative_slope", "inplace")),
    "elu": (nn.ELU, ("alpha", "inplace")), "celu": (nn.CELU, ("alpha", "inplace")),
    "selu": (nn.SELU, ("inplace",)), "softplus": (nn.Softplus, ("beta", "threshold")),
    "gelu": (nn.GELU, ("approximate",)), "silu": (nn.SiLU, ("inplace",)),
    "mish": (nn.Mish, ("inplace",)), "hardswish": (nn.Hardswish, ("inplace",)),
    "softsign": (nn.Softsign, ()), "logsigmoid": (nn.LogSigmoid, ()),
}  # fmt: skip


#: The cache owner of the activations' derivative bounds (see :func:`convmat.cache_info`).
DERIVATIVE_OWNER = "derivative bound"


def _derivative_sup(kind: str, approximate: str = "none") -> float:
    """:func:`_derivative_sup_uncached`, kept in the engine's one cache (a float each, under
    its byte budget and emptied by :func:`convmat.clear_cache`)."""
    return cached(
        (DERIVATIVE_OWNER, kind, approximate),
        DERIVATIVE_OWNER,
        lambda: _derivative_sup_uncached(kind, approximate),
        lambda _: 8,  # one float64
    )


def _derivative_sup_uncached(kind: str, approximate: str = "none") -> float:
    """An upper bound on ``sup |f'|`` for GELU, SiLU or Mish: the largest ``|f'|`` on a grid
    of step ``h`` over ``[-40, 40]``, plus ``h max|f''|`` (twice what Taylor's theorem needs:
    ``f'`` moves by at most ``max|f''| h / 2`` from the nearest grid point, with ``max|f''|``
    itself read off the grid). Outside ``[-40, 40]`` these ``f'`` are within 1e-15 of 0 or 1,
    below the sup inside. Values: GELU 1.12906, GELU(tanh) 1.12927, SiLU 1.09984,
    Mish 1.08849 (each a few 1e-5 above the true sup)."""
    h = 1e-4
    f: Callable[[torch.Tensor], torch.Tensor]
    f = {"GELU": lambda v: nn.functional.gelu(v, approximate=approximate),
         "SiLU": nn.functional.silu, "Mish": nn.functional.mish}[kind]  # fmt: skip
    with torch.enable_grad():
        t = torch.arange(-40.0, 40.0 + h, h, dtype=torch.float64, requires_grad=True)
        (d1,) = torch.autograd.grad(f(t).sum(), t, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), t)
    return float(d1.detach().abs().max()) + h * float(d2.abs().max())


def _activation(m: nn.Module) -> tuple[float, str] | None:
    """The Lipschitz constant of an elementwise module and why, or None if not one."""
    if isinstance(m, _UNIT):
        return 1.0, "1-Lipschitz" if not isinstance(m, _DROPOUT) else "identity in eval mode"
    if isinstance(m, nn.Sigmoid):
        return 0.25, "sup sigmoid' = 1/4"
    if isinstance(m, nn.Hardsigmoid):
        return 1 / 6, "slope 1/6"
    if isinstance(m, nn.Hardswish):
        return 1.5, "sup |hardswish'| = 3/2 (at x = 3)"
    if isinstance(m, nn.LeakyReLU):
        return max(1.0, abs(m.negative_slope)), "max(1, |negative_slope|)"
    if isinstance(m, nn.ELU):
        return max(1.0, abs(m.alpha)), "max(1, |alpha|)"
    if isinstance(m, nn.SELU):
        return 1.0507009873554805 * 1.6732632423543772, "scale * alpha"
    if isinstance(m, nn.PReLU):
        return max(1.0, float(m.weight.detach().abs().max())), "max(1, max |weight|)"
    if isinstance(m, _NUMERIC):
        approx = getattr(m, "approximate", "none")
        return _derivative_sup(type(m).__name__, approx), "sup |f'| on a grid, with a margin"
    return None


_DROPOUT = (nn.modules.dropout._DropoutNd, nn.AlphaDropout)


def _overlap(in_size: int, out_size: int, kernel: int, stride: int, padding: int,
             dilation: int) -> int:  # fmt: skip
    """The most windows of a 1-D pooling that any input position belongs to."""
    taps = torch.arange(kernel)[None, :]
    return most_reads(reads(torch.arange(out_size)[:, None], taps, stride, dilation, padding),
                      in_size)  # fmt: skip


def _adaptive_overlap(in_size: int, out_size: int) -> int:
    """The most windows of a 1-D adaptive pooling that any input position belongs to."""
    start, end = adaptive_window(torch.arange(out_size), in_size, out_size)
    cover = (torch.arange(in_size)[None, :] >= start[:, None]) & (
        torch.arange(in_size)[None, :] < end[:, None]
    )
    return int(cover.sum(0).max())


def _pool_matrix_norm(m: nn.Module, in_spatial: tuple[int, ...],
                      out_spatial: tuple[int, ...]) -> float:  # fmt: skip
    """The exact operator norm of an average pooling (plain or adaptive) of one channel.

    Its matrix is the Kronecker product of one 1-D pooling matrix per dimension (the windows
    are boxes and every divisor torch uses is a product over dimensions, ``divisor_override``
    a constant), so its norm is the product of theirs: each 1-D matrix is made by torch's own
    pooling of an identity, and its norm taken by dense SVD in float64 (with the SVD's rounding
    margin added: an upper end)."""
    d = len(in_spatial)
    adaptive = isinstance(m, nn.modules.pooling._AdaptiveAvgPoolNd)
    fn = getattr(nn.functional, f"{'adaptive_' if adaptive else ''}avg_pool{d}d")
    if not adaptive:
        k, s, p = (ntuple(getattr(m, a), d, a) for a in ("kernel_size", "stride", "padding"))
        override = getattr(m, "divisor_override", None)
    total = 1.0
    for i, n in enumerate(in_spatial):
        one = [1] * d
        eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, *one[:i], n, *one[i + 1 :])
        if adaptive:
            out = fn(eye, [*one[:i], out_spatial[i], *one[i + 1 :]])
        else:
            kw: dict[str, Any] = {"ceil_mode": m.ceil_mode,
                                  "count_include_pad": m.count_include_pad}  # fmt: skip
            if override:
                kw["divisor_override"] = 1
            dims = [(k[i], s[i], p[i]) if j == i else (1, 1, 0) for j in range(d)]
            out = fn(eye, *(list(v) for v in zip(*dims)), **kw)
        total *= _dense_upper(out.reshape(n, -1))
    return total / override if not adaptive and override else total


def _pool(m: nn.Module, x: torch.Tensor, result: Any) -> tuple[float, str] | None:
    """The Lipschitz constant of a pooling module at this input, and why (None: not one)."""
    if isinstance(result, tuple):
        return None  # return_indices: the indices are not a Lipschitz function
    in_sp, out_sp = tuple(x.shape[2:]), tuple(result.shape[2:])
    if isinstance(m, nn.modules.pooling._MaxPoolNd):
        d = len(in_sp)
        k, s, p, dl = (ntuple(getattr(m, a), d, a)
                       for a in ("kernel_size", "stride", "padding", "dilation"))  # fmt: skip
        count = math.prod(_overlap(*a) for a in zip(in_sp, out_sp, k, s, p, dl))
        return math.sqrt(count), f"max pooling: sqrt(most windows per input entry = {count})"
    if isinstance(m, nn.modules.pooling._AdaptiveMaxPoolNd):
        count = math.prod(_adaptive_overlap(a, b) for a, b in zip(in_sp, out_sp))
        return math.sqrt(count), f"max pooling: sqrt(most windows per input entry = {count})"
    if isinstance(m, nn.modules.pooling._AvgPoolNd | nn.modules.pooling._AdaptiveAvgPoolNd):
        return _pool_matrix_norm(m, in_sp, out_sp), "exact norm of the pooling matrix"
    return None


_INTERPOLATE = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                "antialias")  # fmt: skip


def _interpolate_norm(x: torch.Tensor, options: dict[str, Any]) -> float:
    """The exact operator norm of ``F.interpolate(x, **options)`` on one channel.

    Every mode (nearest, nearest-exact, (bi/tri)linear, bicubic, area; not antialiased, which
    is refused before) resamples each dimension on its own, so its matrix is a Kronecker
    product of 1-D matrices and its norm the product of theirs: each made by torch's own
    ``interpolate`` of an identity, with the same options (the other dimensions of size 1,
    kept), its norm by dense SVD with the SVD's rounding margin."""
    spatial = tuple(x.shape[2:])
    d = len(spatial)
    size, scale = options.get("size"), options.get("scale_factor")
    total = 1.0
    for i, n in enumerate(spatial):
        one = [1] * d
        eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, *one[:i], n, *one[i + 1 :])
        kw = dict(options)
        if size is not None:
            kw["size"] = [*one[:i], ntuple(size, d, "size")[i], *one[i + 1 :]]
        if scale is not None:
            sf = scale if isinstance(scale, list | tuple) else (scale,) * d
            kw["scale_factor"] = [1.0 * (j != i) or float(sf[i]) for j in range(d)]
        out = nn.functional.interpolate(eye, **kw)
        total *= _dense_upper(out.reshape(n, -1))
    return total


def _bn_scale(m: nn.modules.batchnorm._BatchNorm) -> torch.Tensor | None:
    """``gamma / sqrt(running_var + eps)`` of a BatchNorm in eval mode (None: batch stats)."""
    if m.training or m.running_var is None:
        return None
    scale = 1 / torch.sqrt(m.running_var.detach().double() + m.eps)
    return scale * m.weight.detach().double() if m.weight is not None else scale


def _folded_norm(layer: Any, scale: torch.Tensor, in_shape: tuple[int, ...],
                 method: Method, width: float | None = None) -> float:  # fmt: skip
    """The certified upper end of the norm of ``layer`` with its output channel ``c`` scaled
    by ``scale[c]`` (a BatchNorm folded into it; the bias plays no part), certified to the
    room a ``width`` allows."""
    folded = copy.deepcopy(layer).double()
    grams = None
    with torch.no_grad():
        w = folded.weight
        if isinstance(layer, nn.Linear):
            return _dense_upper(w * scale[:, None])
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            g = layer.groups
            view = w.view(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
            view.mul_(scale.view(g, 1, -1, *[1] * (w.dim() - 2)))
        else:
            # The layer's own Gram matrices, kept from its norm, scaled (none formed again).
            geo = Geometry.from_module(folded, in_shape[1:])
            grams = folded_grams(w, scale, geo)
            w.mul_(scale.view(-1, *[1] * (w.dim() - 1)))
    return _certified_upper(folded, in_shape[1:], method, width, grams)


def _dense_upper(w: torch.Tensor) -> float:
    """A certified upper end of the spectral norm of a dense matrix (:func:`_matrix_norm`)."""
    return _matrix_norm(w)[2]


#: Each node's bound is raised by this factor: it covers the rounding of the float64 products,
#: sums and square roots on the way (each a few units of 1.1e-16 relative).
_ROUNDING = 1 + 1e-14


def _name(target: Any) -> str:
    """A function's or method's short name (``add`` for ``operator.add``)."""
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


class _Bound(torch.fx.Interpreter):
    """Runs the traced model once and propagates, node by node, a certified Lipschitz
    constant from the model's input (a dynamic program over the graph, in execution order)."""

    def __init__(self, gm: torch.fx.GraphModule, records: list[LayerNorm],
                 method: Method, width: float | None = None) -> None:  # fmt: skip
        super().__init__(gm)
        self.queue: dict[str, list[LayerNorm]] = {}
        for r in records:
            self.queue.setdefault(r.path.split(" ")[0], []).append(r)
        self.method, self.width = method, width
        self.lip: dict[torch.fx.Node, float] = {}
        self.shapes: dict[torch.fx.Node, tuple[int, ...]] = {}
        self.factors: list[GraphFactor] = []
        self.reasons: list[str] = []
        self.first = True

    def L(self, a: Any) -> float:
        return self.lip[a] if isinstance(a, torch.fx.Node) else 0.0

    def run_node(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)
        start = time.perf_counter()
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if isinstance(args[0] if args else None, list | tuple):
            tensor = next((a for a in args[0] if isinstance(a, torch.Tensor)), tensor)
        self.shapes[n] = tuple(tensor.shape[1:]) if tensor is not None else ()
        factor, rule, lip = self._rule(n, args, kwargs, result)
        if math.isinf(lip) and not any(math.isinf(self.L(a)) for a in n.all_input_nodes):
            self.reasons.append(f"{self._target(n)} ({self._kind(n)}): {rule}")
        self.lip[n] = lip * _ROUNDING if lip else lip
        first = n.args[0] if n.args else None
        if isinstance(first, torch.fx.Node) and self._in_place(n):
            # Later readers of the input see the result: give them its bound if larger.
            self.lip[first] = max(self.lip[first], self.lip[n])
        if n.op in ("call_module", "call_function", "call_method"):
            self.factors.append(GraphFactor(n.name, self._target(n), self._kind(n),
                                            self.shapes[n], factor, rule, lip,
                                            time.perf_counter() - start))  # fmt: skip
        return result

    def _in_place(self, n: torch.fx.Node) -> bool:
        """Whether ``n`` writes its result into its first input."""
        if n.op == "call_module":
            return bool(getattr(self.module.get_submodule(cast(str, n.target)), "inplace", False))
        name = _name(n.target)
        return (
            (n.op == "call_method" and name.endswith("_"))
            or bool(n.kwargs.get("inplace"))
            or name in ("iadd", "isub", "imul", "itruediv")
        )

    def _target(self, n: torch.fx.Node) -> str:
        return cast(str, n.target) if n.op == "call_module" else _name(n.target)

    def _kind(self, n: torch.fx.Node) -> str:
        if n.op == "call_module":
            return type(self.module.get_submodule(cast(str, n.target))).__name__
        return f"{'method' if n.op == 'call_method' else 'function'} {_name(n.target)}"

    def _rule(self, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any],
              result: Any) -> tuple[float, str, float]:  # fmt: skip
        """``(factor, rule, Lipschitz bound of n's output)``."""
        ins = n.all_input_nodes
        if n.op == "placeholder":
            first, self.first = self.first, False
            return (1.0, "the input", 1.0) if first else (0.0, "a fixed argument", 0.0)
        if n.op == "get_attr":
            return 0.0, "a constant", 0.0
        if n.op == "output":
            leaves: list[torch.fx.Node] = []  # each time it is returned
            torch.fx.node.map_arg(n.args, leaves.append)
            return (
                1.0,
                "outputs combined in quadrature",
                math.sqrt(sum(self.L(a) ** 2 for a in leaves)),
            )
        if all(self.L(a) == 0 for a in ins):
            return 0.0, "does not depend on the input", 0.0
        if not isinstance(result, torch.Tensor | tuple | list):
            if n.op == "call_method" and n.target in ("size", "dim", "numel"):
                return 0.0, "a size", 0.0
            if n.op == "call_function" and _name(n.target) == "getattr":
                return 0.0, "an attribute", 0.0
            return math.inf, "a value that is not a tensor, computed from the input", math.inf
        if n.op == "call_module":
            return self._module(n, args, result)
        return self._function(n, args, kwargs, result)

    def _unary(self, n: torch.fx.Node, factor: float, rule: str) -> tuple[float, str, float]:
        src = n.args[0] if n.args else next(iter(n.kwargs.values()))
        return factor, rule, factor * self.L(src) if factor else 0.0

    def _module(
        self, n: torch.fx.Node, args: tuple[Any, ...], result: Any
    ) -> tuple[float, str, float]:
        target = cast(str, n.target)  # a module's qualified name
        m = self.module.get_submodule(target)
        if isinstance(m, _LAYERS):
            queue = self.queue.get(target)
            if not queue:
                return math.inf, "no record of this layer's call", math.inf
            r = queue.pop(0)
            if not r.certified:
                return math.inf, f"no certified upper end ({r.method})", math.inf
            return self._unary(n, r.upper, f"certified upper end ({r.method})")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return self._batchnorm(n, m)
        found = _activation(m) or _pool(m, args[0], result)
        if isinstance(m, nn.Upsample):
            options = {k: getattr(m, k) for k in _INTERPOLATE if hasattr(m, k)}
            found = _interpolate_norm(args[0], options), "exact norm of the resampling matrix"
        if found is not None:
            return self._unary(n, *found)
        return math.inf, "no Lipschitz rule for this module", math.inf

    def _batchnorm(
        self, n: torch.fx.Node, m: nn.modules.batchnorm._BatchNorm
    ) -> tuple[float, str, float]:
        scale = _bn_scale(m)
        if scale is None:
            return math.inf, "uses batch statistics (no running statistics)", math.inf
        src = n.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and len(src.users) == 1
            and isinstance(layer := self.module.get_submodule(cast(str, src.target)), _LAYERS)
            and not _own_forward_problem(layer)
            and (not isinstance(layer, nn.Linear) or len(self.shapes[src]) == 1)
        ):
            upper = _folded_norm(layer, scale, self.shapes[src], self.method, self.width)
            rule = f"folded into {src.target}: certified upper end of the folded layer"
            return upper, rule, upper * self.L(src.args[0])  # fmt: skip
        return self._unary(n, float(scale.abs().max()), "max |gamma / sqrt(var + eps)|")

    def _function(self, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any],
                  result: Any) -> tuple[float, str, float]:  # fmt: skip
        """The rule of a function or method node, looked up by its name in
        :data:`_FUNCTION_RULES`."""
        rule = _FUNCTION_RULES.get(_name(n.target))
        found = rule(self, n, args, kwargs, result) if rule is not None else None
        if found is None:
            return math.inf, "no Lipschitz rule for this operation", math.inf
        return found

    # -- the rules of functions and methods (each: node, args, kwargs, result -> bound) -------

    def _add(self, n: torch.fx.Node, args: _Args, kwargs: _Kwargs, result: Any) -> _Found:
        a, b = (*n.args, n.kwargs.get("other"))[:2]
        va, vb = (*args, kwargs.get("other"))[:2]
        alpha = abs(float(kwargs.get("alpha", 1)))
        lip = self.L(a) * _spread(va, result) + alpha * self.L(b) * _spread(vb, result)
        return 1.0, "sum: L(a) + L(b) (each times sqrt(copies) if broadcast)", lip

    def _neg(self, n: torch.fx.Node, args: _Args, kwargs: _Kwargs, result: Any) -> _Found:
        return self._unary(n, 1.0, "negation")

    def _product(self, n: torch.fx.Node, args: _Args, kwargs: _Kwargs, result: Any) -> _Found:
        name = _name(n.target)
        a, b = n.args[:2]
        if self.L(a) and self.L(b):
            return math.inf, "product of two tensors that depend on the input", math.inf
        const = args[1] if self.L(a) else args[0]
        if name in _DIV and not self.L(a):
            return math.inf, "division by a tensor that depends on the input", math.inf
        c = float(torch.as_tensor(const).double().abs().max())
        c = 1 / float(torch.as_tensor(const).double().abs().min()) if name in _DIV else c
        spread = _spread(args[0] if self.L(a) else args[1], result)
        return c, "times a constant: max |c|", c * max(self.L(a), self.L(b)) * spread

    def _cat(self, n: torch.fx.Node, args: _Args, kwargs: _Kwargs, result: Any) -> _Found:
        parts: Any = n.args[0] if n.args else n.kwargs["tensors"]
        return (
            1.0,
            "concatenation: sqrt(sum of squares)",
            math.sqrt(sum(self.L(p) ** 2 for p in parts)),
        )

    def _reduce(self, n: torch.fx.Node, args: _Args, kwargs: _Kwargs, result: Any) -> _Found:
        name = _name(n.target)
        x: Any = args[0] if args else None
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if dims is None:
            count = x.numel()
        else:
            dims = (dims,) if isinstance(dims, int) else dims
            count = math.prod(x.shape[d] for d in dims)
        factor = 1 / math.sqrt(count) if name == "mean" else math.sqrt(count)
        return self._unary(n, factor, f"{name} over {count} entries")

    def _moves(self, n: torch.fx.Node, args: _Args, kwargs: _Kwargs, result: Any) -> _Found:
        return self._unary(n, 1.0, "moves or selects entries")

    def _copies(self, n: torch.fx.Node, args: _Args, kwargs: _Kwargs, result: Any) -> _Found:
        x = args[0] if args else None
        return self._unary(n, _spread(x, result), "each entry copied: sqrt(copies)")

    def _getitem(self, n: torch.fx.Node, args: _Args, kwargs: _Kwargs, result: Any) -> _Found:
        x, index = args[0] if args else None, n.args[1]
        if isinstance(x, tuple | list) or _basic_index(index):
            return self._unary(n, 1.0, "selects entries")
        return math.inf, f"indexing with {index!r} may repeat entries", math.inf

    def _dropout(self, n: torch.fx.Node, args: _Args, kwargs: _Kwargs, result: Any) -> _Found:
        if kwargs.get("training", args[2] if len(args) > 2 else True):
            return math.inf, "dropout in training mode is random", math.inf
        return self._unary(n, 1.0, "identity in eval mode")

    def _resample(self, n: torch.fx.Node, args: _Args, kwargs: _Kwargs, result: Any) -> _Found:
        options = {**dict(zip(_INTERPOLATE, args[1:])), **kwargs}
        if options.get("antialias"):
            return math.inf, "antialiased resampling has no rule here", math.inf
        rule = "exact norm of the resampling matrix"
        return self._unary(n, _interpolate_norm(args[0], options), rule)

    def _as_module(
        self, n: torch.fx.Node, args: _Args, kwargs: _Kwargs, result: Any
    ) -> _Found | None:
        """The rule of the module the function is (``F.relu`` is ``nn.ReLU``); None if none."""
        cls, names = _AS_MODULE[_name(n.target)]
        x: Any = args[0] if args else None
        try:
            m = cls(**dict(zip(names, args[1:])), **kwargs)
        except TypeError as err:
            return math.inf, f"could not read its arguments: {err}", math.inf
        found = _activation(m) or _pool(m, x, result)
        return self._unary(n, *found) if found is not None else None


#: ``(factor, rule, Lipschitz bound of the node's output)``.
_Found = tuple[float, str, float]
#: A node's evaluated positional and keyword arguments.
_Args = tuple[Any, ...]
_Kwargs = dict[str, Any]

#: The Lipschitz rule of every function and method the graph may call, by its name:
#: ``target -> rule(bound, node, args, kwargs, result)``, which gives a :data:`_Found` (or None:
#: no rule after all). A name not here has no rule.
_FUNCTION_RULES: dict[str, Callable[..., _Found | None]] = {
    **dict.fromkeys(_ADD, _Bound._add),
    **dict.fromkeys(("neg", "neg_"), _Bound._neg),
    **dict.fromkeys(_MUL | _DIV, _Bound._product),
    **dict.fromkeys(_CAT, _Bound._cat),
    **dict.fromkeys(("mean", "sum", "avg"), _Bound._reduce),
    **dict.fromkeys(_SHAPE_OPS, _Bound._moves),
    **dict.fromkeys(("expand", "expand_as", "repeat", "broadcast_to", "tile"), _Bound._copies),
    "getitem": _Bound._getitem,
    **dict.fromkeys(("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout"),
                    _Bound._dropout),
    **dict.fromkeys(("interpolate", "upsample"), _Bound._resample),
    **dict.fromkeys(_AS_MODULE, _Bound._as_module),
}  # fmt: skip


def _spread(value: Any, result: torch.Tensor) -> float:
    """``sqrt(copies)``: broadcasting ``value`` to the result's shape repeats each entry
    ``result.numel() / value.numel()`` times, multiplying norms by the square root of that."""
    if not isinstance(value, torch.Tensor) or not value.numel():
        return 1.0
    return math.sqrt(result.numel() / value.numel())


def _basic_index(index: Any) -> bool:
    """Whether indexing a tensor with ``index`` selects each entry at most once."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, int | slice) for p in parts)


def _graph_bound(
    model: nn.Module, shape: tuple[int, ...], records: list[LayerNorm], method: Method,
    width: float | None = None,
) -> tuple[float, str, tuple[GraphFactor, ...], tuple[str, ...]]:  # fmt: skip
    """``(bound, how, factors, reasons)``: the certified Lipschitz bound of the model in eval
    mode, along its ``torch.fx`` graph; ``inf`` with the reasons where none is certified."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many kinds on code it cannot follow
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        why = (f"torch.fx could not trace the model ({type(err).__name__}: {first}); only the "
               f"per-layer norms are given, no whole-model bound")  # fmt: skip
        return math.inf, "not traced", (), (why,)
    gm = torch.fx.GraphModule(model, graph)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    run = _Bound(gm, records, method, width)
    with torch.no_grad():
        run.run(torch.zeros(1, *shape, dtype=dtype, device=device))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    how = f"torch.fx graph of {len(gm.graph.nodes)} nodes"
    return run.lip[out], how, tuple(run.factors), tuple(run.reasons)


def _outputs(y: Any) -> torch.Tensor:
    """A model's output(s) flattened into one vector per sample."""
    leaves = [y] if isinstance(y, torch.Tensor) else torch.utils._pytree.tree_leaves(y)
    return torch.cat([t.reshape(t.shape[0], -1) for t in leaves
                      if isinstance(t, torch.Tensor)], dim=1)  # fmt: skip


def _recorded_push(
    f: nn.Module, x: torch.Tensor, output: torch.Tensor, pull: Callable[..., Any]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``u -> J(x) u`` of the model copy ``f`` by the first of :data:`_PUSHES` that applies:
    its recorded tape, or the transpose of its pull-back ``pull`` (recorded here: a vjp of the
    vjp; an error where the backward is not differentiable)."""
    if "tape" in _PUSHES:
        try:
            return linearise(lambda u: _outputs(f(u)), x)[1]
        except NotLinearisable:
            pass
    back = torch.func.vjp(lambda z: pull(z)[0], torch.zeros_like(output))[1]
    return lambda u: cast(torch.Tensor, back(u)[0])


def _empirical_lower(
    model: nn.Module, shape: tuple[int, ...], probes: int, iterations: int, seed: int
) -> tuple[float, torch.Tensor | None, torch.Tensor | None, str]:
    """The largest ``||J v|| / ||v||`` of the model's Jacobian found by Lanczos on ``J^T J``
    (the top Ritz vector) at ``probes`` random inputs, with the input and direction reaching
    it, or 0 and why it could not be measured. The steps run in float32 (they only choose the
    direction, 2-3x faster; float64 where ``J^T J`` leaves float32's range); ``J^T z`` is a
    vjp, ``J u`` a recorded product (:func:`_recorded_push`: the model's tape, a forward pass
    without biases, 0.29 s a step on a U-Net at 224x224; else the transposed pull-back, 0.89
    s), or forward mode where neither applies (1.19 s). The directions are then measured in
    float64 by forward mode (so the lower end never rests on the recorded product), the best
    float32 estimate first, the rest only while their estimate could beat it."""
    if probes == 0:
        return 0.0, None, None, "not measured (probes=0)"
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        exact = copy.deepcopy(model).to(torch.float64).eval()
        fast = copy.deepcopy(model).to(torch.float32).eval()
    except Exception as err:  # any failure to copy means: it cannot be measured
        return 0.0, None, None, f"not measured: the model could not be copied ({err})"

    def image(f: nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``J(x) v / ||v||`` of the model copy ``f``."""
        out: torch.Tensor = torch.func.jvp(lambda u: _outputs(f(u)), (x,), (v / v.norm(),))[1]
        return out

    def steps(f: nn.Module, x: torch.Tensor, start: torch.Tensor, recorded: bool
              ) -> tuple[torch.Tensor, float]:  # fmt: skip
        """The top Ritz vector of ``J^T J`` after at most ``iterations`` Lanczos steps from
        ``start`` at ``x``, on the model copy ``f`` (in its precision), ``J u`` by a recorded
        product (``recorded``) or by forward mode; with the first, its ``||J v|| / ||v||`` by
        that product (``inf`` with the second)."""
        output, pull = torch.func.vjp(lambda u: _outputs(f(u)), x)[:2]
        push = _recorded_push(f, x, output, pull) if recorded else None

        def gram(u: torch.Tensor) -> torch.Tensor:
            u = u.view_as(x)
            w: torch.Tensor = pull(image(f, x, u) if push is None else push(u))[0]
            size = float(w.norm())  # inf where the entries are finite but their norm is not
            if not math.isfinite(size) or (size == 0 and f is fast):  # 0: perhaps underflow
                raise _BeyondRange
            return w.flatten()

        # One basis of every step where memory allows (restarted from its Ritz vector else).
        basis = min(iterations, _basis_size(x.numel(), x.device, itemsize=x.element_size()))
        v = _lanczos_top(gram, start.flatten(), _LOWER_TOL, basis, iterations, min_steps=0)[0]
        v = v.view_as(x)
        estimate = math.inf if push is None else float(push(v / v.norm()).norm())
        return v, estimate

    def direction(x: torch.Tensor, start: torch.Tensor, recorded: bool
                  ) -> tuple[torch.Tensor, float]:  # fmt: skip
        """:func:`steps` in float32, or in float64 where ``J^T J`` leaves float32's range or is
        0 there (the start itself where it leaves float64's, or is not a number)."""
        for f, dtype in ((fast, torch.float32), (exact, torch.float64)):
            try:
                return steps(f, x.to(dtype), start.to(dtype), recorded)
            except _BeyondRange:
                continue
        return start, math.inf  # beyond float64's range too (or NaN): the start as it is

    def forward(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return direction(x, start, recorded=False)[0]

    gen = torch.Generator(device=device).manual_seed(seed)
    # (input, start, direction, float32 ||J v|| / ||v|| by the recorded product; inf: none)
    runs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []
    best: tuple[float, torch.Tensor | None, torch.Tensor | None] = (0.0, None, None)
    with torch.no_grad():
        for _ in range(probes):
            x = torch.randn(1, *shape, dtype=torch.float64, device=device, generator=gen)
            start = torch.randn(1, *shape, dtype=torch.float64, device=device, generator=gen)
            with kept_pages():  # every Lanczos step allocates what the last one freed
                try:
                    v, estimate = direction(x, start, recorded=bool(_PUSHES))
                except Exception:  # a backward that is not itself differentiable
                    if not _PUSHES:
                        raise
                    v, estimate = forward(x, start), math.inf
            runs.append((x, start, v, estimate))
        # Measured in float64 by forward mode, best estimate first, until no estimate left
        # could beat the best measured. A recorded product can be wrong without an error (a
        # backward that records no graph transposes to zero; a custom derivative differs from
        # the tape's): it must give forward mode's ||J v|| (to float32's rounding), or every
        # probe it ran runs again by forward mode.
        trusted = True
        for x, start, v, estimate in sorted(runs, key=lambda run: -run[3]):
            if trusted and best[1] is not None and estimate < best[0] * (1 - _ESTIMATE_SLACK):
                break
            if not trusted and estimate < math.inf:
                v, estimate = forward(x, start), math.inf
            value = float(image(exact, x, v.double()).norm())
            if estimate < math.inf and abs(estimate - value) > _PUSH_AGREEMENT * value:
                trusted = False
                v = forward(x, start)
                value = float(image(exact, x, v.double()).norm())
            if best[1] is None or value > best[0]:  # a witness even where J = 0 (dead ReLUs)
                best = (value, x[0], v.double()[0])
    note = (f"largest ||J v|| / ||v|| of the Jacobian at {probes} random inputs after at most "
            f"{iterations} Lanczos steps: a local value, below the Lipschitz constant")  # fmt: skip
    return (*best, note)
