"""The recorded Jacobian (convmat.analysis.tangent.linearise) against torch's forward mode
(torch.func.jvp) in float64, on every operation it follows, at random inputs."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from convmat.analysis.tangent import NotLinearisable, linearise


def _agrees(f, x: torch.Tensor, seed: int) -> None:
    """``push(u)`` equals forward mode's ``J u`` (and ``f(x)`` the value) for a random ``u``,
    twice from one recording (the tape is replayed, not used up)."""
    gen = torch.Generator().manual_seed(seed)
    y, push = linearise(f, x)
    with torch.no_grad():
        assert torch.equal(y, f(x.clone()))
    for _ in range(2):
        u = torch.randn(x.shape, dtype=x.dtype, generator=gen)
        want = torch.func.jvp(f, (x.clone(),), (u,))[1].detach()
        got = push(u)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * (1 + float(want.abs().max())))


def _bn(c: int, dims: int, gen: torch.Generator) -> nn.Module:
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](c).double().eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(c, dtype=torch.float64, generator=gen))
        bn.running_var.copy_(torch.rand(c, dtype=torch.float64, generator=gen) + 0.1)
    return bn


#: (CELU's alphas have exact inverses: torch's forward mode rounds ``1 / alpha`` to float32.)
_ACTIVATIONS = [
    nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6(), nn.ReLU6(inplace=True), nn.LeakyReLU(0.2),
    nn.LeakyReLU(0.3, inplace=True), nn.LeakyReLU(-0.3), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(),
    nn.SiLU(inplace=True), nn.Mish(), nn.Hardswish(), nn.Hardswish(inplace=True),
    nn.Hardsigmoid(), nn.Hardsigmoid(inplace=True), nn.Sigmoid(), nn.Tanh(), nn.ELU(0.7),
    nn.ELU(1.5, inplace=True), nn.CELU(0.5), nn.CELU(2.0, inplace=True), nn.Softplus(2.0, 1.0),
    nn.Hardtanh(-0.5, 0.8), nn.Threshold(0.1, -2.0), nn.Threshold(0.3, 0.5, inplace=True),
    lambda x: torch.clamp(x, -0.4, 0.6), lambda x: torch.clamp(x, min=0.1),
    lambda x: torch.clamp(x, max=0.2), lambda x: torch.clamp_min(x, -0.1),
    lambda x: x.clone().clamp_(-0.3, 0.3), lambda x: torch.sigmoid(x.clone()).sigmoid_(),
    lambda x: x.clone().tanh_(),
]  # fmt: skip


@given(index=st.integers(0, len(_ACTIVATIONS) - 1), seed=st.integers(0, 2**31 - 1))
def test_activations(index, seed):
    """Every entry-wise activation (in place or not) after a linear map, so that its input is
    no longer the recorded input itself."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    act = _ACTIVATIONS[index]
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=gen)
    _agrees(lambda t: act(conv(t)), x, seed)


