"""The one cache of the package: everything convmat keeps between calls, under one byte budget.

Index patterns (per configuration and device, with the index tensors they grow on request), block
patterns (with their transpose, made on request), tap tables, the matrix layers' W (per layer,
input size, device and dtype) and the operator's flipped kernels all live here, each entry tagged
with its *owner*: what kind of thing it is, or which layer holds it. An entry that grows later
(a pattern making its CSR index tensors) is measured again when it grows. The least recently
used entries go first when the budget is exceeded; a single value larger than the whole budget is
returned to its caller but not kept.

The budget, one knob:

- :func:`set_cache_budget` (bytes; ``None`` goes back to the environment or the default);
- the environment variable ``CONVMAT_CACHE_BYTES``, read when the cache is first used (and again
  after ``set_cache_budget(None)``): a number of bytes, optionally with a unit, ``KiB``, ``MiB``,
  ``GiB``, ``TiB`` (or ``K``, ``M``, ``G``, ``T``: powers of 1024) or ``kB``, ``MB``, ``GB``,
  ``TB`` (powers of 1000); ``0`` keeps nothing. An invalid value raises
  :class:`~convmat.ConvMatError` at that first use, naming the variable and the value;
- the default: 2 GiB or a quarter of the memory found (:func:`~convmat.engine.memory.total_memory`,
  which honours cgroup limits and rlimits), whichever is smaller.

:func:`cache_info` says what is held and by whom; :func:`clear_cache` empties everything.

Thread-safe: lookups, insertions and evictions hold one lock, and each is O(1) apart from the
evictions it causes; values are built outside it (two threads may build the same entry at once;
both results are correct and one is kept). An evicted value stays valid for whoever holds it.

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
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any, NamedTuple, TypeVar

import torch

from .._errors import ConvMatError

__all__ = [
    "ENV_BUDGET",
    "builds",
    "cache_budget",
    "cache_info",
    "cached",
    "cached_bytes",
    "clear_cache",
    "discard",
    "lookup",
    "make_room",
    "parse_bytes",
    "set_cache_budget",
    "store",
    "tensor_bytes",
]

T = TypeVar("T")

#: The environment variable that sets the budget.
ENV_BUDGET = "CONVMAT_CACHE_BYTES"

#: The default budget's ceiling.
DEFAULT_CAP = 2 * 2**30

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip


def same_values(kept: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether ``kept`` (a copy an entry was built from) still equals ``tensor``: the same
    dtype, device, shape and values (whatever changed them since).

    >>> t = torch.ones(3)
    >>> same_values(t.clone(), t), same_values(t.double(), t), same_values(t + 1, t)
    (True, False, False)
    """
    return (kept.dtype == tensor.dtype and kept.device == tensor.device
            and kept.shape == tensor.shape and bool(torch.equal(kept, tensor)))  # fmt: skip


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by the storages of ``tensors`` (each storage counted once; meta holds none).

    >>> t = torch.zeros(10, dtype=torch.float64)
    >>> tensor_bytes([t, t[2:], None])
    80
    """
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
            elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
                parts = [t.ccol_indices(), t.row_indices(), t.values()]
            total += tensor_bytes(parts)
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def parse_bytes(text: str, name: str = ENV_BUDGET) -> int:
    """A byte count written as ``"1073741824"``, ``"64MiB"``, ``"1.5 GiB"`` or ``"2G"``.

    >>> parse_bytes("64MiB"), parse_bytes("2 kB"), parse_bytes("0")
    (67108864, 2000, 0)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ConvMatError(
            f"{name} must be a number of bytes >= 0, optionally with a unit (KiB, MiB, GiB, "
            f"TiB, K, M, G, T, kB, MB, GB, TB), e.g. '512MiB', got {text!r}"
        )
    return int(float(match.group(1)) * unit)


