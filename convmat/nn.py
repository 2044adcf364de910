"""``convmat.nn``: the matrix layers (``convmat.nn.MatrixConv2d``, ...; see
:mod:`convmat.layers.nn`) and :func:`spectral_norm`, the true-operator spectral normalisation
(see :mod:`convmat.analysis.normalize`, imported on first use)."""

from typing import Any

from .layers.nn import *  # noqa: F403
from .layers.nn import __all__ as _layers

__all__ = [*_layers, "spectral_norm"]  # noqa: F405 (spectral_norm: by __getattr__)


def __getattr__(name: str) -> Any:
    if name == "spectral_norm":
        from .analysis import spectral_norm

        return spectral_norm
    raise AttributeError(f"module 'convmat.nn' has no attribute {name!r}")
