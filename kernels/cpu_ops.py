"""Typed entry points of the compiled CPU kernels (`csrc/cpu_ops.cpp`, built by `cpu_ext`).

Callers ask `available()` (or `usable(...)` for given tensors) first: the kernels take
contiguous float32 CPU tensors (the LoRA op's adapter pools may also be bfloat16), and exist
only where `cpu_ext` could build or load them; everything else keeps the torch path.
"""

from __future__ import annotations

import torch

from lorafold.kernels import cpu_ext


def available() -> bool:
    """True when the compiled kernels are built (or can be, once) and loaded."""
    return cpu_ext.available()


def usable(*tensors: torch.Tensor) -> bool:
    """True when the compiled kernels are loaded and take these tensors as they are."""
    f32 = torch.float32
    for t in tensors:  # `is_cpu` and `dtype` are plain attributes; `t.device` builds an object
        if not t.is_cpu or t.dtype != f32 or not t.is_contiguous():
            return False
    return available()


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence over its paged context: q [B, H, D] -> [B, H, D].

    k_cache, v_cache: [num_blocks * block_size, Hkv, D]; block_tables [B, nb] int64 (rows
    padded past a sequence's blocks are never read); context_lens [B] int64, each >= 1."""
    return torch.ops.lorafold_cpu.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)


def lora_apply(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    row_start: torch.Tensor,
    ranks: torch.Tensor,
    sorted_tokens: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    slice_offsets: list[int],
    out: torch.Tensor,
) -> None:
    """out[t, slice i] += (x[t] A_{i,s}ᵀ) B_{i,s} for every token t of slot s, in place, each
    slice at its own rank `ranks[i, s]` (int32 [n_slices, num_slots]). x and out float32;
    a_pool and b_pool both float32 or both bfloat16 (widened as read, float32 arithmetic). The segment tensors
    are a `LoRABatchMeta`'s (int32); row_start is int32 [num_slots]."""
    torch.ops.lorafold_cpu.lora_apply(
        x, a_pool, b_pool, row_start, ranks, sorted_tokens, seg_slots, seg_starts, list(slice_offsets), out
    )


def lora_lay_out(
    a_dst: torch.Tensor,
    b_dst: torch.Tensor,
    lora_a: list[torch.Tensor | None],
    lora_b: list[torch.Tensor | None],
    scales: list[float],
    slice_offsets: list[int],
) -> torch.Tensor:
    """One layer's share of an adapter into its rows, in one call: a_dst [n_slices, rows,
    d_in] gets each slice's A [r_i, d_in] then zeros, b_dst [rows, D] each slice's
    (scale_i B_i)ᵀ (B_i [D_i, r_i]) in the slice's columns then zeros (None: a slice the
    adapter leaves alone, all zeros). A and B float32, any strides; the destinations float32,
    bfloat16 or float16 (rounded as torch rounds), each row contiguous. Returns the ranks
    [n_slices] int32."""
    return torch.ops.lorafold_cpu.lora_lay_out(a_dst, b_dst, lora_a, lora_b, [float(s) for s in scales],
                                              list(slice_offsets))
