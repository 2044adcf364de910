"""Convolutions as ``nn.Linear`` layers."""

from __future__ import annotations

import torch
from torch import nn

from ._typing import IntOrTuple
from .matrix import to_matrix

__all__ = ["to_linear"]


def to_linear(module: nn.Module, input_size: IntOrTuple) -> nn.Linear:
    """An ``nn.Linear`` computing exactly what a conv or transposed conv layer computes on
    inputs of spatial size ``input_size``: ``linear(x.flatten(1)) == module(x).flatten(1)``.

    The weight is the dense W (a copy, detached from the module); the bias is the layer's bias
    repeated over the output positions.

    Args:
        module: an ``nn.Conv{1,2,3}d`` or ``nn.ConvTranspose{1,2,3}d``.
        input_size: spatial size of one input.

    Returns:
        ``nn.Linear(C_in * prod(input_size), C_out * prod(out))`` on the module's device and dtype.

    Shape:
        ``(B, C_in * prod(input_size)) -> (B, C_out * prod(out))``

    >>> conv = nn.Conv2d(2, 3, 3, padding=1)
    >>> lin = to_linear(conv, (5, 5))
    >>> x = torch.randn(4, 2, 5, 5)
    >>> torch.allclose(lin(x.flatten(1)), conv(x).flatten(1), atol=1e-6)
    True
    """
    with torch.no_grad():
        W = to_matrix(module, input_size)
        rows, cols = W.shape
        weight = module.weight
        linear = nn.Linear(
            cols, rows, bias=module.bias is not None, device=weight.device, dtype=weight.dtype
        )
        linear.weight.copy_(W)
        if module.bias is not None:
            linear.bias.copy_(module.bias.repeat_interleave(rows // module.bias.numel()))
    return linear
