"""The whole-model bound of lipschitz_report against the dense Jacobian (torch autograd, float64).

For an affine model (convolutions, linear layers, BatchNorm in eval mode, average pooling,
sums, concatenations) the Jacobian is the same everywhere and its norm IS the Lipschitz
constant: there ``lower <= ||J|| <= upper``. For a nonlinear one, ``||J(x)||`` at any point is
below the Lipschitz constant, so ``upper >= ||J(x)||`` at random points. Single factors whose
bound is exact (a folded conv, BatchNorm, every average pooling, mean, max pooling's
``sqrt(k)``) are checked for equality.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from convmat import lipschitz_report
from convmat.analysis import torus
from convmat.analysis.lipschitz import _derivative_sup

from .models import ZOO
from .tests_helpers import jac, jnorm

ROOT = Path(__file__).resolve().parents[1]


def report(model: nn.Module, shape: tuple[int, ...], **kw):
    return lipschitz_report(model, shape, progress=False, **kw)


def random_bn(n: int, seed: int, cls: type = nn.BatchNorm2d) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = cls(n)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
        bn.weight.copy_(torch.randn(n, generator=g))
        bn.bias.copy_(torch.randn(n, generator=g))
    return bn


def check_affine(model: nn.Module, shape: tuple[int, ...], exact: bool = False):
    """lower <= ||J|| <= upper (equal where ``exact``), and the witness reaches lower."""
    model = model.double().eval()
    r = report(model, shape)
    true = jnorm(model, torch.zeros(shape))
    assert r.certified, r.not_certified
    assert r.lower <= true * (1 + 1e-9) and true <= r.upper * (1 + 1e-9), (r.lower, true, r.upper)
    if exact:
        assert r.upper == pytest.approx(true, rel=1e-7)
    check_witness(model, r)
    return r


def check_witness(model: nn.Module, r) -> None:
    """``lower`` is ``||J(x) v|| / ||v||`` at the stored witness input and direction."""
    x, v = r.witness_input, r.witness_direction
    value = float((jac(model, x) @ v.reshape(-1).double()).norm() / v.norm())
    assert r.lower == pytest.approx(value, rel=1e-9)
    assert r.lower <= r.upper


# -- affine models: the bound against the Jacobian's norm --------------------------------------


@settings(max_examples=30)
@given(
    cin=st.integers(1, 3), cout=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 2),
    transposed=st.booleans(), seed=st.integers(0, 100),
)  # fmt: skip
def test_conv_with_batchnorm_folded_is_exact(cin, cout, k, stride, transposed, seed):
    torch.manual_seed(seed)
    conv = (nn.ConvTranspose2d(cin, cout, k, stride) if transposed
            else nn.Conv2d(cin, cout, k, stride, padding=k // 2))  # fmt: skip
    r = check_affine(nn.Sequential(conv, random_bn(cout, seed)), (cin, 4, 5), exact=True)
    assert any(f.rule.startswith("folded into 0") for f in r.factors)


@settings(max_examples=15, deadline=None)
@given(
    cin=st.integers(1, 4), cout=st.integers(1, 4), stride=st.integers(1, 2),
    groups=st.sampled_from([1, 2]), width=st.sampled_from([None, 1e-3]),
    seed=st.integers(0, 100),
)  # fmt: skip
def test_a_folded_batchnorm_scales_the_gram_matrices_kept_from_its_layer(
    cin, cout, stride, groups, width, seed
):
    """By Lanczos (the enclosing torus certifies the upper ends), the BatchNorm folded into a
    conv takes the Gram matrices kept from the conv's own norm, scaled, where they are ``M
    M^H``: its factor is the one certified from Gram matrices formed afresh (nothing kept),
    within the room, and bounds the dense Jacobian's norm."""
    assume(cin % groups == 0 and cout % groups == 0)
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, stride, padding=1, groups=groups)
    model = nn.Sequential(conv, random_bn(cout, seed)).double().eval()
    shape = (cin, 9, 10)
    calls = []
    scaled = torus.TorusGrams.scaled

    def spy(self, scale):
        calls.append(self.rows <= self.cols)
        return scaled(self, scale)

    with patch.object(torus.TorusGrams, "scaled", spy):
        r = report(model, shape, method="lanczos", width=width)
    with patch.object(torus, "_KEPT_BYTES", 0):
        fresh = report(model, shape, method="lanczos", width=width)
    assert calls == [True] or calls == [False]  # taken once, scaled where it can be
    folded = next(f for f in r.factors if f.rule.startswith("folded into 0"))
    again = next(f for f in fresh.factors if f.rule.startswith("folded into 0"))
    room = 1e-9 if width is None else 2 * width
    assert abs(folded.factor / again.factor - 1) <= room
    true = jnorm(model, torch.zeros(shape))
    assert true <= r.upper * (1 + 1e-9)


