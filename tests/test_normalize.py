"""Spectral normalisation by the convolution's operator norm (convmat.analysis.normalize)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import convmat
from convmat import ConvMatError
from convmat.analysis.normalize import ConvSpectralNorm, spectral_norm

from .reference import MODES, MODULE, MODULE_T

F64 = torch.float64


@st.composite
def layers(draw):
    """A small convolution or transposed convolution (1-D or 2-D), its input size and the
    configuration ``convmat.operator_norm`` takes for its weight."""
    n = draw(st.sampled_from([1, 2]))
    transposed = draw(st.booleans())
    groups = draw(st.integers(1, 2))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    k = tuple(draw(st.integers(1, 3)) for _ in range(n))
    s = tuple(draw(st.integers(1, 2)) for _ in range(n))
    d = tuple(draw(st.integers(1, 2)) for _ in range(n))
    p = tuple(draw(st.integers(0, 2)) for _ in range(n))
    common = dict(stride=s, padding=p, dilation=d, groups=groups, bias=True, dtype=F64)
    if transposed:
        op = tuple(draw(st.integers(0, max(ss, dd) - 1)) for ss, dd in zip(s, d))
        size = tuple(draw(st.integers(1, {1: 6, 2: 4}[n])) for _ in range(n))
        out = [
            (i - 1) * ss - 2 * pp + dd * (kk - 1) + o + 1
            for i, ss, pp, dd, kk, o in zip(size, s, p, d, k, op)
        ]
        assume(all(o >= 1 for o in out))
        module = MODULE_T[n](cin, cout, k, output_padding=op, **common)
        config = dict(transposed=True, stride=s, padding=p, dilation=d, groups=groups,
                      output_padding=op)  # fmt: skip
    else:
        mode = draw(st.sampled_from(MODES))
        size = []
        for kk, dd, pp in zip(k, d, p):
            lo = max(1, dd * (kk - 1) + 1 - 2 * pp, pp + 1 if mode == "reflect" else pp)
            size.append(draw(st.integers(lo, lo + {1: 6, 2: 3}[n])))
        size = tuple(size)
        module = MODULE[n](cin, cout, k, padding_mode=mode, **common)
        config = dict(stride=s, padding=p, dilation=d, groups=groups, padding_mode=mode)
    seed = draw(st.integers(0, 2**16))
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, dtype=F64,
                                        generator=torch.Generator().manual_seed(seed)))  # fmt: skip
    return module, size, config


def _train_forwards(module, size, count):
    """``count`` forwards in training mode on random inputs (no optimizer step)."""
    x = torch.randn(2, module.in_channels, *size, dtype=module.weight.dtype)
    for _ in range(count):
        module(x)


def _param(module) -> ConvSpectralNorm:
    return module.parametrizations.weight[0]


# -- (a) the converged estimate is the operator norm ------------------------------------------
@settings(max_examples=max(10, settings.default.max_examples // 2))  # 2000 power steps each
@given(layers(), st.sampled_from([0.5, 1.0, 3.0]))
def test_converged_sigma_is_the_operator_norm(drawn, bound):
    module, size, config = drawn
    weight = module.weight.detach().clone()
    values = convmat.singular_values(weight, size, **config)
    top = float(values[0])
    assume(top > 1e-6)
    # Power iteration converges to the top singular space at the rate (s/s1)^2 per step, s the
    # largest singular value below s1 (a repeated s1 is no obstacle: sigma is s1 anywhere in its
    # space), sigma twice as fast; 2000 steps reach 1e-6 while s/s1 < 0.995. Values within 1e-7
    # of s1 count as s1 (sigma is within 1e-7 of it there anyway).
    below = values[values < top * (1 - 1e-7)]
    ratio = float(below[0]) / top if below.numel() else 0.0
    assume(ratio < 0.995)
    spectral_norm(module, size, n_power_iterations=50, bound=bound)
    _train_forwards(module, size, 40)
    param = _param(module)
    with torch.no_grad():
        sigma = param.sigma(module.parametrizations.weight.original).item()
    exact = convmat.operator_norm(weight, size, **config).value
    assert abs(sigma - exact) <= 1e-6 * exact
    # The normalised layer's norm is the bound.
    module.eval()
    normalised = convmat.operator_norm(module.weight.detach(), size, **config).value
    assert abs(normalised - bound) <= 1e-6 * bound


@pytest.mark.parametrize(
    ("module", "config"),
    [
        (nn.Conv3d(2, 2, 3, stride=(1, 2, 1), padding=1, padding_mode="circular", dtype=F64),
         dict(stride=(1, 2, 1), padding=1, padding_mode="circular")),
        (nn.ConvTranspose3d(2, 4, 2, stride=2, groups=2, dtype=F64),
         dict(transposed=True, stride=2, groups=2)),
    ],
    ids=["conv3d", "conv_transpose3d"],
)  # fmt: skip
def test_three_dimensional_layers(module, config):
    size = (3, 4, 3)
    torch.manual_seed(0)
    weight = module.weight.detach().clone()
    spectral_norm(module, size, n_power_iterations=50)
    _train_forwards(module, size, 40)
    with torch.no_grad():
        sigma = _param(module).sigma(module.parametrizations.weight.original).item()
    exact = convmat.operator_norm(weight, size, method="dense", **config).value
    assert abs(sigma - exact) <= 1e-6 * exact


def test_complex_weights_use_the_conjugate_transpose():
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 2, 3, padding=1, bias=False, dtype=torch.complex128)
    dense = convmat.ConvOperator(conv.weight.detach(), 6, padding=1).to_dense()
    exact = torch.linalg.matrix_norm(dense, ord=2).item()
    spectral_norm(conv, 6, n_power_iterations=50)
    _train_forwards(conv, (6,), 40)
    conv.eval()
    normalised = convmat.ConvOperator(conv.weight.detach(), 6, padding=1).to_dense()
    assert abs(torch.linalg.matrix_norm(normalised, ord=2).item() - 1.0) <= 1e-6
    with torch.no_grad():
        sigma = _param(conv).sigma(conv.parametrizations.weight.original)
    assert not sigma.is_complex()
    assert abs(sigma.item() - exact) <= 1e-6 * exact


def test_vectors_have_the_operator_shapes():
    conv = spectral_norm(nn.Conv2d(2, 3, 3, stride=2), (9, 7))
    assert _param(conv)._u.shape == (3, 4, 3)
    assert _param(conv)._v.shape == (2, 9, 7)
    up = spectral_norm(nn.ConvTranspose1d(2, 5, 3, stride=2, output_padding=1), 6)
    assert _param(up)._u.shape == (5, 14)
    assert _param(up)._v.shape == (2, 6)


def test_one_by_one_kernel_agrees_with_torch():
    """A 1x1 stride-1 convolution is its reshaped kernel on every position: both
    normalisations give the same weight."""
    torch.manual_seed(0)
    ours = spectral_norm(nn.Conv2d(4, 3, 1, dtype=F64), (5, 5), n_power_iterations=50)
    theirs = parametrizations.spectral_norm(nn.Conv2d(4, 3, 1, dtype=F64), n_power_iterations=50)
    with torch.no_grad():
        theirs.parametrizations.weight.original.copy_(ours.parametrizations.weight.original)
    _train_forwards(ours, (5, 5), 20)
    _train_forwards(theirs, (5, 5), 20)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-10, atol=1e-12)


# -- (b) after training, the certified norm is the bound; torch's is above it -----------------
def _fit(module, size, steps=300, seed=0):
    """Fit random targets with Adam; the layer stays in training mode throughout."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, module.in_channels, *size, dtype=F64, generator=gen)
    target = torch.randn(module(x).shape, dtype=F64, generator=gen)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.mse_loss(module(x), target)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    module.eval()
    return losses


