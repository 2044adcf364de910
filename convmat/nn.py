"""The matrix layers (``convmat.nn.MatrixConv2d``, ...): see :mod:`convmat.layers.nn`."""

from .layers.nn import *  # noqa: F403
from .layers.nn import __all__  # noqa: F401