def _default_budget() -> int:
    from .memory import total_memory  # the memory module imports this one only on demand

    found = total_memory()
    return DEFAULT_CAP if found is None else min(DEFAULT_CAP, found // 4)


def _budget_from_env() -> int | None:
    raw = os.environ.get(ENV_BUDGET)
    if raw is None or not raw.strip():
        return None
    return parse_bytes(raw)


def _device_of(key: Hashable) -> torch.device | None:
    """The device named in a tuple key (the engine's keys name theirs), or None."""
    if isinstance(key, tuple):
        for part in key:
            if isinstance(part, torch.device):
                return part
    return None


class _Entry(NamedTuple):
    owner: str
    value: Any
    nbytes: int


class _Cache:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.bytes = 0
        self.budget: int | None = None  # None: the environment's or the default, found on use
        self.builds: dict[str, int] = {}

    def limit(self) -> int:
        if self.budget is None:
            env = _budget_from_env()
            self.budget = env if env is not None else _default_budget()
        return self.budget

    def put(self, key: Hashable, entry: _Entry) -> None:
        """Keep ``entry`` (replacing what ``key`` held) unless it exceeds the whole budget, then
        evict down to the budget (caller holds the lock)."""
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        if entry.nbytes > self.limit():
            return
        self.entries[key] = entry
        self.bytes += entry.nbytes
        self.evict()

    def evict(self) -> None:
        """Drop least recently used entries until the budget holds (caller holds the lock)."""
        limit = self.limit()
        while self.entries and self.bytes > limit:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes


_CACHE = _Cache()


def cached(key: Hashable, owner: str, build: Callable[[], T], size: Callable[[T], int]) -> T:
    """The value under ``key``, built by ``build()`` (outside the lock) on a miss and kept.

    Args:
        key: hashable; unique across owners (include the owner's own tag in it). A
            ``torch.device`` in a tuple key tells :func:`make_room` where the value lives.
        owner: who holds it, for :func:`cache_info` and :func:`discard`.
        build: makes the value.
        size: its bytes.

    Returns:
        The cached or new value. A value larger than the whole budget is returned without
        being kept.

    >>> cached(("doc", 2), "doc", lambda: 41 + 1, lambda v: 8)
    42
    >>> discard("doc")
    8
    """
    with _CACHE.lock:
        hit = _CACHE.entries.get(key)
        if hit is not None:
            _CACHE.entries.move_to_end(key)
            kept: T = hit.value
            return kept
        _CACHE.limit()  # a bad CONVMAT_CACHE_BYTES is reported before anything is built
    value = build()
    nbytes = int(size(value))
    with _CACHE.lock:
        _CACHE.builds[owner] = _CACHE.builds.get(owner, 0) + 1
        _CACHE.put(key, _Entry(owner, value, nbytes))
    return value


def lookup(key: Hashable) -> Any:
    """The value under ``key`` (marked as used), or None.

    >>> lookup(("nothing", "here")) is None
    True
    """
    with _CACHE.lock:
        hit = _CACHE.entries.get(key)
        if hit is None:
            return None
        _CACHE.entries.move_to_end(key)
        return hit.value


def store(key: Hashable, owner: str, value: Any, nbytes: int) -> None:
    """Keep ``value`` under ``key`` (replacing what was there, as the most recently used entry),
    evicting as needed; a value larger than the whole budget is not kept (and what ``key`` held
    goes). Call it again when a kept value grows, with its new size.

    >>> store(("doc", 3), "doc", "value", 5); lookup(("doc", 3)); discard("doc")
    'value'
    5
    """
    with _CACHE.lock:
        _CACHE.put(key, _Entry(owner, value, int(nbytes)))


def discard(owner: str) -> int:
    """Drop every entry of ``owner``; returns the bytes freed (an O(entries) scan).

    >>> discard("nobody")
    0
    """
    with _CACHE.lock:
        keys = [k for k, e in _CACHE.entries.items() if e.owner == owner]
        freed = 0
        for k in keys:
            freed += _CACHE.entries.pop(k).nbytes
        _CACHE.bytes -= freed
        return freed


def make_room(nbytes: int, device: torch.device) -> bool:
    """Drop least recently used entries on ``device`` (or of unknown device) until ``nbytes``
    are freed; nothing is dropped, and False returned, when all of them together hold less.
    The memory guard calls this before refusing an allocation.

    >>> make_room(2**70, torch.device("cpu"))
    False
    """
    with _CACHE.lock:
        mine = [(k, e.nbytes) for k, e in _CACHE.entries.items() if _device_of(k) in (None, device)]
        if sum(n for _, n in mine) < nbytes:
            return False
        freed = 0
        for k, n in mine:  # least recently used first
            if freed >= nbytes:
                break
            del _CACHE.entries[k]
            _CACHE.bytes -= n
            freed += n
        return True


def clear_cache() -> None:
    """Forget everything cached (patterns, block patterns, tap tables, layer matrices, flipped
    kernels); it is rebuilt on demand.

    >>> clear_cache()
    >>> cached_bytes()
    0
    """
    with _CACHE.lock:
        _CACHE.entries.clear()
        _CACHE.bytes = 0


def cached_bytes() -> int:
    """Bytes held by the cache now (never more than :func:`cache_budget`).

    >>> cached_bytes() <= cache_budget()
    True
    """
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
    """Set the cache's byte budget; entries beyond it are dropped at once.

    Args:
        nbytes: bytes (0 keeps nothing), or None for ``CONVMAT_CACHE_BYTES`` or the default
            (see the module documentation).

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
    one per matrix layer (``"MatrixConv2d#3"``). The bytes add up to :func:`cached_bytes`.

    >>> clear_cache(); cache_info()
    {}
    """
    out: dict[str, dict[str, int]] = {}
    with _CACHE.lock:
        for e in _CACHE.entries.values():
            row = out.setdefault(e.owner, {"entries": 0, "bytes": 0})
            row["entries"] += 1
            row["bytes"] += e.nbytes
    return out


def builds(owner: str) -> int:
    """How many values ``owner`` has built (misses), for tests and benchmarks.

    >>> builds("nobody")
    0
    """
    with _CACHE.lock:
        return _CACHE.builds.get(owner, 0)
