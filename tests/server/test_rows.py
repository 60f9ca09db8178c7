"""Rank-row allocator bookkeeping (torch-free)."""

from __future__ import annotations

import pytest

from lorafold.server.lora.rows import RowAllocator


def test_first_fit_free_and_reuse():
    rows = RowAllocator(64)
    assert rows.allocate(0, 16) == 0
    assert rows.allocate(1, 8) == 16
    assert rows.allocate(2, 40) == 24
    assert rows.allocate(3, 1) is None  # full
    rows.free(1)
    assert rows.allocate(3, 4) == 16  # reuses the gap
    assert rows.used == 60


def test_compaction_moves_in_safe_order():
    rows = RowAllocator(32)
    for owner, size in enumerate([8, 8, 8, 8]):
        rows.allocate(owner, size)
    rows.free(0)
    rows.free(2)
    assert rows.allocate(9, 16) is None  # 16 free rows, but fragmented
    moves = rows.compact()
    assert [(m.owner, m.src, m.dst) for m in moves] == [(1, 8, 0), (3, 24, 8)]
    assert rows.allocate(9, 16) == 16


def test_grow_and_errors():
    rows = RowAllocator(4)
    rows.allocate(0, 4)
    rows.grow(12)
    assert rows.allocate(1, 8) == 4
    with pytest.raises(ValueError):
        rows.grow(2)
    with pytest.raises(ValueError):
        rows.allocate(1, 2)
