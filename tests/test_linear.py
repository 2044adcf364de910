"""Conv1D, to_linear and conv2d_as_conv1d against torch's convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from convmat import ConvMatError, conv2d_as_conv1d, to_linear
from convmat.nn import Conv1D

from .reference import conv_configs, conv_transpose_configs
from .tests_helpers import layer_for


@st.composite
def _conv1d_cases(draw):
    """Conv1D arguments whose kernel fits in the padded input."""
    k, s, d = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    symmetric = draw(st.booleans())
    if symmetric:
        pad = draw(st.integers(0, 3))
        padding, before, after = pad, pad, pad
    else:
        before, after = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        padding = (before, after)
    n = draw(st.integers(max(1, d * (k - 1) + 1 - before - after), 20))
    return k, n, s, d, padding, before, after


@given(case=_conv1d_cases(), bias=st.booleans(), batched=st.booleans())
def test_conv1d_matches_f_conv1d(case, bias, batched):
    k, n, s, d, padding, before, after = case
    layer = Conv1D(k, n, stride=s, dilation=d, padding=padding, bias=bias).double()
    x = torch.randn(3, n, dtype=torch.float64)
    ref = F.conv1d(
        F.pad(x[:, None], (before, after)), layer.kernel.view(1, 1, -1), stride=s, dilation=d
    )[:, 0]
    if bias:
        ref = ref + layer.bias
    out = layer(x) if batched else torch.stack([layer(row) for row in x])
    assert out.shape == (3, layer.output_dim)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    W = layer.weight_matrix()
    assert W.shape == (layer.output_dim, n)
    # The kernel sits on the bands: row r holds kernel[m] at column r*s + m*d - before.
    for m in range(k):
        for r in range(layer.output_dim):
            c = r * s + m * d - before
            if 0 <= c < n:
                assert W[r, c] == layer.kernel[m]


@given(
    k=st.integers(2, 5),
    d=st.integers(1, 3),
    pads=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    data=st.data(),
)
def test_conv1d_refuses_a_kernel_wider_than_the_padded_input(k, d, pads, data):
    span = d * (k - 1) + 1
    assume(span - pads[0] - pads[1] > 1)
    n = data.draw(st.integers(1, span - pads[0] - pads[1] - 1))
    with pytest.raises(ConvMatError, match=rf"kernel_size {k} with dilation {d} spans {span}"):
        Conv1D(k, n, dilation=d, padding=pads)


def test_conv1d_seed_example_and_gradient():
    layer = Conv1D(3, 10)
    assert layer.output_dim == 8 and layer.kernel.shape == (3,)
    x = torch.randn(4, 10)
    layer(x).sum().backward()
    expected = torch.stack([x[:, m : m + 8].sum() for m in range(3)])
    torch.testing.assert_close(layer.kernel.grad, expected)
    with pytest.raises(
        ConvMatError, match=r"input must be \(batch, 10\) or \(10,\), got shape \(4, 9\)"
    ):
        layer(torch.randn(4, 9))


@given(
    cfg=st.one_of(
        conv_configs().filter(
            lambda c: (
                isinstance(c.padding, str)
                or (len({*c.pairs[0]}) == 1 and all(b == a for b, a in c.pairs))
            )
        ),
        conv_transpose_configs(asymmetric=False),
    ),
    bias=st.booleans(),
)
def test_to_linear_matches_layer(cfg, bias):
    layer = layer_for(cfg, torch.float64, bias)
    lin = to_linear(layer, cfg.input_size)
    x = cfg.input(batch=2)
    torch.testing.assert_close(lin(x.flatten(1)), layer(x).flatten(1), rtol=0, atol=1e-10)
    assert lin.weight.dtype == torch.float64 and not lin.weight.grad_fn


def test_conv2d_as_conv1d_seed_example():
    x = torch.arange(1.0, 21.0, dtype=torch.float64).view(1, 1, 4, 5)
    w = torch.arange(1, 10, dtype=torch.float64).view(1, 1, 3, 3) / 10
    w1 = conv2d_as_conv1d(w, 4)
    assert w1.shape == (2, 4, 3)
    expected = torch.tensor([[41.1, 45.6, 50.1], [63.6, 68.1, 72.6]], dtype=torch.float64)
    torch.testing.assert_close(F.conv1d(x.view(1, 4, 5), w1).view(2, 3), expected)
    torch.testing.assert_close(F.conv2d(x, w).view(2, 3), expected)


@given(
    cin=st.integers(1, 3),
    cout=st.integers(1, 3),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    h=st.integers(3, 7),
    wd=st.integers(3, 7),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
)
def test_conv2d_as_conv1d_random(cin, cout, kh, kw, h, wd, sh, sw, dh, dw, ph, pw):
    assume(h + 2 * ph >= dh * (kh - 1) + 1 and wd + 2 * pw >= dw * (kw - 1) + 1)
    x = torch.randn(2, cin, h, wd, dtype=torch.float64)
    w = torch.randn(cout, cin, kh, kw, dtype=torch.float64)
    y2 = F.conv2d(x, w, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw))
    w1 = conv2d_as_conv1d(w, h, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw))
    y1 = F.conv1d(x.reshape(2, cin * h, wd), w1, stride=sw, padding=pw, dilation=dw)
    torch.testing.assert_close(y1.view_as(y2), y2, rtol=0, atol=1e-10)


def test_conv2d_as_conv1d_errors():
    with pytest.raises(ConvMatError, match=r"\(C_out, C_in, kh, kw\), got shape \(1, 1, 3\)"):
        conv2d_as_conv1d(torch.ones(1, 1, 3), 4)
    with pytest.raises(
        ConvMatError, match=r"padding must be an int or a \(height, width\) tuple, got 'same'"
    ):
        conv2d_as_conv1d(torch.ones(1, 1, 3, 3), 4, padding="same")
