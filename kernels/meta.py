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

from dataclasses import dataclass, field

import torch

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

    @property
    def num_segments(self) -> int:
        return int(self.seg_slots.numel())

    @property
    def has_lora(self) -> bool:
        return self.num_segments > 0


def build_lora_meta(
    token_slots: torch.Tensor,
    row_start: torch.Tensor,
    slot_alloc: torch.Tensor,
    *,
    backend: str = "torch",
) -> LoRABatchMeta:
    """Sort tokens by adapter slot and describe the segments.

    Args:
        token_slots: [T] integer slot per token, -1 for base-only tokens.
        row_start: [num_slots] int first pool row of each slot.
        slot_alloc: [num_slots] int rows allocated to each slot (its largest module rank).
        backend: "torch" (the reference), "cpp" (the compiled CPU kernel) or "triton".

    Reads the segments on the host: one sync per forward, not per layer.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {backend!r}; use one of {', '.join(map(repr, BACKENDS))}")
    if token_slots.dim() != 1:
        raise ValueError(f"token_slots must be 1-D [T], got shape {tuple(token_slots.shape)}")
    device = token_slots.device
    slots = token_slots.to(torch.int64)
    num_tokens = int(slots.numel())
    if num_tokens and int(slots.max()) >= row_start.numel():
        raise ValueError(f"slot {int(slots.max())} out of range: only {row_start.numel()} adapter slots exist")
    if num_tokens and int(slots.min()) < -1:
        raise ValueError("token slots must be >= -1 (-1 means no adapter)")
    active = torch.nonzero(slots >= 0).flatten()
    sorted_tokens = active[torch.argsort(slots[active], stable=True)]
    seg_slots, counts = torch.unique_consecutive(slots[sorted_tokens], return_counts=True)
    seg_starts = torch.zeros(seg_slots.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=seg_starts[1:])
    first_rows = row_start.to(device=device, dtype=torch.int64)[seg_slots]
    alloc = slot_alloc.to(device=device, dtype=torch.int64)[seg_slots]
    # one host read for everything the grids and the reference need
    table = torch.stack([seg_starts[:-1], seg_starts[1:], first_rows, alloc], dim=1).tolist()
    segments = tuple((lo, hi, row, rows) for lo, hi, row, rows in table)
    return LoRABatchMeta(
        sorted_tokens=sorted_tokens.to(torch.int32),
        seg_slots=seg_slots.to(torch.int32),
        seg_starts=seg_starts.to(torch.int32),
        max_seg_len=max((hi - lo for lo, hi, _, _ in segments), default=0),
        max_rank=max((rows for *_, rows in segments), default=0),
        num_tokens=num_tokens,
        backend=backend,
        segments=segments,
    )
