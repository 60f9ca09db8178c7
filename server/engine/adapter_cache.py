"""Device adapter slots: which adapter sits in which slot, LRU eviction, pins (torch-free).

The table only decides; the model runner moves weights. Contract with the engine:

- The scheduler calls `acquire(name)` when it admits a request (this pins the slot for that
  request) and `unpin(slot)` when the request finishes, is aborted or is preempted.
- When `acquire` answers needs_load=True, the slot now belongs to `name` but holds other (or
  no) weights: the engine must load `name` into it before running the step (the scheduler
  lists these in `SchedulerOutput.adapter_loads`).
- Eviction only ever takes a slot with no request in flight (refcount 0), least recently
  used first. `NoFreeSlotError` means every slot is pinned; the scheduler checks
  `can_acquire` first, so it never sees it.
- `invalidate(name)` (re-registration with new weights, or a failed load) detaches the slot
  from the name at once: requests already running keep using it until they finish; the slot
  is freed when its last pin goes; new requests for `name` get a fresh slot and a load.
  While that happens the same name may briefly occupy two slots, which is why pins are
  counted per slot, not per name.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class NoFreeSlotError(RuntimeError):
    """Every adapter slot is pinned by requests in flight."""


@dataclass(slots=True)
class AdapterCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AdapterSlotTable:
    def __init__(self, num_slots: int) -> None:
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
        self.num_slots = num_slots
        self.stats = AdapterCacheStats()
        self._name: list[str | None] = [None] * num_slots  # occupant (current or stale)
        self._refs: list[int] = [0] * num_slots
        self._stale: list[bool] = [False] * num_slots  # invalidated, freed when unpinned
        self._slot_of: dict[str, int] = {}  # name -> its current (non-stale) slot
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest slot
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned resident slots, oldest first

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

    def can_acquire(self, name: str) -> bool:
        """Would `acquire(name)` succeed now (resident, a free slot, or an evictable one)?"""
        return name in self._slot_of or bool(self._free) or bool(self._lru)

    # ---- changes -------------------------------------------------------------------------

    def acquire(self, name: str) -> tuple[int, bool]:
        """Pin a slot for one request of `name`; returns (slot, needs_load)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty str, got {name!r}")
        slot = self._slot_of.get(name)
        if slot is not None:
            self.stats.hits += 1
            self._pin(slot)
            return slot, False
        if self._free:
            slot = self._free.pop()
        elif self._lru:
            slot, _ = self._lru.popitem(last=False)
            evicted = self._name[slot]
            _require(evicted is not None and self._refs[slot] == 0, f"LRU slot {slot} is pinned or empty")
            del self._slot_of[evicted]
            self.stats.evictions += 1
            logger.debug("adapter slot %d: evicting %s for %s", slot, evicted, name)
        else:
            raise NoFreeSlotError(
                f"all {self.num_slots} adapter slots are pinned by requests in flight; cannot place {name!r} "
                "(check can_acquire first, or raise max_loras)"
            )
        self.stats.misses += 1
        self._name[slot] = name
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

    # ---- internals -----------------------------------------------------------------------

    def _pin(self, slot: int) -> None:
        self._refs[slot] += 1
        self._lru.pop(slot, None)

    def _release(self, slot: int) -> None:
        self._name[slot] = None
        self._stale[slot] = False
        self._free.append(slot)

    def check_invariants(self) -> None:
        """Every slot is exactly one of: free, pinned, or unpinned-resident in the LRU."""
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


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(f"adapter slot table invariant broken: {message}")
