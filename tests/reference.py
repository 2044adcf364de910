"""Independent references (torch's own convolutions) and hypothesis strategies for the tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MODULE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MODULE_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
LAYOUTS = [torch.strided, torch.sparse_coo, torch.sparse_csr]
MODES = ["zeros", "reflect", "replicate", "circular"]


@dataclass
class Config:
    """One convolution (or transposed convolution) drawn for a test."""

    ndim: int
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    input_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: object  # any form the public API accepts
    pairs: tuple[tuple[int, int], ...]  # the same padding as (before, after) pairs
    padding_mode: str = "zeros"
    output_padding: tuple[int, ...] = ()
    transposed: bool = False
    kwargs: dict = field(default_factory=dict)

    def weight(self, dtype=torch.float64, integer=False, generator=None):
        lead = (
            (self.in_channels, self.out_channels // self.groups)
            if self.transposed
            else (
                self.out_channels,
                self.in_channels // self.groups,
            )
        )
        shape = (*lead, *self.kernel_size)
        if integer:
            return torch.randint(-4, 5, shape, generator=generator).to(dtype)
        return torch.randn(shape, dtype=dtype, generator=generator)

    def input(self, batch=3, dtype=torch.float64, integer=False, generator=None):
        shape = (batch, self.in_channels, *self.input_size)
        if integer:
            return torch.randint(-4, 5, shape, generator=generator).to(dtype)
        return torch.randn(shape, dtype=dtype, generator=generator)

    def matrix_kwargs(self):
        kw = dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups
        )
        if self.transposed:
            kw["output_padding"] = self.output_padding
        else:
            kw["padding_mode"] = self.padding_mode
        return kw


def flat_pads(pairs):
    """``(before, after)`` pairs in the last-dim-first order that ``F.pad`` takes."""
    return [v for pair in reversed(pairs) for v in pair]


def reference(cfg: Config, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """torch's own result for ``cfg``: ``nn.Conv*d`` where it takes the padding form as given,
    otherwise ``F.pad`` then an unpadded ``F.conv*d`` (or, transposed, crop the unpadded output)."""
    n = cfg.ndim
    if cfg.transposed:
        if isinstance(cfg.padding, str) or all(b == a for b, a in cfg.pairs):
            pad = 0 if cfg.padding == "valid" else tuple(b for b, _ in cfg.pairs)
            return CONV_T[n](
                x,
                weight,
                stride=cfg.stride,
                padding=pad,
                output_padding=cfg.output_padding,
                groups=cfg.groups,
                dilation=cfg.dilation,
            )
        full = CONV_T[n](x, weight, stride=cfg.stride, groups=cfg.groups, dilation=cfg.dilation)
        full = F.pad(full, flat_pads([(0, op) for op in cfg.output_padding]))
        index = [slice(None), slice(None)]
        for size, (before, after) in zip(full.shape[2:], cfg.pairs):
            index.append(slice(before, size - after))
        return full[tuple(index)]
    symmetric = isinstance(cfg.padding, str) or all(b == a for b, a in cfg.pairs)
    if symmetric:
        layer = MODULE[n](
            cfg.in_channels,
            cfg.out_channels,
            cfg.kernel_size,
            stride=cfg.stride,
            padding=cfg.padding if isinstance(cfg.padding, str) else tuple(b for b, _ in cfg.pairs),
            dilation=cfg.dilation,
            groups=cfg.groups,
            bias=False,
            padding_mode=cfg.padding_mode,
            dtype=weight.dtype,
        )
        return torch.func.functional_call(layer, {"weight": weight}, (x,))
    mode = "constant" if cfg.padding_mode == "zeros" else cfg.padding_mode
    xp = F.pad(x, flat_pads(cfg.pairs), mode=mode)
    return CONV[n](xp, weight, stride=cfg.stride, dilation=cfg.dilation, groups=cfg.groups)


def apply(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x.flatten(1) @ W.T`` for any layout of W."""
    flat = x.reshape(x.shape[0], -1)
    if W.layout == torch.strided:
        return flat @ W.T
    return (W @ flat.T.contiguous()).T


def _draw_padding(draw, n, form, most):
    """A padding argument of the given form, and the same padding as (before, after) pairs."""
    if form == "valid":
        return ((0, 0),) * n, "valid"
    if form == "int":
        p = draw(st.integers(0, most))
        return ((p, p),) * n, p
    if form == "tuple":
        ps = _sizes(draw, n, 0, most)
        return tuple((p, p) for p in ps), ps
    pairs = tuple((draw(st.integers(0, most)), draw(st.integers(0, most))) for _ in range(n))
    return pairs, pairs


def _sizes(draw, n, lo, hi):
    return tuple(draw(st.integers(lo, hi)) for _ in range(n))


@st.composite
def conv_configs(draw, dims=(1, 2, 3), modes=tuple(MODES)):
    """A convolution torch accepts, with any padding form and mode."""
    n = draw(st.sampled_from(dims))
    big = {1: 4, 2: 3, 3: 2}[n]
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    k = _sizes(draw, n, 1, big + 1)
    d = _sizes(draw, n, 1, big)
    mode = draw(st.sampled_from(modes))
    form = draw(st.sampled_from(["int", "tuple", "pairs", "same", "valid"]))
    s = (1,) * n if form == "same" else _sizes(draw, n, 1, big)
    if form == "same":
        pairs = tuple(
            ((dd * (kk - 1)) // 2, dd * (kk - 1) - (dd * (kk - 1)) // 2) for kk, dd in zip(k, d)
        )
        padding = "same"
    else:
        pairs, padding = _draw_padding(draw, n, form, 3)
    sizes = []
    for kk, dd, (b, a) in zip(k, d, pairs):
        lo = max(1, dd * (kk - 1) + 1 - b - a)
        if mode == "reflect":
            lo = max(lo, b + 1, a + 1)
        if mode == "circular":
            lo = max(lo, b, a)
        sizes.append(draw(st.integers(lo, lo + {1: 6, 2: 4, 3: 2}[n])))
    return Config(n, cin, cout, groups, k, tuple(sizes), s, d, padding, pairs, mode)


@st.composite
def conv_transpose_configs(draw, dims=(1, 2, 3), asymmetric=True):
    """A transposed convolution torch accepts (asymmetric pairs computed by cropping)."""
    n = draw(st.sampled_from(dims))
    big = {1: 4, 2: 3, 3: 2}[n]
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    k = _sizes(draw, n, 1, big + 1)
    s = _sizes(draw, n, 1, big)
    d = _sizes(draw, n, 1, big)
    op = tuple(draw(st.integers(0, max(ss, dd) - 1)) for ss, dd in zip(s, d))
    form = draw(st.sampled_from(["int", "tuple", "valid"] + (["pairs"] if asymmetric else [])))
    pairs, padding = _draw_padding(draw, n, form, 2)
    i = _sizes(draw, n, 1, {1: 6, 2: 4, 3: 3}[n])
    out = [
        (ii - 1) * ss - b - a + dd * (kk - 1) + o + 1
        for ii, ss, (b, a), dd, kk, o in zip(i, s, pairs, d, k, op)
    ]
    assume(all(o >= 1 for o in out))
    return Config(n, cin, cout, groups, k, i, s, d, padding, pairs, "zeros", op, transposed=True)
