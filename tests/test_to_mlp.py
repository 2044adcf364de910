"""to_mlp: whole CNNs as Flatten + Linear + activations, exact in float64."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from convmat import ConvMatError, to_linear, to_matrix, to_mlp
from convmat.layers import linear
from convmat.layers.linear import SparseLinear


def _randomise_batchnorm(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


MODELS = {
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3, stride=2, padding=1, padding_mode="reflect"),
            nn.ReLU(),
            nn.Conv1d(3, 2, 2, dilation=2),
        ),
        (2, 11),
    ),
    "conv3d": (
        lambda: nn.Sequential(
            nn.Conv3d(1, 2, 2, groups=1),
            nn.ELU(),
            nn.Conv3d(2, 2, 2, groups=2, padding_mode="circular", padding=1),
        ),
        (1, 4, 4, 3),
    ),
    "conv_transpose": (
        lambda: nn.Sequential(
            nn.ConvTranspose2d(2, 3, 3, stride=2, output_padding=1), nn.Sigmoid()
        ),
        (2, 3, 4),
    ),
    "batchnorm": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.GELU(), nn.BatchNorm2d(3, affine=False)
        ),
        (1, 5, 5),
    ),
    "batchnorm1d": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.SiLU()),
        (3, 4),
    ),
    "avgpool": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 2, 1),
            nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
            nn.Tanh(),
            nn.AvgPool2d(2),
        ),
        (2, 9, 8),
    ),
    "adaptive": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 2, 3), nn.AdaptiveAvgPool1d(4), nn.Softplus(), nn.AvgPool1d(2)
        ),
        (2, 13),
    ),
    "adaptive3d": (
        lambda: nn.Sequential(nn.AdaptiveAvgPool3d((2, 1, 3)), nn.LeakyReLU(0.2)),
        (2, 5, 3, 4),
    ),
    "flatten_unflatten_dropout": (
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Unflatten(1, (2, 3, 3)),
            nn.Conv2d(2, 1, 2),
            nn.Identity(),
            nn.Flatten(),
            nn.Linear(4, 2),
        ),
        (2, 3, 3),
    ),
    "lenet": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Sequential(nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2)),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        ),
        (1, 28, 28),
    ),
    "encoder_decoder": (
        lambda: nn.Sequential(
            nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1),
                nn.BatchNorm2d(8),
                nn.LeakyReLU(),
                nn.Conv2d(8, 16, 3, stride=2, padding=1),
                nn.ReLU(),
            ),
            nn.Sequential(
                nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1),
                nn.Sigmoid(),
            ),
        ),
        (3, 16, 16),
    ),
}


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("name", list(MODELS))
def test_to_mlp_matches_model(name, sparse):
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().double()
    _randomise_batchnorm(model)
    model.eval()
    mlp = to_mlp(model, shape, sparse=sparse, dtype=torch.float64)
    assert isinstance(mlp[0], nn.Flatten)
    linear = SparseLinear if sparse else nn.Linear
    for m in mlp[1:]:
        assert (
            isinstance(m, linear)
            or not any(True for _ in m.parameters())
            or isinstance(m, nn.PReLU)
            or type(m).__module__.startswith("torch.nn.modules.activation")
        )
    # No two linear layers in a row: consecutive affine maps are merged.
    kinds = [isinstance(m, linear) for m in mlp[1:]]
    assert not any(a and b for a, b in itertools.pairwise(kinds))
    x = torch.randn(4, *shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), model(x).flatten(1), rtol=0, atol=1e-10)


def test_lenet_merges_into_expected_layers():
    torch.manual_seed(0)
    model = MODELS["lenet"][0]().double().eval()
    mlp = to_mlp(model, (1, 28, 28))
    assert [type(m).__name__ for m in mlp] == [
        "Flatten",
        "Linear",
        "ReLU",
        "Linear",
        "ReLU",
        "Linear",
        "ReLU",
        "Linear",
        "ReLU",
        "Linear",
    ]
    # conv1 (6*28*28 outputs); pool2+conv2+bn merged into one map; then pool, flatten, fc1.
    assert mlp[1].weight.shape == (6 * 28 * 28, 28 * 28)
    assert mlp[3].weight.shape == (16 * 10 * 10, 6 * 28 * 28)
    assert mlp[5].weight.shape == (120, 16 * 10 * 10)


@pytest.mark.parametrize(
    ("model", "shape", "match"),
    [
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))),
            (1, 6, 6),
            r"^1\.1 \(MaxPool2d\) is not supported by to_mlp",
        ),
        (
            nn.Sequential(nn.Conv2d(2, 2, 1), Residual()),
            (2, 4, 4),
            r"^1 \(Residual\) is not supported",
        ),
        (Residual(), (2, 4, 4), r"^Residual \(Residual\) is not supported"),
        (nn.Sequential(nn.Conv1d(1, 1, 1), nn.PReLU(3)), (1, 4), r"^1 \(PReLU\) is not supported"),
        (
            nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)),
            (2, 3),
            r"^0 \(BatchNorm1d\) has no running statistics",
        ),
        (
            nn.Sequential(nn.Conv1d(1, 1, 1), nn.Linear(4, 2)),
            (1, 4),
            r"^1 \(Linear\) is applied to a non-flat input of shape \(1, 4\)",
        ),
    ],
)
def test_to_mlp_errors_name_the_layer(model, shape, match):
    with pytest.raises(ConvMatError, match=match):
        to_mlp(model.eval(), shape)


def test_to_mlp_rejects_training_mode():
    with pytest.raises(
        ConvMatError, match=r"Sequential is in training mode; to_mlp needs model\.eval\(\)"
    ):
        to_mlp(nn.Sequential(nn.Conv1d(1, 1, 1), nn.Dropout()), (1, 4))


# ---------------------------------------------------------------------------------------------
# Random small CNNs against the model itself, in float64.

CONV_MODULE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T_MODULE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
ADAPTIVE = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.ELU, nn.Sigmoid, nn.Softplus, nn.GELU, nn.Hardtanh]


def _conv_layer(draw, n, channels, spatial):
    cout = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0 and cout % g == 0]))
    padding = draw(st.integers(0, 1))
    dilation = draw(st.integers(1, 2))
    # The kernel fits in the padded input.
    most = max(1, min(3, (min(spatial) + 2 * padding - 1) // dilation + 1))
    kernel = draw(st.integers(1, most))
    modes = ["zeros", "circular", "replicate"] + (["reflect"] if min(spatial) > padding else [])
    return CONV_MODULE[n](
        channels,
        cout,
        kernel,
        stride=draw(st.integers(1, 2)),
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(modes)),
    )


def _conv_transpose_layer(draw, n, channels):
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    # Padding at most what the kernel's span adds, so every output size is >= 1.
    padding = draw(st.integers(0, dilation * (kernel - 1) // 2))
    return CONV_T_MODULE[n](
        channels,
        draw(st.integers(1, 3)),
        kernel,
        stride=stride,
        padding=padding,
        output_padding=draw(st.integers(0, max(stride, dilation) - 1)),
        dilation=dilation,
        bias=draw(st.booleans()),
    )


def _avgpool_layer(draw, n, spatial):
    kernel = draw(st.integers(1, min(3, min(spatial))))
    kw = dict(
        stride=draw(st.sampled_from([None, 1, 2, 3])),
        padding=draw(st.integers(0, kernel // 2)),
        ceil_mode=draw(st.booleans()),
        count_include_pad=draw(st.booleans()),
    )
    if n > 1:  # AvgPool1d has no divisor_override
        kw["divisor_override"] = draw(st.sampled_from([None, 1, 2, 5]))
    return AVGPOOL[n](kernel, **kw)


@st.composite
def small_cnns(draw):
    """A nested Sequential of conv / transposed conv / BatchNorm / average pooling /
    activations (optionally Flatten + Linear at the end) and its input shape."""
    n = draw(st.sampled_from([1, 2, 2, 3]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    shape = (draw(st.integers(1, 3)), *draw(st.lists(st.integers(2, 6), min_size=n, max_size=n)))
    input_shape, layers = shape, []
    for _ in range(draw(st.integers(1, 5))):
        channels, spatial = shape[0], shape[1:]
        kind = draw(st.sampled_from(["conv", "conv_t", "bn", "avg", "adaptive", "act"]))
        if kind == "conv":
            layer = _conv_layer(draw, n, channels, spatial)
        elif kind == "conv_t":
            layer = _conv_transpose_layer(draw, n, channels)
        elif kind == "bn":
            layer = BATCHNORM[n](channels, affine=draw(st.booleans()))
        elif kind == "avg":
            layer = _avgpool_layer(draw, n, spatial)
        elif kind == "adaptive":
            layer = ADAPTIVE[n](tuple(draw(st.integers(1, s + 1)) for s in spatial))
        else:
            layer = draw(st.sampled_from(ACTIVATIONS))()
        layer = layer.double().eval()
        with torch.no_grad():
            shape = tuple(layer(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
        layers.append(layer)
    if draw(st.booleans()):
        layers += [nn.Flatten(), nn.Linear(math.prod(shape), draw(st.integers(1, 4))).double()]
    # Nest some of it, as real models do.
    cut = draw(st.integers(0, len(layers)))
    model = nn.Sequential(*layers[:cut], nn.Sequential(*layers[cut:])).double()
    _randomise_batchnorm(model)
    return model.eval(), input_shape


@given(case=small_cnns(), sparse=st.booleans())
def test_to_mlp_random_cnns_match_the_model(case, sparse):
    model, shape = case
    mlp = to_mlp(model, shape, sparse=sparse, dtype=torch.float64)  # some have no parameters
    kinds = [isinstance(m, (nn.Linear, SparseLinear)) for m in mlp[1:]]
    assert not any(a and b for a, b in itertools.pairwise(kinds))
    x = torch.randn(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), model(x).flatten(1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_average_pooling_falls_back_to_probing_when_the_windows_disagree(monkeypatch, sparse):
    """The pooling matrix is checked against the layer itself; a wrong one is replaced by the
    layer's response to the unit inputs."""
    real = linear._pool_channel

    def wrong(*args):
        crow, col, values = real(*args)
        return crow, col, values * 2

    monkeypatch.setattr(linear, "_pool_channel", wrong)
    for pool, shape in [
        (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (2, 7, 6)),
        (nn.AdaptiveAvgPool3d((2, 3, 1)), (1, 5, 4, 3)),
    ]:
        model = nn.Sequential(pool).eval()
        mlp = to_mlp(model, shape, sparse=sparse, dtype=torch.float64)
        x = torch.randn(2, *shape, dtype=torch.float64)
        torch.testing.assert_close(mlp(x), model(x).flatten(1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_to_mlp_float32_model_as_float64(sparse):
    """The model runs in its own dtype; the result is the requested one, merged in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.AvgPool2d(2),
        nn.Conv2d(3, 2, 3),
        nn.PReLU(),
        nn.Flatten(),
        nn.Linear(2, 2),
    )
    _randomise_batchnorm(model)
    model.eval()
    mlp = to_mlp(model, (2, 6, 6), sparse=sparse, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in [*mlp.parameters(), *mlp.buffers()])
    # The float32 parameters are exact in float64: the reference is the same model in float64.
    reference = copy.deepcopy(model).double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), reference(x).flatten(1), rtol=0, atol=1e-12)
    # And the other way: a float64 model as float32.
    mlp32 = to_mlp(reference, (2, 6, 6), sparse=sparse, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            mlp32(x.float()).double(), reference(x).flatten(1), rtol=1e-5, atol=1e-5
        )


def test_batchnorm_alone_and_first():
    """A BatchNorm with nothing to merge into is a diagonal; first in line it scales the columns
    of the conv after it."""
    for sparse in (False, True):
        model = nn.Sequential(
            nn.BatchNorm2d(2), nn.Tanh(), nn.BatchNorm2d(2), nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3)
        ).double()
        _randomise_batchnorm(model)
        model.eval()
        mlp = to_mlp(model, (2, 4, 5), sparse=sparse)
        lin = "SparseLinear" if sparse else "Linear"
        assert [type(m).__name__ for m in mlp] == ["Flatten", lin, "Tanh", lin]
        x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), model(x).flatten(1), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Conv subclasses: exact when they run torch's forward, refused (path, class, why) otherwise.


class StdConv(nn.Conv2d):
    """Standardises its weight in forward (as timm's StdConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """Pads inside forward (as timm's Conv2dSame)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride)


class ScaledOutput(nn.Conv2d):
    """Scales the output through ``_conv_forward``."""

    def _conv_forward(self, x, weight, bias):
        return 2 * super()._conv_forward(x, weight, bias)


class Documented(nn.Conv2d):
    """Only adds a docstring: a plain convolution."""


class PlainReLU(nn.ReLU):
    """A subclass that keeps torch's forward."""


class ShiftedBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) + 1


