"""Adapter slots: fill and clear adapters in the LoRA layers at run time.

A slot is an index into every LoRA layer's pools. Loading an adapter takes two steps:
`stage` lays its factors out on the host exactly as the pools hold them (scale folded into
B, zeros past each module's rank, one block per layer: a CPU-side copy, built off the
critical path by the engine's prefetcher where it has a core of its own), and `fill` copies
each block into the slot's row range: one copy per pool, not a loop over modules. On the
CPU, `fill` also takes the adapter unstaged and lays it out straight into the slot (one pass
instead of two). Clearing only gives the rows back (rows no slot owns are never read). Base
weights are never touched and the model is never rebuilt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lorafold.kernels import cpu_ops
from lorafold.kernels.meta import LoRABatchMeta, lora_meta_from_runs, token_runs
from lorafold.server.lora.layers import MultiLoRALinear
from lorafold.server.lora.peft_format import AdapterError, LoRAAdapter, ModuleLoRA, ModuleSpec
from lorafold.server.lora.rows import Move, RowAllocator

@dataclass(frozen=True, slots=True)
class StagedAdapter:
    """An adapter laid out as the pools hold it, on the host.

    rows: rows it owns in every pool (its largest rank).
    blocks[i]: for layer i, (a [n_slices, rows, in], b [rows, out], ranks [n_slices] int32),
        or None where the adapter adapts none of the layer's slices.
    """

    adapter: LoRAAdapter
    rows: int
    blocks: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in filter(None, self.blocks))


@dataclass(frozen=True, slots=True)
class Target:
    """Where one adapter module (e.g. `model.layers.0.self_attn.k_proj`) lands."""

    layer: MultiLoRALinear
    slice_idx: int


class AdapterSlots:
    def __init__(self, targets: dict[str, Target], num_slots: int, rows: int, backend: str = "torch") -> None:
        """rows: the pools' rows (every target layer's, fixed). backend: the LoRA ops'
        implementation every forward of these pools runs (see `kernels.ops.choose_backend`);
        it travels in each batch's metadata."""
        if num_slots <= 0:
            raise ValueError("num_slots must be positive")
        self.targets = targets
        self.num_slots = num_slots
        self.backend = backend
        self.layers: list[MultiLoRALinear] = list({id(t.layer): t.layer for t in targets.values()}.values())
        device = self.layers[0].a_pool.device if self.layers else torch.device("cpu")
        self.allocator = RowAllocator(rows)
        # the kernels read each slot's first row here; the host reads the allocator's copy
        self.row_start = torch.zeros(num_slots, dtype=torch.int32, device=device)
        for layer in self.layers:
            layer.row_start = self.row_start  # one shared tensor: moves update every layer at once
        self.occupant: list[LoRAAdapter | None] = [None] * num_slots
        # On CUDA, adapter copies run on a side stream from page-locked staging blocks, so a
        # load overlaps the GPU work queued before it (the previous step's forward); the next
        # forward that reads the pools waits for them (`wait_copies`), not the host.
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: list[torch.cuda.Event] = []

    @property
    def row_bytes(self) -> int:
        """Device bytes of one rank row across every pool (an adapter of largest rank r
        holds r of them)."""
        return sum((l.a_pool.shape[0] * l.a_pool.shape[2] + l.b_pool.shape[1]) * l.a_pool.element_size()
                   for l in self.layers)

    def base_modules(self) -> dict[str, ModuleSpec]:
        specs = {}
        for path, t in self.targets.items():
            lo, hi = t.layer.slice_offsets[t.slice_idx], t.layer.slice_offsets[t.slice_idx + 1]
            specs[path] = ModuleSpec(in_features=t.layer.in_features, out_features=hi - lo)
        return specs

    def _reserve(self, slot: int, rows: int) -> int:
        start = self.allocator.allocate(slot, rows)
        if start is not None:
            return start
        # No gap holds it: pack the ranges to the front, one pass over each layer (the caller,
        # `AdapterSlotTable`, keeps the rows held within the pools, so packing always makes room)
        self._apply_moves(self.allocator.relayout(rows))
        start = self.allocator.allocate(slot, rows)
        assert start is not None, "allocation after a relayout cannot fail"
        return start

    def _apply_moves(self, moves: list[Move]) -> None:
        self.wait_copies()  # the moves read rows a pending copy may still be writing
        for layer in self.layers:
            layer.relayout_rows(moves)
        for move in moves:
            self.row_start[move.owner].fill_(move.dst)
        if self._copy_stream is not None:  # later copies write the re-laid-out pools
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.row_start.device))

    def wait_copies(self) -> None:
        """Make the current stream wait for the adapter copies issued so far (CUDA; a no-op
        elsewhere, where copies are synchronous). Called before any forward reads the pools."""
        stream = torch.cuda.current_stream(self.row_start.device) if self._pending else None
        for event in self._pending:
            stream.wait_event(event)
        self._pending.clear()

    @torch.no_grad()
    def stage(self, adapter: LoRAAdapter) -> StagedAdapter:
        """Lay `adapter` out as the pools hold it, on the host (page-locked when the pools are
        on a GPU, so `fill` copies asynchronously). Safe to call from a worker thread."""
        pin = self.layers[0].a_pool.device.type == "cuda"
        rows, blocks = adapter.max_rank, []
        for layer, mods in self._modules_by_layer(adapter):
            if not mods:
                blocks.append(None)
                continue
            a = torch.empty((layer.a_pool.shape[0], rows, layer.in_features), dtype=layer.a_pool.dtype, pin_memory=pin)
            b = torch.empty((rows, layer.out_features), dtype=layer.b_pool.dtype, pin_memory=pin)
            ranks = _lay_out(layer, mods, a, b)
            blocks.append((a, b, ranks.pin_memory() if pin else ranks))
        return StagedAdapter(adapter=adapter, rows=rows, blocks=tuple(blocks))

    @torch.no_grad()
    def fill(self, slot: int, adapter: LoRAAdapter | StagedAdapter) -> None:
        """Load `adapter` into `slot`, replacing any occupant: a staged one by one copy per
        pool; an unstaged one on CPU laid out straight into the slot's rows (one pass, where
        staging then copying would make two), elsewhere staged first."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")
        direct = not isinstance(adapter, StagedAdapter) and self.layers[0].a_pool.device.type == "cpu"
        staged = None if direct else adapter if isinstance(adapter, StagedAdapter) else self.stage(adapter)
        mods = self._modules_by_layer(adapter) if direct else None  # validates before the slot changes
        self.clear(slot)
        rows = adapter.max_rank if direct else staged.rows
        start = self._reserve(slot, rows)
        self.row_start[slot].fill_(start)
        side = self._copy_stream
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            self._write_rows(slot, start, rows, staged, mods)
        if side is not None:
            event = torch.cuda.Event()
            event.record(side)
            self._pending.append(event)
        self.occupant[slot] = adapter if direct else staged.adapter

    def _write_rows(self, slot: int, start: int, rows: int, staged: StagedAdapter | None,
                    mods: list[tuple[MultiLoRALinear, dict[int, ModuleLoRA]]] | None) -> None:
        """Every row of the slot's range in every layer: laid out from the factors (`mods`,
        CPU) or copied from `staged`'s blocks, zeros where a layer is not adapted."""
        direct = mods is not None
        for i, layer in enumerate(self.layers):
            a_dst, b_dst = layer.a_pool[:, start : start + rows], layer.b_pool[start : start + rows]
            block = None if direct else staged.blocks[i]
            if direct and mods[i][1]:
                layer.ranks[:, slot] = _lay_out(layer, mods[i][1], a_dst, b_dst)
            elif block is not None:
                a, b, ranks = block
                a_dst.copy_(a, non_blocking=True)
                b_dst.copy_(b, non_blocking=True)
                layer.ranks[:, slot].copy_(ranks, non_blocking=True)
            else:  # the kernels read all `rows` rows of the range: untouched layers read zeros
                a_dst.zero_()
                b_dst.zero_()
                layer.ranks[:, slot].fill_(0)

    def _modules_by_layer(self, adapter: LoRAAdapter) -> list[tuple[MultiLoRALinear, dict[int, ModuleLoRA]]]:
        """Each layer with the adapter's modules on it, by slice (empty: none)."""
        unknown = set(adapter.modules) - set(self.targets)
        if unknown:
            raise AdapterError(f"adapter targets modules this model does not expose: {sorted(unknown)[:3]}")
        by_layer: dict[int, dict[int, ModuleLoRA]] = {id(layer): {} for layer in self.layers}
        for path, module in adapter.modules.items():
            target = self.targets[path]
            by_layer[id(target.layer)][target.slice_idx] = module
        return [(layer, by_layer[id(layer)]) for layer in self.layers]

    def clear(self, slot: int) -> None:
        """Give the slot's rows back. Nothing is zeroed: rows no slot owns are never read, and
        `fill` writes every row of a range before the slot is used again."""
        if slot not in self.allocator:
            return
        self.allocator.free(slot)
        self.occupant[slot] = None

    def meta(self, token_slots: torch.Tensor | list[int]) -> LoRABatchMeta:
        """Batch metadata, on the pools' device, for a forward whose token t uses slot
        token_slots[t] (-1: base)."""
        slots = token_slots.tolist() if isinstance(token_slots, torch.Tensor) else list(token_slots)
        return self.host_meta(token_runs(slots), len(slots)).to(self.row_start.device)

    def host_meta(self, runs: Iterable[tuple[int, int, int]], num_tokens: int) -> LoRABatchMeta:
        """Batch metadata on the host (`LoRABatchMeta.to` moves it) for a forward of
        `num_tokens` tokens given as runs (slot, first token, length), slot -1 for the base:
        from the allocator's row ranges, reading nothing back from the device. Makes the
        device's current stream wait for the adapter copies issued so far."""
        runs = list(runs)
        for slot in {slot for slot, _, _ in runs if slot != -1}:
            if not 0 <= slot < self.num_slots or self.occupant[slot] is None:
                raise ValueError(f"slot {slot} holds no adapter")
        self.wait_copies()
        ranges = {slot: (self.allocator.start_of(slot), self.allocator.rows_of(slot))
                  for slot, _, _ in runs if slot >= 0}
        return lora_meta_from_runs(runs, num_tokens, ranges, backend=self.backend)


