"""Device adapter slots: which adapter sits in which slot, a row budget, LRU eviction, pins
(torch-free).

The table only decides; the model runner moves weights. Capacity has two limits: `num_slots`
(slot ids; `max_loras` when the user caps it) and `capacity_rows`, the adapter memory budget
in rank rows (an adapter of largest rank r owns r rows in every LoRA layer's pools, so rows
times the model's bytes per row is its device memory). None means "slots only".

Contract with the engine:

- The scheduler calls `acquire(name, rows)` when it admits a request (this pins the slot for
  that request) and `unpin(slot)` when the request finishes, is aborted or is preempted.
- When `acquire` answers needs_load=True, the slot now belongs to `name` but holds other (or
  no) weights: the engine must load `name` into it before running the step (the scheduler
  lists these in `SchedulerOutput.adapter_loads`).
- Eviction only ever takes a slot with no request in flight (refcount 0), least recently
  used first, skipping the names in `protected` (adapters the waiting queue still needs);
  as many as it takes to free `rows`. `NoFreeSlotError` means no such choice exists; the
  scheduler checks `can_acquire` first, so it never sees it.
- A slot whose adapter was evicted or released gives its rows back at once in the table; the
  runner must drop its weights before the next loads: `take_released()` lists those slots
  (the scheduler passes them on in `SchedulerOutput.adapter_frees`).
- `invalidate(name)` (re-registration with new weights, or a failed load) detaches the slot
  from the name at once: requests already running keep using it until they finish; the slot
  is freed when its last pin goes; new requests for `name` get a fresh slot and a load.
  While that happens the same name may briefly occupy two slots, which is why pins are
  counted per slot, not per name.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class NoFreeSlotError(RuntimeError):
    """No free slot or room, and nothing idle that may be evicted."""


@dataclass(slots=True)
class AdapterCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AdapterSlotTable:
    def __init__(self, num_slots: int, capacity_rows: int | None = None) -> None:
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
        if capacity_rows is not None and (not isinstance(capacity_rows, int) or capacity_rows < 1):
            raise ValueError(f"capacity_rows must be an int >= 1 or None, got {capacity_rows!r}")
        self.num_slots = num_slots
        self.capacity_rows = capacity_rows
        self.stats = AdapterCacheStats()
        self._name: list[str | None] = [None] * num_slots  # occupant (current or stale)
        self._rows: list[int] = [0] * num_slots  # rows the occupant holds
        self._refs: list[int] = [0] * num_slots
        self._stale: list[bool] = [False] * num_slots  # invalidated, freed when unpinned
        self._slot_of: dict[str, int] = {}  # name -> its current (non-stale) slot
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest slot
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned resident slots, oldest first
        self._released: list[int] = []  # slots emptied since the last take_released()
        self.used_rows = 0

    # ---- queries -------------------------------------------------------------------------

    def slot_of(self, name: str) -> int | None:
        """The current slot of `name`, or None when it is not resident."""
        return self._slot_of.get(name)

    def resident(self) -> dict[str, int]:
        """Current adapter name -> slot (stale slots excluded)."""
        return dict(self._slot_of)

    def refcount(self, slot: int) -> int:
        return self._refs[slot]

    @property
    def num_pinned(self) -> int:
        return sum(1 for r in self._refs if r > 0)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def fits(self, rows: int) -> bool:
        """Could an adapter of `rows` rows ever be resident (with everything else evicted)?"""
        return self.capacity_rows is None or rows <= self.capacity_rows

    def can_acquire(self, name: str, rows: int = 1, protected: Container[str] = ()) -> bool:
        """Would `acquire(name, rows, protected)` succeed now (resident, room, or evictable idle
        adapters not in `protected`)?"""
        return name in self._slot_of or self._victims(rows, protected) is not None

    # ---- changes -------------------------------------------------------------------------

    def acquire(self, name: str, rows: int = 1, protected: Container[str] = ()) -> tuple[int, bool]:
        """Pin a slot for one request of `name` (an adapter of `rows` rank rows); returns
        (slot, needs_load). Evicts idle adapters not in `protected`, least recently used first,
        when it needs a slot or rows."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty str, got {name!r}")
        slot = self._slot_of.get(name)
        if slot is not None:
            self.stats.hits += 1
            self._pin(slot)
            return slot, False
        victims = self._victims(rows, protected)
        if victims is None:
            raise NoFreeSlotError(
                f"no room for adapter {name!r} ({rows} rows): {self.num_slots} slots, {self.used_rows} of "
                f"{self.capacity_rows} rows held, the idle ones needed by waiting requests or all pinned by "
                "requests in flight (check can_acquire first, or raise the adapter memory budget / max_loras)"
            )
        for victim in victims:
            evicted = self._name[victim]
            _require(evicted is not None and self._refs[victim] == 0, f"victim slot {victim} is pinned or empty")
            del self._lru[victim]
            del self._slot_of[evicted]
            self._release(victim)
            self.stats.evictions += 1
            logger.debug("adapter slot %d: evicting %s for %s", victim, evicted, name)
        slot = self._free.pop()
        self.stats.misses += 1
        self._name[slot] = name
        self._rows[slot] = rows
        self.used_rows += rows
        self._slot_of[name] = slot
        self._pin(slot)
        return slot, True

    def pin(self, slot: int) -> None:
        """Add one in-flight reference to an occupied slot."""
        if self._name[slot] is None:
            raise ValueError(f"adapter slot {slot} is empty; acquire it by name instead")
        self._pin(slot)

    def unpin(self, slot: int) -> None:
        """Drop one in-flight reference; at zero the slot becomes evictable (or free if stale)."""
        if self._refs[slot] <= 0:
            raise ValueError(f"adapter slot {slot} is not pinned (unbalanced unpin)")
        self._refs[slot] -= 1
        if self._refs[slot] > 0:
            return
        if self._stale[slot]:
            self._release(slot)
        else:
            self._lru[slot] = None  # most recently used goes last

    def invalidate(self, name: str) -> None:
        """Forget `name`'s weights: free its slot now if unpinned, else once the pins drain."""
        slot = self._slot_of.pop(name, None)
        if slot is None:
            return
        if self._refs[slot] == 0:
            self._lru.pop(slot, None)
            self._release(slot)
        else:
            self._stale[slot] = True
        logger.debug("adapter %s invalidated (slot %d, %d pins)", name, slot, self._refs[slot])

    def take_released(self) -> list[int]:
        """Slots emptied (evicted, released) since the last call, still empty now: their
        weights must be dropped before new ones are loaded, or the rows would be held twice."""
        released = [s for s in dict.fromkeys(self._released) if self._name[s] is None]
        self._released.clear()
        return released

    # ---- internals -----------------------------------------------------------------------

    def _victims(self, rows: int, protected: Container[str]) -> list[int] | None:
        """Idle slots to evict (LRU first, none in `protected`) so that a slot is free and
        `rows` fit; [] when nothing must go, None when no choice works."""
        need_rows = 0 if self.capacity_rows is None else self.used_rows + rows - self.capacity_rows
        if rows < 1 or not self.fits(rows):
            return None
        need_slot = not self._free
        if need_rows <= 0 and not need_slot:
            return []
        victims = []
        for slot in self._lru:
            if self._name[slot] in protected:
                continue
            victims.append(slot)
            need_rows -= self._rows[slot]
            need_slot = False
            if need_rows <= 0:
                return victims
        return None

    def _pin(self, slot: int) -> None:
        self._refs[slot] += 1
        self._lru.pop(slot, None)

    def _release(self, slot: int) -> None:
        self.used_rows -= self._rows[slot]
        self._name[slot] = None
        self._rows[slot] = 0
        self._stale[slot] = False
        self._free.append(slot)
        self._released.append(slot)

    def check_invariants(self) -> None:
        """Every slot is exactly one of: free, pinned, or unpinned-resident in the LRU; the rows
        held add up and stay within the budget."""
        free, lru = set(self._free), set(self._lru)
        _require(len(free) == len(self._free), "a slot is on the free list twice")
        for slot in range(self.num_slots):
            states = (slot in free) + (slot in lru) + (self._refs[slot] > 0)
            _require(self._refs[slot] >= 0, f"slot {slot} has a negative refcount")
            _require(states == 1, f"slot {slot} is in {states} of the states free / evictable / pinned")
            _require((slot in free) == (self._name[slot] is None), f"slot {slot}: free list and occupant disagree")
            _require(not (self._stale[slot] and slot in lru), f"stale slot {slot} is evictable")
        for name, slot in self._slot_of.items():
            _require(self._name[slot] == name and not self._stale[slot], f"{name} maps to slot {slot} wrongly")
        _require(self.used_rows == sum(self._rows), "used_rows differs from the rows the slots hold")
        _require(self.capacity_rows is None or self.used_rows <= self.capacity_rows, "rows held exceed the budget")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(f"adapter slot table invariant broken: {message}")
