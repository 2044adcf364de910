"""The analysis: the matrix-free operator and its adjoint, singular values and operator norms,
Lipschitz reports. Built on the engine, :mod:`convmat.matrix` and the layers.

The names below are the package's interface; the other packages use only these (a contract in
``pyproject.toml``, checked by ``tests/test_layers_contract.py``).
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

#: Where each name of the interface lives; imported on first use.
_WHERE = {
    "ConvOperator": ".operator",
    "ConvSpectralNorm": ".normalize",
    "LayerNorm": ".lipschitz",
    "LipschitzReport": ".lipschitz",
    "NormResult": ".spectral",
    "dottest": ".operator",
    "layer_calls": ".lipschitz",
    "lipschitz_report": ".lipschitz",
    "operator_norm": ".spectral",
    "singular_values": ".spectral",
    "spectral_norm": ".normalize",
}

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)

if TYPE_CHECKING:
    from .lipschitz import LayerNorm, LipschitzReport, layer_calls, lipschitz_report
    from .normalize import ConvSpectralNorm, spectral_norm
    from .operator import ConvOperator, dottest
    from .spectral import NormResult, operator_norm, singular_values

__all__ = [
    "ConvOperator",
    "ConvSpectralNorm",
    "LayerNorm",
    "LipschitzReport",
    "NormResult",
    "dottest",
    "layer_calls",
    "lipschitz_report",
    "operator_norm",
    "singular_values",
    "spectral_norm",
]
