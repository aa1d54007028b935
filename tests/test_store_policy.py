"""Policy of the tiered expert store, without Ray: LRU, bounds, pins, write-back, prefetch, history."""

from __future__ import annotations

import contextlib
import random
import threading

import pytest

from aios_ray.store.policy import (
    AccessHistory,
    Eviction,
    PinnedError,
    PrefetchQueue,
    TierCounters,
    TierFullError,
    TierPolicy,
)


def k(expert: int, layer: int = 0) -> tuple[int, int]:
    """A stand-in for ExpertKey(layer, expert): the policy takes any hashable key."""
    return (layer, expert)


# --- LRU order and bounds -----------------------------------------------------------------------


def test_least_recently_used_goes_first_and_lookup_refreshes():
    tier = TierPolicy(capacity_bytes=300)
    for e in range(3):
        assert tier.admit(k(e), 100) == []
    assert tier.lookup(k(0))  # 0 is now the most recent; 1 is the oldest
    evicted = tier.admit(k(3), 100)
    assert [ev.key for ev in evicted] == [k(1)]
    assert tier.keys() == [k(2), k(0), k(3)]
    assert tier.used_bytes == 300


def test_byte_bound_with_mixed_sizes_evicts_just_enough():
    tier = TierPolicy(capacity_bytes=1000)
    tier.admit(k(0), 100)
    tier.admit(k(1), 500)
    tier.admit(k(2), 300)
    assert tier.victims(250, k(3)) == [Eviction(k(0), 100, False, 0), Eviction(k(1), 500, False, 0)]
    assert len(tier) == 3  # victims() only plans
    evicted = tier.admit(k(3), 250)
    assert [ev.key for ev in evicted] == [k(0), k(1)]
    assert tier.used_bytes == 550 and set(tier.keys()) == {k(2), k(3)}
    assert tier.counters.evictions == 2


def test_entry_bound_evicts_even_when_bytes_fit():
    tier = TierPolicy(capacity_bytes=10_000, capacity_entries=2)
    tier.admit(k(0), 10)
    tier.admit(k(1), 20)
    assert [ev.key for ev in tier.admit(k(2), 30)] == [k(0)]
    assert len(tier) == 2 and tier.used_bytes == 50


def test_readmit_updates_size_without_duplicating():
    tier = TierPolicy(capacity_bytes=300)
    tier.admit(k(0), 100)
    tier.admit(k(1), 100)
    assert tier.admit(k(0), 150) == []  # grows in place and becomes most recent
    assert tier.keys() == [k(1), k(0)] and tier.used_bytes == 250
    assert [ev.key for ev in tier.admit(k(0), 250)] == [k(1)]  # grows by evicting others, not itself
    assert tier.keys() == [k(0)] and tier.used_bytes == 250


def test_entry_larger_than_tier_is_refused():
    tier = TierPolicy(capacity_bytes=100)
    with pytest.raises(TierFullError, match="more than the tier"):
        tier.admit(k(0), 101)
    assert len(tier) == 0


# --- pins -----------------------------------------------------------------------------------------


def test_pinned_entries_are_never_evicted():
    tier = TierPolicy(capacity_bytes=300)
    for e in range(3):
        tier.admit(k(e), 100)
    tier.pin(k(0))  # the oldest, but leased
    assert [ev.key for ev in tier.admit(k(3), 100)] == [k(1)]
    assert k(0) in tier
    with pytest.raises(PinnedError):
        tier.evict(k(0))
    assert tier.unpin(k(0)) == 0
    assert tier.evict(k(0)) == Eviction(k(0), 100, False, 0)


def test_tier_full_when_everything_is_pinned_and_nothing_is_lost():
    tier = TierPolicy(capacity_bytes=200)
    tier.admit(k(0), 100)
    tier.admit(k(1), 100)
    tier.pin(k(0))
    tier.pin(k(1))
    with pytest.raises(TierFullError, match="pinned"):
        tier.admit(k(2), 50)
    with pytest.raises(TierFullError):
        tier.victims(50, k(2))
    assert tier.keys() == [k(0), k(1)] and tier.used_bytes == 200 and tier.counters.evictions == 0
    tier.unpin(k(1))
    assert [ev.key for ev in tier.admit(k(2), 50)] == [k(1)]