@given(
    dims=st.integers(1, 3),
    cin=st.integers(1, 4),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    mode=st.sampled_from(["zeros", "reflect", "replicate"]),
    transposed=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_convolutions_and_batch_norm(dims, cin, groups, kernel, stride, dilation, padding,
                                     mode, transposed, bias, seed):  # fmt: skip
    """Convolutions of every dimension, stride, dilation, groups, padding mode (circular
    padding writes into views: refused, below) and transposed (with output padding), with and
    without a bias, then BatchNorm with running statistics: the tape drops the bias and
    scales by the BatchNorm."""
    size = 6
    cin, cout = cin * groups, 2 * groups
    if transposed:
        mode = "zeros"
        extra = stride - 1 if stride > 1 else 0
        conv = getattr(nn, f"ConvTranspose{dims}d")(
            cin, cout, kernel, stride, padding=min(padding, dilation * (kernel - 1)),
            output_padding=extra, groups=groups, bias=bias, dilation=dilation)  # fmt: skip
    else:
        padding = min(padding, size - 1)
        conv = getattr(nn, f"Conv{dims}d")(cin, cout, kernel, stride, padding, dilation,
                                           groups, bias, padding_mode=mode)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(conv.double(), _bn(cout, dims, gen))
    x = torch.randn(1, cin, *[size] * dims, dtype=torch.float64, generator=gen)
    _agrees(model, x, seed)


_POOLS = [
    lambda x: F.max_pool2d(x, 2),
    lambda x: F.max_pool2d(x, 3, 2, padding=1, ceil_mode=True),
    lambda x: F.max_pool2d(x, 2, 1, dilation=2),
    lambda x: nn.MaxPool2d(2, return_indices=True)(x)[0],
    lambda x: F.max_pool1d(x.flatten(2), 3, 2),
    lambda x: F.max_pool3d(x.unsqueeze(2).expand(-1, -1, 3, -1, -1), 2, 1, padding=1),
    lambda x: F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False),
    lambda x: F.avg_pool1d(x.flatten(2), 4, 3),
    lambda x: F.avg_pool3d(x.unsqueeze(2), (1, 2, 2)),
    lambda x: F.adaptive_avg_pool2d(x, (3, 2)),
    lambda x: F.adaptive_avg_pool3d(x.unsqueeze(2), (1, 4, 3)),
    lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
    lambda x: F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True),
    lambda x: F.interpolate(x, size=(7, 4), mode="bilinear"),
    lambda x: F.interpolate(x, scale_factor=1.5, mode="bicubic"),
    lambda x: F.interpolate(x.flatten(2), scale_factor=2, mode="linear"),
    lambda x: F.interpolate(x.unsqueeze(2), size=(2, 7, 7), mode="trilinear"),
    lambda x: F.interpolate(x.unsqueeze(2), scale_factor=2, mode="nearest"),
    lambda x: F.pad(x, (1, 2, 0, 1), value=3.0),
    lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"),
    lambda x: F.pad(x, (1, 0, 2, 1), mode="replicate"),
    lambda x: F.pad(x.flatten(2), (2, 1), mode="reflect"),
    lambda x: F.pixel_shuffle(x.repeat(1, 2, 1, 1), 2),
    lambda x: F.pixel_unshuffle(x[..., :4, :4], 2),
    lambda x: x.mean(), lambda x: x.sum((2, 3)), lambda x: x.mean(dim=1, keepdim=True),
    lambda x: torch.flip(x, (2,)), lambda x: torch.roll(x, 2, 3),
    lambda x: x.narrow(2, 1, 3), lambda x: x.index_select(3, torch.tensor([4, 0, 0])),
    lambda x: x[:, 1:, ::2, 1], lambda x: x.permute(0, 2, 3, 1).reshape(-1),
    lambda x: x.transpose(1, 2).contiguous().view(1, -1), lambda x: x.expand(3, -1, -1, -1),
]  # fmt: skip


