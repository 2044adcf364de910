"""Bad input to the analysis functions: a clear error (type, message naming the argument and
the value) before any LAPACK call or large allocation, never a raw internal one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convmat import (
    ConvMatError,
    ConvOperator,
    dottest,
    lipschitz_report,
    operator_norm,
    singular_values,
)

W = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def with_value(value: float) -> torch.Tensor:
    w = W.clone()
    w[0, 1, 1, 1] = value
    return w


class StdConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight - self.weight.mean()) / self.weight.std()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Conv2dSame(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return F.conv2d(F.pad(x, [0, 1, 0, 1]), weight, bias, self.stride)


OP = ConvOperator(W, (5, 5), padding=1)
INF, NAN = float("inf"), float("nan")

CASES = [
    # (call, error type, message pattern)
    (lambda: operator_norm(with_value(INF), (8, 8), padding=1), ConvMatError,
     r"the weight must be finite, got a weight holding inf"),
    (lambda: operator_norm(with_value(NAN), (8, 8), padding=1), ConvMatError,
     r"the weight must be finite, got a weight holding NaN"),
    (lambda: operator_norm(with_value(-INF), (80, 80), padding=1, method="lanczos"),
     ConvMatError, r"must be finite, got a weight holding inf"),
    (lambda: singular_values(with_value(INF), (8, 8), padding=1), ConvMatError,
     r"must be finite, got a weight holding inf"),
    (lambda: singular_values(with_value(NAN), (8, 8), padding=1, padding_mode="circular"),
     ConvMatError, r"must be finite, got a weight holding NaN"),
    (lambda: singular_values(with_value(NAN), (8, 8), k=1, method="lanczos"), ConvMatError,
     r"must be finite, got a weight holding NaN"),
    (lambda: operator_norm(W, (8, 8), tol=NAN), ConvMatError,
     r"tol must be a number with 0 < tol < 1, got nan"),
    (lambda: operator_norm(W, (8, 8), tol=0), ConvMatError, r"0 < tol < 1, got 0"),
    (lambda: operator_norm(W, (8, 8), tol=-1e-3), ConvMatError, r"0 < tol < 1, got -0.001"),
    (lambda: operator_norm(W, (8, 8), tol=True), ConvMatError, r"0 < tol < 1, got True"),
    (lambda: operator_norm(W, (8, 8), tol="1e-7"), ConvMatError, r"0 < tol < 1, got '1e-7'"),
    (lambda: operator_norm(W, (8, 8), tol=1.5), ConvMatError, r"0 < tol < 1, got 1.5"),
    (lambda: singular_values(W, (8, 8), k=True), ConvMatError,
     r"k must be an int between 1 and 72 \(or None\), got True"),
    (lambda: singular_values(W, (8, 8), k=1.5), ConvMatError, r"k must be an int .*got 1.5"),
    (lambda: singular_values(W, (8, 8), k=0), ConvMatError, r"k must be an int .*got 0"),
    (lambda: singular_values(W, (8, 8), k="2"), ConvMatError, r"k must be an int .*got '2'"),
    (lambda: singular_values(W, (8, 8), k=73), ConvMatError, r"between 1 and 72 .*got 73"),
    (lambda: operator_norm(W.to(torch.complex128), (8, 8)), ConvMatError,
     r"the spectral functions take real weights, got dtype torch.complex128"),
    (lambda: singular_values(W.to(torch.complex64), (8, 8)), ConvMatError,
     r"real weights, got dtype torch.complex64"),
    (lambda: operator_norm(W.to(torch.float8_e4m3fn), (8, 8)), ConvMatError,
     r"weight must have a dtype torch's convolutions compute in \(not float8\)"),
    (lambda: singular_values(W.to(torch.float8_e5m2), (8, 8)), ConvMatError,
     r"not float8\), got float8_e5m2"),
    (lambda: operator_norm(StdConv2d(2, 2, 3), (8, 8)), ConvMatError,
     r"module \(StdConv2d\) overrides forward, so it may not compute the convolution"),
    (lambda: singular_values(Conv2dSame(2, 2, 3), (8, 8)), ConvMatError,
     r"module \(Conv2dSame\) overrides _conv_forward"),
    (lambda: operator_norm(nn.Linear(3, 2), (8, 8)), ConvMatError,
     r"module \(Linear\) is not a convolution layer"),
    (lambda: operator_norm(nn.LazyConv2d(2, 3), (8, 8)), ConvMatError,
     r"module \(LazyConv2d\) has uninitialised parameters"),
    (lambda: operator_norm(nn.Conv2d(2, 2, 3, device="meta"), (8, 8)), ConvMatError,
     r"need the weight's values, got a weight on the meta device"),
    (lambda: operator_norm([[1.0]], 8), TypeError,
     r"source must be a weight tensor, a convolution module or a ConvOperator, got list"),
    (lambda: operator_norm(W, (8, 8), method="svd"), ConvMatError,
     r"method must be one of \('auto', 'fft', 'dense', 'lanczos'\), got 'svd'"),
    (lambda: operator_norm(W, (8, 8), padding=1, method="fft"), ConvMatError,
     r"method='fft' does not apply: the fft method needs circular padding"),
    (lambda: operator_norm(OP, (8, 8)), ConvMatError,
     r"a ConvOperator carries its own input_size"),
    (lambda: operator_norm(nn.Conv1d(1, 1, 3), 6, flip=True), ConvMatError,
     r"a module carries its own configuration; got \['flip'\] as well"),
    (lambda: singular_values(nn.Conv1d(1, 1, 3), 6, stride=2, padding=1), ConvMatError,
     r"a module carries its own configuration; got \['padding', 'stride'\]"),
    (lambda: singular_values(W, (8, 8), method="lanczos"), ConvMatError,
     r"method='lanczos' finds the top k < 72 singular values .*got k=None"),
    (lambda: OP @ torch.zeros(50), ConvMatError,
     r"x must have the operator's dtype torch.float64, got torch.float32"),
    (lambda: OP @ torch.zeros(50, dtype=torch.long), ConvMatError, r"got torch.int64"),
    (lambda: OP @ torch.zeros(0, dtype=torch.float64), ConvMatError,
     r"x must have shape \(50,\), \(B, 50\) or \(B, \*\(2, 5, 5\)\), got \(0,\)"),
    (lambda: OP @ [0.0] * 50, TypeError, r"op @ x needs x to be a torch.Tensor, got list"),
    (lambda: OP @ None, TypeError, r"got NoneType"),
    (lambda: dottest(W), TypeError, r"dottest needs op to be a ConvOperator, got Tensor"),
    (lambda: dottest(OP.to(torch.long)), ConvMatError,
     r"dottest needs a floating-point or complex weight, got torch.int64"),
    (lambda: OP.with_weight(W[:1]), ConvMatError,
     r"weight must have shape \(2, 2, 3, 3\) for this operator, got \(1, 2, 3, 3\)"),
    (lambda: ConvOperator.from_geometry(W, "geometry"), ConvMatError,
     r"geometry must be a Geometry, got str"),
    (lambda: lipschitz_report(nn.Sequential(nn.Conv2d(1, 1, 3)), (1, 8, 8), tol=0), ConvMatError,
     r"tol must be a number with 0 < tol < 1, got 0"),
    (lambda: lipschitz_report(nn.Sequential(nn.Conv2d(1, 1, 3)), (1, 8, 8), method="exact"),
     ConvMatError, r"method must be one of"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, message", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_clear_errors(call, error, message, capfd):
    with pytest.raises(error, match=message):
        call()
    # Nothing printed by LAPACK (MKL printed DLASCL for non-finite weights).
    assert capfd.readouterr().out == ""


def test_table_is_large_enough():
    assert len(CASES) >= 20


def test_empty_batch_gives_an_empty_result():
    for op in (OP, OP.T):
        x = torch.zeros(0, op.shape[1], dtype=torch.float64)
        assert (op @ x).shape == (0, op.shape[0])
        assert (op @ x.reshape(0, *op.in_shape)).shape == (0, *op.out_shape)
