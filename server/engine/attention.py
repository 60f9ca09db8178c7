"""Paged-KV attention over a flat batch of tokens from many sequences (CPU / torch path).

One step's batch mixes prefill chunks (many query tokens of one sequence) and decode tokens
(one query token each). K/V of every token are first written into fixed-size cache blocks;
each sequence then attends over its whole context, read back through its block table.
Decode tokens (one query each) run the compiled paged-attention kernel where it is built
(`kernels.cpu_ops`, float32 CPU): it reads each sequence's K/V rows straight from their
blocks, once. Elsewhere, and for prefill chunks, contexts are read back a whole block at a
time (one `index_select` row = block_size tokens x all KV heads: fewer, larger copies than
gathering token by token); decode sequences are then batched into one SDPA call (padded to
the longest context in blocks and masked), and prefill chunks run one SDPA call each (a
handful per step). That is the "sdpa" backend; the "flex" backend (the GPU path,
`flex_paged.py`) attends straight into the blocks through FlexAttention, the optional
"flashinfer" backend (`flashinfer_paged.py`) through FlashInfer's paged kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafold.kernels import cpu_ops
from lorafold.kernels.transfer import host_to_device
from lorafold.server.engine.flashinfer_paged import FlashInferAttention, FlashInferStep
from lorafold.server.engine.flex_paged import FlexMetadata, build_flex_metadata, flex_paged_attention


@dataclass(frozen=True, slots=True)
class PrefillSeq:
    q_start: int  # first query row in the flat batch
    q_len: int
    ctx_len: int  # context length including this chunk
    blocks: torch.Tensor  # [ceil(ctx_len / block_size)] cache blocks of the context, in order
    mask: torch.Tensor  # [q_len, ctx_len] bool, True = attend


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Everything attention needs for one step; built once, shared by all layers."""

    slot_mapping: torch.Tensor  # [N] flat cache slot (block * block_size + offset) of each token
    decode_rows: torch.Tensor  # [B] query rows of the decode tokens
    decode_blocks: torch.Tensor  # [B, nb] cache blocks of each decode sequence's context (padded with 0)
    decode_mask: torch.Tensor  # [B, 1, 1, nb * block_size] additive float: 0 = attend, -inf = padding
    decode_lens: torch.Tensor  # [B] int64 context length of each decode sequence
    prefills: tuple[PrefillSeq, ...]
    block_size: int
    decode_only: bool = False  # every token is a decode token, rows in order: no row gather/scatter
    flex: FlexMetadata | None = None  # set: the FlexAttention backend (the fields above are then empty)
    flashinfer: FlashInferStep | None = None  # set: the FlashInfer backend (likewise)


def build_attention_metadata(
    slot_mapping: list[int],
    seqs: list[tuple[int, int, int, list[int]]],
    block_size: int,
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    backend: str = "sdpa",
    num_blocks: int | None = None,
    flashinfer: FlashInferAttention | None = None,
) -> AttentionMetadata:
    """seqs: (q_start, q_len, ctx_len, block_table) per sequence of the step.

    dtype: the queries' dtype (SDPA's CUDA kernels refuse an additive mask of another dtype).
    backend: "sdpa", "flex" (then `num_blocks`, the cache's size in blocks, is needed) or
    "flashinfer" (then `flashinfer`, the runner's planner, plans the step)."""
    if backend == "flashinfer":
        if flashinfer is None:
            raise ValueError("the flashinfer attention backend needs the runner's FlashInferAttention")
        step = flashinfer.plan(seqs, block_size)
        slots = host_to_device(torch.tensor(slot_mapping, dtype=torch.int64), device)
        return _kernel_metadata(slots, block_size, dtype, flashinfer=step)
    if backend == "flex":
        if num_blocks is None:
            raise ValueError("the flex attention backend needs num_blocks (the KV cache's size in blocks)")
        flex, slots = build_flex_metadata(seqs, block_size, num_blocks, len(slot_mapping), device, slot_mapping)
        return _kernel_metadata(slots, block_size, dtype, flex=flex)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; use 'sdpa', 'flex' or 'flashinfer'")
    decodes = [s for s in seqs if s[1] == 1]
    prefills = []
    for q_start, q_len, ctx_len, table in seqs:
        if q_len == 1:
            continue
        offset = ctx_len - q_len
        mask = torch.arange(ctx_len)[None, :] <= (offset + torch.arange(q_len))[:, None]
        blocks = torch.tensor(_context_blocks(table, ctx_len, block_size), dtype=torch.int64)
        prefills.append(PrefillSeq(q_start, q_len, ctx_len, blocks.to(device), mask.to(device)))
    if decodes:
        tables = [_context_blocks(table, ctx_len, block_size) for _, _, ctx_len, table in decodes]
        width = max(len(t) for t in tables)
        blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
        lens = torch.tensor([s[2] for s in decodes])
        # padded positions read block 0 (zero-initialised or real K/V, always finite) and are
        # masked; an additive float mask spares SDPA a bool -> float conversion in every layer
        pad = (torch.arange(width * block_size)[None, :] >= lens[:, None])[:, None, None, :]
        mask = torch.zeros(pad.shape, dtype=dtype).masked_fill_(pad, float("-inf"))
        rows = torch.tensor([s[0] for s in decodes], dtype=torch.int64)
    else:
        blocks = torch.zeros(0, 0, dtype=torch.int64)
        mask = torch.zeros(0, 1, 1, 0, dtype=dtype)
        rows = torch.zeros(0, dtype=torch.int64)
        lens = torch.zeros(0, dtype=torch.int64)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        decode_rows=rows.to(device),
        decode_blocks=blocks.to(device),
        decode_mask=mask.to(device),
        decode_lens=lens.to(device),
        prefills=tuple(prefills),
        block_size=block_size,
        decode_only=not prefills and [s[0] for s in decodes] == list(range(len(slot_mapping))),
    )


