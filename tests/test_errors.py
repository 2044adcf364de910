"""Every ConvMatError case, matched by message, and agreement with what torch rejects."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from convmat import (
    ConvMatError,
    conv_matrix,
    conv_output_size,
    conv_transpose_matrix,
    conv_transpose_output_size,
    same_padding,
    to_matrix,
)

from .reference import MODES, MODULE

W2 = torch.ones(4, 2, 3, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(weight=[[1.0]]), r"weight must be a torch\.Tensor, got list"),
        (dict(weight=torch.ones(1, 1, 3, dtype=torch.bool)), r"numeric dtype, got torch\.bool"),
        (
            dict(weight=torch.ones(4, 3)),
            r"weight must have 3, 4 or 5 dimensions .* got shape \(4, 3\)",
        ),
        (dict(weight=torch.ones(1, 1, 1, 1, 1, 1)), r"3, 4 or 5 dimensions"),
        (dict(weight=torch.ones(0, 2, 3)), r"no empty dimension, got shape \(0, 2, 3\)"),
        (dict(weight=torch.ones(2, 2, 3).to_sparse()), r"dense \(strided\) tensor"),
        (
            dict(input_size=(8, 8, 8)),
            r"input_size must be an int or a tuple of 2 ints .* \(8, 8, 8\)",
        ),
        (dict(input_size=0), r"input_size must be >= 1 in every dimension, got 0"),
        (dict(input_size=8.5), r"input_size must be an int, got 8\.5"),
        (dict(stride=0), r"stride must be >= 1 in every dimension, got 0"),
        (dict(stride=(1, -2)), r"stride must be >= 1 in every dimension, got \(1, -2\)"),
        (dict(dilation=0), r"dilation must be >= 1 in every dimension, got 0"),
        (dict(groups=0), r"groups must be >= 1, got 0"),
        (
            dict(groups=3),
            r"out_channels \(weight\.shape\[0\]\) \(4\) must be divisible by groups, got groups=3",
        ),
        (
            dict(padding="full"),
            r"padding must be an int, a tuple of 2 ints, .*'valid' or 'same', got 'full'",
        ),
        (dict(padding=-1), r"padding must be >= 0 in every dimension, got -1"),
        (dict(padding=(1, (2, -1))), r"padding must be >= 0 in every dimension"),
        (dict(padding=(1, 2, 3)), r"padding must be .* got \(1, 2, 3\)"),
        (dict(padding=((1, 2, 3), 1)), r"padding must be .* pairs"),
        (dict(padding=True), r"padding must be an int, got True"),
        (
            dict(padding="same", stride=2),
            r"padding='same' is only defined for stride 1 .* same_padding\(\)",
        ),
        (
            dict(padding_mode="mirror"),
            r"padding_mode must be one of \('zeros', 'reflect', 'replicate', 'circular'\), got 'mirror'",
        ),
        (
            dict(padding=4, padding_mode="reflect"),
            r"reflect padding must be smaller than the input .* padding=4 for input size 4",
        ),
        (
            dict(padding=5, padding_mode="circular"),
            r"circular padding must be at most the input size .* padding=5",
        ),
        (
            dict(input_size=2),
            r"kernel_size 3 with dilation 1 spans 3 elements, more than the padded input in dimension 0 \(input 2 \+ padding 0\+0 = 2\)",
        ),
        (dict(dilation=3, padding=1), r"kernel_size 3 with dilation 3 spans 7 elements"),
        (
            dict(layout=torch.sparse_bsr),
            r"layout must be torch\.strided, torch\.sparse_coo or torch\.sparse_csr",
        ),
    ],
)
def test_conv_matrix_errors(kwargs, match):
    args = dict(weight=W2, input_size=4)
    args.update(kwargs)
    weight, size = args.pop("weight"), args.pop("input_size")
    with pytest.raises(ConvMatError, match=match):
        conv_matrix(weight, size, **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(output_padding=2, stride=2),
            r"output_padding must be >= 0 and smaller than either stride or dilation .* output_padding=2",
        ),
        (dict(output_padding=-1, stride=2), r"output_padding must be >= 0"),
        (dict(output_padding=1), r"smaller than either stride or dilation"),
        (
            dict(padding="same"),
            r"padding must be an int, a tuple of 2 ints, a tuple of 2 \(before, after\) pairs or 'valid', got 'same'",
        ),
        (dict(padding=3), r"output size .* must be >= 1 in every dimension, got \(-2, -2\)"),
        (dict(groups=3), r"in_channels \(weight\.shape\[0\]\) \(4\) must be divisible by groups"),
        (dict(weight=torch.ones(4, 3)), r"\(C_in, C_out // groups, \*kernel\)"),
    ],
)
def test_conv_transpose_matrix_errors(kwargs, match):
    args = dict(weight=W2, input_size=2)
    args.update(kwargs)
    weight, size = args.pop("weight"), args.pop("input_size")
    with pytest.raises(ConvMatError, match=match):
        conv_transpose_matrix(weight, size, **args)


def test_dense_too_large_names_bytes_and_sparse_layouts():
    w = torch.ones(64, 64, 3, 3)
    with pytest.raises(
        ConvMatError,
        match=r"a dense W of shape \(1073741824, 1073741824\) .* needs 4,611,686,018,427,387,904 bytes, more than the .* use layout=torch\.sparse_csr",
    ):
        conv_matrix(w, (4096, 4096), padding=1)
    with pytest.raises(ConvMatError, match=r"a sparse W .* needs [\d,]+ bytes, more than"):
        conv_matrix(w, (65536, 65536), padding=1, layout=torch.sparse_csr)


def test_size_helper_errors():
    with pytest.raises(
        ConvMatError,
        match=r"sizes must agree on the number of spatial dimensions, got lengths \[2, 3\]",
    ):
        conv_output_size((4, 4), (3, 3, 3))
    with pytest.raises(ConvMatError, match=r"kernel_size must be >= 1"):
        conv_output_size(4, 0)
    with pytest.raises(ConvMatError, match=r"spans 5 elements"):
        conv_output_size(4, 5)
    with pytest.raises(ConvMatError, match=r"output_padding must be >= 0 and smaller"):
        conv_transpose_output_size(4, 3, stride=2, output_padding=2)
    with pytest.raises(ConvMatError, match=r"stride must be >= 1"):
        same_padding(4, 3, stride=0)


def test_to_matrix_errors():
    with pytest.raises(
        ConvMatError,
        match=r"module \(Linear\) is not a convolution layer",
    ):
        to_matrix(nn.Linear(3, 3), 3)
    conv = nn.Conv2d(2, 2, 3)
    with pytest.raises(ConvMatError, match=r"input_size must be an int or a tuple of 2 ints"):
        to_matrix(conv, (5, 5, 5))


def _torch_accepts(n, cin, cout, k, s, d, p, groups, mode, size):
    try:
        layer = MODULE[n](
            cin,
            cout,
            k,
            stride=s,
            padding=p,
            dilation=d,
            groups=groups,
            padding_mode=mode,
            bias=False,
        )
        layer(torch.ones(1, cin, *(size,) * n))
    except (RuntimeError, ValueError):
        return False
    return True


@given(
    n=st.sampled_from([1, 2]),
    cin=st.integers(1, 4),
    cout=st.integers(1, 4),
    k=st.integers(1, 5),
    s=st.integers(-1, 3),
    d=st.integers(-1, 3),
    p=st.one_of(st.integers(-1, 5), st.sampled_from(["same", "valid"])),
    groups=st.integers(1, 3),
    mode=st.sampled_from(MODES),
    size=st.integers(1, 6),
)
def test_rejects_exactly_what_torch_rejects(n, cin, cout, k, s, d, p, groups, mode, size):
    """convmat raises ConvMatError exactly when torch's layer refuses the configuration."""
    accepted = _torch_accepts(n, cin, cout, k, s, d, p, groups, mode, size)
    if isinstance(p, int) and p < 0:
        # torch's non-zero modes take negative padding as cropping (through F.pad); convmat
        # rejects negative padding in every mode.
        accepted = False
    if cin % groups:
        return  # no weight of shape (C_out, C_in // groups, ...) exists to ask convmat with
    weight = torch.ones(cout, cin // groups, *(k,) * n)
    try:
        conv_matrix(weight, size, stride=s, padding=p, dilation=d, groups=groups, padding_mode=mode)
    except ConvMatError:
        assert not accepted
    else:
        assert accepted


@given(
    k=st.integers(1, 4),
    s=st.integers(1, 3),
    d=st.integers(1, 3),
    p=st.integers(0, 4),
    op=st.integers(0, 3),
    size=st.integers(1, 4),
)
def test_transposed_rejects_exactly_what_torch_rejects(k, s, d, p, op, size):
    weight = torch.ones(2, 2, k)
    try:
        torch.nn.functional.conv_transpose1d(
            torch.ones(1, 2, size), weight, stride=s, padding=p, output_padding=op, dilation=d
        )
        accepted = True
    except RuntimeError:
        accepted = False
    try:
        conv_transpose_matrix(weight, size, stride=s, padding=p, output_padding=op, dilation=d)
    except ConvMatError:
        assert not accepted
    else:
        assert accepted