class SoftmaxReLU(nn.ReLU):
    def forward(self, x):
        return torch.softmax(x, 1)


class OwnSequential(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize(
    ("cls", "method"),
    [(StdConv, "forward"), (Conv2dSame, "forward"), (ScaledOutput, "_conv_forward")],
)
def test_conv_subclasses_with_their_own_forward_are_refused(cls, method):
    layer = cls(2, 3, 3).double()
    with pytest.raises(ConvMatError, match=rf"^module \({cls.__name__}\) overrides {method}"):
        to_linear(layer, (6, 6))
    model = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), layer)).eval()
    for sparse in (False, True):
        with pytest.raises(
            ConvMatError, match=rf"^module 1\.1 \({cls.__name__}\) overrides {method}, so it"
        ):
            to_mlp(model, (2, 6, 6), sparse=sparse)


def test_subclasses_that_keep_torch_forward_are_exact():
    torch.manual_seed(0)
    layer = Documented(2, 3, 3, padding=1).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    lin = to_linear(layer, (5, 5))
    torch.testing.assert_close(lin(x.flatten(1)), layer(x).flatten(1), rtol=0, atol=1e-12)
    model = nn.Sequential(layer, PlainReLU(), Documented(3, 1, 2).double()).eval()
    for sparse in (False, True):
        mlp = to_mlp(model, (2, 5, 5), sparse=sparse)
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), model(x).flatten(1), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (ShiftedBatchNorm(2), r"^0\.1 \(ShiftedBatchNorm\) overrides forward"),
        (SoftmaxReLU(), r"^0\.1 \(SoftmaxReLU\) overrides forward"),
        (OwnSequential(nn.ReLU()), r"^0\.1 \(OwnSequential\) is not supported by to_mlp"),
    ],
)
def test_other_layers_with_their_own_forward_are_refused(layer, match):
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 1), layer)).eval()
    with pytest.raises(ConvMatError, match=match):
        to_mlp(model, (1, 3, 3))


