"""convmat: the exact matrix of every convolution PyTorch can run.

>>> import torch, convmat
>>> W = convmat.conv_matrix(torch.ones(1, 1, 3), 4)
>>> W.shape
torch.Size([2, 4])
"""

from ._errors import ConvMatError
from ._pattern import clear_cache
from .linear import to_linear, to_mlp
from .lipschitz import LayerNorm, LipschitzReport, lipschitz_report
from .matrix import conv2d_as_conv1d, conv_matrix, conv_transpose_matrix, to_matrix
from .operator import ConvOperator, dottest
from .plotting import animate, plot_matrix
from .shapes import conv_output_size, conv_transpose_output_size, same_padding
from .spectral import NormResult, operator_norm, singular_values
from .symbolic import SymbolicMatrix, symbolic

__version__ = "0.1.0"

__all__ = [
    "ConvMatError",
    "ConvOperator",
    "LayerNorm",
    "LipschitzReport",
    "NormResult",
    "SymbolicMatrix",
    "__version__",
    "animate",
    "clear_cache",
    "conv2d_as_conv1d",
    "conv_matrix",
    "conv_output_size",
    "conv_transpose_matrix",
    "conv_transpose_output_size",
    "dottest",
    "lipschitz_report",
    "operator_norm",
    "plot_matrix",
    "same_padding",
    "singular_values",
    "symbolic",
    "to_linear",
    "to_matrix",
    "to_mlp",
]
