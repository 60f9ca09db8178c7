"""Adapter slots through pool relayouts: every resident adapter's rows stay its own weights.

Loading adapters of mixed ranks in turns into a small pool forces allocation misses, so the
pools are re-laid out (rank zones packed and merged, in place or grown). After every fill
and clear, each resident slot's rows must still hold exactly its adapter (A, and B with the
scale folded in, zero past each module's rank), and a mixed batch must equal the merged
models, so a relayout that loses, mixes up or misplaces rows fails here."""

from __future__ import annotations

import copy
import random

import torch

from lorafold.server.lora.context import lora_batch
from lorafold.server.lora.wrap import wrap_linears
from tests.conftest import build_tiny_llama, merged_model, random_adapter


def _check_resident(slots) -> None:  # noqa: ANN001
    for slot, adapter in enumerate(slots.occupant):
        if adapter is None:
            continue
        start, alloc = int(slots.row_start[slot]), int(slots.slot_alloc[slot])
        for path, target in slots.targets.items():
            layer, mod = target.layer, adapter.modules[path]
            r = mod.lora_a.shape[0]
            a_rows = layer.a_pool[target.slice_idx, start : start + alloc]
            b_rows = layer.b_pool[start : start + alloc]
            torch.testing.assert_close(a_rows[:r], mod.lora_a, rtol=0, atol=0)
            torch.testing.assert_close(b_rows[:r].t(), mod.lora_b * mod.scale, rtol=0, atol=0)
            assert not a_rows[r:].any() and not b_rows[r:].any(), "rows past a module's rank must stay zero"


def _wrapped_tiny_llama(num_slots: int, rows: int):  # noqa: ANN202
    """The tiny random base, a copy of it with adapter slots, and those slots."""
    base = build_tiny_llama(seed=0)
    model = copy.deepcopy(base)
    return base, model, wrap_linears(model, num_slots=num_slots, rows=rows)


def _assert_batch_matches_merged(base, model, slots, seed: int, with_base: bool = False,  # noqa: ANN001
                                 batch_slots: list[int] | None = None) -> None:
    """One batch of 5 tokens per resident slot (or per slot of `batch_slots`; plus a base-only
    row) equals, row by row, the model with that row's adapter merged (the base itself for
    the base row)."""
    resident = [s for s, a in enumerate(slots.occupant) if a is not None]
    row_slots = (resident if batch_slots is None else batch_slots) + ([-1] if with_base else [])
    ids = torch.randint(0, base.config.vocab_size, (len(row_slots), 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), lora_batch(slots.meta(torch.tensor(row_slots).repeat_interleave(5))):
        mixed = model(ids).logits
    assert torch.isfinite(mixed).all()
    with torch.no_grad():
        for row, s in enumerate(row_slots):
            ref_model = base if s < 0 else merged_model(base, slots.occupant[s])
            torch.testing.assert_close(mixed[row], ref_model(ids[row : row + 1]).logits[0], rtol=1e-4, atol=1e-4)


def test_mixed_rank_loads_and_evictions_survive_relayouts(monkeypatch):
    from lorafold.server.lora.layers import MultiLoRALinear

    kinds: list[str] = []  # which relayouts ran: in place, or into grown pools
    original = MultiLoRALinear.relayout_rows

    def spy(self, rows, moves):  # noqa: ANN001
        kinds.append("in place" if rows == self.a_pool.shape[1] else "grown")
        original(self, rows, moves)

    monkeypatch.setattr(MultiLoRALinear, "relayout_rows", spy)
    base, model, slots = _wrapped_tiny_llama(num_slots=6, rows=128)
    specs = slots.base_modules()
    rng = random.Random(0)
    # churn of ranks 2-16 (with this seed one allocation miss is re-laid out in place), then
    # a rank-64 adapter the pools must grow for
    for i in range(41):
        rank = rng.choice([2, 4, 8, 16]) if i < 40 else 64
        slot = i % slots.num_slots
        if rng.random() < 0.3:
            slots.clear((slot + 1) % slots.num_slots)
        slots.fill(slot, random_adapter(specs, rank, seed=i, std=0.2))
        _check_resident(slots)
    assert {"in place", "grown"} <= set(kinds), f"both relayout paths must run, got {sorted(set(kinds))}"
    _assert_batch_matches_merged(base, model, slots, seed=1)


def _poison_unowned_rows(slots) -> int:  # noqa: ANN001
    """NaN into every pool row no resident slot owns; returns how many rows that was."""
    owned = torch.zeros(slots.allocator.capacity, dtype=torch.bool)
    for slot, adapter in enumerate(slots.occupant):
        if adapter is not None:
            start, alloc = int(slots.row_start[slot]), int(slots.slot_alloc[slot])
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
    # Grown pools are allocated uninitialised (layers.relayout_rows): correct only if no path
    # reads a row outside the batch's slots and every fill writes its whole range. Free rows
    # full of NaN must change nothing, before and after further fills, clears and regrowth.
    base, model, slots = _wrapped_tiny_llama(num_slots=6, rows=16)
    specs = slots.base_modules()
    rng = random.Random(3)
    for i in range(30):
        slot = i % slots.num_slots
        if rng.random() < 0.3:
            slots.clear((slot + 2) % slots.num_slots)
        slots.fill(slot, _uneven_adapter(specs, rng.choice([2, 4, 8, 16, 32]), seed=i))
        _poison_unowned_rows(slots)
        _check_resident(slots)
    assert _poison_unowned_rows(slots) > 0, "the churn must leave free rows to poison"
    _assert_batch_matches_merged(base, model, slots, seed=2, with_base=True)


def test_packing_active_slots_makes_their_weights_one_view_each():
    # The engine packs the slots a step uses to the front of their rank zones so the CPU
    # path reads each rank group in place. Packing must keep every resident adapter's rows
    # its own, and afterwards a decode batch of the active slots must plan one view per rank.
    from lorafold.kernels.meta import build_lora_meta

    base, model, slots = _wrapped_tiny_llama(num_slots=8, rows=256)
    specs = slots.base_modules()
    ranks = [4, 8, 4, 8, 4, 8, 4, 8]  # two classes, each within one zone
    for slot, r in enumerate(ranks):
        slots.fill(slot, _uneven_adapter(specs, r, seed=slot))
    rng = random.Random(4)
    moved = 0
    for trial in range(8):
        active = set(rng.sample(range(8), rng.randint(1, 7)))
        moved += slots.pack_active(active)
        assert slots.pack_active(active) == 0
        _check_resident(slots)
        batch = [sorted(active)[i] for i in slots.batch_order(sorted(active))]
        meta = build_lora_meta(torch.tensor(batch), slots.row_start, slots.slot_alloc)
        assert len(meta.groups) == len({ranks[s] for s in active})
        assert all(g.row_first >= 0 and g.full for g in meta.groups), "a packed decode batch must be all views"
        _assert_batch_matches_merged(base, model, slots, seed=trial, batch_slots=batch)
    assert moved > 0, "the random active sets must make packing move rows"