TRAINING = [
    ("zeros 3x3", lambda: nn.Conv2d(3, 4, 3, padding=1, dtype=F64), (8, 8), {"padding": 1}),
    ("reflect 3x3", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", dtype=F64),
     (8, 8), {"padding": 1, "padding_mode": "reflect"}),
    ("zeros 1-D k5 dil2", lambda: nn.Conv1d(2, 3, 5, padding=4, dilation=2, dtype=F64), (16,),
     {"padding": 4, "dilation": 2}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("label", "make", "size", "config"), TRAINING, ids=[t[0] for t in TRAINING]
)
def test_trained_layer_is_certified_within_bound(label, make, size, config, capsys):
    bound = 1.0
    torch.manual_seed(0)
    ours = spectral_norm(make(), size, bound=bound)
    losses = _fit(ours, size)
    assert losses[-1] < losses[0]
    ours_norm = convmat.operator_norm(ours.weight.detach(), size, method="dense", **config)
    assert ours_norm.upper <= bound * (1 + 1e-3)
    assert ours_norm.lower >= bound * (1 - 1e-3)

    torch.manual_seed(0)
    theirs = parametrizations.spectral_norm(make())
    _fit(theirs, size)
    theirs_norm = convmat.operator_norm(theirs.weight.detach(), size, method="dense", **config)
    # torch normalises the reshaped kernel, whose norm is below the stride-1 operator's.
    assert theirs_norm.lower > bound * 1.05
    with capsys.disabled():
        print(f"\n[{label}] after training: convmat spectral_norm -> operator norm "
              f"{ours_norm.value:.6f}, torch spectral_norm -> {theirs_norm.value:.4f} "
              f"({theirs_norm.value / bound:.3f}x the bound)")  # fmt: skip


def test_transposed_layer_trains_to_its_bound():
    torch.manual_seed(1)
    size = (5, 5)
    up = spectral_norm(nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1,
                                          dtype=F64), size, bound=2.0)  # fmt: skip
    _fit(up, size, steps=200)
    norm = convmat.operator_norm(up.weight.detach(), size, transposed=True, stride=2, padding=1,
                                 output_padding=1, method="dense")  # fmt: skip
    assert 2.0 * (1 - 1e-3) <= norm.lower <= norm.upper <= 2.0 * (1 + 1e-3)