def test_linear_with_batchnorm1d_folded_and_standalone_batchnorm_are_exact():
    torch.manual_seed(0)
    check_affine(nn.Sequential(nn.Linear(6, 4), random_bn(4, 1, nn.BatchNorm1d)), (6,), exact=True)
    check_affine(nn.Sequential(random_bn(3, 2)), (3, 4, 4), exact=True)
    # A conv used twice is not folded: BN stands alone (two factors), still a bound.
    conv, bn = nn.Conv2d(2, 2, 3, padding=1), random_bn(2, 3)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = conv, bn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    r = report(Twice().double(), (2, 4, 4))
    assert [f.rule for f in r.factors if f.target == "bn"] == ["max |gamma / sqrt(var + eps)|"]
    check_affine(Twice(), (2, 4, 4))


@given(
    dims=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 3), pad=st.integers(0, 1),
    ceil=st.booleans(), include=st.booleans(), override=st.sampled_from([None, 1, 3]),
    size=st.integers(3, 6),
)  # fmt: skip
def test_average_pooling_of_every_kind_is_exact(dims, k, stride, pad, ceil, include, override,
                                                size):  # fmt: skip
    assume(2 * pad <= k)
    cls = getattr(nn, f"AvgPool{dims}d")
    kw = {} if dims == 1 else {"divisor_override": override}
    pool = cls(k, stride, pad, ceil_mode=ceil, count_include_pad=include, **kw)
    shape = (2, *[size + i for i in range(dims)])
    r = check_affine(nn.Sequential(pool), shape, exact=True)
    assert r.factors[0].rule == "exact norm of the pooling matrix"


@given(dims=st.integers(1, 3), size=st.integers(1, 7), out=st.integers(1, 5))
def test_adaptive_average_pooling_is_exact(dims, size, out):
    pool = getattr(nn, f"AdaptiveAvgPool{dims}d")(out)
    check_affine(nn.Sequential(pool), (1, *[size] * dims), exact=True)


@settings(max_examples=30)
@given(
    dims=st.integers(1, 3), mode=st.sampled_from(["nearest", "nearest-exact", "linear", "cubic",
                                                   "area"]),
    align=st.booleans(), by_size=st.booleans(), scale=st.sampled_from([0.5, 1.5, 2.0, 3.0]),
    antialias=st.booleans(), size=st.integers(2, 5),
)  # fmt: skip
def test_upsampling_and_interpolation_are_exact(dims, mode, align, by_size, scale, antialias,
                                                size):  # fmt: skip
    if mode in ("linear", "cubic"):
        assume(mode == "linear" or dims == 2)
        mode = {1: "linear", 2: "bilinear" if mode == "linear" else "bicubic", 3: "trilinear"}[
            dims]
    else:
        align = None
    antialias = antialias and mode in ("bilinear", "bicubic")
    shape = (2, *[size + i for i in range(dims)])
    where = {"size": tuple(int(v * scale) + 1 for v in shape[1:])} if by_size else {
        "scale_factor": scale}
    check_affine(nn.Sequential(nn.Upsample(**where, mode=mode, align_corners=align)), shape,
                 exact=True)  # fmt: skip

    class Resample(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, **where, mode=mode, align_corners=align, antialias=antialias)

    if not antialias:
        check_affine(Resample(), shape, exact=True)
    else:  # its matrix is not made per dimension as above: refused
        r = report(Resample(), shape)
        assert r.upper == math.inf and "antialiased" in r.not_certified[0]


