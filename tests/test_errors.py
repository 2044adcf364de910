"""Every ConvMatError case, matched by message, and agreement with what torch rejects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from convmat import (
    ConvMatError,
    conv2d_as_conv1d,
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
    per_group=st.integers(1, 2),
    cout=st.integers(1, 4),
    k=st.integers(1, 5),
    s=st.integers(-1, 3),
    d=st.integers(-1, 3),
    p=st.one_of(st.integers(-1, 5), st.sampled_from(["same", "valid"])),
    groups=st.integers(1, 3),
    mode=st.sampled_from(MODES),
    size=st.integers(1, 6),
)
def test_rejects_exactly_what_torch_rejects(n, per_group, cout, k, s, d, p, groups, mode, size):
    """convmat raises ConvMatError exactly when torch's layer refuses the configuration.

    Only in_channels divisible by groups are drawn: no weight of shape
    ``(C_out, C_in // groups, ...)`` exists otherwise to ask convmat with.
    """
    cin = groups * per_group
    accepted = _torch_accepts(n, cin, cout, k, s, d, p, groups, mode, size)
    if isinstance(p, int) and p < 0:
        # torch's non-zero modes take negative padding as cropping (through F.pad); convmat
        # rejects negative padding in every mode.
        accepted = False
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


# --- bad inputs to the core functions, one row each -------------------------------------------

F8 = torch.float8_e4m3fn
NO_EMPTY_CHECK = (
    "_spatial_dims (convmat/engine/shapes.py) takes input_size=() as zero spatial dimensions and "
    "returns (); it should refuse an empty tuple naming the parameter"
)
def _row(call, exc, match, id, reason=None):
    """One table row; ``reason`` marks a gap in the library (a strict xfail until fixed)."""
    marks = () if reason is None else pytest.mark.xfail(strict=True, reason=reason)
    return pytest.param(call, exc, match, id=id, marks=marks)


E = ConvMatError
BAD_INPUTS = [
    # conv_matrix: sizes
    _row(lambda: conv_matrix(W2, True), E, r"input_size must be an int, got True", "size-bool"),
    _row(
        lambda: conv_matrix(W2, (4, True)),
        E,
        r"input_size must be an int, got True",
        "size-bool-in-tuple",
    ),
    _row(lambda: conv_matrix(W2, 4.0), E, r"input_size must be an int, got 4\.0", "size-float"),
    _row(lambda: conv_matrix(W2, -3), E, r"input_size must be >= 1 .* got -3", "size-negative"),
    _row(lambda: conv_matrix(W2, None), E, r"input_size must be an int, got None", "size-none"),
    _row(lambda: conv_matrix(W2, "4"), E, r"input_size must be an int, got '4'", "size-str"),
    _row(
        lambda: conv_matrix(W2, ()),
        E,
        r"input_size must be .* tuple of 2 ints .* got \(\)",
        "size-empty",
    ),
    _row(
        lambda: conv_matrix(W2, (4, 4, 4)),
        E,
        r"input_size .* tuple of 2 ints .* \(4, 4, 4\)",
        "size-3-for-2d",
    ),
    _row(
        lambda: conv_matrix(W2, torch.tensor([4, 4])),
        E,
        r"input_size must be an int, got tensor",
        "size-tensor-2",
    ),
    # conv_matrix: stride, dilation, groups, padding
    _row(
        lambda: conv_matrix(W2, 4, stride=True),
        E,
        r"stride must be an int, got True",
        "stride-bool",
    ),
    _row(
        lambda: conv_matrix(W2, 4, stride=1.0),
        E,
        r"stride must be an int, got 1\.0",
        "stride-float",
    ),
    _row(
        lambda: conv_matrix(W2, 4, stride=None),
        E,
        r"stride must be an int, got None",
        "stride-none",
    ),
    _row(
        lambda: conv_matrix(W2, 4, stride="2"), E, r"stride must be an int, got '2'", "stride-str"
    ),
    _row(
        lambda: conv_matrix(W2, 4, stride=()),
        E,
        r"stride must be an int or a tuple of 2 ints",
        "stride-empty",
    ),
    _row(
        lambda: conv_matrix(W2, 4, stride=(1, 1, 1)),
        E,
        r"stride .* tuple of 2 ints .* \(1, 1, 1\)",
        "stride-3",
    ),
    _row(
        lambda: conv_matrix(W2, 4, dilation=-1),
        E,
        r"dilation must be >= 1 .* got -1",
        "dilation-negative",
    ),
    _row(
        lambda: conv_matrix(W2, 4, dilation=1.5),
        E,
        r"dilation must be an int, got 1\.5",
        "dilation-float",
    ),
    _row(
        lambda: conv_matrix(W2, 4, dilation=2**63),
        E,
        r"dilation must fit in a 64-bit integer .* got 9223372036854775808",
        "dilation-2**63",
    ),
    _row(
        lambda: conv_matrix(W2, 4, groups=True),
        E,
        r"groups must be an int, got True",
        "groups-bool",
    ),
    _row(
        lambda: conv_matrix(W2, 4, groups=2.0),
        E,
        r"groups must be an int, got 2\.0",
        "groups-float",
    ),
    _row(
        lambda: conv_matrix(W2, 4, groups=None),
        E,
        r"groups must be an int, got None",
        "groups-none",
    ),
    _row(
        lambda: conv_matrix(W2, 4, groups=-1), E, r"groups must be >= 1, got -1", "groups-negative"
    ),
    _row(
        lambda: conv_matrix(W2, 4, groups=2**63),
        E,
        r"groups must fit in a 64-bit integer .* got 9223372036854775808",
        "groups-2**63",
    ),
    _row(
        lambda: conv_matrix(W2, 4, padding=None),
        E,
        r"padding must be an int, got None",
        "padding-none",
    ),
    _row(
        lambda: conv_matrix(W2, 4, padding=1.0),
        E,
        r"padding must be an int, got 1\.0",
        "padding-float",
    ),
    _row(
        lambda: conv_matrix(W2, 4, padding=(True, 1)),
        E,
        r"padding must be an int, got True",
        "padding-bool-in-tuple",
    ),
    _row(
        lambda: conv_matrix(W2, 4, padding=((1.0, 1), (1, 1))),
        E,
        r"padding must be an int, got 1\.0",
        "padding-float-in-pair",
    ),
    _row(
        lambda: conv_matrix(W2, 4, padding="SAME"),
        E,
        r"padding must be .* 'valid' or 'same', got 'SAME'",
        "padding-str-case",
    ),
    _row(
        lambda: conv_matrix(W2, 4, padding={}),
        E,
        r"padding must be an int, got \{\}",
        "padding-dict",
    ),
    _row(
        lambda: conv_matrix(W2, 4, padding=2**63),
        E,
        r"padding must fit in a 64-bit integer .* got 9223372036854775808",
        "padding-2**63",
    ),
    _row(
        lambda: conv_matrix(W2, 4, padding_mode=None),
        E,
        r"padding_mode must be one of .* got None",
        "mode-none",
    ),
    _row(
        lambda: conv_matrix(W2, 4, padding_mode="Zeros"),
        E,
        r"padding_mode must be one of .* got 'Zeros'",
        "mode-case",
    ),
    _row(
        lambda: conv_matrix(W2, 4, padding_mode="constant"),
        E,
        r"padding_mode must be one of .* got 'constant'",
        "mode-F.pad-name",
    ),
    # conv_matrix: layout and weight
    _row(
        lambda: conv_matrix(W2, 4, layout="strided"),
        E,
        r"layout must be torch\.strided, .* got 'strided'",
        "layout-str",
    ),
    _row(lambda: conv_matrix(W2, 4, layout=None), E, r"layout must be .* got None", "layout-none"),
    _row(
        lambda: conv_matrix(W2, 4, layout=torch.float32),
        E,
        r"layout must be .* got torch\.float32",
        "layout-a-dtype",
    ),
    _row(
        lambda: conv_matrix(W2, 4, layout=torch.sparse_csc),
        E,
        r"layout must be .* got torch\.sparse_csc",
        "layout-csc",
    ),
    _row(
        lambda: conv_matrix(W2.numpy(), 4),
        E,
        r"weight must be a torch\.Tensor, got ndarray",
        "weight-numpy",
    ),
    _row(
        lambda: conv_matrix(None, 4),
        E,
        r"weight must be a torch\.Tensor, got NoneType",
        "weight-none",
    ),
    _row(
        lambda: conv_matrix(torch.tensor(1.0), 4),
        E,
        r"weight must have 3, 4 or 5 dimensions .* got shape \(\)",
        "weight-0d",
    ),
    _row(
        lambda: conv_matrix(W2.to(F8), 4),
        E,
        r"weight .* float8_e4m3fn",
        "weight-float8-dense",
    ),
    _row(
        lambda: conv_matrix(W2.to(F8), 4, layout=torch.sparse_csr),
        E,
        r"weight .* float8_e4m3fn",
        "weight-float8-csr",
    ),
    _row(
        lambda: conv_matrix(W2.to(torch.float8_e5m2), 4, layout=torch.sparse_coo),
        E,
        r"weight .* float8_e5m2",
        "weight-float8-coo",
    ),
    _row(
        lambda: conv_matrix(W2, 4, strides=2),
        TypeError,
        r"unexpected keyword argument 'strides'",
        "unknown-keyword",
    ),
    _row(lambda: conv_matrix(W2, 4, 2), TypeError, r"2 positional arguments", "stride-positional"),
    # conv_transpose_matrix
    _row(
        lambda: conv_transpose_matrix(W2, 4, stride=2, output_padding=True),
        E,
        r"output_padding must be an int, got True",
        "T-output_padding-bool",
    ),
    _row(
        lambda: conv_transpose_matrix(W2, 4, stride=2, output_padding=0.5),
        E,
        r"output_padding must be an int, got 0\.5",
        "T-output_padding-float",
    ),
    _row(
        lambda: conv_transpose_matrix(W2, 4, output_padding=None),
        E,
        r"output_padding must be an int, got None",
        "T-output_padding-none",
    ),
    _row(
        lambda: conv_transpose_matrix(W2, 4, dilation=None),
        E,
        r"dilation must be an int, got None",
        "T-dilation-none",
    ),
    _row(
        lambda: conv_transpose_matrix(W2, (4, 4, 4)),
        E,
        r"input_size .* tuple of 2 ints",
        "T-size-3-for-2d",
    ),
    _row(
        lambda: conv_transpose_matrix(W2, 4, layout="csr"),
        E,
        r"layout must be .* got 'csr'",
        "T-layout-str",
    ),
    _row(
        lambda: conv_transpose_matrix(W2, 4, padding_mode="reflect"),
        TypeError,
        r"unexpected keyword argument 'padding_mode'",
        "T-padding_mode",
    ),
    _row(
        lambda: conv_transpose_matrix(W2, 4, stride=2**63),
        E,
        r"stride must fit in a 64-bit integer .* got 9223372036854775808",
        "T-stride-2**63",
    ),
    _row(
        lambda: conv_transpose_matrix(W2.to(torch.float8_e5m2), 4),
        E,
        r"weight .* float8_e5m2",
        "T-weight-float8",
    ),
    # to_matrix
    _row(
        lambda: to_matrix(None, 4),
        E,
        r"module \(NoneType\) is not a convolution layer",
        "to_matrix-none",
    ),
    _row(
        lambda: to_matrix(nn.Sequential(nn.Conv2d(2, 2, 3)), 4),
        E,
        r"module \(Sequential\) is not a convolution",
        "to_matrix-sequential",
    ),
    _row(
        lambda: to_matrix(nn.LazyConv2d(2, 3), 4),
        E,
        r"module \(LazyConv2d\) has uninitialised parameters",
        "to_matrix-lazy",
    ),
    _row(
        lambda: to_matrix(nn.Conv2d(2, 2, 3), True),
        E,
        r"input_size must be an int, got True",
        "to_matrix-size-bool",
    ),
    _row(
        lambda: to_matrix(nn.Conv2d(2, 2, 3), None),
        E,
        r"input_size must be an int, got None",
        "to_matrix-size-none",
    ),
    _row(
        lambda: to_matrix(nn.Conv2d(2, 2, 3), 4, layout="x"),
        E,
        r"layout must be .* got 'x'",
        "to_matrix-layout",
    ),
    _row(
        lambda: to_matrix(nn.Conv2d(2, 2, 3).to(F8), 4),
        E,
        r"weight .* float8_e4m3fn",
        "to_matrix-float8",
    ),
    # the size helpers
    _row(
        lambda: conv_output_size(True, 3),
        E,
        r"input_size must be an int, got True",
        "size-helper-bool",
    ),
    _row(
        lambda: conv_output_size(4.0, 3),
        E,
        r"input_size must be an int, got 4\.0",
        "size-helper-float",
    ),
    _row(
        lambda: conv_output_size(None, 3),
        E,
        r"input_size must be an int, got None",
        "size-helper-none",
    ),
    _row(
        lambda: conv_output_size(-4, 3),
        E,
        r"input_size must be >= 1 .* got -4",
        "size-helper-negative",
    ),
    _row(
        lambda: conv_output_size((4, "a"), 3),
        E,
        r"input_size must be an int, got 'a'",
        "size-helper-str-in-tuple",
    ),
    _row(
        lambda: conv_output_size(4, 3, padding=-1),
        E,
        r"padding must be >= 0 .* got -1",
        "size-helper-padding",
    ),
    _row(
        lambda: conv_output_size(4, 3, stride=2, padding="same"),
        E,
        r"padding='same' is only defined for stride 1",
        "size-helper-same-strided",
    ),
    _row(
        lambda: conv_output_size(4, 3, padding_mode="zeros"),
        TypeError,
        r"unexpected keyword argument 'padding_mode'",
        "size-helper-padding_mode",
    ),
    _row(
        lambda: conv_output_size((), 3),
        E,
        r"input_size .* \(\)",
        "size-helper-empty",
    ),
    _row(
        lambda: conv_transpose_output_size(4, True),
        E,
        r"kernel_size must be an int, got True",
        "T-size-helper-kernel-bool",
    ),
    _row(
        lambda: conv_transpose_output_size(4, 3, output_padding=None),
        E,
        r"output_padding must be an int, got None",
        "T-size-helper-output_padding-none",
    ),
    _row(
        lambda: conv_transpose_output_size(4, 3, padding="same"),
        E,
        r"padding must be .* or 'valid', got 'same'",
        "T-size-helper-same",
    ),
    _row(
        lambda: conv_transpose_output_size((), 3),
        E,
        r"input_size .* \(\)",
        "T-size-helper-empty",
    ),
    _row(
        lambda: same_padding(4, 3, dilation=0),
        E,
        r"dilation must be >= 1 .* got 0",
        "same_padding-dilation",
    ),
    _row(
        lambda: same_padding(4, "3"),
        E,
        r"kernel_size must be an int, got '3'",
        "same_padding-kernel-str",
    ),
    _row(
        lambda: same_padding(4, 3.5),
        E,
        r"kernel_size must be an int, got 3\.5",
        "same_padding-kernel-float",
    ),
    _row(
        lambda: same_padding((4, 4), (3, 3, 3)),
        E,
        r"sizes must agree .* got lengths \[2, 3\]",
        "same_padding-lengths",
    ),
    _row(
        lambda: same_padding((), 3), E, r"input_size .* \(\)", "same_padding-empty"
    ),
    # conv2d_as_conv1d
    _row(
        lambda: conv2d_as_conv1d(torch.ones(2, 2, 3), 4),
        E,
        r"weight must be a 2-D convolution's .* got shape \(2, 2, 3\)",
        "c2c1-weight-3d",
    ),
    _row(
        lambda: conv2d_as_conv1d([[1.0]], 4),
        E,
        r"weight must be a torch\.Tensor, got list",
        "c2c1-weight-list",
    ),
    _row(
        lambda: conv2d_as_conv1d(W2, 4, padding="same"),
        E,
        r"padding must be an int or a \(height, width\) tuple, got 'same'",
        "c2c1-padding-same",
    ),
    _row(
        lambda: conv2d_as_conv1d(W2, 4, stride=0),
        E,
        r"stride must be >= 1 .* got 0",
        "c2c1-stride-0",
    ),
    _row(
        lambda: conv2d_as_conv1d(W2, 4, groups=2),
        TypeError,
        r"unexpected keyword argument 'groups'",
        "c2c1-groups",
    ),
    _row(
        lambda: conv2d_as_conv1d(W2, True),
        E,
        r"input_height must be an int, got True",
        "c2c1-height-bool",
    ),
    _row(
        lambda: conv2d_as_conv1d(W2, None),
        E,
        r"input_height must be an int, got None",
        "c2c1-height-none",
    ),
    _row(
        lambda: conv2d_as_conv1d(W2, (4, 4)),
        E,
        r"input_height must be an int, got \(4, 4\)",
        "c2c1-height-tuple",
    ),
    _row(
        lambda: conv2d_as_conv1d(W2, 4, stride=(1, 1, 1)),
        E,
        r"stride must be an int or a \(height, width\) tuple",
        "c2c1-stride-3",
    ),
    _row(
        lambda: conv2d_as_conv1d(W2, 4, stride=(1, -5)),
        E,
        r"stride must be >= 1 .* got \(1, -5\)",
        "c2c1-width-stride-negative",
    ),
    _row(
        lambda: conv2d_as_conv1d(W2, 4, dilation=(1, "a")),
        E,
        r"dilation must be an int, got 'a'",
        "c2c1-width-dilation-str",
    ),
    _row(
        lambda: conv2d_as_conv1d(W2.to(F8), 4),
        E,
        r"weight .* float8_e4m3fn",
        "c2c1-weight-float8",
    ),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD_INPUTS)
def test_bad_inputs_to_the_core(call, exc, match):
    """Each bad input gives a ConvMatError (TypeError for a wrong signature) naming the
    parameter and the value, never a raw internal error or a silent result."""
    with pytest.raises(exc, match=match):
        call()


# --- edge inputs that are not errors: each is computed, and exactly -----------------------------

X2 = torch.randn(2, 2, 5, 5, dtype=torch.float64)
WD = torch.randn(4, 2, 3, 3, dtype=torch.float64)


def _flat_apply(W, x):
    flat = x.reshape(x.shape[0], -1)
    return flat @ W.T if W.layout == torch.strided else (W @ flat.T.contiguous()).T


@pytest.mark.parametrize("layout", [torch.strided, torch.sparse_coo, torch.sparse_csr], ids=str)
def test_weight_that_requires_grad(layout):
    w = WD.clone().requires_grad_()
    W = conv_matrix(w, 5, padding=1, layout=layout)
    y = _flat_apply(W, X2)
    torch.testing.assert_close(y, F.conv2d(X2, WD, padding=1).flatten(1), rtol=0, atol=1e-12)
    y.sum().backward()
    w2 = WD.clone().requires_grad_()
    F.conv2d(X2, w2, padding=1).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", [torch.strided, torch.sparse_coo, torch.sparse_csr], ids=str)
def test_meta_weight_gives_a_meta_matrix(layout):
    W = conv_matrix(WD.to("meta"), 5, padding=1, layout=layout)
    assert W.device.type == "meta" and W.shape == (100, 50) and W.layout == layout
    W = conv_transpose_matrix(WD.to("meta"), 5, stride=2)
    assert W.device.type == "meta" and W.shape == (2 * 11 * 11, 4 * 25)
    W = to_matrix(nn.Conv2d(2, 4, 3, device="meta"), 5)
    assert W.device.type == "meta" and W.shape == (4 * 9, 2 * 25)


@pytest.mark.parametrize("layout", [torch.strided, torch.sparse_coo, torch.sparse_csr], ids=str)
def test_complex_weight_is_exact(layout):
    w = torch.randn(4, 2, 3, 3, dtype=torch.complex128)
    x = torch.randn(2, 2, 5, 5, dtype=torch.complex128)
    W = conv_matrix(w, 5, padding=1, layout=layout)
    torch.testing.assert_close(
        _flat_apply(W, x), F.conv2d(x, w, padding=1).flatten(1), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8], ids=str)
def test_integer_weight_is_exact(dtype):
    w = torch.randint(-3, 4, (4, 2, 3, 3))
    W = conv_matrix(w.to(dtype), 5, padding=1)
    assert W.dtype == dtype
    expected = conv_matrix(w.double(), 5, padding=1)
    assert torch.equal(W.double(), expected)


@pytest.mark.parametrize("stride", [2**63, 2**64 + 3, -(2**63) - 1])
def test_stride_beyond_int64_is_refused(stride):
    """torch refuses stride=2**63 ("Overflow when unpacking long long"); so does convmat,
    naming the parameter, everywhere a stride is taken."""
    for call in (
        lambda: conv_matrix(WD, 5, stride=stride, padding=1),
        lambda: conv_output_size(5, 3, stride=stride),
        lambda: same_padding(5, 3, stride=stride),
    ):
        with pytest.raises(ConvMatError, match=r"stride must fit in a 64-bit integer"):
            call()


def test_largest_int64_stride_is_one_window():
    """The largest stride torch takes: one window per dimension, exactly."""
    W = conv_matrix(WD, 5, stride=2**63 - 1, padding=1)
    assert torch.equal(W, conv_matrix(WD, 5, stride=7, padding=1))


@pytest.mark.parametrize(
    "size", [[5, 5], torch.Size([5, 5]), torch.tensor(5), (torch.tensor(5), 5)], ids=repr
)
def test_integer_like_sizes(size):
    assert torch.equal(conv_matrix(WD, size, padding=1), conv_matrix(WD, 5, padding=1))
