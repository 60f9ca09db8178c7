"""Rank-row allocation for adapter slots (torch-free bookkeeping).

Every LoRA layer keeps its adapters' weights in one pool of rows; a slot owns the same
contiguous row range in every pool, sized to its adapter's largest rank. Small adapters
therefore pay only for their own rank, and a rank-256 adapter needs no restart: when no
contiguous range is free the pools are compacted or grown (see `AdapterSlots`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Move:
    owner: int
    src: int
    dst: int
    rows: int


class RowAllocator:
    """First-fit allocation of contiguous row ranges in a pool of `capacity` rows."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._ranges: dict[int, tuple[int, int]] = {}  # owner -> (start, rows)

    def start_of(self, owner: int) -> int:
        return self._ranges[owner][0]

    def rows_of(self, owner: int) -> int:
        return self._ranges[owner][1]

    def __contains__(self, owner: int) -> bool:
        return owner in self._ranges

    @property
    def used(self) -> int:
        return sum(rows for _, rows in self._ranges.values())

    def _gaps(self) -> list[tuple[int, int]]:
        gaps, cursor = [], 0
        for start, rows in sorted(self._ranges.values()):
            if start > cursor:
                gaps.append((cursor, start - cursor))
            cursor = start + rows
        if cursor < self.capacity:
            gaps.append((cursor, self.capacity - cursor))
        return gaps

    def allocate(self, owner: int, rows: int) -> int | None:
        """Reserve `rows` contiguous rows for `owner`; None if no gap is large enough."""
        if owner in self._ranges:
            raise ValueError(f"owner {owner} already holds rows; free them first")
        if rows <= 0:
            raise ValueError("rows must be positive")
        for start, size in self._gaps():
            if size >= rows:
                self._ranges[owner] = (start, rows)
                return start
        return None

    def free(self, owner: int) -> None:
        self._ranges.pop(owner, None)

    def compact(self) -> list[Move]:
        """Pack every range to the front; returns the moves, in an order safe for in-place copies."""
        moves, cursor = [], 0
        for owner, (start, rows) in sorted(self._ranges.items(), key=lambda kv: kv[1][0]):
            if start != cursor:
                moves.append(Move(owner=owner, src=start, dst=cursor, rows=rows))
                self._ranges[owner] = (cursor, rows)
            cursor += rows
        return moves

    def grow(self, capacity: int) -> None:
        if capacity < self.capacity:
            raise ValueError("pools only grow")
        self.capacity = capacity