def _kernel_metadata(slot_mapping: torch.Tensor, block_size: int, dtype: torch.dtype, **backend: object
                     ) -> AttentionMetadata:
    """The metadata of a backend whose kernel reads the blocks itself (`flex=` or
    `flashinfer=`): the SDPA path's fields stay empty."""
    empty = slot_mapping.new_zeros(0)
    return AttentionMetadata(slot_mapping=slot_mapping, decode_rows=empty, decode_blocks=empty,
                             decode_mask=empty.to(dtype), decode_lens=empty, prefills=(), block_size=block_size,
                             **backend)


def _context_blocks(table: list[int], ctx_len: int, block_size: int) -> list[int]:
    needed = (ctx_len + block_size - 1) // block_size
    if len(table) < needed:
        raise ValueError(f"block table covers {len(table) * block_size} tokens but the context has {ctx_len}")
    return list(table[:needed])


def _read_blocks(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """cache [num_slots_total, Hkv, D], blocks [...] -> [..., block_size, Hkv, D] (one copy)."""
    _, heads, dim = cache.shape
    rows = cache.view(-1, block_size * heads * dim).index_select(0, blocks.reshape(-1))
    return rows.view(*blocks.shape, block_size, heads, dim)


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """One query token per decode sequence, q [B, H, D] -> [B, H, D], over its cached context.

    The query heads sharing a KV head attend as one group of queries ([B, Hkv, H/Hkv, D]
    against [B, Hkv, L, D]), the layout of transformers' `repeat_kv` without its copy
    (faster than SDPA's enable_gqa on short contexts). The compiled kernel, where
    it takes the tensors, reads the blocks in place instead."""
    bs = meta.block_size
    if not q.is_contiguous():
        q = q.contiguous()
    if cpu_ops.usable(q, k_cache, v_cache):
        return cpu_ops.paged_decode_attention(q, k_cache, v_cache, meta.decode_blocks, meta.decode_lens, bs, scale)
    batch, heads, dim = q.shape
    kd = _read_blocks(k_cache, meta.decode_blocks, bs).flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
    vd = _read_blocks(v_cache, meta.decode_blocks, bs).flatten(1, 2).transpose(1, 2)
    qg = q.view(batch, kd.shape[1], heads // kd.shape[1], dim)
    od = F.scaled_dot_product_attention(qg, kd, vd, attn_mask=meta.decode_mask, scale=scale)
    return od.reshape(batch, heads, dim)


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
    if meta.flex is not None:
        return flex_paged_attention(q, k_cache, v_cache, meta.flex, scale)
    if meta.flashinfer is not None:  # planned with the model's scale
        return meta.flashinfer.run(q, k_cache, v_cache)
    bs = meta.block_size
    if meta.decode_only:  # a pure decode step (the common case): q rows are the decode rows
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if meta.decode_rows.numel():
        od = _decode_attention(q.index_select(0, meta.decode_rows), k_cache, v_cache, meta, scale)
        out.index_copy_(0, meta.decode_rows, od)
    for p in meta.prefills:
        qp = q[p.q_start : p.q_start + p.q_len].transpose(0, 1)[None]  # [1, H, q, D]
        if p.ctx_len == p.q_len:  # a whole prompt in one chunk: its own k/v are the context
            kp = k[p.q_start : p.q_start + p.q_len].transpose(0, 1)[None]
            vp = v[p.q_start : p.q_start + p.q_len].transpose(0, 1)[None]
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
            out[p.q_start : p.q_start + p.q_len] = op[0].transpose(0, 1)
            continue
        kp = _read_blocks(k_cache, p.blocks, bs).flatten(0, 1)[: p.ctx_len].transpose(0, 1)[None]  # [1, Hkv, ctx, D]
        vp = _read_blocks(v_cache, p.blocks, bs).flatten(0, 1)[: p.ctx_len].transpose(0, 1)[None]
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale, enable_gqa=True)
        out[p.q_start : p.q_start + p.q_len] = op[0].transpose(0, 1)
    return out
