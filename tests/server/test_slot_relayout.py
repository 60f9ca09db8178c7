"""Adapter slots through pool relayouts: every resident adapter's rows stay its own weights.

Loading adapters of mixed ranks in turns into a small pool forces allocation misses, so the
pools are re-laid out (ranges packed to the front, in place). After every fill
and clear, each resident slot's rows must still hold exactly its adapter (A, and B with the
scale folded in, zero past each module's rank), and a mixed batch must equal the merged
models, so a relayout that loses, mixes up or misplaces rows fails here."""

from __future__ import annotations

import copy
import random

import torch

from lorafold.server.engine.llama import LeanLlama
from tests.conftest import build_tiny_llama, lean_logits, merged_model, random_adapter


def _check_resident(slots) -> None:  # noqa: ANN001
    for slot, adapter in enumerate(slots.occupant):
        if adapter is None:
            continue
        start, alloc = int(slots.row_start[slot]), slots.allocator.rows_of(slot)
        # the kernels read row_start, the metadata the allocator: they must agree
        assert start == slots.allocator.start_of(slot), (slot, start, slots.allocator.start_of(slot))
        for path, target in slots.targets.items():
            layer, mod = target.layer, adapter.modules[path]
            r = mod.lora_a.shape[0]
            lo, hi = layer.slice_offsets[target.slice_idx], layer.slice_offsets[target.slice_idx + 1]
            a_rows = layer.a_pool[target.slice_idx, start : start + alloc]
            b_rows = layer.b_pool[start : start + alloc, lo:hi]  # the slice's columns of a fused layer
            torch.testing.assert_close(a_rows[:r], mod.lora_a, rtol=0, atol=0)
            torch.testing.assert_close(b_rows[:r].t(), mod.lora_b * mod.scale, rtol=0, atol=0)
            assert not a_rows[r:].any() and not b_rows[r:].any(), "rows past a module's rank must stay zero"


def _wrapped_tiny_llama(num_slots: int, rows: int):  # noqa: ANN202
    """The tiny random base, the serving decoder on a copy of it, and its adapter slots."""
    base = build_tiny_llama(seed=0)
    model = LeanLlama(copy.deepcopy(base), num_slots=num_slots, rows=rows)
    return base, model, model.slots


def _assert_batch_matches_merged(base, model, slots, seed: int, with_base: bool = False,  # noqa: ANN001
                                 batch_slots: list[int] | None = None) -> None:
    """One batch of 5 tokens per resident slot (or per slot of `batch_slots`; plus a base-only
    row) equals, row by row, the model with that row's adapter merged (the base itself for
    the base row)."""
    resident = [s for s, a in enumerate(slots.occupant) if a is not None]
    row_slots = (resident if batch_slots is None else batch_slots) + ([-1] if with_base else [])
    ids = torch.randint(0, base.config.vocab_size, (len(row_slots), 5), generator=torch.Generator().manual_seed(seed))
    mixed = lean_logits(model, ids, row_slots)
    assert torch.isfinite(mixed).all()
    with torch.no_grad():
        for row, s in enumerate(row_slots):
            ref_model = base if s < 0 else merged_model(base, slots.occupant[s])
            torch.testing.assert_close(mixed[row], ref_model(ids[row : row + 1]).logits[0], rtol=1e-4, atol=1e-4)


def _make_room(slots, slot: int, rows: int, rng: random.Random) -> None:  # noqa: ANN001
    """Clear random other slots until `rows` fit beside the others (as the slot table's
    evictions keep the rows held within the pools) once `slot` is emptied by its fill."""
    slots.clear(slot)
    while slots.allocator.used + rows > slots.allocator.capacity:
        slots.clear(rng.choice([s for s, a in enumerate(slots.occupant) if a is not None]))


def test_mixed_rank_loads_and_evictions_survive_relayouts(monkeypatch):
    from lorafold.server.lora.layers import MultiLoRALinear

    packed: list[int] = []  # ranges moved by each relayout
    original = MultiLoRALinear.relayout_rows

    def spy(self, moves):  # noqa: ANN001
        packed.append(sum(m.src != m.dst for m in moves))
        original(self, moves)

    monkeypatch.setattr(MultiLoRALinear, "relayout_rows", spy)
    base, model, slots = _wrapped_tiny_llama(num_slots=6, rows=48)
    specs = slots.base_modules()
    # three rank-16 adapters fill the 48 rows; two leave, so 32 rows are free in two gaps of 16:
    # a rank-32 adapter finds no gap and the ranges are packed
    for slot in range(3):
        slots.fill(slot, random_adapter(specs, 16, seed=100 + slot, std=0.2))
    slots.clear(0)
    slots.clear(2)
    slots.fill(3, random_adapter(specs, 32, seed=103, std=0.2))
    assert packed and max(packed) > 0, "the rank-32 load must pack the ranges"
    _check_resident(slots)
    rng = random.Random(0)
    # churn of ranks 2-32, clearing slots as needed to make room, as evictions do
    for i in range(41):
        rank = rng.choice([2, 4, 8, 16, 32])
        slot = i % slots.num_slots
        _make_room(slots, slot, rank, rng)
        slots.fill(slot, random_adapter(specs, rank, seed=i, std=0.2))
        _check_resident(slots)
    assert sum(1 for n in packed if n) >= 5, f"the churn must pack the pools repeatedly, got {packed}"
    _assert_batch_matches_merged(base, model, slots, seed=1)


def _poison_unowned_rows(slots) -> int:  # noqa: ANN001
    """NaN into every pool row no resident slot owns; returns how many rows that was."""
    owned = torch.zeros(slots.allocator.capacity, dtype=torch.bool)
    for slot, adapter in enumerate(slots.occupant):
        if adapter is not None:
            start, alloc = int(slots.row_start[slot]), slots.allocator.rows_of(slot)
            owned[start : start + alloc] = True
    for layer in slots.layers:
        layer.a_pool[:, ~owned] = float("nan")
        layer.b_pool[~owned] = float("nan")
    return int((~owned).sum())


def _uneven_adapter(specs, r: int, seed: int):  # noqa: ANN001
    """A random adapter whose modules alternate between rank r and r // 2 (a rank pattern),
    so each slot has rows past some modules' ranks that must read as zero."""
    from lorafold.server.lora.peft_format import ModuleLoRA

    adapter = random_adapter(specs, r, seed=seed, std=0.2)
    for k, (path, mod) in enumerate(sorted(adapter.modules.items())):
        if k % 2:
            adapter.modules[path] = ModuleLoRA(mod.lora_a[: r // 2], mod.lora_b[:, : r // 2], mod.scale)
    return adapter


def test_rows_no_slot_owns_are_never_read():
    # The pools are allocated uninitialised (MultiLoRALinear): correct only if no path reads
    # a row outside the batch's slots and every fill writes its whole range. Free rows full of
    # NaN must change nothing, before and after further fills, clears and packing.
    base, model, slots = _wrapped_tiny_llama(num_slots=6, rows=48)
    specs = slots.base_modules()
    rng = random.Random(3)
    for i in range(30):
        slot = i % slots.num_slots
        if rng.random() < 0.3:
            slots.clear((slot + 2) % slots.num_slots)
        rank = rng.choice([2, 4, 8, 16, 32])
        _make_room(slots, slot, rank, rng)
        slots.fill(slot, _uneven_adapter(specs, rank, seed=i))
        _poison_unowned_rows(slots)
        _check_resident(slots)
    assert _poison_unowned_rows(slots) > 0, "the churn must leave free rows to poison"
    _assert_batch_matches_merged(base, model, slots, seed=2, with_base=True)
