"""convmat: the exact matrix of every convolution PyTorch can run.

>>> import torch, convmat
>>> W = convmat.conv_matrix(torch.ones(1, 1, 3), 4)
>>> W.shape
torch.Size([2, 4])
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes

__version__ = "0.1.0"

#: Which package's interface gives each public name; imported on first use (``import convmat``
#: stays light). ``symbolic`` is read from its module, whose name it shares (see
#: :mod:`convmat.presentation`).
_WHERE = {
    "ConvMatError": "._errors",
    "ConvOperator": ".analysis",
    "LayerNorm": ".analysis",
    "LipschitzReport": ".analysis",
    "NormResult": ".analysis",
    "SymbolicMatrix": ".presentation",
    "animate": ".presentation",
    "cache_budget": ".engine",
    "cache_info": ".engine",
    "clear_cache": ".engine",
    "conv2d_as_conv1d": ".matrix",
    "conv_matrix": ".matrix",
    "conv_output_size": ".engine",
    "conv_transpose_matrix": ".matrix",
    "conv_transpose_output_size": ".engine",
    "dottest": ".analysis",
    "lipschitz_report": ".analysis",
    "operator_norm": ".analysis",
    "plot_matrix": ".presentation",
    "same_padding": ".engine",
    "set_cache_budget": ".engine",
    "singular_values": ".analysis",
    "spectral_norm": ".analysis",
    "symbolic": ".presentation.symbolic",
    "to_linear": ".layers",
    "to_matrix": ".matrix",
    "to_mlp": ".layers",
}

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)

if TYPE_CHECKING:  # what IDEs and type checkers see
    from ._errors import ConvMatError
    from .analysis import (
        ConvOperator,
        LayerNorm,
        LipschitzReport,
        NormResult,
        dottest,
        lipschitz_report,
        operator_norm,
        singular_values,
        spectral_norm,
    )
    from .engine import (
        cache_budget,
        cache_info,
        clear_cache,
        conv_output_size,
        conv_transpose_output_size,
        same_padding,
        set_cache_budget,
    )
    from .layers import to_linear, to_mlp
    from .matrix import conv2d_as_conv1d, conv_matrix, conv_transpose_matrix, to_matrix
    from .presentation import SymbolicMatrix, animate, plot_matrix
    from .presentation.symbolic import symbolic


__all__ = [
    "ConvMatError",
    "ConvOperator",
    "LayerNorm",
    "LipschitzReport",
    "NormResult",
    "SymbolicMatrix",
    "__version__",
    "animate",
    "cache_budget",
    "cache_info",
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
    "set_cache_budget",
    "singular_values",
    "spectral_norm",
    "symbolic",
    "to_linear",
    "to_matrix",
    "to_mlp",
]
