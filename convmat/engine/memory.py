"""The memory guard: how much can still be allocated, checked before every large allocation.

On the CPU the bytes that can still be allocated are the smallest of:

- ``MemAvailable`` of ``/proc/meminfo`` (the machine);
- the cgroup's limit less its usage (containers, CI): cgroup v2 ``memory.max`` minus
  ``memory.current`` (``"max"`` is no limit), cgroup v1 ``memory.limit_in_bytes`` minus
  ``memory.usage_in_bytes``, for the process's cgroup and every cgroup above it. Page cache the
  kernel can drop (``inactive_file`` of ``memory.stat``) is not counted as used, as in
  ``docker stats``;
- the process's rlimits: ``RLIMIT_AS`` minus its virtual size (``ulimit -v``) and ``RLIMIT_DATA``
  minus its data size (``ulimit -d``), where set.

On CUDA it is the driver's free memory plus what torch's caching allocator holds unused. The meta
device allocates nothing and has no limit.

What the cache holds is real memory, already counted as used by every figure above, so it is not
subtracted a second time; it can however be given back. When an allocation does not fit,
:func:`check_allocation` first drops least recently used cache entries on that device (as many as
the shortfall) and measures again; only then does it refuse. The cache's own growth needs no
reserve: everything it keeps was built by an allocation that passed this guard.

Allocations below :data:`SMALL` are not checked (reading the limits costs a few file reads).

The analysis runs a model's forward pass, or forms chunks of Gram matrices, again and again at the
same sizes. With glibc every tensor above the ``mmap`` threshold (128 KiB, raised as large chunks
are freed up to 32 MiB) is a fresh ``mmap`` whose pages the kernel zeroes on first touch and takes
back when it is freed: a U-Net's forward pass at 3x512x512 spent a third of its CPU time there.
:func:`kept_pages` serves such tensors from the heap instead and keeps their pages for the next;
the free pages are given back on leaving, and before the limits are read inside it (freed pages
still count as used).

>>> check_allocation(10 * 2**60, torch.device("cpu"), "an example")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
convmat._errors.ConvMatError: an example needs 11,529,215,046,068,469,760 bytes, more than ...
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .._errors import ConvMatError

__all__ = [
    "SMALL",
    "MemoryLimit",
    "available_memory",
    "check_allocation",
    "format_bytes",
    "kept_pages",
    "memory_limit",
    "memory_limits",
    "total_memory",
]

#: Allocations of fewer bytes are not checked.
SMALL = 2**23

#: Cgroup v1 writes "no limit" as a page-rounded 2**63 - 1; anything this large is no limit.
_NO_LIMIT = 2**62

_CGROUP_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class MemoryLimit:
    """Bytes that can still be allocated under one limit, and which limit it is.

    Attributes:
        nbytes: the bytes left under this limit.
        source: which limit (``"MemAvailable"``, ``"cgroup v2 memory.max"``, ``"RLIMIT_AS"``...).
    """

    nbytes: int
    source: str


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (``"1.5 GiB"``).

    >>> format_bytes(3 * 2**29), format_bytes(512)
    ('1.5 GiB', '512 B')
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} EiB"


# -- readers (one place, replaced by the tests) ----------------------------------------------
def _read(path: str) -> str | None:
    """The text of ``path``, or None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _rlimit(name: str) -> int | None:
    """The soft limit ``resource.<name>`` in bytes, or None where unlimited or unknown."""
    try:
        import resource
    except ImportError:  # not on every platform
        return None
    which = getattr(resource, name, None)
    if which is None:
        return None
    soft, _ = resource.getrlimit(which)
    return None if soft == resource.RLIM_INFINITY or soft < 0 else int(soft)


def _field_kib(text: str | None, name: str) -> int | None:
    """``name:  123 kB`` of a /proc file, in bytes."""
    for line in (text or "").splitlines():
        if line.startswith(name + ":"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text.strip())
    except ValueError:
        return None


def _stat_field(text: str | None, name: str) -> int:
    """``name value`` of a cgroup ``memory.stat`` (0 when absent)."""
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name and parts[1].isdigit():
            return int(parts[1])
    return 0


def _cgroup_dirs() -> list[tuple[str, str]]:
    """``(version, directory)`` of the process's memory cgroups: its own and every one above it
    (a parent's limit binds too), and the mount's root (a container sees its own cgroup there)."""
    text = _read("/proc/self/cgroup") or ""
    found: list[tuple[str, str]] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            version, base = "v2", _CGROUP_ROOT
        elif "memory" in controllers.split(","):
            version, base = "v1", f"{_CGROUP_ROOT}/memory"
        else:
            continue
        names = [p for p in path.strip().split("/") if p]
        for depth in range(len(names), -1, -1):
            entry = (version, "/".join([base, *names[:depth]]))
            if entry not in found:
                found.append(entry)
    for entry in (("v2", _CGROUP_ROOT), ("v1", f"{_CGROUP_ROOT}/memory")):
        if entry not in found:
            found.append(entry)
    return found