# ---------------------------------------------------------------------------------------------
# Bad input: ConvMatError (TypeError for a wrong type) naming the parameter or the layer, the
# value and what is allowed; nothing large allocated first.

CONV_RELU = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
LAZY = nn.Sequential(nn.LazyConv2d(4, 3)).eval()
META = nn.Sequential(nn.Conv2d(3, 4, 3, device="meta")).eval()
PARTLY_TRAINING = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
PARTLY_TRAINING[1].train()
HUGE = (3, 10**6, 10**6)

BAD_INPUTS = [
    # (call, error, match)
    (lambda: to_mlp(CONV_RELU, (3, 0, 4)), ConvMatError, r"input_shape must be a tuple \(C, "),
    (lambda: to_mlp(CONV_RELU, (3, 4.0, 4)), ConvMatError, r"ints >= 1.*got \(3, 4\.0, 4\)"),
    (lambda: to_mlp(CONV_RELU, (3, True, 4)), ConvMatError, r"input_shape must .*\(3, True, 4\)"),
    (lambda: to_mlp(CONV_RELU, 5), ConvMatError, r"input_shape must be .*, got 5$"),
    (lambda: to_mlp(CONV_RELU, "3,8,8"), ConvMatError, r"input_shape must be .*, got '3,8,8'"),
    (lambda: to_mlp(CONV_RELU, ()), ConvMatError, r"input_shape must be .*, got \(\)"),
    (lambda: to_mlp(CONV_RELU, (3, -2, 4)), ConvMatError, r"input_shape must be .*\(3, -2, 4\)"),
    (
        lambda: to_mlp(CONV_RELU, (3, 8)),
        ConvMatError,
        r"^0 \(Conv2d\) takes inputs of shape \(C=3, 2 spatial sizes\) per sample, got \(3, 8\) "
        r"\(input_shape\)",
    ),
    (
        lambda: to_mlp(CONV_RELU, (2, 8, 8)),
        ConvMatError,
        r"^0 \(Conv2d\) takes inputs of shape \(C=3, .*got \(2, 8, 8\)",
    ),
    (lambda: to_mlp(CONV_RELU, (3, 2, 2)), ConvMatError, r"kernel_size 3 .* spans 3 elements"),
    (
        lambda: to_mlp(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(4)).eval(), (3, 4, 4)),
        ConvMatError,
        r"^1 \(BatchNorm2d\) takes inputs of shape \(C=4, 2 spatial sizes\) .*got \(8, 4, 4\)$",
    ),
    (
        lambda: to_mlp(nn.Sequential(nn.Flatten(), nn.Linear(10, 2)).eval(), (3, 4)),
        ConvMatError,
        r"^1 \(Linear\) takes inputs of shape \(in_features=10,\) per sample, got \(12,\)",
    ),
    (
        lambda: to_mlp(nn.Sequential(nn.AvgPool2d(5)).eval(), (1, 2, 2)),
        ConvMatError,
        r"^0 \(AvgPool2d\) cannot run on an input of shape \(1, 2, 2\) \(input_shape\): torch",
    ),
    (
        lambda: to_mlp(nn.Sequential(nn.AvgPool1d(3)).eval(), (1, 5, 5)),
        ConvMatError,
        r"^0 \(AvgPool1d\) takes inputs of shape \(C, 1 spatial sizes\)",
    ),
    (
        lambda: to_mlp(nn.Sequential(nn.Unflatten(1, (5, 5))).eval(), (3, 4)),
        ConvMatError,
        r"^0 \(Unflatten\) cannot run on an input of shape \(3, 4\)",
    ),
    (
        lambda: to_mlp(CONV_RELU, (3, 8, 8), dtype=torch.int64),
        ConvMatError,
        r"dtype must be None or a floating-point torch\.dtype .*got torch\.int64",
    ),
    (lambda: to_mlp(CONV_RELU, (3, 8, 8), dtype="float64"), ConvMatError, r"got 'float64'"),
    (
        lambda: to_mlp(CONV_RELU, (3, 8, 8), sparse=True, dtype=torch.float16),
        ConvMatError,
        r"dtype torch\.float16 with sparse=True on the CPU: .* pass dtype=torch\.float32",
    ),
    (lambda: to_mlp(None, (3, 8, 8)), TypeError, r"model must be an nn\.Module, got NoneType"),
    (lambda: to_mlp(CONV_RELU, (3, 8, 8), sparse="yes"), TypeError, r"sparse must be a bool"),
    (lambda: to_mlp(LAZY, (3, 8, 8)), ConvMatError, r"^0 \(LazyConv2d\) has uninitialised"),
    (lambda: to_mlp(META, (3, 8, 8)), ConvMatError, r"^0 \(Conv2d\) has tensors on the meta"),
    (
        lambda: to_mlp(PARTLY_TRAINING, (3, 8, 8)),
        ConvMatError,
        r"^1 \(BatchNorm2d\) is in training mode; to_mlp needs model\.eval\(\)",
    ),
    (
        lambda: to_mlp(CONV_RELU, HUGE),
        ConvMatError,
        r"^to_mlp: the W of 0 \(Conv2d\), a dense \(3999984000016, 3000000000000\) matrix of "
        r"torch\.float32, needs [\d,]+ bytes.* pass sparse=True to to_mlp",
    ),
    (
        lambda: to_mlp(CONV_RELU, HUGE, sparse=True),
        ConvMatError,
        r"^to_mlp: the W of 0 \(Conv2d\), a sparse \(at most [\d,]+ non-zeros\) .* needs "
        r"[\d,]+ bytes.* use convmat\.ConvOperator",
    ),
    (lambda: to_linear(nn.Linear(3, 4), 5), ConvMatError, r"^module \(Linear\) is not a conv"),
    (lambda: to_linear(nn.Conv2d(3, 4, 3), 0), ConvMatError, r"input_size must be >= 1"),
    (lambda: to_linear(nn.Conv2d(3, 4, 3), (5, 5, 5)), ConvMatError, r"input_size must be an int"),
    (lambda: to_linear(nn.Conv2d(3, 4, 3), (2, 5)), ConvMatError, r"kernel_size 3 .* spans"),
    (lambda: to_linear(nn.Conv2d(3, 4, 3), "5"), ConvMatError, r"input_size must be an int"),
    (lambda: to_linear(nn.Conv2d(3, 4, 3, device="meta"), 5), ConvMatError, r"on the meta"),
    (
        lambda: to_linear(nn.Conv2d(3, 4, 3), (10**6, 10**6)),
        ConvMatError,
        r"^to_linear: a dense W of shape \(3999984000016, 3000000000000\) .* needs [\d,]+ "
        r"bytes.* to_mlp\(module, \(C, \*input_size\), sparse=True\)",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "match"), BAD_INPUTS, ids=[f"row{i}" for i in range(len(BAD_INPUTS))]
)
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert "layout" not in str(info.value)


