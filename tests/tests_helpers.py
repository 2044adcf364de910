"""Helpers shared by the layer tests."""

from __future__ import annotations

from .reference import MODULE, MODULE_T


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
