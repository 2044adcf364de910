"""lipschitz_report on a small ResNet-like model against dense SVD, and the `convmat norm` command."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from convmat import ConvMatError, lipschitz_report

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    """A ResNet basic block: two 3x3 convolutions and a shortcut (a strided 1x1 where needed)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.down(x))


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
        self.layer1 = Block(4, 4, 1)
        self.layer2 = Block(4, 8, 2)
        self.head = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.stem(x))))
        x = F.relu(self.up(F.relu(self.head(x))))
        return self.fc(x.mean(dim=(2, 3)))


def small_resnet() -> nn.Module:
    """The factory the command imports."""
    torch.manual_seed(0)
    return SmallResNet()


EXPECTED_INPUTS = {
    "stem": (3, 12, 12),
    "layer1.conv1": (4, 12, 12),
    "layer1.conv2": (4, 12, 12),
    "layer2.conv1": (4, 12, 12),
    "layer2.conv2": (8, 6, 6),
    "layer2.down.0": (4, 12, 12),
    "head": (8, 6, 6),
    "up": (8, 6, 6),
    "fc": (4,),
}


def jacobian(m: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of ``x -> m(x) - m(0)`` on one input of ``shape``, by torch's autograd on a
    float64 copy (independent of convmat)."""
    f = copy.deepcopy(m).double().eval()
    zero = torch.zeros(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: f(v[None])[0], zero)
    return jac.reshape(-1, zero.numel())


def dense_norm(model: nn.Module, path: str, shape: tuple[int, ...]) -> float:
    m = model.get_submodule(path.split(" ")[0])
    return float(np.linalg.svd(jacobian(m, shape).numpy(), compute_uv=False)[0])


def test_resnet_layer_norms_equal_dense_svd():
    model = small_resnet()
    model.train()
    stats = model.layer1.bn1.running_mean.clone()
    report = lipschitz_report(model, (3, 12, 12), progress=False)
    assert {r.path: r.input_shape for r in report} == EXPECTED_INPUTS
    assert [r.path for r in report][:3] == ["stem", "layer1.conv1", "layer1.conv2"]
    expected = {r.path: dense_norm(model, r.path, r.input_shape) for r in report}
    for r in report:
        assert abs(r.norm - expected[r.path]) <= 1e-9 * expected[r.path], r.path
        assert r.lower <= expected[r.path] * (1 + 1e-12) <= r.upper * (1 + 1e-12)
        assert r.certified and r.converged
    assert report.product == pytest.approx(math.prod(expected.values()), rel=1e-8)
    # The whole-model bound follows the graph (residual sums, BN folded, the mean's 1/12):
    # certified, and above the local value found.
    assert report.certified and 0 < report.lower <= report.certified_bound == report.upper
    # The forward pass ran in eval mode and left the model as it was.
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.layer1.bn1.running_mean, stats)
    assert [r.method for r in report if r.path == "stem"] == ["fft"]
    assert not hasattr(report, "bound")  # it multiplied point values: now `product`


def test_iterative_norms_and_intervals():
    """method="lanczos": every conv layer goes through Lanczos, at the default tol."""
    model = small_resnet()
    report = lipschitz_report(model, (3, 12, 12), progress=False, method="lanczos")
    methods = {r.path: r.method for r in report}
    assert methods["layer1.conv1"] == "lanczos" and methods["up"] == "lanczos"
    assert methods["stem"] == "lanczos" and methods["fc"] == "dense"
    for r in report:
        expected = dense_norm(model, r.path, r.input_shape)
        assert abs(r.norm - expected) <= 1e-7 * expected, r.path
        assert r.lower <= expected * (1 + 1e-12) and expected <= r.upper * (1 + 1e-12), r.path


def test_reshaped_norm_is_what_spectral_norm_divides_by():
    """torch's own spectral_norm (many power steps) against the reshaped-kernel column."""
    model = small_resnet()
    report = {r.path: r for r in lipschitz_report(model, (3, 12, 12), progress=False)}
    for path in ("layer1.conv1", "up", "fc"):
        layer = model.get_submodule(path)
        original = layer.weight.detach().clone()
        normed = nn.utils.parametrizations.spectral_norm(layer, n_power_iterations=500)
        with torch.no_grad():
            normed.train()
            normed(torch.zeros(1, *EXPECTED_INPUTS[path]))  # run the power iteration
            normed.eval()
            sigma = (original.norm() / normed.weight.norm()).item()
        assert report[path].reshaped == pytest.approx(sigma, rel=1e-4)
    assert report["fc"].ratio == pytest.approx(1.0)
    assert all(r.ratio >= 1 - 1e-12 for r in report.values())


@given(channels=st.integers(1, 4), size=st.integers(3, 9), stride=st.integers(1, 2))
def test_chain_records_and_table(channels, size, stride):
    conv = nn.Conv1d(1, channels, 3, stride=stride, padding=1).double()
    model = nn.Sequential(conv, nn.Tanh(), conv if channels == 1 else nn.Identity(), nn.Flatten())
    report = lipschitz_report(model, (1, size), progress=False)
    out = (size - 1) // stride + 1
    expected = [("0", (1, size))] + ([("0 (call 2)", (1, out))] if channels == 1 else [])
    assert [(r.path, r.input_shape) for r in report] == expected
    for r in report:
        W = jacobian(conv, r.input_shape)
        assert r.norm == pytest.approx(torch.linalg.svdvals(W)[0].item(), rel=1e-9)
    table = str(report)
    assert all(r.path in table for r in report) and "product of layer norms" in table
    assert "(an estimate, not a bound)" in table and "certified bound: " in table
    rows = report.to_dicts()
    assert [d["path"] for d in rows] == [r.path for r in report]
    assert rows[0]["ratio"] == report[0].ratio and rows[0]["config"].startswith(
        f"1->{channels} k=3"
    )


def test_progress_bar_goes_to_stderr(capsys):
    lipschitz_report(nn.Sequential(nn.Linear(3, 2)), (3,), progress=True)
    assert "operator norms" in capsys.readouterr().err


def test_errors():
    model = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(ConvMatError, match=r"does not run on an input of shape \(1, 2, 8, 8\)"):
        lipschitz_report(model, (2, 8, 8), progress=False)
    with pytest.raises(ConvMatError, match=r"input_shape must be positive sizes, got \(3, 0\)"):
        lipschitz_report(model, (3, 0), progress=False)
    with pytest.raises(
        ConvMatError, match=r"input_shape \(3, 1000000, 1000000\) needs 11175.9 GiB"
    ):
        lipschitz_report(model, (3, 1000000, 1000000), progress=False)
    with pytest.raises(ConvMatError, match=r"model must be an nn.Module, got str"):
        lipschitz_report("resnet", (3, 8, 8))
    with pytest.raises(ConvMatError, match=r"tol must be a number with 0 < tol < 1, got nan"):
        lipschitz_report(model, (3, 8, 8), tol=float("nan"))
    with pytest.raises(ConvMatError, match=r"method='fft' does not apply"):
        lipschitz_report(model, (3, 8, 8), method="fft", progress=False)


# -- conv subclasses with their own forward ------------------------------------------------


class PadInForward(nn.Conv2d):
    """As timm's Conv2dSame: pads (asymmetrically) inside forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, [0, 1, 1, 0]), self.weight, self.bias)


class StdConv2d(nn.Conv2d):
    """As timm's StdConv2d: standardises its weight in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / (std + 1e-6), self.bias, self.stride, self.padding)


class ScaledOutput(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.5 * super().forward(x)


class Documented(nn.Conv2d):
    """Only a docstring: a plain convolution."""


class Squared(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) ** 2


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * super().forward(x)


def subclass_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        PadInForward(2, 3, 3),
        nn.ReLU(),
        StdConv2d(3, 3, 3, padding=1),
        ScaledOutput(3, 2, 3, padding=1, bias=True),
        Documented(2, 2, 3, padding=1),
        nn.Flatten(),
        ScaledLinear(72, 4),
    ).double()


def test_a_subclass_the_tape_cannot_follow_gets_its_norm_by_forward_mode(monkeypatch):
    """Own-forward layers take ``J u`` from the tape; where it refuses, forward mode gives the
    same norms (the dense SVD's, checked below)."""
    from convmat.analysis import lipschitz as lip
    from convmat.analysis.tangent import NotLinearisable

    taped = [r.norm for r in lipschitz_report(subclass_model(), (2, 7, 7), progress=False)]

    def refuse(f, x):
        raise NotLinearisable("refused here")

    monkeypatch.setattr(lip, "linearise", refuse)
    forward = [r.norm for r in lipschitz_report(subclass_model(), (2, 7, 7), progress=False)]
    assert forward == pytest.approx(taped, rel=1e-9)


def test_subclasses_linear_in_their_input_get_a_jacobian_norm():
    model = subclass_model()
    report = lipschitz_report(model, (2, 7, 7), progress=False)
    rows = {r.path: r for r in report}
    assert {p: r.method for p, r in rows.items()} == {
        "0": "jvp-lanczos", "2": "jvp-lanczos", "3": "jvp-lanczos", "4": "dense",
        "6": "jvp-lanczos",
    }  # fmt: skip
    assert rows["0"].input_shape == (2, 7, 7) and rows["2"].input_shape == (3, 6, 6)
    for r in report:
        m = model.get_submodule(r.path)
        expected = float(np.linalg.svd(jacobian(m, r.input_shape).numpy(), compute_uv=False)[0])
        assert abs(r.norm - expected) <= 1e-7 * expected, r.path
        if r.method == "jvp-lanczos":
            assert r.lower == r.norm and r.upper == math.inf and not r.certified and r.converged
            assert "own forward, linear" in r.config
        else:
            assert r.certified and r.lower <= expected * (1 + 1e-12) <= r.upper * (1 + 1e-12)
    # Taken for a plain convolution, StdConv2d's stored weight gives another norm.
    plain = nn.Conv2d(3, 3, 3, padding=1, bias=False).double()
    with torch.no_grad():
        plain.weight.copy_(model[2].weight)
    stored = float(np.linalg.svd(jacobian(plain, (3, 6, 6)).numpy(), compute_uv=False)[0])
    assert abs(stored - rows["2"].norm) > 0.1 * rows["2"].norm
    assert report.certified_bound == math.inf
    table = str(report)
    assert "none" in table and "not certified" in table
    assert "no certified bound: no certified upper end for 0, 2, 3, 6" in table


def test_subclass_not_linear_in_its_input_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(Squared(2, 2, 3)))
    with pytest.raises(
        ConvMatError, match=r"module 1\.0 \(Squared\) overrides forward.*not linear in its input"
    ):
        lipschitz_report(model, (1, 8, 8), progress=False)


