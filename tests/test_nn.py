"""Matrix layers against their torch twins: outputs, gradients, state_dict, training, caching."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from convmat import ConvMatError, conv_matrix
from convmat.nn import (
    MatrixConv1d,
    MatrixConv2d,
    MatrixConv3d,
    MatrixConvTranspose1d,
    MatrixConvTranspose2d,
    MatrixConvTranspose3d,
)

from .reference import conv_configs, conv_transpose_configs
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


def test_weight_matrix_is_public_w():
    layer = MatrixConv1d(2, 3, 3, padding=1, padding_mode="circular", dtype=torch.float64)
    W = layer.weight_matrix(7)
    assert W.layout == torch.sparse_csr
    expected = conv_matrix(layer.weight.detach(), 7, padding=1, padding_mode="circular")
    torch.testing.assert_close(W.to_dense().detach(), expected, rtol=0, atol=0)
    dense = MatrixConv1d(2, 3, 3, layout=torch.strided)
    assert dense.weight_matrix(7).layout == torch.strided


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
