"""Type aliases shared by the public API."""

from __future__ import annotations

from typing import Literal

__all__ = ["IntOrTuple", "PaddingArg", "PaddingMode", "Pads"]

#: An int applied to every spatial dimension, or one int per dimension.
IntOrTuple = int | tuple[int, ...]

#: ``(before, after)`` zero counts, one pair per spatial dimension.
Pads = tuple[tuple[int, int], ...]

#: Every padding form: an int, one int per dimension, ``"valid"``, ``"same"``,
#: or one ``(before, after)`` pair per dimension.
PaddingArg = int | tuple[int, ...] | tuple[tuple[int, int], ...] | Literal["valid", "same"]

#: How the padded border is filled, as in ``nn.Conv{N}d(padding_mode=...)``: the names of the
#: engine's registry ``convmat.engine.PADDING_MODES``, in its order (a test checks they agree).
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
