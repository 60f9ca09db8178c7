"""Rank-row allocation for adapter slots (torch-free bookkeeping).

Every LoRA layer keeps its adapters' weights in one pool of rows; a slot owns the same
contiguous row range in every pool, sized to its adapter's largest rank, so small adapters
pay only for their own rank and a rank-256 adapter needs no restart. Ranges are placed
first-fit; when no gap holds a new range, `relayout` packs the owned ranges to the front
(and grows the pool when even that leaves too little room), and the pools copy the moved
rows (`MultiLoRALinear.relayout_rows`). The kernels read any layout, so placement only has
to keep the pool small, never to keep adapters adjacent.
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

    def __init__(self, capacity: int, *, max_capacity: int | None = None) -> None:
        """max_capacity: the pool never grows past this many rows (None: no limit)."""
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        if max_capacity is not None and max_capacity < capacity:
            raise ValueError(f"max_capacity {max_capacity} < capacity {capacity}")
        self.capacity = capacity
        self.max_capacity = max_capacity
        self._ranges: dict[int, tuple[int, int]] = {}  # owner -> (start, rows)

    def start_of(self, owner: int) -> int:
        return self._ranges[owner][0]

    def rows_of(self, owner: int) -> int:
        return self._ranges[owner][1]

    def __contains__(self, owner: int) -> bool:
        return owner in self._ranges

    @property
    def used(self) -> int:
        """Rows owned by ranges."""
        return sum(rows for _, rows in self._ranges.values())

    def _in_order(self) -> list[tuple[int, int, int]]:
        """(start, rows, owner) of every range, by start."""
        return sorted((start, rows, owner) for owner, (start, rows) in self._ranges.items())

    def allocate(self, owner: int, rows: int) -> int | None:
        """Reserve `rows` contiguous rows for `owner` in the first gap that holds them; None
        when no gap does (then `relayout` makes room)."""
        if owner in self._ranges:
            raise ValueError(f"owner {owner} already holds rows; free them first")
        if rows <= 0:
            raise ValueError("rows must be positive")
        cursor = 0
        for start, size, _ in [*self._in_order(), (self.capacity, 0, -1)]:
            if start - cursor >= rows:
                self._ranges[owner] = (cursor, rows)
                return cursor
            cursor = max(cursor, start + size)
        return None

    def free(self, owner: int) -> None:
        self._ranges.pop(owner, None)

    def relayout(self, rows: int) -> list[Move]:
        """Pack the owned ranges to the front (in their current order), growing `capacity`
        (at least doubling it, never past `max_capacity`) until `rows` more fit behind them.
        ValueError when they cannot fit within `max_capacity`.

        Returns every owned range with its old and new place (src == dst when it stays); the
        pools copy them in order of increasing start, which never overwrites a range not yet
        read (every range moves towards the front)."""
        need = self.used + rows
        if self.max_capacity is not None and need > self.max_capacity:
            raise ValueError(f"{need} rows do not fit the pool's limit of {self.max_capacity} rows")
        moves, cursor = [], 0
        for start, size, owner in self._in_order():
            moves.append(Move(owner=owner, src=start, dst=cursor, rows=size))
            self._ranges[owner] = (cursor, size)
            cursor += size
        if need > self.capacity:
            grown = max(2 * self.capacity, need)
            self.capacity = grown if self.max_capacity is None else min(grown, self.max_capacity)
        return moves