#: The process's limited memory cgroups, ``(version, directory, limit)``, found once (a
#: cgroup's limit is its configuration; its usage is read at every check), with the reader
#: they were found with.
_LIMITED: tuple[object, list[tuple[str, str, int]]] | None = None


def _limited_cgroups() -> list[tuple[str, str, int]]:
    global _LIMITED
    if _LIMITED is None or _LIMITED[0] is not _read:  # a new reader (the tests) looks again
        found = []
        for version, d in _cgroup_dirs():
            name = "memory.max" if version == "v2" else "memory.limit_in_bytes"
            limit = _int(_read(f"{d}/{name}"))  # "max" (no limit) reads as None
            if limit is not None and limit < _NO_LIMIT:
                found.append((version, d, limit))
        _LIMITED = (_read, found)
    return _LIMITED[1]


def _cgroup_limits() -> list[tuple[int, int, str]]:
    """``(limit, used, source)`` of every memory cgroup of the process that sets a limit."""
    out = []
    for version, d, limit in _limited_cgroups():
        if version == "v2":
            used = _int(_read(f"{d}/memory.current"))
            dropped = _stat_field(_read(f"{d}/memory.stat"), "inactive_file")
            source = "cgroup v2 memory.max"
        else:
            used = _int(_read(f"{d}/memory.usage_in_bytes"))
            dropped = _stat_field(_read(f"{d}/memory.stat"), "total_inactive_file")
            source = "cgroup v1 memory.limit_in_bytes"
        out.append((limit, max(0, (used or 0) - dropped), source))
    return out


def _process_sizes() -> tuple[int | None, int | None]:
    """The process's virtual size and data size in bytes (VmSize, VmData)."""
    status = _read("/proc/self/status")
    size, data = _field_kib(status, "VmSize"), _field_kib(status, "VmData")
    if size is None or data is None:
        statm = (_read("/proc/self/statm") or "").split()
        if len(statm) >= 6:
            page = _page_size()
            size = int(statm[0]) * page if size is None else size
            data = int(statm[5]) * page if data is None else data
    return size, data


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


def _physical(name: str) -> int | None:
    try:
        return os.sysconf(name) * _page_size()
    except (ValueError, OSError, AttributeError):
        return None


# -- the limits ------------------------------------------------------------------------------
def memory_limits(device: torch.device | str = "cpu") -> list[MemoryLimit]:
    """Every limit found on what ``device`` can still allocate (empty where none is known).

    >>> all(limit.nbytes >= 0 for limit in memory_limits("cpu"))
    True
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        spare = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return [MemoryLimit(int(free + max(spare, 0)), "CUDA free memory")]
    if device.type != "cpu":
        return []
    _give_back_kept()
    found = []
    meminfo = _field_kib(_read("/proc/meminfo"), "MemAvailable")
    if meminfo is None:
        meminfo = _physical("SC_AVPHYS_PAGES")
    if meminfo is not None:
        found.append(MemoryLimit(meminfo, "MemAvailable"))
    for limit, used, source in _cgroup_limits():
        found.append(MemoryLimit(max(0, limit - used), source))
    caps = {name: _rlimit(name) for name in ("RLIMIT_AS", "RLIMIT_DATA")}
    if any(cap is not None for cap in caps.values()):
        sizes = dict(zip(caps, _process_sizes()))
        for (name, cap), shell in zip(caps.items(), ("-v", "-d")):
            current = sizes[name]
            if cap is not None and current is not None:
                found.append(MemoryLimit(max(0, cap - current), f"{name}, ulimit {shell}"))
    return found


def memory_limit(device: torch.device | str = "cpu") -> MemoryLimit | None:
    """The limit that binds first on ``device`` (the smallest), or None where none is known.

    >>> memory_limit("meta") is None
    True
    """
    found = memory_limits(device)
    return min(found, key=lambda limit: limit.nbytes) if found else None


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``, or None where that is unknown.

    The smallest of the limits of :func:`memory_limits` (see the module documentation).

    >>> available_memory("cpu") > 0
    True
    """
    limit = memory_limit(device)
    return None if limit is None else limit.nbytes


def total_memory() -> int | None:
    """Bytes of memory this process may use in all: the machine's, or less where a cgroup's
    limit or the ``RLIMIT_AS`` / ``RLIMIT_DATA`` rlimits say so; None where nothing is known.

    >>> total_memory() > 0
    True
    """
    found = [_physical("SC_PHYS_PAGES")]
    found += [limit for _, _, limit in _limited_cgroups()]
    found += [_rlimit("RLIMIT_AS"), _rlimit("RLIMIT_DATA")]
    known = [n for n in found if n is not None]
    return min(known) if known else None


