"""The one cache of the package: everything convmat keeps between calls, under one byte budget.

Index patterns (per configuration and device), block patterns, tap tables, the matrix layers'
W (per layer, input size, device and dtype) and the operator's flipped kernels all live here,
each entry tagged with its *owner* (what kind of thing it is, or which layer holds it). The
least recently used entries go first when the budget is exceeded. One knob sets the budget:
:func:`set_cache_budget` or the environment variable ``CONVMAT_CACHE_BYTES`` (read at import);
the default is 2 GiB or a quarter of the memory found, whichever is smaller.
:func:`cache_info` says what is held and by whom; :func:`clear_cache` empties it.

Thread-safe: lookups, insertions and evictions hold one lock; values are built outside it (two
threads may build the same entry at once; both results are correct and one is kept).

>>> set_cache_budget(2**20)
>>> cached(("example", 1), "doc", lambda: torch.zeros(1000), lambda t: t.nbytes).shape
torch.Size([1000])
>>> cache_info()["doc"]
{'entries': 1, 'bytes': 4000}
>>> clear_cache(); set_cache_budget(None)
>>> cache_info()
{}
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

import torch

from .._errors import ConvMatError

__all__ = [
    "builds",
    "cache_budget",
    "cache_info",
    "cached",
    "cached_bytes",
    "clear_cache",
    "discard",
    "lookup",
    "set_cache_budget",
    "store",
    "tensor_bytes",
]

T = TypeVar("T")

#: The environment variable that sets the budget in bytes.
ENV_BUDGET = "CONVMAT_CACHE_BYTES"


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by the storages of ``tensors`` (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        if t.layout != torch.strided:
            parts: list[torch.Tensor] = []
            if t.layout == torch.sparse_coo:
                parts = [t._indices(), t._values()]
            elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
                parts = [t.crow_indices(), t.col_indices(), t.values()]
            total += tensor_bytes(parts)
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _default_budget() -> int:
    from .memory import total_memory  # the memory module does not import this one

    found = total_memory()
    cap = 2 * 2**30
    return cap if found is None else min(cap, found // 4)


def _budget_from_env() -> int | None:
    raw = os.environ.get(ENV_BUDGET)
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConvMatError(f"{ENV_BUDGET} must be a number of bytes >= 0, got {raw!r}")
    return value


class _Cache:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.entries: OrderedDict[Hashable, tuple[str, Any, int]] = OrderedDict()
        self.bytes = 0
        self.budget: int | None = None  # None: the default, found on first use
        self.builds: dict[str, int] = {}

    def limit(self) -> int:
        if self.budget is None:
            env = _budget_from_env()
            self.budget = env if env is not None else _default_budget()
        return self.budget

    def evict(self) -> None:
        """Drop least recently used entries until the budget holds (caller holds the lock)."""
        limit = self.limit()
        while self.entries and self.bytes > limit:
            _, (_, _, size) = self.entries.popitem(last=False)
            self.bytes -= size


_CACHE = _Cache()


def cached(key: Hashable, owner: str, build: Callable[[], T], size: Callable[[T], int]) -> T:
    """The value under ``key``, built by ``build()`` (outside the lock) on a miss and kept.

    Args:
        key: hashable; unique across owners (include the owner's own tag in it).
        owner: who holds it, for :func:`cache_info` and :func:`discard`.
        build: makes the value.
        size: its bytes.

    A value larger than the whole budget is returned without being kept.
    """
    with _CACHE.lock:
        hit = _CACHE.entries.get(key)
        if hit is not None:
            _CACHE.entries.move_to_end(key)
            return hit[1]
    value = build()
    nbytes = int(size(value))
    with _CACHE.lock:
        _CACHE.builds[owner] = _CACHE.builds.get(owner, 0) + 1
        if nbytes > _CACHE.limit():
            return value
        old = _CACHE.entries.pop(key, None)
        if old is not None:
            _CACHE.bytes -= old[2]
        _CACHE.entries[key] = (owner, value, nbytes)
        _CACHE.bytes += nbytes
        _CACHE.evict()
    return value


def lookup(key: Hashable) -> Any:
    """The value under ``key`` (marked as used), or None."""
    with _CACHE.lock:
        hit = _CACHE.entries.get(key)
        if hit is None:
            return None
        _CACHE.entries.move_to_end(key)
        return hit[1]


def store(key: Hashable, owner: str, value: Any, nbytes: int) -> None:
    """Keep ``value`` under ``key`` (replacing what was there), evicting as needed."""
    with _CACHE.lock:
        old = _CACHE.entries.pop(key, None)
        if old is not None:
            _CACHE.bytes -= old[2]
        if nbytes > _CACHE.limit():
            return
        _CACHE.entries[key] = (owner, value, nbytes)
        _CACHE.bytes += nbytes
        _CACHE.evict()


def discard(owner: str) -> int:
    """Drop every entry of ``owner``; returns the bytes freed."""
    with _CACHE.lock:
        keys = [k for k, (o, _, _) in _CACHE.entries.items() if o == owner]
        freed = 0
        for k in keys:
            freed += _CACHE.entries.pop(k)[2]
        _CACHE.bytes -= freed
        return freed


def clear_cache() -> None:
    """Forget everything cached (patterns, layer matrices, ...); it is rebuilt on demand.

    >>> clear_cache()
    >>> cached_bytes()
    0
    """
    with _CACHE.lock:
        _CACHE.entries.clear()
        _CACHE.bytes = 0


def cached_bytes() -> int:
    """Bytes held by the cache now."""
    with _CACHE.lock:
        return _CACHE.bytes


def cache_budget() -> int:
    """The byte budget in force.

    >>> cache_budget() > 0
    True
    """
    with _CACHE.lock:
        return _CACHE.limit()


def set_cache_budget(nbytes: int | None) -> None:
    """Set the cache's byte budget (``None``: back to ``CONVMAT_CACHE_BYTES`` or the default);
    entries beyond it are dropped at once. 0 keeps nothing.

    >>> set_cache_budget(0); cached_bytes()
    0
    >>> set_cache_budget(None)
    """
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int)
                               or nbytes < 0):  # fmt: skip
        raise ConvMatError(f"nbytes must be an int >= 0 or None, got {nbytes!r}")
    with _CACHE.lock:
        _CACHE.budget = nbytes
        _CACHE.evict()


def cache_info() -> dict[str, dict[str, int]]:
    """What the cache holds, by owner: ``{owner: {"entries": n, "bytes": b}}``.

    Owners are ``"pattern"``, ``"block pattern"``, ``"tap table"``, ``"flipped kernel"`` and
    one per matrix layer (``"MatrixConv2d#3"``).
    """
    out: dict[str, dict[str, int]] = {}
    with _CACHE.lock:
        for owner, _, size in _CACHE.entries.values():
            row = out.setdefault(owner, {"entries": 0, "bytes": 0})
            row["entries"] += 1
            row["bytes"] += size
    return out


def builds(owner: str) -> int:
    """How many values ``owner`` has built (misses), for tests and benchmarks."""
    with _CACHE.lock:
        return _CACHE.builds.get(owner, 0)
