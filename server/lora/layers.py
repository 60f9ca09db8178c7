"""Linear layers that add a per-token LoRA delta from adapter slots to a frozen base linear.

    y[t] = x[t] W0ᵀ (+ bias)  +  Σ_i  (x[t] A_{i,s}ᵀ) (s_i B_{i,s})ᵀ   into slice i's columns,
    s = slot of token t (none: base only)

One layer may fuse several slices that share their input (q/k/v, gate/up): the base weight
is their concatenation and the LoRA shrink/expand run once for all slices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafold.kernels.meta import LoRABatchMeta
from lorafold.kernels.ops import apply
from lorafold.server.lora.rows import Move
from lorafold.server.models.packed_linear import DEFAULT_BATCH_HINT, can_prepack, packed_linear, prepack, use_packed


class MultiLoRALinear(nn.Module):
    """A frozen base linear plus rank-row pools of adapter weights.

    Buffers:
        a_pool [n_slices, R, in]: lora_A rows of every slot.
        b_pool [R, out]: lora_B rows (transposed), scale folded in.
        ranks  [n_slices, num_slots] int32: each slice's rank per slot (0 = not adapted).
    `row_start` [num_slots] is shared by all layers and owned by `AdapterSlots`.
    """

    def __init__(self, base: nn.Linear, slice_sizes: list[int], num_slots: int, rows: int,
                 pool_dtype: torch.dtype | None = None) -> None:
        """pool_dtype: the adapter pools' dtype (None: the base weight's); the activations and
        the output keep the base's."""
        super().__init__()
        if sum(slice_sizes) != base.out_features:
            raise ValueError(f"slices {slice_sizes} do not add up to out_features={base.out_features}")
        self.base = base
        self.slice_offsets = [0]
        for size in slice_sizes:
            self.slice_offsets.append(self.slice_offsets[-1] + size)
        w = base.weight
        pool_dtype = w.dtype if pool_dtype is None else pool_dtype
        # Allocated once at their full size (the adapter memory budget) and left uninitialised:
        # rows no slot owns are never read (every op reads only the rows of the slots in its
        # batch; `AdapterSlots.fill` writes every row of a range before its slot is used). On
        # the CPU an untouched row costs no RAM, so the pools take memory as adapters fill
        # them; on a GPU the budget is reserved at start (as the KV cache is), and the pools
        # never move, so captured decode graphs stay valid.
        self.register_buffer("a_pool", w.new_empty((len(slice_sizes), rows, base.in_features), dtype=pool_dtype),
                             persistent=False)
        self.register_buffer("b_pool", w.new_empty((rows, base.out_features), dtype=pool_dtype), persistent=False)
        self.register_buffer(
            "ranks", torch.zeros((len(slice_sizes), num_slots), dtype=torch.int32, device=w.device), persistent=False
        )
        self.row_start: torch.Tensor = torch.zeros(num_slots, dtype=torch.int32, device=w.device)
        self._packed: torch.Tensor | None = None  # see prepack_base

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight (dtype checks, tying)
        return self.base.weight

    def prepack_base(self, batch_hint: int = DEFAULT_BATCH_HINT) -> bool:
        """Keep a oneDNN-packed copy of the base weight for no-grad forwards (see
        `server.models.packed_linear`); False where the weight cannot be packed."""
        if not can_prepack(self.base.weight):
            return False
        self._packed = prepack(self.base.weight, batch_hint)
        return True

    def forward(self, x: torch.Tensor, meta: LoRABatchMeta | None = None) -> torch.Tensor:
        """x [T, in] (or [..., in] flattening to T rows); `meta` says which slot each row
        uses (None: the base alone)."""
        # F.linear on the base's parameters rather than calling the base module: one nn.Module
        # dispatch less per layer, which shows at decode sizes.
        if self._packed is not None and use_packed(x):
            out = packed_linear(x, self._packed, self.base.bias)
        else:
            out = F.linear(x, self.base.weight, self.base.bias)
        if meta is None or not meta.has_lora:
            return out
        flat_x = x.reshape(-1, x.shape[-1])
        if flat_x.shape[0] != meta.num_tokens:
            raise ValueError(
                f"LoRA batch metadata describes {meta.num_tokens} tokens but the layer got {flat_x.shape[0]}; "
                "build it from the same batch (one slot per token, in order)"
            )
        flat_out = out.reshape(-1, out.shape[-1])
        apply(flat_x, self.a_pool, self.b_pool, self.row_start, self.ranks, self.slice_offsets, meta, flat_out)
        return out

    # --- slot updates (called by AdapterSlots between forwards) -------------------------
    def relayout_rows(self, moves: list[Move]) -> None:
        """Move every owned range where `moves` says, in place. Each moved range is read
        before any is written, so overlapping moves are safe."""
        moved = [(m, self.a_pool[:, m.src : m.src + m.rows].clone(), self.b_pool[m.src : m.src + m.rows].clone())
                 for m in moves if m.src != m.dst]
        for m, a, b in moved:
            self.a_pool[:, m.dst : m.dst + m.rows] = a
            self.b_pool[m.dst : m.dst + m.rows] = b
