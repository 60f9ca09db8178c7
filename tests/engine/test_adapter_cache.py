"""Adapter slot table: hits / loads, LRU eviction that never touches a pinned adapter, invalidation."""

from __future__ import annotations

import random

import pytest

from lorafold.server.engine.adapter_cache import AdapterSlotTable, NoFreeSlotError
from lorafold.server.engine.block_manager import BlockManager
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.scheduler import Scheduler
from lorafold.server.engine.sampling_params import SamplingParams
from lorafold.server.engine.sequence import Sequence


def test_free_slots_then_hits() -> None:
    t = AdapterSlotTable(3)
    assert t.acquire("a") == (0, True)
    assert t.acquire("b") == (1, True)
    assert t.acquire("a") == (0, False)
    assert t.refcount(0) == 2 and t.slot_of("a") == 0 and t.slot_of("zzz") is None
    assert (t.stats.hits, t.stats.misses, t.stats.evictions) == (1, 2, 0)
    assert t.resident() == {"a": 0, "b": 1}
    t.check_invariants()


def test_lru_eviction_skips_pinned_and_takes_least_recent() -> None:
    t = AdapterSlotTable(3)
    for name in "abc":
        t.acquire(name)
    t.unpin(t.slot_of("b"))  # b idle first
    t.unpin(t.slot_of("a"))  # then a; c stays pinned
    slot, load = t.acquire("d")
    assert load and slot == 1 and t.slot_of("b") is None  # b was least recently used
    slot, load = t.acquire("e")
    assert load and slot == 0 and t.slot_of("a") is None
    assert t.slot_of("c") == 2 and t.stats.evictions == 2
    assert not t.can_acquire("f")
    with pytest.raises(NoFreeSlotError, match="pinned"):
        t.acquire("f")
    assert t.can_acquire("c")  # resident: always fine
    t.check_invariants()


def test_reuse_refreshes_recency() -> None:
    t = AdapterSlotTable(2)
    a, _ = t.acquire("a")
    b, _ = t.acquire("b")
    t.unpin(a)
    t.unpin(b)
    t.unpin(t.acquire("a")[0])  # a used again: b is now the LRU
    assert t.acquire("c") == (b, True)
    assert t.slot_of("a") == a


def test_unbalanced_unpin_and_empty_pin_raise() -> None:
    t = AdapterSlotTable(2)
    s, _ = t.acquire("a")
    t.unpin(s)
    with pytest.raises(ValueError, match="unbalanced"):
        t.unpin(s)
    with pytest.raises(ValueError):
        t.pin(1)
    t.pin(s)
    assert t.refcount(s) == 1
    with pytest.raises(ValueError):
        AdapterSlotTable(0)


def test_invalidate_unpinned_frees_at_once() -> None:
    t = AdapterSlotTable(2)
    s, _ = t.acquire("a")
    t.unpin(s)
    t.invalidate("a")
    assert t.slot_of("a") is None and t.num_free == 2
    assert t.acquire("a") == (0, True)  # reloaded
    t.invalidate("never-seen")  # a no-op
    t.check_invariants()


def test_invalidate_pinned_drains_then_frees() -> None:
    t = AdapterSlotTable(2)
    old, _ = t.acquire("a")
    t.invalidate("a")
    new, load = t.acquire("a")  # new weights: a fresh slot and a load, old requests keep theirs
    assert load and new != old and t.refcount(old) == 1
    with pytest.raises(NoFreeSlotError):
        t.acquire("b")  # the stale slot is still in use, never evicted
    t.unpin(old)
    assert t.num_free == 1 and t.slot_of("a") == new
    assert t.acquire("b") == (old, True)
    t.check_invariants()


@pytest.mark.parametrize("seed", range(5))
def test_random_ops_never_evict_a_pinned_adapter(seed: int) -> None:
    rng = random.Random(seed)
    t = AdapterSlotTable(4)
    held: list[tuple[str, int]] = []  # (name, slot) of in-flight requests
    stale: set[int] = set()
    for _ in range(3000):
        op = rng.random()
        if op < 0.5:
            name = f"ad{rng.randrange(8)}"
            if t.can_acquire(name):
                slot, load = t.acquire(name)
                assert not load or all(s != slot for _, s in held), "a slot in use was overwritten"
                held.append((name, slot))
            else:
                with pytest.raises(NoFreeSlotError):
                    t.acquire(name)
        elif op < 0.9 and held:
            name, slot = held.pop(rng.randrange(len(held)))
            t.unpin(slot)
        else:
            name = f"ad{rng.randrange(8)}"
            if t.slot_of(name) is not None:
                stale.add(t.slot_of(name))
            t.invalidate(name)
        t.check_invariants()
        for name, slot in held:  # every in-flight request still finds its weights
            assert t._name[slot] == name
        assert t.num_pinned == len({s for _, s in held})
    s = t.stats
    assert s.misses > 0 and s.hits > 0 and s.evictions > 0


