"""Paged-KV attention over a flat batch of tokens from many sequences (CPU / torch path).

One step's batch mixes prefill chunks (many query tokens of one sequence) and decode tokens
(one query token each). K/V of every token are first written into fixed-size cache blocks;
each sequence then attends over its whole context, read back through its block table.
Decode sequences are batched into one SDPA call (padded to the longest context and masked);
prefill chunks run one SDPA call each (a handful per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class PrefillSeq:
    q_start: int  # first query row in the flat batch
    q_len: int
    ctx_len: int  # context length including this chunk
    kv_index: torch.Tensor  # [ctx_len] flat cache slots of the context, in order
    mask: torch.Tensor  # [q_len, ctx_len] bool, True = attend


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Everything attention needs for one step; built once, shared by all layers."""

    slot_mapping: torch.Tensor  # [N] flat cache slot (block * block_size + offset) of each token
    decode_rows: torch.Tensor  # [B] query rows of the decode tokens
    decode_kv_index: torch.Tensor  # [B, L] flat cache slots of each decode sequence's context (padded)
    decode_mask: torch.Tensor  # [B, 1, 1, L] bool, True = attend
    prefills: tuple[PrefillSeq, ...]


def build_attention_metadata(
    slot_mapping: list[int],
    seqs: list[tuple[int, int, int, list[int]]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """seqs: (q_start, q_len, ctx_len, block_table) per sequence of the step."""
    decodes = [s for s in seqs if s[1] == 1]
    prefills = []
    for q_start, q_len, ctx_len, table in seqs:
        if q_len == 1:
            continue
        kv_index = _flat_slots(table, ctx_len, block_size)
        offset = ctx_len - q_len
        mask = torch.arange(ctx_len)[None, :] <= (offset + torch.arange(q_len))[:, None]
        prefills.append(PrefillSeq(q_start, q_len, ctx_len, kv_index.to(device), mask.to(device)))
    if decodes:
        max_ctx = max(s[2] for s in decodes)
        kv = torch.zeros(len(decodes), max_ctx, dtype=torch.int64)
        for i, (_, _, ctx_len, table) in enumerate(decodes):
            kv[i, :ctx_len] = _flat_slots(table, ctx_len, block_size)
        lens = torch.tensor([s[2] for s in decodes])
        mask = (torch.arange(max_ctx)[None, :] < lens[:, None])[:, None, None, :]
        rows = torch.tensor([s[0] for s in decodes], dtype=torch.int64)
    else:
        kv = torch.zeros(0, 0, dtype=torch.int64)
        mask = torch.zeros(0, 1, 1, 0, dtype=torch.bool)
        rows = torch.zeros(0, dtype=torch.int64)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        decode_rows=rows.to(device),
        decode_kv_index=kv.to(device),
        decode_mask=mask.to(device),
        prefills=tuple(prefills),
    )


def _flat_slots(table: list[int], ctx_len: int, block_size: int) -> torch.Tensor:
    blocks = torch.tensor(table, dtype=torch.int64)
    slots = (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)
    if slots.numel() < ctx_len:
        raise ValueError(f"block table covers {slots.numel()} tokens but the context has {ctx_len}")
    return slots[:ctx_len]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write k/v into the cache, then attend each query over its sequence's context.

    Args:
        q: [N, H, D]; k, v: [N, Hkv, D] for the step's tokens.
        k_cache, v_cache: [num_slots_total, Hkv, D] (the layer's blocks, flattened).
    Returns:
        [N, H, D].
    """
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        qd = q.index_select(0, meta.decode_rows)[:, :, None, :]  # [B, H, 1, D]
        kd = k_cache[meta.decode_kv_index].transpose(1, 2)  # [B, Hkv, L, D]
        vd = v_cache[meta.decode_kv_index].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        out.index_copy_(0, meta.decode_rows, od[:, :, 0, :])
    for p in meta.prefills:
        qp = q[p.q_start : p.q_start + p.q_len].transpose(0, 1)[None]  # [1, H, q, D]
        kp = k_cache[p.kv_index].transpose(0, 1)[None]  # [1, Hkv, ctx, D]
        vp = v_cache[p.kv_index].transpose(0, 1)[None]
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale, enable_gqa=True)
        out[p.q_start : p.q_start + p.q_len] = op[0].transpose(0, 1)
    return out
