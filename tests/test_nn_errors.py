"""Every bad use of a matrix layer is a clear error (issue: no raw internal errors).

One row per case: a description, what is called, the exception expected and a pattern its
message must match (naming the argument, the value and what is allowed, or what torch says).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from convmat import ConvMatError
from convmat.nn import (
    MatrixConv1d,
    MatrixConv2d,
    MatrixConv3d,
    MatrixConvTranspose1d,
    MatrixConvTranspose2d,
)


def conv2d(**kwargs):
    return MatrixConv2d(3, 2, 3, **kwargs)


def x2d(*shape, **kwargs):
    return torch.randn(*(shape or (1, 3, 5, 5)), **kwargs)


class _PadsInForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


class _Standardised(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, (weight - weight.mean()) / weight.std(), bias)


CASES = [
    # -- the input -------------------------------------------------------------------------
    ("numpy input", lambda: conv2d()(np.ones((1, 3, 5, 5), np.float32)), TypeError,
     r"input must be a torch\.Tensor, got ndarray"),
    ("list input", lambda: conv2d()([[1.0, 2.0]]), TypeError,
     r"input must be a torch\.Tensor, got list"),
    ("None input", lambda: conv2d()(None), TypeError, r"input must be a torch\.Tensor, got NoneType"),
    ("float64 input, float32 layer", lambda: conv2d()(x2d(dtype=torch.float64)), ConvMatError,
     r"input dtype must be the layer's dtype torch\.float32, got torch\.float64 .*Input type"),
    ("int input", lambda: conv2d()(torch.ones(1, 3, 5, 5, dtype=torch.int64)), ConvMatError,
     r"input dtype must be the layer's dtype torch\.float32, got torch\.int64"),
    ("bool input", lambda: conv2d()(torch.ones(1, 3, 5, 5, dtype=torch.bool)), ConvMatError,
     r"got torch\.bool"),
    ("float32 input, half layer", lambda: conv2d().half()(x2d()), ConvMatError,
     r"layer's dtype torch\.float16, got torch\.float32"),
    ("float32 input, float64 transposed layer",
     lambda: MatrixConvTranspose2d(3, 2, 3).double()(x2d()), ConvMatError,
     r"layer's dtype torch\.float64, got torch\.float32"),
    ("float8 layer", lambda: conv2d().to(torch.float8_e4m3fn)(x2d().to(torch.float8_e4m3fn)),
     ConvMatError, r"layer's dtype must be a floating point type of 16 bits or more.*float8"),
    ("two dims for a 2-D layer", lambda: conv2d()(torch.randn(5, 5)), ConvMatError,
     r"input must have 3 \(unbatched\) or 4 \(batched\) dimensions .* got shape \(5, 5\)"),
    ("five dims for a 2-D layer", lambda: conv2d()(torch.randn(1, 1, 3, 5, 5)), ConvMatError,
     r"input must have 3 \(unbatched\) or 4 \(batched\) dimensions"),
    ("wrong channels", lambda: conv2d()(x2d(1, 2, 5, 5)), ConvMatError,
     r"input must have 3 channels, got shape \(1, 2, 5, 5\)"),
    ("sparse input", lambda: conv2d()(x2d().to_sparse()), ConvMatError,
     r"input must be a dense \(strided\) tensor, got torch\.sparse_coo"),
    ("meta input, cpu layer", lambda: conv2d()(x2d(device="meta")), ConvMatError,
     r"input must be on the layer's device cpu, got meta"),
    ("cpu input, meta layer", lambda: conv2d(device="meta")(x2d()), ConvMatError,
     r"input must be on the layer's device meta, got cpu"),
    ("kernel larger than the input", lambda: conv2d()(x2d(1, 3, 2, 5)), ConvMatError,
     r"kernel_size 3 with dilation 1 spans 3 elements"),
    ("reflect padding as large as the input",
     lambda: conv2d(padding=3, padding_mode="reflect")(x2d(1, 3, 3, 3)), ConvMatError,
     r"reflect padding must be smaller than the input"),
    ("negative padding, at the first forward", lambda: conv2d(padding=-1)(x2d()), ConvMatError,
     r"padding must be >= 0 in every dimension, got \(-1, -1\)"),
    ("transposed output_size out of range",
     lambda: MatrixConvTranspose2d(3, 2, 3, stride=2)(x2d(), output_size=(20, 20)), ConvMatError,
     r"output_size must be between \(11, 11\) and \(12, 12\)"),
    # -- the constructor -------------------------------------------------------------------
    ("stride of 2**63", lambda: conv2d(stride=2**63), ConvMatError,
     r"stride must fit in a 64-bit integer .*got 9223372036854775808"),
    ("padding of 2**63", lambda: conv2d(padding=(0, 2**63)), ConvMatError,
     r"padding must fit in a 64-bit integer .*Overflow.*got \(0, 9223372036854775808\)"),
    ("dilation of 2**64, transposed", lambda: MatrixConvTranspose1d(1, 1, 2, dilation=2**64),
     ConvMatError, r"dilation must fit in a 64-bit integer"),
    ("kernel_size of 2**63, 3-D", lambda: MatrixConv3d(1, 1, (1, 1, 2**63)), ConvMatError,
     r"kernel_size must fit in a 64-bit integer"),
    ("stride 0", lambda: conv2d(stride=0), ConvMatError,
     r"stride must be >= 1 in every dimension, got 0"),
    ("kernel_size 0", lambda: MatrixConv1d(1, 1, 0), ConvMatError,
     r"kernel_size must be >= 1 in every dimension, got 0"),
    ("fractional stride", lambda: conv2d(stride=1.5), ConvMatError, r"stride must be an int, got 1\.5"),
    ("stride tuple of the wrong length", lambda: conv2d(stride=(1, 1, 1)), ConvMatError,
     r"stride must be an int or a tuple of 2 ints .*got \(1, 1, 1\)"),
    ("negative output_padding", lambda: MatrixConvTranspose2d(1, 1, 3, output_padding=-1),
     ConvMatError, r"output_padding must be >= 0 in every dimension, got -1"),
    ("output_padding not below stride, at the first forward",
     lambda: MatrixConvTranspose2d(3, 1, 3, stride=2, output_padding=2)(x2d()), ConvMatError,
     r"output_padding must be >= 0 and smaller than either stride or dilation"),
    ("string padding for a transposed layer",
     lambda: MatrixConvTranspose2d(1, 1, 3, padding="valid"), ConvMatError,
     r"padding must be .* for a transposed convolution .*got 'valid'"),
    ("reflect mode for a transposed layer (torch's own refusal)",
     lambda: MatrixConvTranspose2d(1, 1, 3, padding_mode="reflect"), ValueError,
     r'Only "zeros" padding mode is supported'),
    ("layout torch.sparse_coo", lambda: conv2d(layout=torch.sparse_coo), ConvMatError,
     r"layout must be 'blocks' or 'dense' .*got torch\.sparse_coo"),
    ("layout 'csr'", lambda: conv2d(layout="csr"), ConvMatError,
     r"layout must be 'blocks' or 'dense' .*got 'csr'"),
    ("layout None", lambda: conv2d(layout=None), ConvMatError, r"layout must be .*got None"),
    # -- conversions -----------------------------------------------------------------------
    ("from_module of the other dimension", lambda: MatrixConv2d.from_module(nn.Conv1d(1, 1, 1)),
     ConvMatError, r"module must be a torch\.nn\.Conv2d .*got Conv1d"),
    ("from_module of a transposed layer",
     lambda: MatrixConv2d.from_module(nn.ConvTranspose2d(1, 1, 1)), ConvMatError,
     r"module must be a torch\.nn\.Conv2d .*got ConvTranspose2d"),
    ("from_module of a Linear", lambda: MatrixConv1d.from_module(nn.Linear(2, 2)), ConvMatError,
     r"module must be a torch\.nn\.Conv1d .*got Linear"),
    ("from_module of an uninitialised LazyConv2d",
     lambda: MatrixConv2d.from_module(nn.LazyConv2d(2, 3)), ConvMatError,
     r"module \(LazyConv2d\) has uninitialised parameters"),
    ("from_module of a conv that pads in forward",
     lambda: MatrixConv2d.from_module(_PadsInForward(1, 1, 3)), ConvMatError,
     r"module \(_PadsInForward\) overrides forward"),
    ("from_module of a conv that standardises its weight",
     lambda: MatrixConv2d.from_module(_Standardised(1, 1, 3)), ConvMatError,
     r"module \(_Standardised\) overrides _conv_forward"),
    ("weight_matrix of an empty input", lambda: conv2d().weight_matrix(0), ConvMatError,
     r"input_size must be >= 1 in every dimension, got 0"),
    ("weight_matrix of a too small input", lambda: conv2d().weight_matrix((2, 2)), ConvMatError,
     r"kernel_size 3 with dilation 1 spans 3 elements"),
]


@pytest.mark.parametrize(
    ("description", "call", "error", "pattern"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_use_is_a_clear_error(description, call, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        call()
    if error is not ValueError:  # torch's own refusal keeps torch's type
        assert type(info.value) is error


def test_the_table_is_large():
    assert len(CASES) >= 25
