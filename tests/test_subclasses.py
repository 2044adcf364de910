"""Conv subclasses at every public entry point that takes a module: exact, or a clear refusal.

A subclass of ``nn.Conv2d`` may compute something other than the convolution its settings
describe (timm's ``Conv2dSame`` pads inside ``forward``; ``StdConv2d`` standardises its weight).
Each entry point must either give the module's own function exactly (checked against its dense
Jacobian in float64) or raise :class:`ConvMatError` naming the class (and, where it takes a
model, the layer's path). A subclass that only adds a docstring must be accepted and exact.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convmat
import convmat.nn as cnn
from convmat import ConvMatError

# --- the subclasses --------------------------------------------------------------------------


class PadSameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding computed from the input in forward (as timm's Conv2dSame)."""

    def forward(self, x):
        pads = []
        for i, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, [pads[1][0], pads[1][1], pads[0][0], pads[0][1]])
        return self._conv_forward(x, self.weight, self.bias)


class StdConv2d(nn.Conv2d):
    """Weight standardised per output channel in forward (as timm's StdConv2d)."""

    def forward(self, x):
        flat = self.weight.reshape(self.out_channels, -1)
        mean = flat.mean(1, keepdim=True)
        var = flat.var(1, unbiased=False, keepdim=True)
        w = ((flat - mean) / torch.sqrt(var + 1e-6)).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledConv2d(nn.Conv2d):
    """Output scaled inside ``_conv_forward`` (``forward`` itself is torch's)."""

    def _conv_forward(self, x, weight, bias):
        return 0.5 * super()._conv_forward(x, weight, bias)


class DocumentedConv2d(nn.Conv2d):
    """Only a docstring: this is torch's Conv2d, and must be taken as one."""


class ScaledConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution whose forward scales the output."""

    def forward(self, x, output_size=None):
        return 3.0 * super().forward(x, output_size)


@dataclass(frozen=True)
class Case:
    cls: type
    args: str  # constructor arguments, as source (the command's model file uses them too)
    in_channels: int
    size: tuple[int, int]
    plain: bool  # computes the convolution its settings describe: must be accepted

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.size)

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return eval(f"{self.name}({self.args})").double()


CASES = [
    Case(PadSameConv2d, "2, 3, 3, stride=2", 2, (8, 8), False),
    Case(StdConv2d, "2, 3, 3, padding=1", 2, (6, 6), False),
    Case(ScaledConv2d, "2, 3, 3, padding=1", 2, (6, 6), False),
    Case(DocumentedConv2d, "2, 3, 3, stride=2, padding=1, padding_mode='reflect'", 2, (7, 7), True),
    Case(ScaledConvTranspose2d, "3, 2, 3, stride=2, padding=1, output_padding=1", 3, (4, 4), False),
]
PATH = "1.1"  # where the layer sits in the model of the model-taking entry points

# Entry points that break the contract today (library gaps; strict, so a fix shows up as XPASS).
#: Entry points that do not meet the contract yet (none).
GAPS: dict[tuple[str, str], str] = {}


def cases(entry: str) -> list[Any]:
    """CASES as parameters of the test of ``entry``, known gaps marked."""
    params = []
    for case in CASES:
        reason = GAPS.get((entry, case.name))
        marks = () if reason is None else pytest.mark.xfail(strict=True, reason=reason)
        params.append(pytest.param(case, id=case.name, marks=marks))
    return params


def model_of(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity(), layer)).eval()


def jacobian(module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense matrix of the (affine) module's linear part, from autograd in float64."""
    x = torch.randn(1, *shape, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(module, x)
    return J.reshape(-1, x.numel())


def sample(case: Case) -> torch.Tensor:
    return torch.randn(3, *case.shape, dtype=torch.float64)


def check(case: Case, call, exact, path: str | None = None) -> None:
    """``call()`` is exact (``exact(result)`` asserts it) or a ConvMatError naming the class
    (and ``path``); a plain subclass must be accepted."""
    try:
        result = call()
    except ConvMatError as err:
        message = str(err)
        assert not case.plain, f"{case.name} computes a plain convolution, refused: {message}"
        assert case.name in message, f"the refusal does not name the class: {message}"
        if path is not None:
            assert path in message, f"the refusal does not name the path {path!r}: {message}"
        return
    exact(result)


# --- the entry points --------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("to_matrix"))
def test_to_matrix(case):
    m = case.build()
    J = jacobian(m, case.shape)
    check(
        case,
        lambda: convmat.to_matrix(m, case.size),
        lambda W: torch.testing.assert_close(W, J, rtol=0, atol=1e-12),
    )


@pytest.mark.parametrize("case", cases("conv_operator_from_module"))
def test_conv_operator_from_module(case):
    m = case.build()
    J = jacobian(m, case.shape)
    check(
        case,
        lambda: convmat.ConvOperator.from_module(m, case.size),
        lambda op: torch.testing.assert_close(op.to_dense(), J, rtol=0, atol=1e-12),
    )


@pytest.mark.parametrize("case", cases("operator_norm"))
def test_operator_norm(case):
    m = case.build()
    top = torch.linalg.svdvals(jacobian(m, case.shape))[0].item()

    def exact(result):
        assert result.value == pytest.approx(top, rel=1e-6)
        assert result.lower <= top * (1 + 1e-9)
        if case.plain:
            assert top <= result.upper * (1 + 1e-9)
        else:  # no certified upper end for a general module
            assert math.isinf(result.upper) or getattr(result, "certified", True) is False

    check(case, lambda: convmat.operator_norm(m, case.size), exact)


@pytest.mark.parametrize("case", cases("singular_values"))
def test_singular_values(case):
    m = case.build()
    expected = torch.linalg.svdvals(jacobian(m, case.shape))

    def exact(values):
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-10 * expected[0].item())

    check(case, lambda: convmat.singular_values(m, case.size), exact)


