"""The one error type of the package."""

from __future__ import annotations

__all__ = ["ConvMatError"]


class ConvMatError(ValueError):
    """A configuration that PyTorch would reject or that makes no sense.

    The message names the parameter, the bad value and what is allowed.
    It is raised before anything large is allocated.
    """
