"""Gradients of every matrix layer kind, in both layouts, to any order.

``gradcheck`` / ``gradgradcheck`` compare the analytic first and second derivatives (in the
input, the weight and the bias) with finite differences; the gradient penalties compare second
derivatives with those of torch's own layer in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

from convmat.nn import (
    MatrixConv1d,
    MatrixConv2d,
    MatrixConv3d,
    MatrixConvTranspose1d,
    MatrixConvTranspose2d,
    MatrixConvTranspose3d,
)

# (matrix class, torch class, constructor arguments, input shape): small, with strides,
# dilations, groups, padding modes and pairs, so that every index path is crossed.
KINDS = [
    (MatrixConv1d, nn.Conv1d, dict(in_channels=2, out_channels=2, kernel_size=3, stride=2, padding=1, padding_mode="reflect", groups=2), (2, 2, 6)),
    (MatrixConv2d, nn.Conv2d, dict(in_channels=2, out_channels=2, kernel_size=(2, 3), dilation=(1, 2), padding=1, padding_mode="circular"), (1, 2, 4, 5)),
    # torch's layers take no (before, after) pairs: its reference pads first (F.pad's order)
    (MatrixConv2d, lambda **kw: nn.Sequential(nn.ZeroPad2d((0, 2, 1, 0)), nn.Conv2d(1, 2, 2, stride=2, dtype=kw["dtype"])),
     dict(in_channels=1, out_channels=2, kernel_size=2, stride=2, padding=((1, 0), (0, 2))), (2, 1, 4, 3)),
    (MatrixConv3d, nn.Conv3d, dict(in_channels=1, out_channels=2, kernel_size=2, stride=(1, 2, 1), padding=1, padding_mode="replicate"), (1, 1, 2, 3, 2)),
    (MatrixConvTranspose1d, nn.ConvTranspose1d, dict(in_channels=2, out_channels=2, kernel_size=3, stride=2, padding=1, output_padding=1), (2, 2, 3)),
    (MatrixConvTranspose2d, nn.ConvTranspose2d, dict(in_channels=2, out_channels=2, kernel_size=2, stride=2, dilation=(1, 2), groups=2), (1, 2, 2, 3)),
    (MatrixConvTranspose3d, nn.ConvTranspose3d, dict(in_channels=1, out_channels=2, kernel_size=2, stride=(2, 1, 1)), (1, 1, 2, 2, 2)),
]
IDS = [
    "conv1d", "conv2d", "conv2d-pairs", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d",
]
LAYOUTS = ["blocks", "dense"]


def _functions(kind, layout, seed=0):
    """``f(x, weight, bias)`` of the matrix layer and of torch's, with float64 inputs."""
    cls, base, kwargs, shape = kind
    torch.manual_seed(seed)
    twin = cls(**kwargs, dtype=torch.float64, layout=layout)
    ref = base(**kwargs, dtype=torch.float64)
    names = [n for n, _ in ref.named_parameters()]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = twin.weight.detach().clone().requires_grad_()
    b = twin.bias.detach().clone().requires_grad_()

    def f_twin(x, w, b):
        return functional_call(twin, {"weight": w, "bias": b}, (x,))

    def f_ref(x, w, b):
        return functional_call(ref, dict(zip(names, (w, b))), (x,))

    return f_twin, f_ref, (x, w, b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_gradcheck_and_gradgradcheck(kind, layout):
    f_twin, _, inputs = _functions(kind, layout)
    assert gradcheck(f_twin, inputs)
    assert gradgradcheck(f_twin, inputs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_gradient_penalty_matches_torch(kind, layout):
    """d/d(x, weight, bias) of ||d<g, y>/dx||^2 + ||d<g, y>/dweight||^2 (a gradient penalty
    that reaches both halves of the backward) equals torch's, in float64."""
    f_twin, f_ref, (x, w, b) = _functions(kind, layout, seed=1)
    g = torch.randn_like(f_ref(x, w, b))
    results = []
    for f in (f_twin, f_ref):
        y = f(x, w, b)
        gx, gw = torch.autograd.grad((y * g).sum(), (x, w), create_graph=True)
        penalty = gx.pow(2).sum() + gw.pow(2).sum() + (gx * x).sum()
        results.append(torch.autograd.grad(penalty, (x, w, b), allow_unused=True))
    for mine, theirs in zip(*results):
        if theirs is None:
            assert mine is None or torch.count_nonzero(mine) == 0
        else:
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hessian_vector_product_and_third_order(layout):
    """Hessian-vector products in (x, weight) and a third derivative, against torch's."""
    kind = KINDS[1]
    f_twin, f_ref, (x, w, b) = _functions(kind, layout, seed=2)
    v = (torch.randn_like(x), torch.randn_like(w))

    def loss(f):
        return lambda x, w: f(x, w, b).tanh().pow(2).sum()

    _, hvp_twin = torch.autograd.functional.hvp(loss(f_twin), (x, w), v)
    _, hvp_ref = torch.autograd.functional.hvp(loss(f_ref), (x, w), v)
    for mine, theirs in zip(hvp_twin, hvp_ref):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)
    thirds = []
    for f in (f_twin, f_ref):
        y = f(x, w, b)
        (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
        (gxw,) = torch.autograd.grad(gx.pow(2).sum(), w, create_graph=True)
        thirds.append(torch.autograd.grad(gxw.sum(), (x, w)))
    for mine, theirs in zip(*thirds):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_frozen_weight_and_input_without_grad(layout):
    """Only the gradients asked for are made, and they are torch's."""
    f_twin, f_ref, (x, w, b) = _functions(KINDS[5], layout, seed=3)
    w_frozen = w.detach()
    for f in (f_twin, f_ref):
        y = f(x, w_frozen, b)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        (gxx,) = torch.autograd.grad(gx.pow(2).sum(), x)
        if f is f_twin:
            mine = (gx, gxx)
        else:
            torch.testing.assert_close(mine[0], gx, rtol=0, atol=1e-10)
            torch.testing.assert_close(mine[1], gxx, rtol=0, atol=1e-10)
    x_plain = x.detach()
    (mine,) = torch.autograd.grad(f_twin(x_plain, w, b).pow(2).sum(), w)
    (theirs,) = torch.autograd.grad(f_ref(x_plain, w, b).pow(2).sum(), w)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", [KINDS[1], KINDS[5]], ids=["conv2d", "conv_transpose2d"])
def test_complex_layers(kind, layout):
    """Complex weights and inputs: torch's conjugate convention (grad_x = W^H g, grad_w sums
    g conj(x)), first and second order."""
    cls, base, kwargs, shape = kind
    torch.manual_seed(5)
    twin = cls(**kwargs, dtype=torch.complex128, layout=layout)
    ref = base(**kwargs, dtype=torch.complex128)
    ref.load_state_dict(twin.state_dict())
    x = torch.randn(shape, dtype=torch.complex128)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = twin(x1), ref(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-10)
    g = torch.randn_like(y2)
    (y1 * g).real.sum().backward()
    (y2 * g).real.sum().backward()
    for mine, theirs in [(x1.grad, x2.grad), (twin.weight.grad, ref.weight.grad)]:
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)
    w = twin.weight.detach().clone().requires_grad_()

    def f(x, w):
        return functional_call(twin, {"weight": w, "bias": twin.bias}, (x,))

    inputs = (x[:1].clone().requires_grad_(), w)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)
