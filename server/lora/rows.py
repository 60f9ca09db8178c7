"""Rank-row allocation for adapter slots (torch-free bookkeeping).

Every LoRA layer keeps its adapters' weights in one pool of rows; a slot owns the same
contiguous row range in every pool, sized to its adapter's largest rank. Small adapters
therefore pay only for their own rank, and a rank-256 adapter needs no restart: when no
range is free the pools are re-laid out and grown (see `AdapterSlots`).

Ranges live in *zones*: a zone holds equal ranges of one size (one allocated rank) side by
side. The CPU LoRA path reads a group of same-rank adapters whose rows are evenly spaced as
one strided view of the pool, and copies (gathers) them otherwise; first-fit placement in
load order interleaves ranks, so with mixed ranks every group was a gather. Measured on
SmolLM2 (64 resident adapters of ranks 8-128, a 64-sequence decode step): 0.97-1.09 s with
the adapters interleaved, 0.56-0.59 s in zones.

A new zone is sized to the ranges its class already has (at least `MIN_ZONE_SLOTS`), so a
class's zones double like a vector's storage and at most half of a class's reserved rows
are empty. When a range finds no place, `relayout` packs the zones to the front, one merged
zone per class in increasing size with room for the new range's class, and grows the pool
when they do not fit. With `max_capacity` (the adapter memory budget in rows) the pool never
grows past it: when the zones with their free positions would not fit, the relayout packs
them tight (owned ranges only, one free range for the new one), so any set of ranges whose
rows add up to at most `max_capacity` can be placed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_ZONE_SLOTS = 4


@dataclass(frozen=True, slots=True)
class Move:
    owner: int
    src: int
    dst: int
    rows: int


@dataclass(slots=True)
class _Zone:
    """`len(members)` ranges of `size` rows from row `start`; `members[p]` owns range p."""

    start: int
    size: int
    members: list[int | None] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.size * len(self.members)

    @property
    def end(self) -> int:
        return self.start + self.rows


class RowAllocator:
    """Zoned allocation of contiguous row ranges in a pool of `capacity` rows."""

    def __init__(self, capacity: int, *, max_owners: int | None = None, max_capacity: int | None = None) -> None:
        """max_owners: most ranges held at once (the adapter slots); caps new zones.
        max_capacity: the pool never grows past this many rows (None: no limit)."""
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        if max_capacity is not None and max_capacity < capacity:
            raise ValueError(f"max_capacity {max_capacity} < capacity {capacity}")
        self.capacity = capacity
        self.max_owners = max_owners
        self.max_capacity = max_capacity
        self._zones: list[_Zone] = []  # sorted by start
        self._where: dict[int, tuple[_Zone, int]] = {}  # owner -> (zone, position)

    def start_of(self, owner: int) -> int:
        zone, pos = self._where[owner]
        return zone.start + pos * zone.size

    def rows_of(self, owner: int) -> int:
        return self._where[owner][0].size

    def __contains__(self, owner: int) -> bool:
        return owner in self._where

    @property
    def used(self) -> int:
        """Rows owned by ranges."""
        return sum(zone.size for zone, _ in self._where.values())

    @property
    def reserved(self) -> int:
        """Rows held by zones (owned ranges and the free positions between them)."""
        return sum(zone.rows for zone in self._zones)

    def zone_slots(self, rows: int) -> int:
        """Ranges a new zone of `rows`-row ranges is made for: as many as its class holds
        already (at least MIN_ZONE_SLOTS), never more than `max_owners` allows."""
        held = sum(len(z.members) for z in self._zones if z.size == rows)
        want = max(MIN_ZONE_SLOTS, held)
        if self.max_owners is not None:
            want = min(want, max(1, self.max_owners - held))
        return want

    def _gaps(self) -> list[tuple[int, int]]:
        gaps, cursor = [], 0
        for zone in self._zones:
            if zone.start > cursor:
                gaps.append((cursor, zone.start - cursor))
            cursor = zone.end
        if cursor < self.capacity:
            gaps.append((cursor, self.capacity - cursor))
        return gaps

    def allocate(self, owner: int, rows: int) -> int | None:
        """Reserve `rows` contiguous rows for `owner`: a free position of a zone of that size,
        else a new zone in the first gap that holds it. None when neither exists."""
        if owner in self._where:
            raise ValueError(f"owner {owner} already holds rows; free them first")
        if rows <= 0:
            raise ValueError("rows must be positive")
        for zone in self._zones:
            if zone.size == rows and None in zone.members:
                return self._place(owner, zone, zone.members.index(None))
        slots = self.zone_slots(rows)
        gaps = self._gaps()
        if self.max_capacity is not None and self.capacity >= self.max_capacity:
            # at the limit: a smaller zone in a gap beats re-laying every pool out for each range
            fit = [(start, min(slots, size // rows)) for start, size in gaps if size >= rows]
        else:
            fit = [(start, slots) for start, size in gaps if size >= rows * slots]
        if fit:
            start, n = fit[0]
            zone = _Zone(start, rows, [None] * n)
            self._zones.append(zone)
            self._zones.sort(key=lambda z: z.start)
            return self._place(owner, zone, 0)
        return None

    def _place(self, owner: int, zone: _Zone, pos: int) -> int:
        zone.members[pos] = owner
        self._where[owner] = (zone, pos)
        return zone.start + pos * zone.size

    def free(self, owner: int) -> None:
        found = self._where.pop(owner, None)
        if found is None:
            return
        zone, pos = found
        zone.members[pos] = None
        if all(m is None for m in zone.members):
            self._zones.remove(zone)

    def pack(self, active: set[int]) -> list[Move]:
        """Put the `active` owners of every size class in the class's first positions (its
        zones in row order), so that a batch using only them reads one evenly spaced run of
        rows per zone: a view, where scattered owners would be gathered (copied) every layer.

        Minimal: an active owner already among its class's first k positions (k = the class's
        active owners) stays; each one past them trades places with an inactive occupant (or
        a free position) among the first k. Returns the moves (both sides of each trade, so
        a pool must read every moved range before writing any, as for `relayout`)."""
        moves: list[Move] = []
        for size in sorted({z.size for z in self._zones}):
            places = [(zone, p) for zone in self._zones if zone.size == size for p in range(len(zone.members))]
            k = sum(1 for zone, p in places if zone.members[p] in active)
            holes = [pl for pl in places[:k] if pl[0].members[pl[1]] not in active]
            late = [pl for pl in places[k:] if pl[0].members[pl[1]] in active]
            for (hz, hp), (lz, lp) in zip(holes, late):
                mover, other = lz.members[lp], hz.members[hp]
                hz.members[hp], lz.members[lp] = mover, other
                self._where[mover] = (hz, hp)
                moves.append(Move(owner=mover, src=lz.start + lp * size, dst=hz.start + hp * size, rows=size))
                if other is not None:
                    self._where[other] = (lz, lp)
                    moves.append(Move(owner=other, src=hz.start + hp * size, dst=lz.start + lp * size, rows=size))
        self._zones = [z for z in self._zones if any(m is not None for m in z.members)]  # as `free` does
        return moves

    def relayout(self, size: int | None = None, extra_slots: int = 0) -> list[Move]:
        """Pack the zones to the front, one zone per size class in increasing size (owners in
        their current order, then the class's free positions, plus `extra_slots` free ones
        for class `size`), growing `capacity` (at least doubling it, never past
        `max_capacity`) when they do not fit. Past `max_capacity` the zones keep no free
        positions but one for class `size`; ValueError when even that does not fit.

        Returns every owned range with its old and new place (src == dst when it stays); the
        moves may overlap, so the pools must read every moved range before writing any
        (`MultiLoRALinear.relayout_rows`)."""
        sizes = {z.size for z in self._zones} | ({size} if size is not None and extra_slots else set())
        zones, cursor = self._packed_zones(sorted(sizes), size, extra_slots, keep_free=True)
        if self.max_capacity is not None and cursor > self.max_capacity:
            zones, cursor = self._packed_zones(sorted(sizes), size, min(extra_slots, 1), keep_free=False)
            if cursor > self.max_capacity:
                raise ValueError(f"{cursor} rows do not fit the pool's limit of {self.max_capacity} rows")
        moves = [Move(owner=o, src=self.start_of(o), dst=zone.start + p * zone.size, rows=zone.size)
                 for zone in zones for p, o in enumerate(zone.members) if o is not None]
        self._zones = zones
        for zone in zones:
            for pos, owner in enumerate(zone.members):
                if owner is not None:
                    self._where[owner] = (zone, pos)
        if cursor > self.capacity:
            grown = max(2 * self.capacity, cursor)
            self.capacity = grown if self.max_capacity is None else min(grown, self.max_capacity)
        return moves

    def _packed_zones(self, sizes: list[int], size: int | None, extra: int, *, keep_free: bool) -> tuple[list[_Zone], int]:
        zones, cursor = [], 0
        for cls in sizes:
            members = [m for z in self._zones if z.size == cls for m in z.members]
            owners = [m for m in members if m is not None]
            free = (len(members) - len(owners) if keep_free else 0) + (extra if cls == size else 0)
            zone = _Zone(cursor, cls, owners + [None] * free)
            if zone.members:
                zones.append(zone)
            cursor = zone.end
        return zones, cursor
