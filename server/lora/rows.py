"""Rank-row allocation for adapter slots (torch-free bookkeeping).

Every LoRA layer keeps its adapters' weights in one pool of rows; a slot owns the same
contiguous row range in every pool, sized to its adapter's largest rank, so small adapters
pay only for their own rank and a rank-256 adapter needs no restart. The pools have a fixed
number of rows (the adapter memory budget, allocated once). Ranges are placed first-fit;
when no gap holds a new range but the free rows add up to enough, `relayout` packs the
owned ranges to the front and the pools copy the moved rows
(`MultiLoRALinear.relayout_rows`). The kernels read any layout, so placement never has to
keep adapters adjacent.
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
        """Pack the owned ranges to the front (in their current order), so that `rows` more
        fit behind them. ValueError when the pool is too full for that (nothing moves then).

        Returns every owned range with its old and new place (src == dst when it stays); the
        pools copy them in order of increasing start, which never overwrites a range not yet
        read (every range moves towards the front)."""
        need = self.used + rows
        if need > self.capacity:
            raise ValueError(f"{need} rows do not fit the pool's {self.capacity} rows")
        moves, cursor = [], 0
        for start, size, owner in self._in_order():
            moves.append(Move(owner=owner, src=start, dst=cursor, rows=size))
            self._ranges[owner] = (cursor, size)
            cursor += size
        return moves
