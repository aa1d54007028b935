"""DRAM and hot (GPU or CPU slab) tiers as plain classes; the Ray actors in ``actors/`` wrap them.

Each tier keeps its policy in a ``TierPolicy`` (LRU in bytes, pins, dirty versions, counters) and
talks to the tier below through two calls, ``get_many(keys)`` and ``put_many(items)``, so the same
code runs with plain objects in tests and with actor handles in a cluster. Dirty records are
written to the tier below before they are dropped, and ``flush()`` pushes every dirty record down
to the NVMe store.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from aios_ray.store.policy import TierFullError, TierPolicy
from aios_ray.store.record import ExpertKey, ExpertLayout
from aios_ray.store.slab import HotSlab

Item = tuple[ExpertKey, np.ndarray, int]  # key, flat record, version
Record = tuple[np.ndarray, int]  # flat record, version


class LowerTier(Protocol):
    def get_many(self, keys: Sequence[ExpertKey], for_prefetch: bool = False) -> list[tuple[np.ndarray, int]]: ...
    def put_many(self, items: Sequence[Item]) -> None: ...
    def flush(self) -> int: ...


class NvmeAsLower:
    """Adapts ``NvmeStore`` to the LowerTier calls: write-backs are staged, ``flush`` commits them."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def get_many(self, keys: Sequence[ExpertKey], for_prefetch: bool = False) -> list[tuple[np.ndarray, int]]:
        return list(self.store.read_many(list(keys)))

    def put_many(self, items: Sequence[Item]) -> None:
        self.store.write_many(list(items), commit=False)

    def flush(self) -> int:
        return self.store.commit()


class DramTier:
    """LRU of expert records (flat numpy arrays) bounded in bytes, over the NVMe store."""

    def __init__(self, capacity_bytes: int, layout: ExpertLayout, lower: LowerTier) -> None:
        self.layout, self.lower = layout, lower
        self.policy = TierPolicy(capacity_bytes)
        self.records: dict[ExpertKey, tuple[np.ndarray, int]] = {}
        self.lock = threading.RLock()
        self.incarnation = uuid.uuid4().hex  # a restarted actor is a new incarnation: its unflushed data is gone

    def get_many(self, keys: Sequence[ExpertKey], for_prefetch: bool = False) -> list[tuple[np.ndarray, int]]:
        """Records for the tier above. ``for_prefetch``: the hot tier is prefetching, so this is not a
        demand access and is kept out of the hit, miss and stall counters."""
        with self.lock:
            if for_prefetch:
                found = {k: self.records[k] for k in keys if k in self.policy}
            else:
                found = {k: self.records[k] for k in keys if self.policy.lookup(k)}
            missing = [k for k in dict.fromkeys(keys) if k not in found]
            if missing:
                started = time.perf_counter()
                loaded = list(zip(missing, self.lower.get_many(missing), strict=True))
                self._admit(loaded, dirty=False)  # a batch larger than the tier still returns whole
                found.update(loaded)
                if not for_prefetch:
                    self.policy.record_stall(time.perf_counter() - started)
                self.policy.record_bytes(bytes_in=len(missing) * self.layout.nbytes)
            return [found[k] for k in keys]

    def put_many(self, items: Sequence[Item]) -> None:
        with self.lock:
            self._admit([(key, (flat, version)) for key, flat, version in items], dirty=True)

    def prefetch(self, keys: Iterable[ExpertKey]) -> int:
        with self.lock:
            missing = [k for k in dict.fromkeys(keys) if k not in self.policy]
        if not missing:
            return 0
        records = self.lower.get_many(missing)  # outside the lock: demand reads never wait for a prefetch
        with self.lock:
            fresh = [(k, r) for k, r in zip(missing, records, strict=True) if k not in self.policy]
            self._admit(fresh, dirty=False, prefetched=True)
            self.policy.record_bytes(bytes_in=len(fresh) * self.layout.nbytes)
            return len(fresh)

    def _admit(self, entries: list[tuple[ExpertKey, tuple[np.ndarray, int]]], dirty: bool,
               prefetched: bool = False) -> None:
        for key, (flat, version) in entries:
            evictions = self.policy.admit(key, self.layout.nbytes, dirty=dirty, prefetched=prefetched,
                                          version=version)
            self._write_back([e for e in evictions if e.dirty])
            for eviction in evictions:
                self.records.pop(eviction.key, None)
            self.records[key] = (flat, version)
            if dirty:
                self.policy.mark_dirty(key, version)

    def _write_back(self, evicted_dirty: list) -> None:
        if evicted_dirty:
            self.lower.put_many([(e.key, *self.records[e.key]) for e in evicted_dirty])
            self.policy.record_bytes(bytes_out=len(evicted_dirty) * self.layout.nbytes)

    def flush(self) -> int:
        """Write every dirty record to NVMe; returns how many were written."""
        with self.lock:
            dirty = self.policy.dirty_keys()
            if dirty:
                self.lower.put_many([(k, *self.records[k]) for k in dirty])
                for key in dirty:
                    self.policy.mark_clean(key, self.records[key][1])
            return len(dirty) + self.lower.flush()

    def revert(self, committed: Mapping[ExpertKey, int]) -> tuple[int, int]:
        """Back to the last flush (recovery): a record whose version is not the one NVMe committed last is
        dropped without write-back; the others are exactly the flushed records and stay. Returns
        (kept, dropped)."""
        with self.lock:
            dropped, resident = 0, self.policy.keys()  # a snapshot: evicting while iterating it is safe
            for key in resident:
                version = self.records[key][1]
                if version == committed.get(key):
                    self.policy.mark_clean(key, version)
                    continue
                self.policy.evict(key)
                del self.records[key]
                dropped += 1
            return len(self.records), dropped

    def stats(self) -> dict[str, Any]:
        return {"tier": "dram", "incarnation": self.incarnation, "entries": len(self.policy),
                "used_bytes": self.policy.used_bytes, **self.policy.counters.to_dict()}