def test_scheduler_gives_new_weights_a_new_slot_after_invalidate() -> None:
    cfg = EngineConfig(block_size=4, num_kv_blocks=32, max_num_seqs=4, max_num_batched_tokens=16,
                       max_prefill_chunk=16, max_loras=2)
    sched = Scheduler(cfg, BlockManager(32, 4))
    first = Sequence("r0", [1, 2, 3], SamplingParams(max_tokens=5), adapter="a")
    sched.add(first)
    out = sched.schedule()
    assert [(x.name, x.slot) for x in out.adapter_loads] == [("a", first.lora_slot)]
    sched.postprocess(out, {"r0": 7})
    sched.adapter_slots.invalidate("a")  # re-registered with new weights
    second = Sequence("r1", [1, 2, 3], SamplingParams(max_tokens=5), adapter="a")
    sched.add(second)
    out = sched.schedule()
    assert [(x.name, x.slot) for x in out.adapter_loads] == [("a", second.lora_slot)]
    new_slot = second.lora_slot
    assert new_slot != first.lora_slot
    sched.abort("r0")
    sched.abort("r1")
    assert first.lora_slot == second.lora_slot == -1  # released
    assert sched.adapter_slots.num_free == 1 and sched.adapter_slots.slot_of("a") == new_slot


def test_row_budget_evicts_idle_lru_until_the_new_adapter_fits() -> None:
    t = AdapterSlotTable(16, capacity_rows=32)
    for name, rows in (("a", 8), ("b", 8), ("c", 16)):
        t.acquire(name, rows)
    assert t.used_rows == 32 and t.num_free == 13  # slots are plentiful, rows are not
    assert not t.can_acquire("d", 4)  # everything pinned
    t.unpin(t.slot_of("b"))
    t.unpin(t.slot_of("a"))  # idle LRU order: b, a; c stays pinned
    assert t.can_acquire("d", 16) and not t.can_acquire("e", 17)
    slot, load = t.acquire("d", 12)  # needs 12 rows: b (8) then a (8) go
    assert load and t.slot_of("a") is None and t.slot_of("b") is None and t.stats.evictions == 2
    assert t.used_rows == 28
    assert t.take_released() == [1 - slot] and t.take_released() == []  # d reuses the other one
    t.check_invariants()


def test_protected_adapters_are_skipped_and_rows_beyond_the_budget_never_fit() -> None:
    t = AdapterSlotTable(8, capacity_rows=16)
    for name in "abcd":
        t.unpin(t.acquire(name, 4)[0])  # all idle, LRU a, b, c, d
    assert not t.can_acquire("e", 4, protected={"a", "b", "c", "d"})
    with pytest.raises(NoFreeSlotError, match="waiting requests"):
        t.acquire("e", 4, protected={"a", "b", "c", "d"})
    slot, load = t.acquire("e", 8, protected={"a", "c"})  # skips a and c: b and d go
    assert load and set(t.resident()) == {"a", "c", "e"}
    assert not t.fits(17) and not t.can_acquire("huge", 17) and t.fits(16)
    t.check_invariants()


def test_a_released_slot_reused_at_once_is_not_reported_empty() -> None:
    t = AdapterSlotTable(1, capacity_rows=8)
    t.unpin(t.acquire("a", 8)[0])
    assert t.acquire("b", 8) == (0, True)  # a evicted, slot 0 reused for b in the same step
    assert t.take_released() == []  # the runner's fill replaces a's weights; nothing to drop


@pytest.mark.parametrize("seed", range(5))
def test_random_ops_with_a_row_budget(seed: int) -> None:
    """Rows held never exceed the budget, pinned and protected adapters are never evicted,
    and every slot emptied is reported by take_released (so the pools drop its rows)."""
    rng = random.Random(seed)
    t = AdapterSlotTable(6, capacity_rows=24)
    sizes = {f"ad{i}": rng.choice([1, 2, 4, 8, 16]) for i in range(10)}
    held: list[tuple[str, int]] = []
    holder: dict[int, str] = {}  # slot -> name whose weights the "pools" hold
    for _ in range(3000):
        op = rng.random()
        if op < 0.5:
            name = f"ad{rng.randrange(10)}"
            protected = {n for n in sizes if rng.random() < 0.3} - {name}
            before = t.resident()
            if t.can_acquire(name, sizes[name], protected):
                slot, load = t.acquire(name, sizes[name], protected)
                gone = set(before) - set(t.resident())
                assert not gone & protected, "a protected adapter was evicted"
                assert all(t._name[s] == n for n, s in held), "an adapter in flight was evicted"
                held.append((name, slot))
                if load:
                    holder[slot] = name
            else:
                with pytest.raises(NoFreeSlotError):
                    t.acquire(name, sizes[name], protected)
        elif op < 0.9 and held:
            t.unpin(held.pop(rng.randrange(len(held)))[1])
        else:
            t.invalidate(f"ad{rng.randrange(10)}")
        for slot in t.take_released():
            holder.pop(slot, None)
        t.check_invariants()
        # the pools hold at most the budget: the weights not yet dropped are all current occupants
        assert all(t._name[s] is not None for s in holder)
        assert sum(t._rows[s] for s in holder) <= 24
    assert t.stats.evictions > 0 and t.stats.hits > 0