def test_sparse_linear_checks_its_input():
    layer = SparseLinear(torch.eye(3, dtype=torch.float64)[:2], torch.ones(2, dtype=torch.float64))
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x[..., :2] + 1)
    torch.testing.assert_close(layer(x[0, 0]), x[0, 0, :2] + 1)
    with pytest.raises(ConvMatError, match=r"input dtype must be the layer's torch\.float64"):
        layer(x.float())
    with pytest.raises(ConvMatError, match=r"input must have shape \(\*, 3\), got \(4, 2\)"):
        layer(torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"input must be a torch\.Tensor, got list"):
        layer([1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------------------
# Sizes are checked before anything is formed.


def test_product_size_estimate_covers_the_product():
    torch.manual_seed(0)
    first, second = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, stride=2)
    B = to_matrix(first, (64, 64), layout=torch.sparse_csr)
    A = to_matrix(second, (64, 64), layout=torch.sparse_csr)
    actual = (A @ B).values().numel()
    nnz, exact = linear._product_nnz(A, B)  # estimated from a sample of rows
    assert not exact and actual <= nnz <= 1.5 * actual
    A_small = to_matrix(second, (8, 8), layout=torch.sparse_csr)
    B_small = to_matrix(first, (8, 8), layout=torch.sparse_csr)
    bound, exact = linear._product_nnz(A_small, B_small)  # small: the bound itself
    assert exact and bound >= (A_small @ B_small).values().numel()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_every_matrix_and_product_is_checked_before_it_is_formed(monkeypatch, sparse):
    asked = []
    real = linear.check_allocation

    def spy(nbytes, device, what, instead=""):
        asked.append((what, nbytes))
        real(nbytes, device, what, instead)

    monkeypatch.setattr(linear, "check_allocation", spy)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2)
    ).eval()
    mlp = to_mlp(model, (2, 8, 8), sparse=sparse)
    W = mlp[1].weight
    parts = [W.crow_indices(), W.col_indices(), W.values()] if sparse else [W]
    result = sum(t.numel() * t.element_size() for t in parts)
    whats = " | ".join(what for what, _ in asked)
    for name in ("the W of 0 (Conv2d)", "the matrix of 1 (AvgPool2d)", "the W of 2 (Conv2d)"):
        assert name in whats
    products = [n for what, n in asked if what.startswith("to_mlp: the product of 2 (Conv2d)")]
    assert products and products[-1] >= result


def test_to_mlp_leaves_the_model_and_the_random_state_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 2)
    )
    _randomise_batchnorm(model)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    state = torch.get_rng_state()
    for sparse in (False, True):
        mlp = to_mlp(model, (2, 6, 6), sparse=sparse)
        # Nothing in the result shares memory with the model.
        for t in [*mlp.parameters(), *mlp.buffers()]:
            (t.values() if t.is_sparse_csr else t.data).zero_()
    assert torch.equal(torch.get_rng_state(), state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
