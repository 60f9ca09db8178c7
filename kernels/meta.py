"""Per-forward batch metadata for the multi-LoRA ops.

Built once per forward pass from the per-token adapter slots and shared, read-only, by every
LoRA layer of the model: anything that depends only on *which token uses which slot* is
computed here, so the per-layer ops do no sorting and no host syncs.

Layout (the contract with `reference.py`, `triton_lora.py` and `cpu_ops.lora_apply`):

    sorted_tokens [T_a]  int32   tokens with slot >= 0, stably sorted by slot
    seg_slots     [S]    int32   distinct active slots, ascending
    seg_starts    [S+1]  int32   segment k = sorted_tokens[seg_starts[k]:seg_starts[k+1]]
    max_seg_len   host int
    max_rank      host int       largest allocated rank among active slots (the ops' y width)
    segments      host tuple     per segment (first sorted position, end, first pool row,
                                 allocated rows): what the torch reference loops over
    backend       host str       which implementation the layers run, chosen once by the
                                 caller (`kernels.ops.choose_backend`)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from lorafold.kernels.transfer import aligned_cat, aligned_spans, host_to_device

BACKENDS = ("torch", "cpp", "triton")


@dataclass(frozen=True, slots=True)
class LoRABatchMeta:
    sorted_tokens: torch.Tensor
    seg_slots: torch.Tensor
    seg_starts: torch.Tensor
    max_seg_len: int
    max_rank: int
    num_tokens: int
    backend: str = "torch"
    segments: tuple[tuple[int, int, int, int], ...] = field(default=())
    # what the kernels derive from the metadata once per forward for every layer (the Triton
    # launches' work items); empty when built, on whatever device the tensors are
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_segments(self) -> int:
        return int(self.seg_slots.numel())

    @property
    def has_lora(self) -> bool:
        return self.num_segments > 0

    def to(self, device: torch.device) -> LoRABatchMeta:
        """The same metadata (built on the host) with its index tensors on `device`, in one
        host-to-device copy (`host_to_device`), each 16-byte aligned; itself when they are
        there already."""
        here = self.sorted_tokens.device
        if here.type == device.type and (device.index is None or device.index == here.index):
            return self
        host, (tokens, slots, starts) = aligned_cat([self.sorted_tokens, self.seg_slots, self.seg_starts])
        moved = host_to_device(host, device)
        return replace(self, sorted_tokens=moved[tokens], seg_slots=moved[slots], seg_starts=moved[starts], cache={})


def lora_meta_from_runs(
    runs: Iterable[tuple[int, int, int]],
    num_tokens: int,
    ranges: Mapping[int, tuple[int, int]],
    *,
    backend: str = "torch",
) -> LoRABatchMeta:
    """The metadata of a forward over `num_tokens` tokens, on the host, from Python values only.

    Args:
        runs: (slot, first token, length) per run of consecutive tokens sharing a slot (-1:
            no adapter), in token order: a serving step knows one per scheduled chunk.
        ranges: slot -> (first pool row, allocated rows) of every active slot.
        backend: as in `build_lora_meta`.

    The index tensors are CPU int32 views of one tensor, each 16-byte aligned
    (`LoRABatchMeta.to` moves them in one copy); building them reads nothing back from a
    device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {backend!r}; use one of {', '.join(map(repr, BACKENDS))}")
    by_slot: dict[int, list[tuple[int, int]]] = {}
    for slot, first, length in runs:
        if slot >= 0 and length > 0:
            by_slot.setdefault(slot, []).append((first, length))
    seg_slots = sorted(by_slot)
    tokens: list[int] = []
    seg_starts = [0]
    segments = []
    for slot in seg_slots:  # a segment's tokens in token order: the stable sort by slot
        for first, length in by_slot[slot]:
            tokens.extend(range(first, first + length))
        row, rows = ranges[slot]
        segments.append((seg_starts[-1], len(tokens), row, rows))
        seg_starts.append(len(tokens))
    # each part 16-byte aligned on the host too (one tensor made from the lists): the CPU
    # tests then launch the Triton kernels with the pointer alignment a device copy has
    # (`to`), so they check the variants a GPU compiles
    parts = (tokens, seg_slots, seg_starts)
    spans, total = aligned_spans([len(p) for p in parts], 4)
    values = [0] * total
    for part, span in zip(parts, spans):
        values[span] = part
    packed = torch.tensor(values, dtype=torch.int32)
    tokens_at, slots_at, starts_at = spans
    return LoRABatchMeta(
        sorted_tokens=packed[tokens_at],
        seg_slots=packed[slots_at],
        seg_starts=packed[starts_at],
        max_seg_len=max((hi - lo for lo, hi, _, _ in segments), default=0),
        max_rank=max((rows for *_, rows in segments), default=0),
        num_tokens=num_tokens,
        backend=backend,
        segments=tuple(segments),
    )


def build_lora_meta(
    token_slots: torch.Tensor,
    row_start: torch.Tensor,
    slot_alloc: torch.Tensor,
    *,
    backend: str = "torch",
) -> LoRABatchMeta:
    """Sort tokens by adapter slot and describe the segments, on token_slots' device.

    Args:
        token_slots: [T] int slot of each token (-1: no adapter), any order.
        row_start: [num_slots] int first pool row of each slot.
        slot_alloc: [num_slots] int rows allocated to each slot (its largest module rank).
        backend: "torch" (the reference), "cpp" (the compiled CPU kernel) or "triton".

    Reads the inputs on the host once per forward, not per layer (the serving engine, which
    knows its runs of tokens, calls `lora_meta_from_runs` and reads nothing back).
    """
    if token_slots.dim() != 1:
        raise ValueError(f"token_slots must be 1-D [T], got shape {tuple(token_slots.shape)}")
    slots = token_slots.tolist()
    if slots and max(slots) >= row_start.numel():
        raise ValueError(f"slot {max(slots)} out of range: only {row_start.numel()} adapter slots exist")
    if slots and min(slots) < -1:
        raise ValueError("token slots must be >= -1 (-1 means no adapter)")
    starts, allocs = row_start.tolist(), slot_alloc.tolist()
    ranges = {slot: (starts[slot], allocs[slot]) for slot in set(slots) if slot >= 0}
    return lora_meta_from_runs(token_runs(slots), len(slots), ranges, backend=backend).to(token_slots.device)


def token_runs(token_slots: list[int]) -> list[tuple[int, int, int]]:
    """(slot, first token, length) of each run of consecutive tokens sharing a slot."""
    runs: list[list[int]] = []
    for t, slot in enumerate(token_slots):
        if runs and runs[-1][0] == slot:
            runs[-1][2] += 1
        else:
            runs.append([slot, t, 1])
    return [tuple(run) for run in runs]
