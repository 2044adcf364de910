"""Padding modes as objects: each owns its index map, its rule on sizes and its name in torch.

A padding mode answers one question for every other module: which real input position does a
position of the padded input read (or none, for zeros)? The pattern of W, the matrix-free
operator and the spectral bound all ask :meth:`PaddingMode.source`; adding a mode is one new
subclass registered in :data:`PADDING_MODES`, plus its tests.

>>> import torch
>>> PADDING_MODES["reflect"].source(torch.arange(-2, 6), 4)
(tensor([2, 1, 0, 1, 2, 3, 2, 1]), None)
>>> PADDING_MODES["zeros"].source(torch.arange(-1, 5), 4)[1]
tensor([False,  True,  True,  True,  True, False])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._errors import ConvMatError
from .axes import most_reads

if TYPE_CHECKING:
    import torch

__all__ = ["PADDING_MODES", "PaddingMode", "padding_mode"]


class PaddingMode:
    """How the border of the padded input is filled.

    Attributes:
        name: the ``padding_mode`` string of ``nn.Conv{N}d``.
        torch_pad_mode: the ``mode`` of ``torch.nn.functional.pad``.
        folds: padded positions read real inputs (their taps add onto those inputs in W).
        label: its name in prose, before "padding" (``"zero padding"``).
        periodic: the padded input repeats the input (a convolution with it is circular).
    """

    name: str = ""
    label: str = ""
    torch_pad_mode: str = ""
    folds: bool = True
    periodic: bool = False

    def source(self, position: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The real input position each padded ``position`` reads (``-before .. size+after``),
        and where it reads anything at all (``None``: everywhere)."""
        raise NotImplementedError

    def check(self, size: int, before: int, after: int, dim: int, raw: object) -> None:
        """Raise :class:`ConvMatError` if torch refuses these pads for an input of ``size``."""

    def copies(self, size: int, before: int, after: int) -> int:
        """The most times any real input appears in the padded input (the square of the
        padding's operator norm)."""
        import torch  # here: the shape rules need no torch

        p, valid = self.source(torch.arange(-before, size + after), size)
        return most_reads(p if valid is None else p[valid], size)

    def __repr__(self) -> str:
        return f"PaddingMode({self.name!r})"


class _Zeros(PaddingMode):
    name, torch_pad_mode, folds, label = "zeros", "constant", False, "zero"

    def source(self, position: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return position, (position >= 0) & (position < size)


class _Reflect(PaddingMode):
    name = torch_pad_mode = label = "reflect"

    def source(self, position: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = position.abs()
        return (2 * (size - 1) - p).where(p >= size, p), None

    def check(self, size: int, before: int, after: int, dim: int, raw: object) -> None:
        if max(before, after) >= size:
            raise ConvMatError(
                f"reflect padding must be smaller than the input in every dimension, got "
                f"padding={raw!r} for input size {size} in dimension {dim}"
            )


class _Replicate(PaddingMode):
    name = torch_pad_mode = label = "replicate"

    def source(self, position: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return position.clamp(0, size - 1), None


class _Circular(PaddingMode):
    name = torch_pad_mode = label = "circular"
    periodic = True

    def source(self, position: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return position % size, None

    def check(self, size: int, before: int, after: int, dim: int, raw: object) -> None:
        if max(before, after) > size:
            raise ConvMatError(
                f"circular padding must be at most the input size in every dimension (it may "
                f"wrap around once), got padding={raw!r} for input size {size} in dimension {dim}"
            )


#: Every padding mode by its ``padding_mode`` name, in torch's order.
PADDING_MODES: dict[str, PaddingMode] = {
    m.name: m for m in (_Zeros(), _Reflect(), _Replicate(), _Circular())
}


def padding_mode(name: object) -> PaddingMode:
    """The padding mode called ``name``; :class:`ConvMatError` for an unknown one.

    >>> padding_mode("circular").torch_pad_mode
    'circular'
    """
    mode = PADDING_MODES.get(name) if isinstance(name, str) else None
    if mode is None:
        raise ConvMatError(f"padding_mode must be one of {tuple(PADDING_MODES)!r}, got {name!r}")
    return mode
