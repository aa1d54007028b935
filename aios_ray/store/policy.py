"""Cache policy of the tiered expert store (GPU cache -> DRAM cache -> NVMe), free of Ray and torch.

Each tier is owned by a Ray actor, but the actors only move bytes: *what* to keep, *what* to evict,
*what* must be written back first and *what* to prefetch is decided here, in plain classes that the
tests drive directly. Keys are ``ExpertKey(layer, expert)`` in practice; any hashable works here,
which keeps this module importable without torch (``record.py`` needs it).

- ``TierPolicy``: an LRU bounded in bytes (and optionally entries) with pins (leases), dirty flags
  with versions (so a write-back racing a newer update never loses it) and prefetch accounting.
- ``TierCounters``: what a tier did (hits, misses, prefetch hits, evictions, write-backs, bytes, stalls).
- ``PrefetchQueue``: a bounded, de-duplicating FIFO of keys to bring in.
- ``AccessHistory``: the experts each layer used over the last N steps; predicts what to prefetch.

Thread-safety: the actors run with ``max_concurrency > 1``, so every public method of ``TierPolicy``
(reads too: iterating an ``OrderedDict`` while another thread reorders it is unsafe) runs under one
``threading.RLock``. The lock is re-entrant so that methods may call each other (``admit`` calls the
victim planner) without deadlocking. ``PrefetchQueue`` and ``AccessHistory`` take a plain lock each.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import TypeAlias

Key: TypeAlias = Hashable


class TierFullError(RuntimeError):
    """Raised when an entry cannot fit: the room it needs is held by pinned (leased) entries, or it
    is larger than the whole tier. Nothing has been evicted when this is raised."""


class PinnedError(RuntimeError):
    """Raised when asked to evict an entry that is pinned: a lease holder is still using it."""


@dataclass
class TierCounters:
    """What one tier did. Plain numbers so actors can ship them to the driver and sum them."""

    hits: int = 0  # demand accesses (an expert a step needed) that found the entry here
    misses: int = 0  # demand accesses that had to load it (or stream it past a full tier)
    prefetch_issued: int = 0  # entries admitted by prefetch (not already present)
    prefetch_used: int = 0  # prefetched entries that a demand access then hit
    prefetch_wasted: int = 0  # prefetched entries evicted (or dropped) before any demand access
    streamed: int = 0  # demand misses served around a full tier (no room: a copy for the step, written back)
    evictions: int = 0
    writebacks: int = 0  # dirty entries evicted, plus successful mark_clean calls
    bytes_in: int = 0
    bytes_out: int = 0
    stall_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        """Demand hits over demand accesses (prefetch loads are not accesses); 0.0 before any access (rather
        than a ZeroDivisionError in a report)."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def to_dict(self) -> dict[str, float]:
        """All counters plus ``hit_rate``, ready for a metrics logger."""
        return {**asdict(self), "hit_rate": self.hit_rate}

    def merge(self, other: TierCounters) -> TierCounters:
        """A new ``TierCounters`` with the field-wise sum (e.g. over the actors of one tier)."""
        return TierCounters(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


@dataclass(frozen=True)
class Eviction:
    """An entry removed from a tier. If ``dirty``, the caller must write it back (at ``version``)
    to the next tier *before* dropping its bytes, or the update is lost."""

    key: Key
    nbytes: int
    dirty: bool
    version: int


@dataclass(frozen=True)
class EntryInfo:
    """A read-only snapshot of one entry's bookkeeping."""

    nbytes: int
    dirty: bool
    pins: int
    version: int
    prefetched: bool
    tick: int


@dataclass
class _Entry:
    nbytes: int
    dirty: bool = False
    pins: int = 0
    version: int = 0
    prefetched: bool = False  # brought in by prefetch and not looked up since
    tick: int = 0  # logical time of the last access (lookup hit or admit)


class TierPolicy:
    """LRU bookkeeping of one tier, bounded by ``capacity_bytes`` and optionally ``capacity_entries``
    (e.g. the number of fixed-size slots of a GPU cache).

    Pinned entries (leases, ``pin``/``unpin``) are never evicted; dirty entries are handed back as
    dirty ``Eviction``s so the owning actor writes them back before freeing them. See the module
    docstring for thread-safety.
    """

    def __init__(self, capacity_bytes: int, capacity_entries: int | None = None) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if capacity_entries is not None and capacity_entries <= 0:
            raise ValueError(f"capacity_entries must be positive or None, got {capacity_entries}")
        self.capacity_bytes = capacity_bytes
        self.capacity_entries = capacity_entries
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # least recently used first
        self._used = 0
        self._tick = 0
        self._counters = TierCounters()
        self._lock = threading.RLock()

    # --- reads -------------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[Key]:
        """Present keys, least recently used first (the eviction order, pins aside)."""
        with self._lock:
            return list(self._entries)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def counters(self) -> TierCounters:
        """A snapshot copy: safe to ship or log while other threads keep counting."""
        with self._lock:
            return replace(self._counters)

    def reset_counters(self) -> TierCounters:
        """Start counting afresh (e.g. per step); returns the counters up to now."""
        with self._lock:
            old, self._counters = self._counters, TierCounters()
            return old

    def info(self, key: Key) -> EntryInfo | None:
        """Snapshot of ``key``'s bookkeeping, or None if absent."""
        with self._lock:
            e = self._entries.get(key)
            return None if e is None else EntryInfo(e.nbytes, e.dirty, e.pins, e.version, e.prefetched, e.tick)

    def pinned(self, key: Key) -> bool:
        """Whether ``key`` is present and leased at least once."""
        with self._lock:
            e = self._entries.get(key)
            return e is not None and e.pins > 0

    def dirty_keys(self) -> list[Key]:
        """Keys whose bytes differ from the next tier's copy, least recently used first."""
        with self._lock:
            return [k for k, e in self._entries.items() if e.dirty]

    # --- access --------------------------------------------------------------------------------

    def lookup(self, key: Key) -> bool:
        """Is ``key`` here? Counts a hit or miss, and a prefetch hit on the first use of a prefetched
        entry (so prefetch usefulness is measured); a hit makes the entry most recently used."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                self._counters.misses += 1
                return False
            self._counters.hits += 1
            if e.prefetched:
                self._counters.prefetch_used += 1
                e.prefetched = False
            self._touch(key, e)
            return True

    def admit(
        self, key: Key, nbytes: int, *, dirty: bool = False, prefetched: bool = False, version: int = 0
    ) -> list[Eviction]:
        """Insert ``key`` (or update it if present) as most recently used, evicting least recently
        used unpinned entries to make room; returns them, dirty ones to be written back first.

        Raises ``TierFullError`` (having evicted nothing) if pinned entries leave no room. Re-admitting
        a present key keeps its pins, stays dirty if it was (a pending write-back is not forgotten),
        takes the newer version, and keeps its ``prefetched`` flag (an admit is not a use).
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            plan = self._plan(nbytes, key)
            evicted = [self._remove(victim) for victim in plan]
            old = self._entries.get(key)
            if old is None:
                self._insert(key, _Entry(nbytes, dirty=dirty, version=version, prefetched=prefetched))
            else:
                self._update(key, old, nbytes, dirty=dirty, version=version)
            return evicted

    def victims(self, nbytes: int, key: Key | None = None) -> list[Eviction]:
        """What ``admit(key, nbytes)`` would evict, without evicting it. Raises ``TierFullError`` as
        ``admit`` would."""
        with self._lock:
            return [self._eviction(k, self._entries[k]) for k in self._plan(nbytes, key)]

    def evict(self, key: Key) -> Eviction | None:
        """Remove ``key`` now (None if absent); raises ``PinnedError`` if it is leased."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return None
            if e.pins:
                raise PinnedError(f"{key!r} is pinned ({e.pins} lease(s)); unpin it before evicting")
            return self._remove(key)

    # --- leases ----------------------------------------------------------------------------------

    def pin(self, key: Key) -> int:
        """Lease ``key`` (it will not be evicted until unpinned); returns the pin count."""
        with self._lock:
            e = self._require(key)
            e.pins += 1
            return e.pins

    def unpin(self, key: Key) -> int:
        """Release one lease; returns the pin count. Unpinning an unpinned entry is a bug: ValueError."""
        with self._lock:
            e = self._require(key)
            if e.pins <= 0:
                raise ValueError(f"unpin of {key!r}, which is not pinned")
            e.pins -= 1
            return e.pins

    # --- dirtiness ---------------------------------------------------------------------------

    def mark_dirty(self, key: Key, version: int | None = None) -> int:
        """Record an update of ``key``; its version becomes ``version`` or, if None, the old one + 1.
        Returns the new version, which a later ``mark_clean`` must quote."""
        with self._lock:
            e = self._require(key)
            e.version = e.version + 1 if version is None else version
            e.dirty = True
            return e.version

    def mark_clean(self, key: Key, version: int) -> bool:
        """Record that ``version`` of ``key`` was written back. Cleans only if that is still the current
        version: a write-back that raced a newer update leaves the entry dirty. Returns whether cleaned."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or not e.dirty or e.version != version:
                return False
            e.dirty = False
            self._counters.writebacks += 1
            return True

    # --- accounting ------------------------------------------------------------------------------

    def record_stall(self, seconds: float) -> None:
        """Time a consumer waited for this tier (reported next to the hit rate)."""
        with self._lock:
            self._counters.stall_seconds += seconds

    def record_streamed(self, count: int) -> None:
        """Demand misses that found no room and were served as copies around this tier."""
        with self._lock:
            self._counters.streamed += count

    def record_bytes(self, *, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Bytes actually moved into / out of this tier (the actor knows what it copied)."""
        with self._lock:
            self._counters.bytes_in += bytes_in
            self._counters.bytes_out += bytes_out

    # --- internals (caller holds the lock) -------------------------------------------------------

    def _require(self, key: Key) -> _Entry:
        e = self._entries.get(key)
        if e is None:
            raise KeyError(key)
        return e

    def _touch(self, key: Key, e: _Entry) -> None:
        self._tick += 1
        e.tick = self._tick
        self._entries.move_to_end(key)

    def _fits(self, used: int, count: int) -> bool:
        return used <= self.capacity_bytes and (self.capacity_entries is None or count <= self.capacity_entries)

    def _plan(self, nbytes: int, key: Key | None) -> list[Key]:
        """Least recently used unpinned keys (other than ``key``) whose removal lets ``key`` take
        ``nbytes``; raises ``TierFullError`` if no such set exists."""
        if nbytes > self.capacity_bytes:
            raise TierFullError(f"{key!r} needs {nbytes} bytes, more than the tier's {self.capacity_bytes}")
        old = self._entries.get(key) if key is not None else None
        used = self._used - (old.nbytes if old else 0) + nbytes
        count = len(self._entries) + (0 if old else 1)
        plan: list[Key] = []
        for k, e in self._entries.items():
            if self._fits(used, count):
                break
            if k == key or e.pins:
                continue
            plan.append(k)
            used -= e.nbytes
            count -= 1
        if not self._fits(used, count):
            raise TierFullError(
                f"no room for {key!r} ({nbytes} bytes): {self._used}/{self.capacity_bytes} bytes and "
                f"{len(self._entries)}/{self.capacity_entries} entries used, the rest pinned"
            )
        return plan

    @staticmethod
    def _eviction(key: Key, e: _Entry) -> Eviction:
        return Eviction(key, e.nbytes, e.dirty, e.version)

    def _remove(self, key: Key) -> Eviction:
        e = self._entries.pop(key)
        self._used -= e.nbytes
        self._counters.evictions += 1
        self._counters.writebacks += int(e.dirty)
        self._counters.prefetch_wasted += int(e.prefetched)  # brought in ahead of need, never needed
        return self._eviction(key, e)

    def _insert(self, key: Key, e: _Entry) -> None:
        self._entries[key] = e
        self._used += e.nbytes
        self._counters.prefetch_issued += int(e.prefetched)
        self._touch(key, e)

    def _update(self, key: Key, e: _Entry, nbytes: int, *, dirty: bool, version: int) -> None:
        self._used += nbytes - e.nbytes
        e.nbytes = nbytes
        e.dirty = e.dirty or dirty
        e.version = max(e.version, version)
        self._touch(key, e)


class PrefetchQueue:
    """Keys to bring in, first come first served, each at most once, at most ``maxlen`` of them.

    When full, new keys are refused rather than old ones dropped: the queued ones were predicted
    for sooner. A key that arrives by demand meanwhile should be ``discard``-ed.
    """

    def __init__(self, maxlen: int) -> None:
        if maxlen <= 0:
            raise ValueError(f"maxlen must be positive, got {maxlen}")
        self.maxlen = maxlen
        self._keys: dict[Key, None] = {}  # insertion-ordered set
        self._lock = threading.Lock()

    def push(self, keys: Iterable[Key]) -> int:
        """Queue the keys not already queued, while there is room; returns how many were added."""
        added = 0
        with self._lock:
            for key in keys:
                if key in self._keys:
                    continue
                if len(self._keys) >= self.maxlen:
                    break
                self._keys[key] = None
                added += 1
        return added

    def pop(self, n: int = 1) -> list[Key]:
        """Up to ``n`` keys, oldest first, removed from the queue."""
        with self._lock:
            out = [k for k, _ in zip(self._keys, range(max(n, 0)), strict=False)]
            for key in out:
                del self._keys[key]
            return out

    def discard(self, key: Key) -> bool:
        """Drop ``key`` if queued (it arrived by demand); returns whether it was."""
        with self._lock:
            if key not in self._keys:
                return False
            del self._keys[key]
            return True

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._keys

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)


class AccessHistory:
    """Which experts each layer used in each of the last ``window`` recorded steps.

    The usage-history predictor for text training: experts a layer used recently are likely used
    again, so ``predict`` lists them for prefetch ahead of need. Recording the same (step, layer)
    twice (e.g. per micro-batch) takes the union.
    """

    def __init__(self, window: int) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.window = window
        self._steps: dict[int, dict[int, set[int]]] = {}  # step -> layer -> experts
        self._lock = threading.Lock()

    def record(self, step: int, layer: int, experts: Iterable[int]) -> None:
        """Note that ``layer`` used ``experts`` in ``step``; steps older than the window are dropped."""
        with self._lock:
            if len(self._steps) >= self.window and step not in self._steps and step < min(self._steps):
                return  # older than everything kept: outside the window already
            self._steps.setdefault(step, {}).setdefault(layer, set()).update(int(x) for x in experts)
            while len(self._steps) > self.window:
                del self._steps[min(self._steps)]

    def steps(self) -> list[int]:
        """Steps in the window, oldest first."""
        with self._lock:
            return sorted(self._steps)

    def predict(self, layer: int, top: int | None = None) -> list[int]:
        """Experts ``layer`` used over the window, most promising first: most recently used first,
        then most often used, then by id (deterministic). ``top`` keeps only the first ``top``."""
        with self._lock:
            last: dict[int, int] = {}
            freq: dict[int, int] = {}
            for step, layers in self._steps.items():
                for expert in layers.get(layer, ()):
                    last[expert] = max(last.get(expert, step), step)
                    freq[expert] = freq.get(expert, 0) + 1
        ranked = sorted(last, key=lambda x: (-last[x], -freq[x], x))
        return ranked if top is None else ranked[:top]

    def union_size(self, step: int) -> int:
        """Distinct (layer, expert) pairs used in ``step`` (0 if not in the window): the working set
        a cache must hold for that step, reported next to hit rates."""
        with self._lock:
            return sum(len(experts) for experts in self._steps.get(step, {}).values())