def check_allocation(nbytes: int, device: torch.device | str, what: str, instead: str = "") -> None:
    """Raise :class:`ConvMatError` before allocating ``nbytes`` that do not fit on ``device``.

    Cache entries on ``device`` are given back first when that makes room (see the module
    documentation). The message gives the size needed, the limit found (and which one) and
    ``instead``.

    Args:
        nbytes: the bytes about to be allocated.
        device: where.
        what: what they are for (``"a dense W of shape (10, 10) and dtype torch.float32"``).
        instead: what to do instead, appended to the message.

    >>> check_allocation(100, "cpu", "a small tensor")  # fits: returns None
    """
    if nbytes < SMALL:
        return
    device = torch.device(device)
    limit = memory_limit(device)
    if limit is None or nbytes <= limit.nbytes:
        return
    from .cache import make_room  # the cache imports this module; import it on demand

    if make_room(nbytes - limit.nbytes, device):
        limit = memory_limit(device)
        if limit is None or nbytes <= limit.nbytes:
            return
    assert limit is not None
    hint = f"; {instead}" if instead else ""
    raise ConvMatError(
        f"{what} needs {nbytes:,} bytes, more than the {limit.nbytes:,} bytes available on "
        f"{device} ({format_bytes(nbytes)} > {format_bytes(limit.nbytes)}, limit: "
        f"{limit.source}){hint}"
    )


# -- pages kept for reuse (glibc) ----------------------------------------------------------------
#: glibc's ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
#: While pages are kept: no chunk served by ``mmap``, and the heap's free top never trimmed.
_KEEPING = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
#: glibc's own adjustment raises the ``mmap`` threshold up to this (32 MiB on 64 bits), the
#: trim threshold to twice the ``mmap`` threshold; setting any of them stops the adjustment.
_MMAP_CEILING = 4 * 2**20 * ctypes.sizeof(ctypes.c_long)
#: On leaving: glibc's default most ``mmap`` chunks, and the thresholds its adjustment reaches
#: in a process that has freed a large tensor (which every analysis call has).
_AFTER = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, _MMAP_CEILING),
          (_M_TRIM_THRESHOLD, 2 * _MMAP_CEILING))  # fmt: skip
#: Environment variables by which a user sets glibc's allocator: then it is left alone.
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                  "MALLOC_TOP_PAD_")  # fmt: skip


class _Kept:
    """How deep :func:`kept_pages` is entered (the settings are the outermost's), and glibc's
    ``mallopt`` / ``malloc_trim`` (None where pages are not kept), looked up on first entry."""

    def __init__(self) -> None:
        self.depth = 0
        self.lock = threading.Lock()
        self.looked_up = False
        self.libc: ctypes.CDLL | None = None

    def functions(self) -> ctypes.CDLL | None:
        """The C library's functions (call with :attr:`lock` held)."""
        if not self.looked_up:
            self.libc = _glibc()
            self.looked_up = True
        return self.libc


_kept = _Kept()


def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc and pages may be kept (``mallopt`` and ``malloc_trim``
    typed), else None: not glibc; the user set its allocator (``MALLOC_*_`` variables,
    ``GLIBC_TUNABLES``); or an address-space or data rlimit is set, which heap holes would
    count against (``mmap``'s freed chunks leave none)."""
    if any(name in os.environ for name in _USER_SETTINGS) or "malloc" in os.environ.get(
            "GLIBC_TUNABLES", ""):  # fmt: skip
        return None
    if _rlimit("RLIMIT_AS") is not None or _rlimit("RLIMIT_DATA") is not None:
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (AttributeError, OSError, ValueError):  # not glibc, or no such symbols
        return None
    return libc


def _give_back_kept() -> None:
    """Inside :func:`kept_pages`: give the heap's free pages back to the system (they would
    count as used)."""
    with _kept.lock:
        libc = _kept.libc if _kept.depth else None
        if libc is not None:
            libc.malloc_trim(0)


@contextmanager
def kept_pages() -> Iterator[None]:
    """Within, large CPU tensors come from the heap and their pages are kept for the next
    allocation, instead of each being a fresh ``mmap`` that the kernel zeroes page by page
    (glibc; elsewhere, or where the user set glibc's allocator or an address-space or data
    rlimit is set, nothing changes). On leaving (the outermost, where nested), ``mmap`` is used
    again and the free pages are given back (their address space stays with the heap).

    The setting is the process's: other code's allocations meanwhile, in any thread, are
    kept too. Afterwards glibc's thresholds stay where its own adjustment takes them in a
    process that frees large tensors (``mmap`` from 32 MiB, trim above 64 MiB on 64 bits),
    no longer adjusted. It changes no value, only where memory comes from.

    >>> with kept_pages():
    ...     x = torch.ones(2**20)
    >>> float(x.sum())
    1048576.0
    """
    with _kept.lock:
        libc = _kept.functions()
        if _kept.depth == 0 and libc is not None:
            for parameter, value in _KEEPING:
                libc.mallopt(parameter, value)
        _kept.depth += 1
    try:
        yield
    finally:
        with _kept.lock:
            _kept.depth -= 1
            if _kept.depth == 0 and libc is not None:
                for parameter, value in _AFTER:
                    libc.mallopt(parameter, value)
                libc.malloc_trim(0)