# -- the command -------------------------------------------------------------------------------


def norm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convmat", "norm", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip


def test_norm_command_from_a_factory():
    r = norm("--model", "tests.test_lipschitz:small_resnet", "--input", "3,12,12", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    expected = lipschitz_report(small_resnet(), (3, 12, 12), progress=False)
    assert [d["path"] for d in data["layers"]] == [e.path for e in expected]
    for d, e in zip(data["layers"], expected):
        assert d["norm"] == pytest.approx(e.norm, rel=1e-9)
    assert data["product"] == pytest.approx(expected.product, rel=1e-9)
    assert data["certified_bound"] == pytest.approx(expected.certified_bound, rel=1e-9)
    table = norm("--model", "tests/test_lipschitz.py:small_resnet", "--input", "3,12,12")
    assert table.returncode == 0, table.stderr
    assert "layer2.down.0" in table.stdout and "product of layer norms" in table.stdout


@pytest.mark.parametrize("width", [1e-1, 1e-3])
def test_a_report_to_a_width_brackets_every_layer(width):
    """``lipschitz_report(width=)``: every conv layer's interval holds its dense SVD norm and
    is no wider than asked where reached; the model's bound stays certified (at least the
    product of the layers' lower ends along this chain, at most the default report's bound
    times the widths' room)."""
    model = small_resnet()
    report = lipschitz_report(model, (3, 12, 12), width=width, progress=False)
    exact = lipschitz_report(model, (3, 12, 12), progress=False)
    assert [r.path for r in report] == [r.path for r in exact]
    for r, e in zip(report, exact):
        dense = e.norm
        assert r.lower <= dense * (1 + 1e-9) and dense <= r.upper * (1 + 1e-12)
        if r.converged:
            assert r.upper <= r.lower * (1 + width) * (1 + 1e-12)
    assert exact.upper <= report.upper * (1 + 1e-9)
    assert report.upper <= exact.upper * (1 + width) ** len(report)


def test_a_report_refuses_tol_and_width_together():
    with pytest.raises(ConvMatError, match=r"not both"):
        lipschitz_report(small_resnet(), (3, 12, 12), tol=1e-3, width=1e-3, progress=False)
    with pytest.raises(ConvMatError, match=r"width must be a number"):
        lipschitz_report(small_resnet(), (3, 12, 12), width=0, progress=False)


def test_norm_command_to_a_width():
    r = norm("--model", "tests.test_lipschitz:small_resnet", "--input", "3,12,12", "--json",
             "--width", "1e-2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    expected = lipschitz_report(small_resnet(), (3, 12, 12), width=1e-2, progress=False)
    for d, e in zip(data["layers"], expected):
        assert d["norm"] == pytest.approx(e.norm, rel=1e-12)
        assert d["upper"] == pytest.approx(e.upper, rel=1e-12)


def test_norm_command_from_saved_files(tmp_path):
    plain = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))
    torch.save(plain, tmp_path / "plain.pt")
    r = norm("--model", str(tmp_path / "plain.pt"), "--input", "1,4,4")  # weights_only suffices
    assert r.returncode == 0, r.stderr
    assert f"{lipschitz_report(plain, (1, 4, 4), progress=False)[0].norm:.6f}" in r.stdout

    torch.save(small_resnet(), tmp_path / "resnet.pt")
    r = norm("--model", str(tmp_path / "resnet.pt"), "--input", "3,12,12")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "tests.test_lipschitz.SmallResNet" in r.stderr and "--trust-pickle" in r.stderr
    r = norm("--model", str(tmp_path / "resnet.pt"), "--input", "3,12,12", "--trust-pickle")
    assert r.returncode == 0, r.stderr

    model = small_resnet()
    with torch.no_grad():
        model.fc.weight.mul_(3)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    r = norm("--model", str(tmp_path / "state.pt"), "--input", "3,12,12")
    assert r.returncode == 2 and "holds a state_dict" in r.stderr
    r = norm("--model", "tests.test_lipschitz:small_resnet", "--weights", str(tmp_path / "state.pt"),
             "--input", "3,12,12", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    fc = json.loads(r.stdout)["layers"][-1]
    assert fc["norm"] == pytest.approx(
        np.linalg.svd(model.fc.weight.detach().double().numpy())[1][0]
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no_such_module:f", "--input", "3"], "cannot import 'no_such_module'"),
        (["--model", "tests.test_lipschitz:nothing", "--input", "3"], "has no attribute 'nothing'"),
        (
            ["--model", "tests.test_lipschitz:dense_norm", "--input", "3"],
            "callable without arguments",
        ),
        (["--model", "resnet", "--input", "3"], "must be MODULE:FACTORY"),
        (["--model", "missing.pt", "--input", "3"], "file 'missing.pt' does not exist"),
        (["--model", "tests.test_lipschitz:small_resnet", "--input", "5,12,12"], "does not run"),
    ],
)
def test_norm_command_errors(args, message):
    r = norm(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


@pytest.mark.parametrize("shape", [(1, 6.5, 6), (1, 6, 6.0), (1, True, 6), (1, "6", 6), 6])
def test_input_shape_must_be_ints(shape):
    """Float or bool sizes are refused, never truncated."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval()
    with pytest.raises(ConvMatError, match=r"input_shape must be a tuple of ints"):
        lipschitz_report(model, shape, progress=False)


@pytest.mark.parametrize("pushes", [("tape", "transposed"), ("transposed",)])
def test_the_lower_ends_recorded_products_equal_forward_mode(monkeypatch, pushes):
    """``J u`` by the recorded tape (the default), as the transpose of the pull-back and by
    forward mode give the same directions (to float32 rounding), so the same lower end; the
    witness reproduces it."""
    from convmat.analysis import lipschitz as lip

    torch.manual_seed(3)
    model = SmallResNet().double().eval()
    shape = (3, 12, 12)
    monkeypatch.setattr(lip, "_PUSHES", pushes)
    transposed = lip._empirical_lower(model, shape, 3, 20, 0)
    monkeypatch.setattr(lip, "_PUSHES", ())
    forward = lip._empirical_lower(model, shape, 3, 20, 0)
    assert transposed[0] == pytest.approx(forward[0], rel=1e-5)
    assert torch.equal(transposed[1], forward[1])
    x, v = transposed[1], transposed[2]
    image = torch.func.jvp(copy.deepcopy(model).eval(), (x[None],), (v[None] / v.norm(),))[1]
    assert float(image.norm()) == pytest.approx(transposed[0], rel=1e-12)


class _OnceDifferentiable(torch.autograd.Function):
    """``tanh`` whose backward cannot be differentiated again (forward mode is defined)."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


class _ConvThen(nn.Module):
    """A 2 -> 3 convolution followed by ``function`` (a custom autograd function's apply)."""

    def __init__(self, function) -> None:
        super().__init__()
        self.conv, self.function = nn.Conv2d(2, 3, 3, padding=1), function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(self.conv(x))


def test_a_backward_that_is_not_differentiable_falls_back_to_forward_mode(monkeypatch):
    """Its transposed pull-back is zero without an error: the check against forward mode
    catches it, and the probes run by forward mode (the same lower end as forward mode alone,
    not a random direction's)."""
    from convmat.analysis import lipschitz as lip

    torch.manual_seed(0)
    model = _ConvThen(_OnceDifferentiable.apply).double()
    r = lipschitz_report(model, (2, 5, 5), progress=False, probes=2)
    monkeypatch.setattr(lip, "_PUSHES", ())
    forward = lipschitz_report(model, (2, 5, 5), progress=False, probes=2)
    assert 0 < r.lower <= r.upper
    assert r.lower == pytest.approx(forward.lower, rel=1e-6)
    x, v = r.witness_input, r.witness_direction
    image = torch.func.jvp(copy.deepcopy(model).eval(), (x[None],), (v[None] / v.norm(),))[1]
    assert float(image.norm()) == pytest.approx(r.lower, rel=1e-12)


#: The declared derivative of :class:`_DeclaredSlope`, per channel.
_SLOPES = torch.tensor([3.0, 0.2, 1.0], dtype=torch.float64).view(1, 3, 1, 1)


class _DeclaredSlope(torch.autograd.Function):
    """``2 x`` whose declared derivative is ``_SLOPES`` (a surrogate gradient): the tape
    follows the forward's operations (slope 2), torch's forward mode and backward the declared
    one (so the tape's products lead Lanczos elsewhere)."""

    @staticmethod
    def forward(x):
        return x * 2.0

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * _SLOPES.to(g.dtype)

    @staticmethod
    def jvp(ctx, t):
        return t * _SLOPES.to(t.dtype)


class _Abs(nn.Module):
    """A convolution, ``abs`` (no rule on the tape) and another convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).abs())


def _declared() -> nn.Module:
    return _ConvThen(_DeclaredSlope.apply)


@pytest.mark.parametrize("make", [_Abs, _declared])
def test_a_model_the_tape_cannot_follow_gets_forward_modes_lower_end(monkeypatch, make):
    """An operation with no rule on the tape: the transposed pull-back takes over. A custom
    derivative the tape does not see: its product disagrees with forward mode's measurement,
    and the probes run again by forward mode. Either way the lower end is forward mode's."""
    from convmat.analysis import lipschitz as lip
    from convmat.analysis.tangent import NotLinearisable, linearise

    torch.manual_seed(1)
    model = make().double().eval()
    shape = (2, 6, 6)
    if make is _Abs:
        with pytest.raises(NotLinearisable, match="abs"):
            linearise(model, torch.randn(1, *shape, dtype=torch.float64))
    recorded = lip._empirical_lower(model, shape, 2, 10, 0)
    if make is _declared:  # without the check against forward mode, the tape's answer
        monkeypatch.setattr(lip, "_PUSH_AGREEMENT", math.inf)
        assert lip._empirical_lower(model, shape, 2, 10, 0)[0] < recorded[0] * (1 - 1e-3)
    monkeypatch.setattr(lip, "_PUSHES", ())
    forward = lip._empirical_lower(model, shape, 2, 10, 0)
    assert recorded[0] > 0
    assert recorded[0] == pytest.approx(forward[0], rel=1e-6)
    x, v = recorded[1], recorded[2]
    image = torch.func.jvp(copy.deepcopy(model).eval(), (x[None],), (v[None] / v.norm(),))[1]
    assert float(image.norm()) == pytest.approx(recorded[0], rel=1e-12)


def test_only_probes_that_could_be_the_best_are_measured_in_float64(monkeypatch):
    """The float32 estimates rank the probes: the best is measured in float64, the others only
    while their estimate could beat it; the lower end is the one measuring all would give."""
    from convmat.analysis import lipschitz as lip

    torch.manual_seed(3)
    model = SmallResNet().double().eval()
    shape = (3, 12, 12)
    real = torch.func.jvp
    measured = []

    def counting(f, primals, tangents):
        if primals[0].dtype == torch.float64:
            measured.append(1)
        return real(f, primals, tangents)

    monkeypatch.setattr(torch.func, "jvp", counting)
    ranked = lip._empirical_lower(model, shape, 5, 20, 0)
    assert len(measured) < 5
    measured.clear()
    monkeypatch.setattr(lip, "_ESTIMATE_SLACK", 1.0)  # every probe measured
    every = lip._empirical_lower(model, shape, 5, 20, 0)
    assert len(measured) == 5
    assert ranked[0] == pytest.approx(every[0], rel=1e-4)
    assert ranked[0] <= every[0]


def _affine_net(cin: int, seed: int, scale: float = 1.0) -> nn.Module:
    """Two convolutions (a strided one with a bias): an affine map, its Jacobian constant."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(cin, 3, 3, padding=1, bias=False), nn.Conv2d(3, 2, 2, stride=2))
    with torch.no_grad():
        net[0].weight.mul_(scale)
        net[1].weight.mul_(scale)
    return net.double().eval()


@given(cin=st.integers(1, 2), size=st.integers(3, 6), seed=st.integers(0, 10_000),
       iterations=st.integers(1, 8))  # fmt: skip
def test_the_lower_ends_lanczos_finds_at_least_what_power_steps_would(cin, size, seed, iterations):
    """Lanczos's top Ritz vector after ``k`` products maximises ``||J v||`` over the Krylov
    space that holds power iteration's ``k-1``-th vector: from the same start (the report's
    seeded draw), the lower end is at least power iteration's, computed here in float64 on the
    dense Jacobian, and at most the true norm."""
    from .tests_helpers import jac  # (the command-line tests load this file by path)

    shape = (cin, size, size)
    model = _affine_net(cin, seed)
    r = lipschitz_report(model, shape, progress=False, probes=1, iterations=iterations, seed=seed)
    J = jac(model, torch.zeros(shape))
    gen = torch.Generator().manual_seed(seed)
    torch.randn(1, *shape, dtype=torch.float64, generator=gen)  # the probe's input
    v = torch.randn(math.prod(shape), dtype=torch.float64, generator=gen)  # its start
    for _ in range(iterations - 1):
        v = J.T @ (J @ v)
        v = v / v.norm()
    power = float((J @ v).norm() / v.norm())
    true = float(torch.linalg.matrix_norm(J, ord=2))
    assert power * (1 - 1e-5) <= r.lower <= true * (1 + 1e-9)


@pytest.mark.parametrize("scale", [1.0, 1e12, 1e-25])
def test_the_lower_end_is_the_norm_once_lanczos_spans_the_input(scale):
    """With as many steps as input entries the Krylov space is the whole input: the lower end
    is the Jacobian's norm (to float32's steps). At ``scale`` 1e12 ``J^T J`` (~1e24) leaves
    float32's range, at 1e-25 it underflows to 0 there: the steps run in float64 instead of
    stopping at a random direction."""
    from .tests_helpers import jnorm  # (the command-line tests load this file by path)

    shape = (1, 4, 4)
    model = _affine_net(1, 5, scale)
    true = jnorm(model, torch.zeros(shape))
    r = lipschitz_report(model, shape, progress=False, probes=1, iterations=16)
    assert r.lower == pytest.approx(true, rel=1e-6)
    assert r.lower <= true * (1 + 1e-12)


def test_the_lower_ends_lanczos_restarts_where_memory_caps_its_basis(monkeypatch):
    """A basis capped at 4 vectors (as on a large input with little free memory): 16 steps
    restart from the Ritz vector and find at least what the first 4 did, below the norm."""
    from convmat.analysis import lipschitz as lip

    from .tests_helpers import jnorm  # (the command-line tests load this file by path)

    shape = (1, 4, 4)
    model = _affine_net(1, 7)
    true = jnorm(model, torch.zeros(shape))
    first = lipschitz_report(model, shape, progress=False, probes=1, iterations=4).lower
    monkeypatch.setattr(lip, "_basis_size", lambda *args, **kwargs: 4)
    restarted = lipschitz_report(model, shape, progress=False, probes=1, iterations=16).lower
    assert first * (1 - 1e-6) <= restarted <= true * (1 + 1e-12)
    assert restarted > first * (1 + 1e-6)  # the restarts gained (16 steps on 16 unknowns)