def _lay_out(layer: MultiLoRALinear, mods: dict[int, ModuleLoRA], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Write one layer's share of an adapter into a [n_slices, rows, in] and b [rows, out]
    (host blocks or the pools' rows, same device as the factors): every element once, the
    factors where a slice is adapted (scale folded into B), zeros past its rank and over the
    slices it leaves alone. Returns the slices' ranks [n_slices] int32. On the CPU one
    compiled call (`cpu_ops.lora_lay_out`) where the kernels are built, else the torch ops
    (`_lay_out_torch`, also the reference the compiled one is tested against)."""
    if a.is_cpu and cpu_ops.available():
        slices = [mods.get(i) for i in range(a.shape[0])]
        return cpu_ops.lora_lay_out(a, b, [None if m is None else m.lora_a for m in slices],
                                    [None if m is None else m.lora_b for m in slices],
                                    [0.0 if m is None else m.scale for m in slices], layer.slice_offsets)
    return _lay_out_torch(layer, mods, a, b)


def _lay_out_torch(layer: MultiLoRALinear, mods: dict[int, ModuleLoRA], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`_lay_out` in torch ops: four per slice."""
    ranks = [mods[i].rank if i in mods else 0 for i in range(a.shape[0])]
    for i, r in enumerate(ranks):
        lo, hi = layer.slice_offsets[i], layer.slice_offsets[i + 1]
        if r:
            a[i, :r].copy_(mods[i].lora_a)
            torch.mul(mods[i].lora_b.t(), mods[i].scale, out=b[:r, lo:hi])  # scale and transpose in one pass
        a[i, r:].zero_()
        b[r:, lo:hi].zero_()
    return torch.tensor(ranks, dtype=torch.int32)
