"""Helpers shared by the layer and Lipschitz tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .reference import MODULE, MODULE_T


def jac(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Jacobian of ``model`` (eval mode, float64 copy) at one input ``x`` (no batch)."""
    f = copy.deepcopy(model).double().eval()
    j = torch.autograd.functional.jacobian(lambda v: f(v[None]).reshape(-1), x.double())
    return j.reshape(-1, x.numel())


def jnorm(model: nn.Module, x: torch.Tensor) -> float:
    """The spectral norm of :func:`jac`."""
    return float(torch.linalg.matrix_norm(jac(model, x), ord=2))


def layer_for(cfg, dtype, bias):
    """The torch layer of a drawn configuration (symmetric padding forms only)."""
    common = dict(
        stride=cfg.stride, dilation=cfg.dilation, groups=cfg.groups, bias=bias, dtype=dtype
    )
    if cfg.transposed:
        pad = tuple(b for b, _ in cfg.pairs)
        return MODULE_T[cfg.ndim](
            cfg.in_channels,
            cfg.out_channels,
            cfg.kernel_size,
            padding=pad,
            output_padding=cfg.output_padding,
            **common,
        )
    pad = cfg.padding if isinstance(cfg.padding, str) else tuple(b for b, _ in cfg.pairs)
    return MODULE[cfg.ndim](
        cfg.in_channels,
        cfg.out_channels,
        cfg.kernel_size,
        padding=pad,
        padding_mode=cfg.padding_mode,
        **common,
    )