# -- (c) state_dict round trip ---------------------------------------------------------------
def test_state_dict_round_trip():
    torch.manual_seed(0)
    size = (6, 6)

    def make():
        return nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="circular", dtype=F64)

    trained = spectral_norm(make(), size, bound=0.7)
    _fit(trained, size, steps=20)
    state = trained.state_dict()
    assert {"parametrizations.weight.0._u", "parametrizations.weight.0._v"} <= set(state)
    fresh = spectral_norm(make(), size, bound=0.7)
    fresh.load_state_dict(state)
    fresh.eval()
    for name in ("_u", "_v"):
        assert torch.equal(getattr(_param(fresh), name), getattr(_param(trained), name))
    x = torch.randn(4, 2, *size, dtype=F64)
    assert torch.equal(fresh(x), trained(x))


def test_state_dict_of_another_input_size_is_refused():
    state = spectral_norm(nn.Conv2d(2, 3, 3), (6, 6)).state_dict()
    other = spectral_norm(nn.Conv2d(2, 3, 3), (7, 7))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(state)


# -- (d) eval mode uses the stored vectors ---------------------------------------------------
def test_eval_uses_stored_vectors():
    torch.manual_seed(0)
    size = (7,)
    conv = spectral_norm(nn.Conv1d(2, 2, 3, padding=1, padding_mode="replicate", dtype=F64),
                         size, bound=1.5)  # fmt: skip
    conv.eval()
    u, v = _param(conv)._u.clone(), _param(conv)._v.clone()
    x = torch.randn(3, 2, *size, dtype=F64)
    first = conv(x)
    for _ in range(3):
        assert torch.equal(conv(x), first)
    assert torch.equal(_param(conv)._u, u) and torch.equal(_param(conv)._v, v)
    # The weight is original * bound / <u, W v>, W v by torch's own padded convolution.
    original = conv.parametrizations.weight.original
    wv = F.conv1d(F.pad(v[None], [1, 1], mode="replicate"), original)[0]
    expected = original * 1.5 / torch.vdot(u.reshape(-1), wv.reshape(-1))
    torch.testing.assert_close(conv.weight, expected, rtol=1e-13, atol=0)
    # Training mode moves them again.
    conv.train()
    conv(x)
    assert not torch.equal(_param(conv)._u, u)


def test_gradient_flows_through_sigma():
    conv = spectral_norm(nn.Conv2d(2, 2, 3, stride=2, dtype=F64), (6, 6))
    param = _param(conv).eval()
    weight = conv.parametrizations.weight.original.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(param, (weight,))