def test_partial_room_does_not_evict_when_the_rest_is_pinned():
    tier = TierPolicy(capacity_bytes=300)
    tier.admit(k(0), 100)
    tier.admit(k(1), 200)
    tier.pin(k(1))
    with pytest.raises(TierFullError):
        tier.admit(k(2), 250)  # evicting 0 would free only 100 of the 250 needed
    assert k(0) in tier  # not evicted for nothing


def test_pins_are_counted_and_unpin_below_zero_is_an_error():
    tier = TierPolicy(capacity_bytes=100)
    tier.admit(k(0), 10)
    assert not tier.pinned(k(0))
    assert tier.pin(k(0)) == 1 and tier.pin(k(0)) == 2
    assert tier.unpin(k(0)) == 1 and tier.pinned(k(0))
    tier.unpin(k(0))
    assert not tier.pinned(k(0))
    with pytest.raises(ValueError, match="not pinned"):
        tier.unpin(k(0))
    with pytest.raises(KeyError):
        tier.pin(k(9))


# --- dirtiness and write-back --------------------------------------------------------------------


def test_dirty_entries_come_back_as_dirty_evictions():
    tier = TierPolicy(capacity_bytes=200)
    tier.admit(k(0), 100)
    tier.admit(k(1), 100, dirty=True, version=4)
    assert tier.mark_dirty(k(0)) == 1
    assert tier.dirty_keys() == [k(0), k(1)]
    evicted = tier.admit(k(2), 200)
    assert evicted == [Eviction(k(0), 100, True, 1), Eviction(k(1), 100, True, 4)]
    assert tier.counters.writebacks == 2 and tier.dirty_keys() == []


def test_stale_mark_clean_keeps_the_newer_update_dirty():
    tier = TierPolicy(capacity_bytes=100)
    tier.admit(k(0), 10)
    v1 = tier.mark_dirty(k(0))  # a write-back of v1 starts ...
    v2 = tier.mark_dirty(k(0))  # ... while the optimizer updates it again
    assert v2 > v1
    assert not tier.mark_clean(k(0), v1)
    assert tier.dirty_keys() == [k(0)]
    assert tier.mark_clean(k(0), v2)
    assert tier.dirty_keys() == [] and tier.counters.writebacks == 1
    assert tier.mark_dirty(k(0), version=10) == 10 and tier.info(k(0)).version == 10


def test_readmit_does_not_forget_a_pending_writeback():
    tier = TierPolicy(capacity_bytes=100)
    tier.admit(k(0), 10, dirty=True, version=3)
    tier.pin(k(0))
    tier.admit(k(0), 10, dirty=False, version=1)
    info = tier.info(k(0))
    assert info.dirty and info.version == 3 and info.pins == 1


# --- prefetch accounting and counters ------------------------------------------------------------


def test_prefetched_entry_counts_prefetch_hit_only_on_first_use():
    tier = TierPolicy(capacity_bytes=100)
    tier.admit(k(0), 10, prefetched=True)
    assert tier.lookup(k(0)) and tier.lookup(k(0))
    c = tier.counters
    assert (c.hits, c.prefetch_used, c.prefetch_issued, c.prefetch_wasted, c.misses) == (2, 1, 1, 0, 0)


def test_evicted_unused_prefetch_counts_as_wasted_not_as_a_hit():
    tier = TierPolicy(capacity_bytes=100)
    tier.admit(k(0), 100, prefetched=True)
    tier.admit(k(1), 100)  # evicts the prefetch before anyone used it
    assert not tier.lookup(k(0))
    c = tier.counters
    assert (c.hits, c.prefetch_used, c.prefetch_issued, c.prefetch_wasted, c.misses, c.evictions) == (0, 0, 1, 1, 1, 1)


