"""Rank-row allocator bookkeeping (torch-free): first-fit ranges and packing in a fixed pool."""

from __future__ import annotations

import random

import pytest

from lorafold.server.lora.rows import RowAllocator


def _check_disjoint(rows: RowAllocator, owners: dict[int, int]) -> None:
    """Every owner holds its own size, inside the pool, overlapping no other owner."""
    spans = sorted((rows.start_of(o), rows.rows_of(o), o) for o in owners)
    for (s0, n0, o0), (s1, _, o1) in zip(spans, spans[1:]):
        assert s0 + n0 <= s1, f"owners {o0} and {o1} overlap"
    for start, size, owner in spans:
        assert size == owners[owner]
        assert 0 <= start and start + size <= rows.capacity


def test_first_fit_reuses_freed_gaps():
    rows = RowAllocator(64)
    assert [rows.allocate(o, 16) for o in range(3)] == [0, 16, 32]
    rows.free(1)
    assert rows.allocate(3, 8) == 16  # the first gap that holds it
    assert rows.allocate(4, 8) == 24
    assert rows.allocate(5, 16) == 48
    assert rows.used == 64
    assert rows.allocate(6, 1) is None


def test_relayout_packs_to_the_front_in_order_and_refuses_what_cannot_fit():
    rows = RowAllocator(64)
    for o, size in enumerate([8, 16, 8, 16]):
        rows.allocate(o, size)  # [0, 8) [8, 24) [24, 32) [32, 48)
    rows.free(1)
    rows.free(2)
    assert rows.allocate(9, 32) is None  # 32 rows free, but in two gaps of 16
    moves = rows.relayout(32)
    assert [(m.owner, m.src, m.dst, m.rows) for m in moves] == [(0, 0, 0, 8), (3, 32, 8, 16)]
    assert rows.capacity == 64
    assert rows.allocate(9, 32) == 24
    rows.free(0)
    before = {o: (rows.start_of(o), rows.rows_of(o)) for o in (3, 9)}
    with pytest.raises(ValueError, match="72 rows do not fit the pool's 64 rows"):
        rows.relayout(24)  # 16 rows free: no packing makes room for 24
    assert {o: (rows.start_of(o), rows.rows_of(o)) for o in (3, 9)} == before, "a refused relayout moves nothing"
    moves = rows.relayout(8)
    assert [(m.owner, m.src, m.dst) for m in moves] == [(3, 8, 0), (9, 24, 16)]
    assert rows.allocate(10, 8) == 48


def test_moves_towards_the_front_can_be_applied_in_order():
    """The pools copy moved ranges in list order: no range may be overwritten before it is read."""
    rng = random.Random(2)
    rows = RowAllocator(4096)
    sizes = {o: rng.choice([1, 4, 8, 16, 64]) for o in range(40)}
    for o, size in sizes.items():
        rows.allocate(o, size)
    for o in rng.sample(range(40), 15):
        rows.free(o)
        del sizes[o]
    moves = rows.relayout(1)
    for k, m in enumerate(moves):
        assert m.dst <= m.src
        for later in moves[k + 1 :]:
            assert m.dst + m.rows <= later.src, "a move would overwrite a range still to be read"
    _check_disjoint(rows, sizes)


def test_random_churn_keeps_ranges_disjoint():
    rng = random.Random(0)
    rows = RowAllocator(64)
    owners: dict[int, int] = {}
    for step in range(2000):
        size = rng.choice([1, 4, 8, 16, 32])
        while owners and (rows.used + size > rows.capacity or len(owners) == 16 or rng.random() < 0.4):
            victim = rng.choice(sorted(owners))
            rows.free(victim)
            del owners[victim]
        owner = step
        if rows.allocate(owner, size) is None:
            moves = rows.relayout(size)
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