def test_dtype_and_device_follow_the_module():
    conv = spectral_norm(nn.Conv2d(1, 2, 3), (5, 5))
    assert _param(conv)._u.dtype == torch.float32
    conv.double()
    assert _param(conv)._u.dtype == F64
    conv(torch.randn(1, 1, 5, 5, dtype=F64))


def test_parametrization_follows_the_module_mode():
    conv = nn.Conv1d(1, 1, 3).eval()
    spectral_norm(conv, 6)
    assert not _param(conv).training


def test_removing_keeps_the_normalised_weight():
    conv = spectral_norm(nn.Conv1d(1, 2, 3, dtype=F64), 6).eval()
    expected = conv.weight.detach().clone()
    parametrize.remove_parametrizations(conv, "weight")
    assert torch.equal(conv.weight.detach(), expected)


def test_zero_weight_stays_zero():
    conv = nn.Conv1d(1, 1, 3, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
    spectral_norm(conv, 5)
    assert torch.equal(conv.weight, torch.zeros_like(conv.weight))


# -- (e) torch.compile -----------------------------------------------------------------------
def test_torch_compile_forward_and_backward():
    torch.manual_seed(0)
    size = (6, 6)
    eager = nn.Sequential(spectral_norm(nn.Conv2d(2, 3, 3, padding=1), size), nn.Tanh())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x = torch.randn(4, 2, *size)
    for _ in range(2):
        eager(x).square().sum().backward()
        compiled(x).square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    for a, b in zip(eager.buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b, a)


def test_torch_compile_fullgraph_is_refused():
    model = spectral_norm(nn.Conv1d(1, 1, 3), 6)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"torch\.compiler\.disable"):
        torch.compile(model, fullgraph=True)(torch.randn(1, 1, 6))


# -- (f) errors -------------------------------------------------------------------------------
def test_refuses_what_is_not_a_convolution():
    with pytest.raises(ConvMatError, match="not a convolution layer"):
        spectral_norm(nn.Linear(3, 3), 3)
    with pytest.raises(ConvMatError, match=r"module must be a convolution layer.*int"):
        spectral_norm(3, 3)


def test_refuses_a_subclass_with_its_own_forward():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ConvMatError, match=r"Doubled.*overrides forward"):
        spectral_norm(Doubled(1, 1, 3), (5, 5))


@pytest.mark.parametrize(
    ("input_size", "match"),
    [(0, "input_size must be >= 1"), ((5, 5, 5), r"tuple of 2 ints.*got \(5, 5, 5\)"),
     ((2, 2), "kernel"),
     ("8", "input_size")],
)  # fmt: skip
def test_refuses_a_bad_input_size(input_size, match):
    with pytest.raises(ConvMatError, match=match):
        spectral_norm(nn.Conv2d(1, 1, 3), input_size)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_power_iterations": 0}, "n_power_iterations must be an int >= 1, got 0"),
        ({"n_power_iterations": 1.5}, "n_power_iterations must be an int >= 1, got 1.5"),
        ({"n_power_iterations": True}, "n_power_iterations must be an int >= 1, got True"),
        ({"init_iterations": -1}, "init_iterations must be an int >= 0, got -1"),
        ({"bound": 0}, "bound must be a finite number > 0, got 0"),
        ({"bound": -1.0}, r"bound must be a finite number > 0, got -1\.0"),
        ({"bound": float("inf")}, "bound must be a finite number > 0, got inf"),
        ({"bound": "1"}, "bound must be a finite number > 0, got '1'"),
        ({"eps": 0.0}, r"eps must be a finite number > 0, got 0\.0"),
        ({"name": "bias"}, "name must be 'weight'.*got 'bias'"),
    ],
)
def test_refuses_bad_arguments(kwargs, match):
    conv = nn.Conv2d(1, 1, 3)
    with pytest.raises(ConvMatError, match=match):
        spectral_norm(conv, (5, 5), **kwargs)
    assert not parametrize.is_parametrized(conv)


def test_transposed_layer_with_reflect_padding_is_refused_by_the_geometry():
    conv = nn.ConvTranspose1d(1, 1, 3)
    conv.padding_mode = "reflect"
    with pytest.raises(ConvMatError, match="padding_mode must be 'zeros'"):
        spectral_norm(conv, 5)
