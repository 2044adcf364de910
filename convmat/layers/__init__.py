"""The layers: matrix-form twins of torch's convolutions, the one-signal ``Conv1D``, and
convolutions as ``nn.Linear`` (:func:`to_linear`, :func:`to_mlp`). Built on the engine and
:mod:`convmat.matrix`; nothing here imports the analysis or the presentation.

The names below are the package's interface; the other packages use only these (a contract in
``pyproject.toml``, checked by ``tests/test_layers_contract.py``).
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

#: Where each name of the interface lives; imported on first use.
_WHERE = {
    "Conv1D": ".nn",
    "LayerLayout": ".nn",
    "MatrixConv1d": ".nn",
    "MatrixConv2d": ".nn",
    "MatrixConv3d": ".nn",
    "MatrixConvTranspose1d": ".nn",
    "MatrixConvTranspose2d": ".nn",
    "MatrixConvTranspose3d": ".nn",
    "Pad": ".nn",
    "SparseLinear": ".linear",
    "to_linear": ".linear",
    "to_mlp": ".linear",
}

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)

if TYPE_CHECKING:
    from .linear import SparseLinear, to_linear, to_mlp
    from .nn import (
        Conv1D,
        LayerLayout,
        MatrixConv1d,
        MatrixConv2d,
        MatrixConv3d,
        MatrixConvTranspose1d,
        MatrixConvTranspose2d,
        MatrixConvTranspose3d,
        Pad,
    )

__all__ = [
    "Conv1D",
    "LayerLayout",
    "MatrixConv1d",
    "MatrixConv2d",
    "MatrixConv3d",
    "MatrixConvTranspose1d",
    "MatrixConvTranspose2d",
    "MatrixConvTranspose3d",
    "Pad",
    "SparseLinear",
    "to_linear",
    "to_mlp",
]