def test_counters_hit_rate_merge_and_dict():
    tier = TierPolicy(capacity_bytes=100)
    assert tier.counters.hit_rate == 0.0
    tier.admit(k(0), 10)
    for key in (k(0), k(0), k(0), k(1)):
        tier.lookup(key)
    tier.record_stall(0.5)
    tier.record_bytes(bytes_in=10, bytes_out=4)
    c = tier.counters
    assert c.hit_rate == pytest.approx(0.75)
    total = c.merge(TierCounters(hits=1, misses=3, stall_seconds=0.25))
    assert (total.hits, total.misses, total.stall_seconds) == (4, 4, 0.75)
    assert total.hit_rate == pytest.approx(0.5)
    d = c.to_dict()
    assert d["hit_rate"] == pytest.approx(0.75) and d["bytes_in"] == 10 and d["bytes_out"] == 4
    assert tier.reset_counters().hits == 3 and tier.counters.hits == 0


# --- PrefetchQueue ---------------------------------------------------------------------------------


def test_prefetch_queue_dedups_keeps_order_and_bounds():
    q = PrefetchQueue(maxlen=3)
    assert q.push([k(1), k(2), k(1)]) == 2
    assert q.push([k(2), k(3), k(4)]) == 1  # 2 already queued; 4 refused: full
    assert len(q) == 3 and k(4) not in q
    assert q.discard(k(2)) and not q.discard(k(2))  # arrived by demand
    assert q.pop(5) == [k(1), k(3)]
    assert len(q) == 0 and q.pop() == []
    assert q.push([k(1)]) == 1  # popped keys may be queued again


# --- AccessHistory -----------------------------------------------------------------------------------


def test_access_history_window_and_union_size():
    h = AccessHistory(window=2)
    h.record(1, 0, [1, 2])
    h.record(1, 1, [2])
    h.record(1, 0, [3])  # a second micro-batch of step 1: union
    assert h.union_size(1) == 4
    h.record(2, 0, [4])
    h.record(3, 0, [5])  # step 1 leaves the window
    assert h.steps() == [2, 3]
    assert h.union_size(1) == 0
    assert h.predict(0) == [5, 4]
    h.record(1, 0, [9])  # too old to enter the window
    assert h.steps() == [2, 3] and 9 not in h.predict(0)


def test_access_history_predicts_recent_then_frequent():
    h = AccessHistory(window=4)
    h.record(1, 0, [7, 8, 9])
    h.record(2, 0, [8, 9])
    h.record(3, 0, [9, 3])
    h.record(4, 0, [1, 3])
    h.record(4, 1, [42])  # another layer: not mixed in
    assert h.predict(0) == [3, 1, 9, 8, 7]  # 3 and 1 last used at 4: 3 used twice goes first
    assert h.predict(0, top=2) == [3, 1]
    assert h.predict(1) == [42] and h.predict(5) == []


# --- threads ---------------------------------------------------------------------------------------------


def test_threaded_stress_keeps_bounds_and_pins():
    """Threads admit, look up and lease at once; a leased entry stays present for its whole lease."""
    tier = TierPolicy(capacity_bytes=2_000, capacity_entries=12)
    errors: list[BaseException] = []

    def churn(rng: random.Random, n: int) -> None:
        for _ in range(n):
            key = k(rng.randrange(40), rng.randrange(2))
            if rng.random() < 0.6:
                with contextlib.suppress(TierFullError):
                    tier.admit(key, rng.choice((50, 100, 200, 400)), dirty=rng.random() < 0.3)
            else:
                tier.lookup(key)
            assert tier.used_bytes <= tier.capacity_bytes and len(tier) <= 12

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                key = k(rng.randrange(40), rng.randrange(2))
                try:
                    tier.pin(key)
                except KeyError:
                    churn(rng, 5)
                    continue
                churn(rng, 5)  # others evict around us meanwhile
                assert key in tier and tier.pinned(key), f"{key} evicted while leased"
                tier.unpin(key)
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    present = tier.keys()
    assert tier.used_bytes == sum(tier.info(key).nbytes for key in present) <= 2_000
    assert all(not tier.pinned(key) for key in present)
    c = tier.counters
    assert c.hits > 0 and c.misses > 0 and c.evictions > 0
