"""Matrix layers against their torch twins: outputs, gradients, state_dict, training, caching."""

from __future__ import annotations

import copy
import gc
import math
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from convmat import ConvMatError, cache_info, set_cache_budget
from convmat.nn import (
    MatrixConv1d,
    MatrixConv2d,
    MatrixConv3d,
    MatrixConvTranspose1d,
    MatrixConvTranspose2d,
    MatrixConvTranspose3d,
)

from .reference import conv_configs, conv_transpose_configs, reference
from .tests_helpers import layer_for as torch_layer

MATRIX = {1: MatrixConv1d, 2: MatrixConv2d, 3: MatrixConv3d}
MATRIX_T = {1: MatrixConvTranspose1d, 2: MatrixConvTranspose2d, 3: MatrixConvTranspose3d}
TORCH = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TORCH_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
LAYER_LAYOUTS = [torch.sparse_csr, torch.strided]


def close(actual, expected, dtype):
    """float64: 1e-10. float32: 1e-5 relative to the tensor's largest entry (sums of many float32
    products differ by their order of summation, which no two implementations share)."""
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)
    else:
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def check_parity(ref, twin, x, dtype, **forward_kwargs):
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1, y2 = twin(x1, **forward_kwargs), ref(x2, **forward_kwargs)
    assert y1.shape == y2.shape
    close(y1, y2, dtype)
    g = torch.randn_like(y2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    close(x1.grad, x2.grad, dtype)
    close(twin.weight.grad, ref.weight.grad, dtype)
    if ref.bias is not None:
        close(twin.bias.grad, ref.bias.grad, dtype)


symmetric_convs = conv_configs().filter(
    lambda c: isinstance(c.padding, str) or all(b == a for b, a in c.pairs)
)
symmetric_transposed = conv_transpose_configs(asymmetric=False)


@pytest.mark.parametrize("layout", LAYER_LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@given(
    cfg=st.one_of(symmetric_convs, symmetric_transposed), bias=st.booleans(), batched=st.booleans()
)
def test_layer_parity(cfg, bias, batched, layout, dtype):
    ref = torch_layer(cfg, dtype, bias)
    cls = (MATRIX_T if cfg.transposed else MATRIX)[cfg.ndim]
    twin = cls.from_module(ref, layout=layout)
    assert type(twin.to_module()) is type(ref)
    x = cfg.input(batch=2, dtype=dtype)
    check_parity(ref, twin, x if batched else x[0], dtype)


@pytest.mark.parametrize("layout", LAYER_LAYOUTS, ids=str)
def test_transposed_output_size_argument(layout):
    ref = nn.ConvTranspose2d(4, 2, 3, stride=3, padding=1, dtype=torch.float64)
    twin = MatrixConvTranspose2d.from_module(ref, layout=layout)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    for size in [(13, 16), (15, 18), [2, 2, 14, 17]]:
        check_parity(ref, twin, x, torch.float64, output_size=size)
        ref.zero_grad(), twin.zero_grad()
    with pytest.raises(
        ConvMatError, match=r"output_size must be between \(13, 16\) and \(15, 18\)"
    ):
        twin(x, output_size=(16, 16))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_same_arguments_parameters_and_init(n):
    kwargs = dict(
        in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2, bias=True
    )
    torch.manual_seed(7)
    ref = TORCH[n](**kwargs, padding_mode="circular")
    torch.manual_seed(7)
    twin = MATRIX[n](**kwargs, padding_mode="circular")
    assert isinstance(twin, TORCH[n])
    assert [name for name, _ in twin.named_parameters()] == ["weight", "bias"]
    for (k1, v1), (k2, v2) in zip(ref.state_dict().items(), twin.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    torch.manual_seed(7)
    ref_t = TORCH_T[n](4, 6, 3, stride=2, output_padding=1, dilation=2)
    torch.manual_seed(7)
    twin_t = MATRIX_T[n](4, 6, 3, stride=2, output_padding=1, dilation=2)
    assert torch.equal(ref_t.weight, twin_t.weight) and torch.equal(ref_t.bias, twin_t.bias)


def test_state_dict_both_ways_and_no_sharing():
    ref = nn.Conv2d(3, 5, 3, padding="same", padding_mode="replicate", dtype=torch.float64)
    twin = MatrixConv2d(3, 5, 3, padding="same", padding_mode="replicate", dtype=torch.float64)
    twin.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(twin(x), ref(x), rtol=0, atol=1e-10)
    other = nn.Conv2d(3, 5, 3, padding="same", padding_mode="replicate", dtype=torch.float64)
    other.load_state_dict(twin.state_dict())
    torch.testing.assert_close(other(x), ref(x), rtol=0, atol=0)
    made = MatrixConv2d.from_module(ref)
    assert made.weight.data_ptr() != ref.weight.data_ptr()
    back = made.to_module()
    assert type(back) is nn.Conv2d and back.weight.data_ptr() != made.weight.data_ptr()
    torch.testing.assert_close(back(x), ref(x), rtol=0, atol=0)
    with pytest.raises(ConvMatError, match=r"module must be a torch\.nn\.Conv2d .*got Conv1d"):
        MatrixConv2d.from_module(nn.Conv1d(1, 1, 1))


def test_rebuilt_only_when_weight_changes():
    torch.manual_seed(0)
    layer = MatrixConv2d(2, 4, 3, padding=1, dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    layer(x)
    layer(x).sum().backward()
    assert layer.matrix_builds == 1
    layer(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    assert layer.matrix_builds == 2  # a new input size
    layer(x)
    assert layer.matrix_builds == 2  # both sizes cached
    opt.step()
    layer(x)
    assert layer.matrix_builds == 3
    layer(x)
    assert layer.matrix_builds == 3
    layer.load_state_dict(MatrixConv2d(2, 4, 3, padding=1, dtype=torch.float64).state_dict())
    y = layer(x)
    assert layer.matrix_builds == 4
    ref = nn.Conv2d(2, 4, 3, padding=1, dtype=torch.float64)
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-10)
    layer.weight = nn.Parameter(torch.zeros_like(layer.weight))
    assert torch.equal(layer(x), layer.bias.view(1, -1, 1, 1).expand_as(y))
    assert layer.matrix_builds == 5
    layer.float()
    layer(x.float())
    assert layer.matrix_builds == 6


def _cnn(factory):
    return nn.Sequential(
        factory["conv2"](2, 4, 3, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        factory["conv2"](4, 6, 3, stride=2, groups=2),
        nn.ReLU(),
        factory["convT2"](6, 3, 2, stride=2, output_padding=1),
        nn.Flatten(),
        nn.Linear(3 * 7 * 7, 5),
    ).double()


@pytest.mark.parametrize("layout", LAYER_LAYOUTS, ids=str)
def test_training_parity(layout):
    torch.manual_seed(0)
    ref = _cnn({"conv2": nn.Conv2d, "convT2": nn.ConvTranspose2d})
    twin = copy.deepcopy(ref)
    for i, m in enumerate(twin):
        if isinstance(m, nn.ConvTranspose2d):
            twin[i] = MatrixConvTranspose2d.from_module(m, layout=layout)
        elif isinstance(m, nn.Conv2d):
            twin[i] = MatrixConv2d.from_module(m, layout=layout)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, twin)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(4, 2, 8, 8, dtype=torch.float64, generator=gen)
        target = torch.randn(4, 5, dtype=torch.float64, generator=gen)
        for model, opt in zip((ref, twin), opts):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
    for p1, p2 in zip(ref.parameters(), twin.parameters()):
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-10)
    assert twin[0].matrix_builds == 5


def _torch_matrix(ref, input_size):
    """W by torch alone: the bias-free torch layer applied to every unit input (its columns)."""
    cin = ref.in_channels
    eye = torch.eye(cin * math.prod(input_size), dtype=ref.weight.dtype)
    with torch.no_grad():
        cols = torch.func.functional_call(
            ref, {"weight": ref.weight, "bias": None}, (eye.view(-1, cin, *input_size),)
        )
    return cols.reshape(eye.shape[0], -1).T


@pytest.mark.parametrize("layout", ["blocks", "dense", torch.sparse_csr, torch.strided], ids=str)
def test_weight_matrix_is_public_w(layout):
    layer = MatrixConv1d(
        2, 3, 3, padding=1, padding_mode="circular", dtype=torch.float64, layout=layout
    )
    ref = nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular", dtype=torch.float64)
    ref.load_state_dict(layer.state_dict())
    W = layer.weight_matrix(7)
    blocks = layout in ("blocks", torch.sparse_csr)
    assert W.layout == (torch.sparse_csr if blocks else torch.strided)
    dense = W.to_dense() if blocks else W
    torch.testing.assert_close(dense.detach(), _torch_matrix(ref, (7,)), rtol=0, atol=1e-15)
    t_layer = MatrixConvTranspose2d(2, 3, 2, stride=2, dtype=torch.float64, layout=layout)
    t_ref = nn.ConvTranspose2d(2, 3, 2, stride=2, dtype=torch.float64)
    t_ref.load_state_dict(t_layer.state_dict())
    W = t_layer.weight_matrix((3, 2))
    dense = W.to_dense() if blocks else W
    torch.testing.assert_close(dense.detach(), _torch_matrix(t_ref, (3, 2)), rtol=0, atol=1e-15)


def test_layer_errors():
    layer = MatrixConv2d(3, 2, 3)
    with pytest.raises(
        ConvMatError,
        match=r"input must have 3 \(unbatched\) or 4 \(batched\) dimensions .* got shape \(5, 5\)",
    ):
        layer(torch.randn(5, 5))
    with pytest.raises(ConvMatError, match=r"input must have 3 channels, got shape \(1, 2, 5, 5\)"):
        layer(torch.randn(1, 2, 5, 5))
    with pytest.raises(ConvMatError, match=r"kernel_size 3 with dilation 1 spans 3 elements"):
        layer(torch.randn(1, 3, 2, 5))
    with pytest.raises(
        ConvMatError,
        match=r"layout must be 'blocks' or 'dense' .*got torch\.sparse_coo",
    ):
        MatrixConv2d(3, 2, 3, layout=torch.sparse_coo)


ALL_KINDS = [
    # (matrix class, torch class, constructor arguments, input shape)
    (MatrixConv1d, nn.Conv1d, dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect", groups=2), (3, 2, 7)),
    (MatrixConv2d, nn.Conv2d, dict(in_channels=3, out_channels=2, kernel_size=(2, 3), stride=2, dilation=(2, 1)), (2, 3, 6, 7)),
    (MatrixConv3d, nn.Conv3d, dict(in_channels=2, out_channels=2, kernel_size=2, padding=1, padding_mode="circular"), (2, 2, 3, 2, 3)),
    (MatrixConvTranspose1d, nn.ConvTranspose1d, dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, output_padding=1), (2, 2, 5)),
    (MatrixConvTranspose2d, nn.ConvTranspose2d, dict(in_channels=4, out_channels=2, kernel_size=3, stride=2, padding=1, groups=2), (2, 4, 3, 4)),
    (MatrixConvTranspose3d, nn.ConvTranspose3d, dict(in_channels=2, out_channels=2, kernel_size=2, stride=(1, 2, 1)), (1, 2, 2, 3, 2)),
]
KIND_IDS = [cls.__name__ for cls, *_ in ALL_KINDS]
LAYOUT_NAMES = ["blocks", "dense"]


def _pair(kind, layout, dtype=torch.float64):
    cls, base, kwargs, shape = kind
    ref = base(**kwargs, dtype=dtype)
    return ref, cls.from_module(ref, layout=layout), shape


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("kind", ALL_KINDS, ids=KIND_IDS)
def test_zero_batch(kind, layout):
    ref, twin, shape = _pair(kind, layout)
    x1 = torch.zeros(0, *shape[1:], dtype=torch.float64, requires_grad=True)
    x2 = torch.zeros(0, *shape[1:], dtype=torch.float64, requires_grad=True)
    y1, y2 = twin(x1), ref(x2)
    assert y1.shape == y2.shape and y1.dtype == y2.dtype
    y1.sum().backward()
    y2.sum().backward()
    assert x1.grad.shape == x2.grad.shape
    torch.testing.assert_close(twin.weight.grad, ref.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(twin.bias.grad, ref.bias.grad, rtol=0, atol=0)


def _same_function(twin, ref, shape):
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(twin(x), ref(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_stale_weight_through_data(layout):
    """Values changed behind autograd's back (no version bump) rebuild W (issue 9, item 1)."""
    torch.manual_seed(0)
    layer = MatrixConv2d(2, 3, 3, padding=1, layout=layout).double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    layer(x)
    for change in (lambda d: d.normal_(), lambda d: d.clamp_(-0.01, 0.01), lambda d: d.mul_(3)):
        builds = layer.matrix_builds
        change(layer.weight.data)
        _same_function(layer, layer.to_module(), (2, 2, 6, 6))
        assert layer.matrix_builds == builds + 1
    # EMA / Polyak update through .data, then weight clipping
    target = MatrixConv2d(2, 3, 3, padding=1, layout=layout).double()
    target.weight.data.mul_(0.9).add_(0.1 * layer.weight.data)
    _same_function(target, target.to_module(), (1, 2, 6, 6))
    # the same values written again (add 0, copy of itself) are no change: no rebuild
    builds = layer.matrix_builds
    layer.weight.data.add_(0.0)
    layer.weight.data.copy_(layer.weight.data.clone())
    layer(x)
    assert layer.matrix_builds == builds


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_functional_call_with_fresh_weights(layout):
    torch.manual_seed(1)
    layer = MatrixConv2d(2, 3, 3, padding=1, layout=layout).double()
    ref = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    for _ in range(40):
        params = {
            "weight": torch.randn(3, 2, 3, 3, dtype=torch.float64),
            "bias": torch.randn(3, dtype=torch.float64),
        }
        y = torch.func.functional_call(layer, params, (x,))
        torch.testing.assert_close(
            y, torch.func.functional_call(ref, params, (x,)), rtol=0, atol=1e-10
        )
    _same_function(layer, layer.to_module(), (2, 2, 5, 5))  # its own weight again


def test_cache_entries_belong_to_the_layer():
    layer = MatrixConv2d(2, 3, 3, padding=1)
    owner = layer._cache_owner
    assert owner.startswith("MatrixConv2d#")
    layer(torch.randn(1, 2, 5, 5))
    layer(torch.randn(1, 2, 6, 6))
    assert cache_info()[owner]["entries"] == 2
    layer.double()  # through _apply: the float32 W's are gone
    assert owner not in cache_info()
    layer(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    assert cache_info()[owner]["entries"] == 1
    layer.to(torch.float64)
    assert owner not in cache_info()
    layer(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    model = nn.Sequential(nn.Identity(), layer)
    model.float()  # a parent's .float() reaches the layer's _apply
    assert owner not in cache_info()
    model(torch.randn(1, 2, 5, 5))
    del model, layer
    gc.collect()
    assert owner not in cache_info()


def test_least_recently_used_sizes_go_first():
    layer = MatrixConv2d(2, 2, 3, padding=1, layout="dense", dtype=torch.float64)
    sizes = [(n, n) for n in range(4, 9)]  # dense W of 8 KB .. 131 KB
    try:
        set_cache_budget(250_000)  # room for a few of these W's and their patterns
        for size in sizes:
            x = torch.randn(1, 2, *size, dtype=torch.float64)
            torch.testing.assert_close(layer(x), layer.to_module()(x), rtol=0, atol=1e-10)
        held = cache_info()[layer._cache_owner]
        assert 1 <= held["entries"] < len(sizes)
        assert sum(row["bytes"] for row in cache_info().values()) <= 250_000
        builds = layer.matrix_builds
        layer(torch.randn(1, 2, *sizes[-1], dtype=torch.float64))  # most recent: kept
        assert layer.matrix_builds == builds
        layer(torch.randn(1, 2, *sizes[0], dtype=torch.float64))  # oldest: evicted, rebuilt
        assert layer.matrix_builds == builds + 1
    finally:
        set_cache_budget(None)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_hold_their_own_cache(how):
    torch.manual_seed(2)
    layer = MatrixConv2d(2, 3, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    y = layer(x)
    other = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    assert other._cache_owner != layer._cache_owner
    torch.testing.assert_close(other(x), y, rtol=0, atol=0)
    with torch.no_grad():
        other.weight.mul_(2)
    ref = nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64)
    ref.load_state_dict(other.state_dict())
    torch.testing.assert_close(other(x), ref(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_layout_names_and_aliases():
    torch.manual_seed(3)
    ref = nn.Conv2d(2, 4, 3, dtype=torch.float64)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    for layout, name in [
        ("blocks", "blocks"), (torch.sparse_csr, "blocks"), ("dense", "dense"), (torch.strided, "dense"),
    ]:
        twin = MatrixConv2d.from_module(ref, layout=layout)
        assert twin.layout == name and f"layout='{name}'" in repr(twin)
        torch.testing.assert_close(twin(x), ref(x), rtol=0, atol=1e-10)
    assert MatrixConv2d(1, 1, 1).layout == "blocks"


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(layout, dtype):
    """Half / bfloat16 layers give torch's float32 result rounded to their dtype (the block
    layout multiplies in float32: the sparse kernels have none for these dtypes)."""
    torch.manual_seed(4)
    twin = MatrixConv2d(4, 4, 3, padding=1, layout=layout).to(dtype)
    x = torch.randn(2, 4, 6, 6).to(dtype).requires_grad_()
    y = twin(x)
    assert y.dtype == dtype
    ref = nn.Conv2d(4, 4, 3, padding=1)
    ref.load_state_dict({k: v.float() for k, v in twin.state_dict().items()})
    xf = x.detach().float().requires_grad_()
    expected = ref(xf)
    eps = torch.finfo(dtype).eps
    scale = expected.abs().max().item()
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=4 * eps * scale)
    g = torch.randn_like(expected)
    (y.float() * g).sum().backward()
    (expected * g).sum().backward()
    scale = xf.grad.abs().max().item()
    torch.testing.assert_close(x.grad.float(), xf.grad, rtol=0, atol=8 * eps * scale)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("kind", ALL_KINDS, ids=KIND_IDS)
def test_meta_device_gives_shapes(kind, layout):
    cls, base, kwargs, shape = kind
    twin = cls(**kwargs, device="meta", layout=layout)
    ref = base(**kwargs, device="meta")
    x1 = torch.empty(shape, device="meta", requires_grad=True)
    x2 = torch.empty(shape, device="meta", requires_grad=True)
    y1, y2 = twin(x1), ref(x2)
    assert y1.shape == y2.shape and y1.device.type == "meta"
    y1.sum().backward()
    y2.sum().backward()
    assert x1.grad.shape == x2.grad.shape and twin.weight.grad.shape == ref.weight.grad.shape
    assert cache_info().get(twin._cache_owner) is None


asymmetric_convs = conv_configs().filter(lambda c: not isinstance(c.padding, str))
asymmetric_transposed = conv_transpose_configs(asymmetric=True).filter(
    lambda c: not isinstance(c.padding, str)
)


def _layer_of(cfg, layout):
    common = dict(stride=cfg.stride, dilation=cfg.dilation, groups=cfg.groups, dtype=torch.float64, layout=layout)
    if cfg.transposed:
        return MATRIX_T[cfg.ndim](cfg.in_channels, cfg.out_channels, cfg.kernel_size, padding=cfg.padding, output_padding=cfg.output_padding, **common)
    return MATRIX[cfg.ndim](cfg.in_channels, cfg.out_channels, cfg.kernel_size, padding=cfg.padding, padding_mode=cfg.padding_mode, **common)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@given(cfg=st.one_of(asymmetric_convs, asymmetric_transposed))
def test_every_padding_form_and_to_module(cfg, layout):
    """Any padding (pairs included): the layer and to_module() both compute torch's function
    (the reference pads with F.pad or crops an unpadded transposed convolution)."""
    layer = _layer_of(cfg, layout)
    x = cfg.input(batch=2)
    n = cfg.ndim
    expected = reference(cfg, x, layer.weight.detach()) + layer.bias.detach().view(-1, *(1,) * n)
    torch.testing.assert_close(layer(x).detach(), expected, rtol=0, atol=1e-10)
    back = layer.to_module()
    assert all(type(m).__module__.startswith(("torch.", "convmat.layers.nn")) for m in back.modules())
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(back(x[0]), expected[0], rtol=0, atol=1e-10)


def test_to_module_of_asymmetric_padding_is_a_pad_then_the_conv():
    layer = MatrixConv2d(2, 3, 3, padding=((1, 2), (0, 0)))
    back = layer.to_module()
    assert isinstance(back, nn.Sequential) and type(back[1]) is nn.Conv2d
    assert back[1].padding == (0, 0)
    t = MatrixConvTranspose1d(2, 3, 3, stride=2, padding=((2, 0),)).to_module()
    assert type(t[0]) is nn.ConvTranspose1d and t[1].pads == (-2, 0)


class _Docstring(nn.Conv2d):
    """Only a docstring: still torch's own forward."""


class _PadsInForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


class _Standardised(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean()) / weight.std()
        return super()._conv_forward(x, w, bias)


def test_from_module_refuses_convs_with_their_own_forward():
    ok = _Docstring(2, 3, 3, dtype=torch.float64)
    twin = MatrixConv2d.from_module(ok)
    _same_function(twin, ok, (1, 2, 5, 5))
    for cls in (_PadsInForward, _Standardised):
        with pytest.raises(ConvMatError, match=rf"module \({cls.__name__}\) overrides"):
            MatrixConv2d.from_module(cls(2, 3, 3))
    with pytest.raises(ConvMatError, match=r"module \(LazyConv2d\) has uninitialised parameters"):
        MatrixConv2d.from_module(nn.LazyConv2d(3, 3))
    lazy = nn.LazyConv2d(3, 3, dtype=torch.float64)
    lazy(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    _same_function(MatrixConv2d.from_module(lazy), lazy, (1, 2, 5, 5))
