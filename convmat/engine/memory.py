"""The memory guard: how much can still be allocated, checked before every large allocation."""

from __future__ import annotations

import os

import torch

from .._errors import ConvMatError

__all__ = ["available_memory", "check_allocation", "total_memory"]


def total_memory() -> int | None:
    """Bytes of memory of this machine, or None where that is unknown."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``, or None where that is unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(nbytes: int, device: torch.device, what: str, instead: str = "") -> None:
    """Raise :class:`ConvMatError` before allocating ``nbytes`` that do not fit on ``device``.

    Args:
        nbytes: the bytes about to be allocated.
        device: where.
        what: what they are for (``"a dense W of shape (10, 10) and dtype torch.float32"``).
        instead: what to do instead, appended to the message.
    """
    free = available_memory(device)
    if free is not None and nbytes > free:
        hint = f"; {instead}" if instead else ""
        raise ConvMatError(
            f"{what} needs {nbytes:,} bytes, more than the {free:,} bytes available on "
            f"{device}{hint}"
        )