class HotTier:
    """Expert slots in a shared slab; records come from the tier below and go back to it dirty.

    A compute process leases the slots it needs for a step (pinned: never evicted while leased),
    computes on them in place and marks what it updated dirty; ``release`` ends the lease.
    """

    def __init__(self, slab: HotSlab, layout: ExpertLayout, lower: LowerTier) -> None:
        self.slab, self.layout, self.lower = slab, layout, lower
        self.policy = TierPolicy(slab.num_slots * layout.nbytes, capacity_entries=slab.num_slots)
        self.slot_of: dict[ExpertKey, int] = {}
        self.version: dict[ExpertKey, int] = {}
        self.free = list(range(slab.num_slots - 1, -1, -1))
        self.leases: dict[str, list[ExpertKey]] = {}
        self.streaming: dict[str, set[ExpertKey]] = {}  # per holder: keys it computes on as streamed copies
        self.inflight: dict[ExpertKey, threading.Event] = {}  # keys a prefetch is fetching right now
        self.epoch = 0  # bumped by revert(): a prefetch fetched before it must not install what it got
        self.lock = threading.RLock()
        self.incarnation = uuid.uuid4().hex

    def lease(self, keys: Sequence[ExpertKey], holder: str) -> dict[ExpertKey, int]:
        """Make ``keys`` resident and pin them for ``holder``; returns each key's slot. Raises
        ``TierFullError`` when pinned slots leave no room (``acquire`` streams the overflow instead)."""
        slots, _ = self._acquire(keys, holder, stream_overflow=False)
        return slots

    def acquire(self, keys: Sequence[ExpertKey], holder: str) -> tuple[dict[ExpertKey, int], dict[ExpertKey, Record]]:
        """``lease`` that degrades instead of failing: the keys that find room get pinned slots, and the rest
        (when the step needs more experts than the tier has free slots) come back as copies of their records,
        streamed past the tier. Those count as misses, as ``streamed``, and their load as stall; the holder
        computes on its copy and sends an updated one back with ``write_back``."""
        return self._acquire(keys, holder, stream_overflow=True)

    def _acquire(self, keys: Sequence[ExpertKey], holder: str,
                 stream_overflow: bool) -> tuple[dict[ExpertKey, int], dict[ExpertKey, Record]]:
        """A key whose prefetch is already under way is waited for rather than fetched a second time; the
        wait counts as stall (smaller than a demand load, since the fetch started earlier)."""
        waited = 0.0
        while True:
            with self.lock:
                pending = [self.inflight[k] for k in keys if k not in self.policy and k in self.inflight]
                if not pending:
                    if waited:
                        self.policy.record_stall(waited)
                    return self._acquire_locked(keys, holder, stream_overflow)
            started = time.perf_counter()
            for event in pending:
                event.wait()
            waited += time.perf_counter() - started

    def _acquire_locked(self, keys: Sequence[ExpertKey], holder: str,
                        stream_overflow: bool) -> tuple[dict[ExpertKey, int], dict[ExpertKey, Record]]:
        held = self.leases.setdefault(holder, [])
        missing = []
        for key in dict.fromkeys(keys):
            if self.policy.lookup(key):  # a demand access: counted as a hit or a miss, once per key and lease
                self.policy.pin(key)  # pinned at once: loading the misses must not evict it
                held.append(key)
            else:
                missing.append(key)
        overflow: list[ExpertKey] = []
        if stream_overflow:
            room = max(self._unpinned_room(), 0)
            missing, overflow = missing[:room], missing[room:]
        self._load(missing, prefetched=False, pin_for=held)
        streamed = self._stream(overflow, holder)
        return {k: self.slot_of[k] for k in keys if k not in streamed}, streamed

    def _unpinned_room(self) -> int:
        """Slots that are free or hold an unpinned entry (which a load may evict)."""
        return self.slab.num_slots - sum(1 for k in self.slot_of if self.policy.pinned(k))

    def _stream(self, keys: list[ExpertKey], holder: str) -> dict[ExpertKey, Record]:
        """Copies of ``keys``' records from the tier below, for a holder that found no free slot."""
        if not keys:
            return {}
        started = time.perf_counter()
        records = self.lower.get_many(keys)
        self.policy.record_stall(time.perf_counter() - started)
        self.policy.record_streamed(len(keys))
        self.streaming.setdefault(holder, set()).update(keys)
        # A copy: the holder updates it in place, and the tier below must keep its own bytes until write_back.
        return {k: (np.array(flat, copy=True), version) for k, (flat, version) in zip(keys, records, strict=True)}

    def write_back(self, items: Sequence[Item]) -> None:
        """Updated copies of streamed records come back: into the slot that holds the key now, if one does,
        otherwise down to the tier below (dirty there), so the update is never lost nor made twice."""
        with self.lock:
            self.epoch += 1  # a prefetch that read the old record before this must not install it
            below = []
            for key, flat, version in items:
                if key in self.slot_of:
                    self.slab.write(self.slot_of[key], flat)
                    self.version[key] = self.policy.mark_dirty(key, version)
                else:
                    below.append((key, flat, version))
            if below:
                self.lower.put_many(below)
                self.policy.record_bytes(bytes_out=len(below) * self.layout.nbytes)

    def release(self, holder: str) -> int:
        with self.lock:
            self.streaming.pop(holder, None)
            keys = self.leases.pop(holder, [])
            for key in keys:
                self.policy.unpin(key)
            return len(keys)

    def prefetch(self, keys: Iterable[ExpertKey]) -> int:
        """Bring keys in ahead of need, where room is free or unpinned. The records are fetched outside
        the lock, so a lease arriving meanwhile is served at once instead of waiting for the prefetch."""
        with self.lock:
            streamed = set().union(*self.streaming.values())  # their update comes back with write_back
            missing = [k for k in dict.fromkeys(keys)
                       if k not in self.policy and k not in self.inflight and k not in streamed]
            missing = missing[:max(self._unpinned_room(), 0)]
            done, epoch = threading.Event(), self.epoch
            for key in missing:
                self.inflight[key] = done  # a lease for it now waits for this fetch instead of repeating it
        if not missing:
            return 0
        loaded = 0
        try:
            records = self.lower.get_many(missing, for_prefetch=True)
            with self.lock:
                for key, record in zip(missing, records, strict=True):
                    if key in self.policy or epoch != self.epoch:
                        continue  # a lease brought it in meanwhile, or a revert made the record stale
                    try:
                        self._install(key, record, prefetched=True, pin_for=None)
                    except TierFullError:
                        break  # leases took the room meanwhile
                    loaded += 1
                self.policy.record_bytes(bytes_in=loaded * self.layout.nbytes)
        finally:
            with self.lock:
                for key in missing:
                    self.inflight.pop(key, None)
            done.set()
        return loaded

    def mark_dirty(self, keys: Iterable[ExpertKey]) -> None:
        with self.lock:
            for key in keys:
                self.version[key] = self.policy.mark_dirty(key, self.version[key] + 1)

    def _load(self, keys: list[ExpertKey], prefetched: bool, pin_for: list[ExpertKey] | None) -> None:
        if not keys:
            return
        started = time.perf_counter()
        records = self.lower.get_many(keys)
        for key, record in zip(keys, records, strict=True):
            self._install(key, record, prefetched=prefetched, pin_for=pin_for)
        if not prefetched:
            self.policy.record_stall(time.perf_counter() - started)
        self.policy.record_bytes(bytes_in=len(keys) * self.layout.nbytes)

    def _install(self, key: ExpertKey, record: tuple[np.ndarray, int], prefetched: bool,
                 pin_for: list[ExpertKey] | None) -> None:
        """Admit one record into a slot (evicting, with write-back, as the policy says); caller holds the lock."""
        flat, version = record
        evictions = self.policy.admit(key, self.layout.nbytes, prefetched=prefetched, version=version)
        self._evict(evictions)
        slot = self.free.pop()
        self.slab.write(slot, flat)
        self.slot_of[key], self.version[key] = slot, version
        if pin_for is not None:
            self.policy.pin(key)
            pin_for.append(key)

    def _evict(self, evictions: list) -> None:
        dirty = [(e.key, self.slab.read(self.slot_of[e.key]), e.version) for e in evictions if e.dirty]
        if dirty:
            self.lower.put_many(dirty)
            self.policy.record_bytes(bytes_out=len(dirty) * self.layout.nbytes)
        for eviction in evictions:
            self.free.append(self.slot_of.pop(eviction.key))
            self.version.pop(eviction.key, None)

    def flush(self) -> int:
        """Every update made so far becomes durable on NVMe (through DRAM)."""
        with self.lock:
            dirty = self.policy.dirty_keys()
            items = [(k, self.slab.read(self.slot_of[k]), self.version[k]) for k in dirty]
            if items:
                self.lower.put_many(items)
                for key, _, version in items:
                    self.policy.mark_clean(key, version)
            return len(items) + self.lower.flush()

    def revert(self, committed: Mapping[ExpertKey, int]) -> tuple[int, int]:
        """Back to the last flush (recovery, or a training worker that restarts from its checkpoint).

        Every lease ends (its holder is gone). A slot whose version is the one NVMe committed last holds
        exactly the flushed record and stays resident, so a restarted worker finds it hot; any other slot
        is dropped without write-back. Sound because a compute process bumps an expert's version
        (``mark_dirty``) *before* its optimizer writes the slot. Returns (kept, dropped).
        """
        with self.lock:
            self.epoch += 1
            for holder in list(self.leases):
                self.release(holder)
            self.streaming.clear()
            dropped, resident = 0, self.policy.keys()  # a snapshot: evicting while iterating it is safe
            for key in resident:
                version = self.version[key]
                if version == committed.get(key):
                    self.policy.mark_clean(key, version)
                    continue
                self.policy.evict(key)
                self.free.append(self.slot_of.pop(key))
                del self.version[key]
                dropped += 1
            return len(self.slot_of), dropped

    def resident(self) -> dict[ExpertKey, int]:
        with self.lock:
            return dict(self.slot_of)

    def stats(self) -> dict[str, Any]:
        return {"tier": "hot", "incarnation": self.incarnation, "slots": self.slab.num_slots,
                "entries": len(self.policy), "used_bytes": self.policy.used_bytes, **self.policy.counters.to_dict()}