@given(index=st.integers(0, len(_POOLS) - 1), seed=st.integers(0, 2**31 - 1))
def test_pooling_resampling_padding_and_views(index, seed):
    """Max pooling (its recorded indices), average and adaptive pooling, resampling of every
    mode, padding of every mode (a constant border other than 0 too), views and reductions,
    after a convolution."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 2, 3, padding=1).double()
    f = _POOLS[index]
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, generator=gen)
    _agrees(lambda t: f(torch.relu(conv(t))), x, seed)


class _Graph(nn.Module):
    """Skips, sums, differences, in-place sums, concatenation, stacking, products of two
    branches and with constants, quotients, matrix products and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 1)
        self.head = nn.Linear(6 * 4 * 4 + 3, 5)
        self.register_buffer("scale", torch.randn(1, 3, 1, 1))
        self.register_buffer("mat", torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        s = a + b
        s.add_(a, alpha=-0.5)
        d = (a - 2.0 * b) * self.scale / 3.0
        p = torch.sigmoid(a) * b  # a product of two branches
        p = p.mul_(1.5) - 1.0
        m = torch.matmul(s, self.mat) + torch.matmul(self.mat, d)  # mm with a constant
        c = torch.cat([m, p], dim=1)
        st_ = torch.stack([c, torch.ones_like(c)], dim=0).sum(0)
        g = F.adaptive_avg_pool2d(st_, 4).flatten(1)
        flat = torch.cat([g, x.mean((2, 3)).repeat(1, 2)[:, :3]], dim=1)
        return torch.relu(self.head(flat)) + 0.1 * flat.sum(1, keepdim=True)


_IN_PLACE = [
    lambda x: x.mul_(2.0) + 1.0,
    lambda x: x.div_(3.0).relu_(),
    lambda x: x.add_(1.0).mul_(x.sigmoid()),  # reads x after it was written
    lambda x: (lambda y: y.mul_(y.sigmoid()))(x * 1.5),
    lambda x: (lambda y: y.sub_(x, alpha=0.5).div_(torch.full_like(y, 4.0)))(x.tanh()),
]  # fmt: skip


@given(index=st.integers(0, len(_IN_PLACE) - 1), seed=st.integers(0, 2**31 - 1))
def test_writes_in_place_leave_the_direction_and_follow_the_values(index, seed):
    """Products, quotients and sums in place (the input itself written, a product of a tensor
    with itself, a factor read after the write): the steps take the values from before the
    write, and replaying them never writes into the direction ``u``."""
    gen = torch.Generator().manual_seed(seed)
    f = _IN_PLACE[index]
    x = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    u = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    kept = u.clone()
    _, push = linearise(f, x)
    got = push(u)
    assert torch.equal(u, kept)
    want = torch.func.jvp(lambda t: f(t.clone()), (x,), (u,))[1]
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_a_sum_takes_its_outputs_dtype_and_a_broadcast_tangent_is_viewable():
    """A float32 tangent summed with a float64 constant is float64 like the value; a tangent
    broadcast by a sum can be viewed as the value can."""
    x = torch.randn(2, 3, dtype=torch.float64)
    ones = torch.ones(4, 2, 3, dtype=torch.float64)
    M = torch.randn(3, 2, dtype=torch.float64)
    _agrees(lambda t: (t.float() + ones) @ M, x, 0)
    _agrees(lambda t: (t + torch.zeros(4, 2, 3, dtype=torch.float64)).view(-1) * 1, x, 0)


@given(seed=st.integers(0, 2**31 - 1))
def test_a_tensor_times_itself_in_place(seed):
    """``y.mul_(y)``: ``2 y u``, against a central difference (exact for a square up to
    rounding; torch's forward mode gives another value here: the two factors alias)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    u = torch.randn(2, 3, dtype=torch.float64, generator=gen)

    def f(t: torch.Tensor) -> torch.Tensor:
        y = t * 1.5
        return y.mul_(y)

    h = 1e-3
    want = (f(x + h * u) - f(x - h * u)) / (2 * h)
    assert torch.allclose(want, 4.5 * x * u, rtol=1e-9, atol=1e-12)
    assert torch.allclose(linearise(f, x)[1](u), want, rtol=1e-9, atol=1e-12)


@given(seed=st.integers(0, 2**31 - 1))
def test_a_graph_of_sums_products_and_concatenations(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, generator=gen)
    _agrees(_Graph().double().eval(), x, seed)


def test_one_batch_norm_used_twice():
    """A BatchNorm in eval mode applied twice (its running statistics are held by the first
    step, and its schema says it may write them: not in eval mode)."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(2, 2, 3, padding=1).double(), _bn(2, 2, torch.Generator().manual_seed(1))
    _agrees(lambda t: bn(conv(bn(t))), torch.randn(1, 2, 5, 5, dtype=torch.float64), 0)


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3))
def test_batched_products_and_a_linear_on_3d_input(seed, batch):
    """``bmm`` with a constant, ``nn.Linear`` on a 3-D input (matmul's views), a BatchNorm1d
    after a linear layer."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin, bn = nn.Linear(4, 3).double(), _bn(3, 1, gen)
    w = torch.randn(batch, 4, 4, dtype=torch.float64, generator=gen)
    v = torch.randn(batch, 5, 5, dtype=torch.float64, generator=gen)
    x = torch.randn(batch, 5, 4, dtype=torch.float64, generator=gen)

    def f(t: torch.Tensor) -> torch.Tensor:
        h = lin(torch.bmm(t, w) + torch.bmm(v, t))
        return bn(h.reshape(-1, 3)).tanh()

    _agrees(f, x, seed)


def test_the_model_zoo():
    """ResNet-18/50, MobileNetV2, VGG-11 and a U-Net follow exactly (at 32x32)."""
    from .models import ZOO

    for make in ZOO.values():
        torch.manual_seed(0)
        model = make().double().eval()
        _agrees(model, torch.randn(1, 3, 32, 32, dtype=torch.float64), 0)


def test_an_output_that_does_not_depend_on_the_input():
    """A comparison cuts the dependence: J is 0."""
    x = torch.randn(1, 2, 3, dtype=torch.float64)
    _agrees(lambda t: (t > 0).double() * 2.0 + 1.0, x, 0)


def _held_then_written(x: torch.Tensor) -> torch.Tensor:
    """A product with a constant that is then written in place (the step holds the constant:
    its replay would read the new values)."""
    scale = torch.full_like(x, 2.0)
    y = x * scale
    scale.add_(1.0)
    return y * scale


def _viewed_then_written(x: torch.Tensor) -> torch.Tensor:
    """A view taken, then its base written in place (the view's values change)."""
    y = x * 2
    v = y.view(-1)
    y.relu_()
    return v * 1


def _written_through_out(x: torch.Tensor) -> torch.Tensor:
    """A held constant written through ``out=`` by an operation that reads no input."""
    s = torch.full_like(x, 2.0)
    y = x * s
    torch.add(torch.ones_like(s[..., :1]), 4.0, out=s[..., :1])
    return y * s


def _indices_written(x: torch.Tensor) -> torch.Tensor:
    """Max pooling's indices (held by its step) written in place."""
    out, index = F.max_pool1d(x * 1, 2, return_indices=True)
    index.zero_()
    return out


@pytest.mark.parametrize(
    "f, message",
    [
        (lambda x: x.abs(), "abs.default has no rule"),
        (lambda x: torch.sort(x, dim=-1)[0], "sort"),
        (lambda x: x[:, :1].relu_(), "writes in place into a view"),
        (lambda x: (lambda v, b: (v.relu_(), b.sum())[1])(x.view(-1), x), "into a view"),
        (lambda x: nn.BatchNorm1d(2).double().train()(x), "batch statistics"),
        (lambda x: F.pad(x, (1, 1), mode="circular"), "into a view"),
        (lambda x: x.squeeze(0) @ x.squeeze(0).T, "two factors"),
        (
            lambda x: F.conv1d(x, x.reshape(2, 1, 4), groups=2),
            "another argument that depends on it",
        ),
        (lambda x: x / x.sum(), "another argument that depends on it"),
        (lambda x: torch.ones_like(x).mul_(x), "writes the input into a constant"),
        (_held_then_written, "into a constant the tape holds"),
        (_viewed_then_written, "writes in place into a view"),
        (_written_through_out, "into a constant the tape holds"),
        (_indices_written, "into a constant the tape holds"),
        (lambda x: x.to(torch.complex128).real * 1, "complex output"),
        (lambda x: torch.fft.rfft(x).abs(), "complex output"),
    ],
)
def test_what_it_does_not_follow_is_refused_by_name(f, message):
    """An operation with no rule, a write in place into a view, BatchNorm with batch
    statistics, a product of two matrices that both depend on the input, an input used as a
    weight or divisor: refused (the caller takes another way), never a wrong product."""
    with pytest.raises(NotLinearisable, match=message):
        linearise(f, torch.randn(1, 2, 4, dtype=torch.float64))
