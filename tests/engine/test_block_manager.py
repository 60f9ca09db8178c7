"""Paged KV block accounting: allocation, slot mapping, frees, invariants."""

from __future__ import annotations

import random

import pytest

from lorafold.server.engine.block_manager import BlockAccountingError, BlockManager, slot_mapping
from lorafold.server.engine.sequence import Sequence


def seq(rid: str, n: int = 5) -> Sequence:
    return Sequence(rid, list(range(n)))


def test_allocate_covers_computed_plus_new_tokens() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq("a", 9)
    assert bm.num_new_blocks(s, 9) == 3
    bm.allocate(s, 9)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 7
    s.num_computed_tokens = 9
    bm.allocate(s, 3)  # positions 9..11 still fit in block 3
    assert len(s.block_table) == 3
    bm.allocate(s, 4)  # position 12 needs a 4th block
    assert len(s.block_table) == 4 and bm.num_free_blocks == 6
    assert len(set(s.block_table)) == 4


def test_slot_mapping_is_block_times_size_plus_offset() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    other = seq("other")
    bm.allocate(other, 4)  # takes block 0 so `s` gets non-trivial ids
    s = seq("s", 7)
    bm.allocate(s, 7)
    b0, b1 = s.block_table
    assert slot_mapping(s, bm.block_size, 0, 7) == [b0 * 4 + i for i in range(4)] + [b1 * 4 + i for i in range(3)]
    assert slot_mapping(s, bm.block_size, 5, 2) == [b1 * 4 + 1, b1 * 4 + 2]
    assert slot_mapping(s, bm.block_size, 3, 0) == []
    with pytest.raises(BlockAccountingError):
        slot_mapping(s, bm.block_size, 6, 3)  # position 8 is beyond its two blocks


def test_can_allocate_and_over_allocation() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = seq("a"), seq("b")
    assert bm.can_allocate(a, 6) and not bm.can_allocate(a, 7)
    bm.allocate(a, 4)
    assert bm.max_new_tokens(b) == 2
    with pytest.raises(BlockAccountingError):
        bm.allocate(b, 3)
    assert bm.num_free_blocks == 1 and b.block_table == []  # a failed allocate takes nothing


def test_free_returns_everything_and_detects_double_free() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = seq("a"), seq("b")
    bm.allocate(a, 5)
    bm.allocate(b, 3)
    stolen = list(a.block_table)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 6
    bm.free(a)  # no blocks left: a no-op, not a double free
    assert bm.num_free_blocks == 6
    a.block_table = stolen  # pretend the table was not cleared
    with pytest.raises(BlockAccountingError, match="double free"):
        bm.free(a)


def test_block_owned_twice_is_detected() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = seq("a"), seq("b")
    bm.allocate(a, 2)
    b.block_table = list(a.block_table)
    with pytest.raises(BlockAccountingError):
        bm.check_invariants([a, b])
    with pytest.raises(BlockAccountingError):
        bm.free(b)


def test_invariants_detect_leak() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq("a")
    bm.allocate(a, 3)
    bm.check_invariants([a])
    with pytest.raises(BlockAccountingError, match="leaked"):
        bm.check_invariants([])  # a is live but not reported


def test_random_churn_keeps_accounting_exact() -> None:
    rng = random.Random(0)
    bm = BlockManager(num_blocks=32, block_size=4)
    live: list[Sequence] = []
    for step in range(2000):
        if live and rng.random() < 0.3:
            s = live.pop(rng.randrange(len(live)))
            bm.free(s)
        else:
            s = live[rng.randrange(len(live))] if live and rng.random() < 0.5 else seq(f"r{step}")
            n = rng.randint(1, 9)
            if bm.can_allocate(s, n):
                bm.allocate(s, n)
                s.num_computed_tokens += n
                if s not in live:
                    live.append(s)
        bm.check_invariants(live)
        assert bm.num_free_blocks + sum(len(s.block_table) for s in live) == 32
        for s in live:
            assert len(s.block_table) == bm.blocks_needed(s.num_computed_tokens)
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == 32


def test_bad_sizes_rejected() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