@pytest.mark.parametrize("case", cases("from_module"))
def test_matrix_layer_from_module(case):
    m = case.build()
    x = sample(case)
    twin_class = cnn.MatrixConvTranspose2d if m.transposed else cnn.MatrixConv2d

    def exact(twin):
        torch.testing.assert_close(twin(x), m(x), rtol=0, atol=1e-12)

    check(case, lambda: twin_class.from_module(m), exact)


@pytest.mark.parametrize("case", cases("to_linear"))
def test_to_linear(case):
    m = case.build()
    x = sample(case)

    def exact(linear):
        torch.testing.assert_close(linear(x.flatten(1)), m(x).flatten(1), rtol=0, atol=1e-12)

    check(case, lambda: convmat.to_linear(m, case.size), exact)


@pytest.mark.parametrize("case", cases("to_mlp"))
def test_to_mlp(case):
    model = model_of(case.build())
    x = sample(case)

    def exact(mlp):
        torch.testing.assert_close(mlp(x), model(x).flatten(1), rtol=0, atol=1e-12)

    check(case, lambda: convmat.to_mlp(model, case.shape), exact, PATH)


def _check_row(case: Case, row: dict[str, Any], top: float) -> None:
    """A report row: the layer's norm, certified only where the layer is a plain conv."""
    value = row.get("norm", row.get("value"))
    assert value == pytest.approx(top, rel=1e-6)
    if case.plain:
        assert row["lower"] <= top * (1 + 1e-9) and top <= row["upper"] * (1 + 1e-9)
    else:
        # No certified upper end: inf in Python, null in the command's JSON.
        assert row["upper"] is None or math.isinf(row["upper"]) or row.get("certified") is False


@pytest.mark.parametrize("case", cases("lipschitz_report"))
def test_lipschitz_report(case):
    model = model_of(case.build())
    top = torch.linalg.svdvals(jacobian(model[1][1], case.shape))[0].item()

    def exact(report):
        rows = [r for r in report.to_dicts() if r["path"] == PATH]
        assert len(rows) == 1, [r["path"] for r in report.to_dicts()]
        _check_row(case, rows[0], top)

    check(case, lambda: convmat.lipschitz_report(model, case.shape, progress=False), exact, PATH)


@pytest.mark.parametrize("case", cases("plot_matrix"))
def test_plot_matrix(case):
    """A picture of a module is a picture of its convolution: given only for a module that
    computes the convolution its settings describe (the same picture as torch's own layer)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    m = case.build()
    base = nn.ConvTranspose2d if m.transposed else nn.Conv2d
    plain = base.__new__(base)
    plain.__dict__.update(m.__dict__)  # the same settings and parameters, torch's own forward

    def exact(fig):
        torch.testing.assert_close(
            jacobian(m, case.shape), jacobian(plain, case.shape), rtol=0, atol=1e-12
        )
        reference = convmat.plot_matrix(plain, case.size)
        got = fig.axes[0].get_images()[0].get_array()
        want = reference.axes[0].get_images()[0].get_array()
        assert (got == want).all() and got.shape == want.shape
        plt.close(reference)
        plt.close(fig)

    check(case, lambda: convmat.plot_matrix(m, case.size), exact)


MODEL_FILE = """
import torch
import torch.nn.functional as F
from torch import nn

{classes}

def build():
    torch.manual_seed(0)
    layer = {name}({args}).double()
    return nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity(), layer)).eval()
"""


@pytest.mark.parametrize("case", cases("norm_command"))
def test_norm_command(case, tmp_path):
    classes = textwrap.dedent(inspect.getsource(case.cls))
    source = MODEL_FILE.format(classes=classes, name=case.name, args=case.args)
    path = tmp_path / "subclass_model.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("subclass_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build()
    top = torch.linalg.svdvals(jacobian(model[1][1], case.shape))[0].item()
    shape = ",".join(map(str, case.shape))
    run = subprocess.run(
        [sys.executable, "-m", "convmat", "norm", "--model", f"{path}:build", "--input", shape,
         "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    if run.returncode == 0:
        rows = [r for r in json.loads(run.stdout)["layers"] if r["path"] == PATH]
        assert len(rows) == 1, run.stdout
        _check_row(case, rows[0], top)
    else:
        assert run.returncode == 2, run.stderr  # a user-facing error, not a traceback
        assert not case.plain, run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        assert case.name in run.stderr and PATH in run.stderr, run.stderr
