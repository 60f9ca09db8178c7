"""Rank-row allocator bookkeeping (torch-free): zones keep same-size ranges side by side."""

from __future__ import annotations

import random

import pytest

from lorafold.server.lora.rows import MIN_ZONE_SLOTS, RowAllocator


def _check_disjoint(rows: RowAllocator, owners: dict[int, int]) -> None:
    """Every owner holds its own size, inside the pool, overlapping no other owner."""
    spans = sorted((rows.start_of(o), rows.rows_of(o), o) for o in owners)
    for (s0, n0, o0), (s1, _, o1) in zip(spans, spans[1:]):
        assert s0 + n0 <= s1, f"owners {o0} and {o1} overlap"
    for start, size, owner in spans:
        assert size == owners[owner]
        assert 0 <= start and start + size <= rows.capacity


def test_same_size_ranges_share_a_zone_in_order():
    rows = RowAllocator(256)
    assert [rows.allocate(o, 16) for o in range(3)] == [0, 16, 32]
    # a rank-8 range opens its own zone after the rank-16 zone's MIN_ZONE_SLOTS positions
    assert rows.allocate(10, 8) == 16 * MIN_ZONE_SLOTS
    assert rows.allocate(3, 16) == 48  # the rank-16 zone's last free position
    assert rows.used == 4 * 16 + 8
    assert rows.reserved == 16 * MIN_ZONE_SLOTS + 8 * MIN_ZONE_SLOTS


def test_freed_position_is_reused_and_empty_zone_released():
    rows = RowAllocator(128)
    for o in range(4):
        rows.allocate(o, 16)
    rows.free(1)
    assert rows.allocate(7, 16) == 16
    for o in (0, 2, 3, 7):
        rows.free(o)
    assert rows.reserved == 0  # the empty zone is gone; a rank-32 zone fits from row 0
    assert rows.allocate(8, 32) == 0


def test_new_zones_double_and_respect_max_owners():
    rows = RowAllocator(4096, max_owners=10)
    for o in range(MIN_ZONE_SLOTS):
        rows.allocate(o, 8)
    assert rows.zone_slots(8) == MIN_ZONE_SLOTS  # as many as the class holds
    for o in range(MIN_ZONE_SLOTS, 2 * MIN_ZONE_SLOTS):
        rows.allocate(o, 8)
    assert rows.zone_slots(8) == 10 - 2 * MIN_ZONE_SLOTS  # capped by max_owners
    assert rows.allocate(99, 512) == 64  # a new class opens its zone after the rank-8 zones


def test_full_pool_returns_none_then_relayout_packs_classes_and_grows():
    rows = RowAllocator(96)
    rows.allocate(0, 16)  # zone [0, 64)
    rows.allocate(1, 8)  # zone [64, 96)
    assert rows.allocate(2, 32) is None  # no gap for a rank-32 zone
    moves = rows.relayout(32, rows.zone_slots(32))
    # every owner is listed with its old and new place; classes in increasing size
    assert sorted((m.owner, m.src, m.dst, m.rows) for m in moves) == [(0, 0, 32, 16), (1, 64, 0, 8)]
    assert rows.capacity >= 32 + 64 + 32 * MIN_ZONE_SLOTS
    assert rows.allocate(2, 32) == 96


def test_relayout_merges_a_class_into_one_zone():
    rows = RowAllocator(64 * 16)
    order = [16, 8, 16, 16, 8, 16, 16, 8]
    for o, size in enumerate(order):
        rows.allocate(o, size)
    rows.free(2)
    moves = rows.relayout()
    got = {m.owner: m.dst for m in moves}
    sixteens = [o for o, s in enumerate(order) if s == 16 and o != 2]
    eights = [o for o, s in enumerate(order) if s == 8]
    assert [got[o] for o in eights] == [0, 8, 16]  # one rank-8 zone, load order kept
    first16 = got[sixteens[0]]
    assert [got[o] for o in sixteens] == [first16 + 16 * k for k in range(len(sixteens))]


def test_random_churn_keeps_ranges_disjoint():
    rng = random.Random(0)
    rows = RowAllocator(64, max_owners=16)
    owners: dict[int, int] = {}
    for step in range(2000):
        if owners and (len(owners) == 16 or rng.random() < 0.4):
            victim = rng.choice(sorted(owners))
            rows.free(victim)
            del owners[victim]
            continue
        owner = step
        size = rng.choice([1, 4, 8, 16, 32, 128])
        if rows.allocate(owner, size) is None:
            moves = rows.relayout(size, rows.zone_slots(size))
            assert sorted(m.owner for m in moves) == sorted(owners)
            assert rows.allocate(owner, size) is not None
        owners[owner] = size
        _check_disjoint(rows, owners)
    assert rows.used == sum(owners.values())


def test_errors():
    rows = RowAllocator(64)
    rows.allocate(0, 4)
    with pytest.raises(ValueError):
        rows.allocate(0, 2)
    with pytest.raises(ValueError):
        rows.allocate(1, 0)
    with pytest.raises(ValueError):
        RowAllocator(-1)


def _class_places(rows: RowAllocator, size: int) -> list[int | None]:
    """Occupants of every position of class `size`, zones in row order (None = free)."""
    return [m for zone in sorted(rows._zones, key=lambda z: z.start) if zone.size == size for m in zone.members]


def test_pack_puts_active_owners_first_with_minimal_moves():
    rng = random.Random(1)
    rows = RowAllocator(4096, max_owners=24)
    sizes = {o: rng.choice([4, 8, 16]) for o in range(24)}
    for o, size in sizes.items():
        assert rows.allocate(o, size) is not None
    for o in rng.sample(range(24), 5):  # free positions inside the zones too
        rows.free(o)
        del sizes[o]
    for _ in range(40):
        active = set(rng.sample(sorted(sizes), rng.randint(0, len(sizes))))
        before = {o: rows.start_of(o) for o in sizes}
        late = 0
        for size in {4, 8, 16}:
            places = _class_places(rows, size)
            k = sum(1 for m in places if m in active)
            late += sum(1 for m in places[k:] if m in active)
        moves = rows.pack(active)
        after = {o: rows.start_of(o) for o in sizes}
        for size in {4, 8, 16}:
            places = _class_places(rows, size)
            k = sum(1 for m in places if m in active)
            assert all(m in active for m in places[:k]), f"class {size}: active owners are not first: {places}"
        # each late active owner moves once, trading with at most one inactive owner
        assert sum(m.owner in active for m in moves) == late
        assert len(moves) <= 2 * late
        for m in moves:
            assert (before[m.owner], after[m.owner], sizes[m.owner]) == (m.src, m.dst, m.rows)
        assert {o for o in sizes if before[o] != after[o]} == {m.owner for m in moves}
        _check_disjoint(rows, sizes)
        assert rows.pack(active) == [], "packing twice moves nothing"


def test_pack_across_zones_releases_a_zone_it_empties():
    rows = RowAllocator(1024)
    for o in range(MIN_ZONE_SLOTS + 1):  # the last owner opens a second rank-8 zone
        rows.allocate(o, 8)
    rows.free(0)
    moves = rows.pack({MIN_ZONE_SLOTS})
    assert [(m.owner, m.dst) for m in moves] == [(MIN_ZONE_SLOTS, 0)]
    assert rows.reserved == 8 * MIN_ZONE_SLOTS, "the emptied second zone must be released"