class Branches(nn.Module):
    """Sums, concatenation, mean, functional pooling and reshapes, all affine."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.c = nn.ConvTranspose2d(5, 2, 2, stride=2)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.bn(self.a(x)), self.b(x)], dim=1)
        y = F.avg_pool2d(self.c(y), 2) + 0.5 * x - x / 4
        z = y.mean(dim=(2, 3)).flatten(1)
        w = torch.flatten(F.adaptive_avg_pool2d(y, 2), 1)
        return self.fc(torch.cat([w, 2 * z.view(1, -1), z.sum(1, keepdim=True)[:, :1] * 0], 1)[:, :8])


def test_affine_graph_with_sums_and_concatenation():
    torch.manual_seed(1)
    model = Branches()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2)
    check_affine(model, (2, 4, 4))


def test_single_factors_are_exact():
    check_affine(nn.Sequential(nn.Flatten(), nn.Dropout(), nn.Identity()), (2, 3), exact=True)

    class Mean(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2)) + torch.sum(x, dim=0)[None] * 0

    check_affine(Mean(), (3, 4, 5), exact=True)


# -- max pooling: sqrt(most windows per entry), attained -----------------------------------------


def most_windows(pool: nn.Module, shape: tuple[int, ...]) -> int:
    """By brute force: for each input entry i, lower it by 1/2 where it is the unique maximum
    of every window holding it; the output moves by 1/2 in exactly those windows."""
    n = math.prod(shape)
    base = -torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) - 2
    x = base.repeat(n, 1) + torch.eye(n, dtype=torch.float64) * (3 - base)
    moved = pool(x.reshape(n, *shape)) - pool((x - 0.5 * torch.eye(n)).reshape(n, *shape))
    return int(torch.round((moved.reshape(n, -1) ** 2).sum(1) * 4).max())


@given(
    dims=st.integers(1, 2), k=st.integers(1, 4), stride=st.integers(1, 3), pad=st.integers(0, 2),
    dilation=st.integers(1, 2), ceil=st.booleans(), size=st.integers(4, 7),
    adaptive=st.booleans(), out=st.integers(1, 5),
)  # fmt: skip
def test_max_pooling_constant_is_attained(dims, k, stride, pad, dilation, ceil, size, adaptive,
                                          out):  # fmt: skip
    assume(2 * pad <= k and (k - 1) * dilation + 1 <= size + 2 * pad)
    pool = (getattr(nn, f"AdaptiveMaxPool{dims}d")(out) if adaptive
            else getattr(nn, f"MaxPool{dims}d")(k, stride, pad, dilation, ceil_mode=ceil))
    shape = (1, *[size] * dims)
    r = report(nn.Sequential(pool), shape)
    assert r.upper == pytest.approx(math.sqrt(most_windows(pool, shape)), rel=1e-12)


def test_max_pool_lipschitz_constant_in_a_nonoverlapping_case_is_one():
    r = report(nn.Sequential(nn.MaxPool2d(2)), (1, 4, 4))
    assert r.factors[0].factor == 1.0 and "= 1)" in r.factors[0].rule


# -- activations ----------------------------------------------------------------------------------

ACTIVATIONS = [
    (nn.ReLU(), 1.0), (nn.ReLU6(), 1.0), (nn.Tanh(), 1.0), (nn.Hardtanh(-2, 3), 1.0),
    (nn.LeakyReLU(0.1), 1.0), (nn.LeakyReLU(-1.5), 1.5), (nn.Sigmoid(), 0.25),
    (nn.Hardswish(), 1.5), (nn.ELU(2.0), 2.0), (nn.ELU(0.5), 1.0), (nn.Softplus(), 1.0),
    (nn.GELU(), None), (nn.GELU("tanh"), None), (nn.SiLU(), None), (nn.Mish(), None),
]  # fmt: skip


@pytest.mark.parametrize("act,exact", ACTIVATIONS, ids=lambda v: repr(v))
def test_activation_constants(act, exact):
    t = torch.linspace(-12, 12, 240_007, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(act(t).sum(), t)
    sup = float(d.abs().max())
    r = report(nn.Sequential(act), (7,))
    factor = r.factors[0].factor
    if exact is not None:
        assert factor == pytest.approx(exact, rel=1e-12) and sup <= factor * (1 + 1e-12)
    else:  # computed: above every derivative seen, and tight to 1e-3
        assert sup <= factor <= sup + 1e-3


def test_numeric_sups_match_the_closed_forms():
    assert _derivative_sup("GELU") == pytest.approx(1.12896, abs=2e-4)
    assert _derivative_sup("SiLU") == pytest.approx(1.09984, abs=2e-4)


# -- nonlinear models: upper >= ||J(x)|| everywhere, lower reached at the witness ---------------


class RandomNet(nn.Module):
    """A small network built from a drawn list of steps (fx unrolls the loop)."""

    def __init__(self, steps: list[tuple[str, int]], cin: int, size: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.steps = steps
        self.mods = nn.ModuleList()
        c = cin
        for kind, arg in steps:
            if kind == "conv":
                self.mods.append(nn.Sequential(nn.Conv2d(c, arg, 3, padding=1),
                                               random_bn(arg, seed)))  # fmt: skip
                c = arg
            elif kind == "residual":
                self.mods.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                               nn.Conv2d(c, c, 1)))  # fmt: skip
            elif kind == "cat":
                self.mods.append(nn.ModuleList([nn.Conv2d(c, arg, 3, padding=1),
                                                nn.Conv2d(c, 1, 1)]))  # fmt: skip
                c = arg + 1
            elif kind == "act":
                self.mods.append(ACTIVATIONS[arg][0])
            else:  # "pool"
                self.mods.append([nn.MaxPool2d(2, 1), nn.AvgPool2d(2, 1, ceil_mode=True),
                                  nn.AvgPool2d(3, 1, 1, count_include_pad=False)][arg])
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for (kind, _), m in zip(self.steps, self.mods):
            if kind == "residual":
                x = x + m(x)
            elif kind == "cat":
                x = torch.cat([m[0](x), m[1](x)], dim=1)
            else:
                x = m(x)
        return self.head(x.mean(dim=(2, 3)))


STEPS = st.one_of(
    st.tuples(st.just("conv"), st.integers(1, 3)), st.tuples(st.just("residual"), st.just(0)),
    st.tuples(st.just("cat"), st.integers(1, 2)),
    st.tuples(st.just("act"), st.integers(0, len(ACTIVATIONS) - 1)),
    st.tuples(st.just("pool"), st.integers(0, 2)),
)  # fmt: skip


@settings(max_examples=30)  # each draws a whole network and its dense Jacobians
@given(steps=st.lists(STEPS, min_size=1, max_size=5), cin=st.integers(1, 2),
       size=st.integers(3, 5), seed=st.integers(0, 1000))  # fmt: skip
def test_random_architectures_bound_the_jacobian(steps, cin, size, seed):
    assume(sum(k == "pool" and a < 2 for k, a in steps) < size)  # each such pool takes 1 off
    model = RandomNet(steps, cin, size, seed).double().eval()
    r = report(model, (cin, size, size), probes=2, iterations=10)
    assert r.certified, r.not_certified
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        x = torch.randn(cin, size, size, generator=gen, dtype=torch.float64) * 2
        assert jnorm(model, x) <= r.upper * (1 + 1e-9)
    check_witness(model, r)
    nonlinear = any(k in ("act", "pool", "residual") for k, _ in steps)
    if not nonlinear:
        assert jnorm(model, torch.zeros(cin, size, size)) >= r.lower * (1 - 1e-9)


def test_a_witness_where_every_probe_meets_a_zero_jacobian():
    """A conv, BatchNorm and ReLU whose every probe lands on dead units: the lower end is 0 and
    its witness (an input and a direction with J v = 0) is still given."""
    model = RandomNet([("conv", 1), ("act", 0)], 1, 3, 1).double().eval()
    r = report(model, (1, 3, 3), probes=2, iterations=10)
    assert r.lower == 0.0 and r.witness_input is not None
    check_witness(model, r)


# -- what is not certified, and why ---------------------------------------------------------------


def test_nodes_without_a_rule_make_the_bound_infinite_with_the_reason():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.Linear(8, 1))
    r = report(model, (1, 4, 4))
    assert r.upper == math.inf and not r.certified
    assert r.not_certified == ("1 (GroupNorm): no Lipschitz rule for this module",)
    assert "not certified: 1 (GroupNorm)" in str(r) and r.lower > 0

    class Square(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x

    r = report(Square(), (3,))
    assert r.upper == math.inf and "product of two tensors" in r.not_certified[0]

    r = report(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), (3, 4))
    assert "batch statistics" in r.not_certified[0]


def test_a_model_fx_cannot_trace_gets_no_bound_and_says_so():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    r = report(Branchy(), (1, 5, 5))
    assert len(r) == 1 and r[0].certified  # the per-layer table stands
    assert r.upper == math.inf and r.graph == "not traced"
    assert "torch.fx could not trace the model" in r.not_certified[0]
    assert "no whole-model bound" in str(r)


def test_an_unused_branch_without_a_rule_does_not_matter():
    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 1, 3), nn.LayerNorm(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.norm(x)
            return self.conv(x)

    r = report(Dead(), (1, 3, 3))
    assert r.certified and r.upper == pytest.approx(r[0].upper, rel=1e-13)


# -- the zoo: traced, finite, and the command -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_trace_and_get_finite_bounds(name):
    kw = {"base": 2} if name == "unet" else {"width": 16, "num_classes": 4}
    if name == "vgg11":
        kw["hidden"] = 16
    r = report(ZOO[name](**kw), (3, 32, 32), probes=1, iterations=5, method="lanczos")
    assert r.certified and r.graph.startswith("torch.fx"), r.not_certified
    assert 0 < r.lower <= r.upper < math.inf


def test_norm_command_carries_the_model_bound():
    cmd = [sys.executable, "-m", "convmat", "norm", "--model",
           "tests.test_lipschitz:small_resnet", "--input", "3,12,12", "--probes", "1"]
    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    model = data["model"]
    assert 0 < model["lower"] <= model["upper"] == data["certified_bound"]
    assert model["certified"] and model["not_certified"] == []
    assert {f["target"] for f in model["factors"]} >= {"layer1.bn1", "add", "mean"}
    assert model["witness"]["value"] == model["lower"]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert text.returncode == 0, text.stderr
    assert "model Lipschitz constant (2-norm, eval mode): [" in text.stdout
    assert "folded into layer1.conv1" in text.stdout


def test_in_place_writes_and_repeated_outputs_are_counted():
    class InPlace(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = x + 0
            y.mul_(3)  # y is now 3 (x + 0): its later readers see it
            return y + 0, y

    r = report(InPlace(), (2, 3))
    assert r.upper == pytest.approx(3 * math.sqrt(2), rel=1e-12)


# -- the rules of functions: one table, target -> rule ------------------------------------------


def test_function_rules_are_a_table(monkeypatch):
    """A function node's rule is the table's entry for its name, and nothing else: without one
    the bound is infinite; an entry added to the table is the rule that applies."""
    from convmat.analysis import lipschitz

    class Sine(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sin(3 * x)

    assert "sin" not in lipschitz._FUNCTION_RULES
    assert lipschitz._FUNCTION_RULES["relu"] is lipschitz._Bound._as_module
    assert set(lipschitz._SHAPE_OPS) <= set(lipschitz._FUNCTION_RULES)
    r = report(Sine(), (5,))
    assert r.upper == math.inf and r.not_certified == ("sin (function sin): no Lipschitz rule "
                                                       "for this operation",)  # fmt: skip
    monkeypatch.setitem(lipschitz._FUNCTION_RULES, "sin",
                        lambda bound, n, *_: bound._unary(n, 1.0, "|sin'| <= 1"))  # fmt: skip
    r = report(Sine(), (5,))
    assert r.upper == pytest.approx(3.0, rel=1e-12) and r.certified
    assert [f.rule for f in r.factors] == ["times a constant: max |c|", "|sin'| <= 1"]
