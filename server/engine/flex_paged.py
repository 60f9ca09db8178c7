"""Paged attention through FlexAttention (the GPU path): queries attend straight into the
paged KV cache through a block mask built from the block tables; nothing is gathered.

The whole cache of a layer, [slots, Hkv, D], is viewed as one key/value sequence
[1, Hkv, slots, D] that every query batch broadcasts over. A sequence of the step is one
batch row of the queries; its block mask lists its physical cache blocks (its block table)
as the KV blocks to visit, so the fused kernel reads only those (KV tile = one cache block).
The mask function, complete on its own (eager FlexAttention evaluates it everywhere), keeps a
key slot when its block belongs to the query's sequence and its logical position is at most
the query's position:

    keep(b, q, kv) = owner[kv // bs] == seq(b)  and  logical[kv // bs] * bs + kv % bs <= pos[b, q]

Decode tokens (one query each) run as one batch [B, H, 1, D]; prefill chunks as a second,
padded to the longest chunk [P, H, Qmax, D] (a handful per step). On CUDA FlexAttention is
compiled once per process (eager would materialise [B, H, Q, slots] scores); on the CPU it
runs eagerly, which is how CI tests this path (`EngineConfig.attention_backend="flex"`).

Shapes are kept off 1 (see `MIN_DIM`): torch.compile's dynamic shapes still specialise a
size of 1, so a step with one sequence, one block or one query tile would compile the kernel
again on the serving thread (and past Dynamo's recompile limit of 8 variants it falls back to
eager FlexAttention, which materialises the scores over the whole cache).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from lorafold.kernels.transfer import aligned_cat, host_to_device

# Rows of queries per block-mask row: one tile covers a whole decode batch row (Q = 1) and
# the usual prefill chunk (<= 256 tokens: two tiles).
Q_BLOCK = 128

# The least batch rows, KV-list width and (for prefill) query tiles a FlexAttention call gets:
# padding rows list no block (kv_num 0) and their queries see nothing; extra width and tiles
# are never read. Then every call of a phase (decode: one query; prefill: several) has one
# specialisation, which `ModelRunner.warm_up` compiles before the first request.
MIN_DIM = 2


@dataclass(frozen=True, slots=True)
class FlexBatch:
    """One FlexAttention call: `rows` of the flat batch gathered into [B, Q] query slots."""

    q_index: torch.Tensor  # [B * Q] flat row of each query slot, N (a zero pad row) for padding
    valid: torch.Tensor  # [n] positions in q_index that hold real rows, in flat-row order of `rows`
    rows: torch.Tensor  # [n] flat rows, the output goes back to
    batch: int
    q_len: int
    block_mask: BlockMask


@dataclass(frozen=True, slots=True)
class FlexMetadata:
    decode: FlexBatch | None
    prefill: FlexBatch | None


def build_flex_metadata(
    seqs: list[tuple[int, int, int, list[int]]], block_size: int, num_blocks: int, num_tokens: int, device: torch.device,
    slot_mapping: list[int] | None = None,
) -> tuple[FlexMetadata, torch.Tensor | None]:
    """seqs: (q_start, q_len, ctx_len, block_table) per sequence of the step (block tables
    cover their contexts). `num_blocks`: blocks in the cache (the key length / block_size).
    Everything is laid out on the host and reaches `device` in one copy (`host_to_device`),
    `slot_mapping` too when given (returned as an int64 device tensor, else None)."""
    owner = torch.full((num_blocks,), -1, dtype=torch.int32)
    logical = torch.zeros(num_blocks, dtype=torch.int32)
    for i, (_, _, ctx_len, table) in enumerate(seqs):
        used = table[: (ctx_len + block_size - 1) // block_size]
        owner[used] = i
        logical[used] = torch.arange(len(used), dtype=torch.int32)
    decodes = [i for i, s in enumerate(seqs) if s[1] == 1]
    prefills = [i for i, s in enumerate(seqs) if s[1] > 1]
    batches = [_host_batch(seqs, members, block_size, num_tokens) if members else None for members in (decodes, prefills)]
    parts = [owner, logical, torch.tensor(slot_mapping or [], dtype=torch.int32)]
    parts += [t for hb in batches if hb is not None for t in hb.arrays]
    host, spans = aligned_cat(parts)  # aligned: the compiled kernel reads the mask's tensors
    on_device = host_to_device(host, device)
    moved = iter(on_device[span] for span in spans)
    owner_d, logical_d, slots_d = next(moved), next(moved), next(moved)
    decode, prefill = (None if hb is None else hb.on_device([next(moved).view(t.shape) for t in hb.arrays], owner_d,
                                                            logical_d, block_size) for hb in batches)
    return FlexMetadata(decode=decode, prefill=prefill), None if slot_mapping is None else slots_d.long()


@dataclass(frozen=True, slots=True)
class _HostBatch:
    """One FlexAttention call's metadata on the host, int32: kv_num [B, 1, tiles], kv_idx
    [B, 1, tiles, width], seq_of [B], pos [B, Q], q_index [B * Q], valid [n], rows [n]."""

    arrays: tuple[torch.Tensor, ...]
    batch: int
    q_len: int

    def on_device(self, arrays: list[torch.Tensor], owner: torch.Tensor, logical: torch.Tensor,
                  block_size: int) -> FlexBatch:
        kv_num, kv_idx, seq_of, pos, q_index, valid, rows = arrays
        mask = paged_block_mask(kv_num, kv_idx, owner, logical, seq_of, pos, block_size, self.q_len)
        return FlexBatch(q_index=q_index.long(), valid=valid.long(), rows=rows.long(), batch=self.batch,
                         q_len=self.q_len, block_mask=mask)


def _host_batch(seqs, members: list[int], block_size: int, num_tokens: int) -> _HostBatch:
    q_len = max(seqs[i][1] for i in members)
    batch = max(len(members), MIN_DIM)
    q_index, valid, rows, positions, tables = [], [], [], [], []
    for b, i in enumerate(members):
        q_start, n, ctx_len, table = seqs[i]
        first = ctx_len - n  # position of the chunk's first query
        q_index += list(range(q_start, q_start + n)) + [num_tokens] * (q_len - n)
        valid += range(b * q_len, b * q_len + n)
        rows += range(q_start, q_start + n)
        positions.append(list(range(first, ctx_len)) + [-1] * (q_len - n))  # -1: a pad query sees nothing
        tables.append(table[: (ctx_len + block_size - 1) // block_size])
    for _ in range(batch - len(members)):  # padding rows: the zero query row, no block, nothing seen
        q_index += [num_tokens] * q_len
        positions.append([-1] * q_len)
        tables.append([])
    q_tiles = (q_len + Q_BLOCK - 1) // Q_BLOCK
    if q_len > 1:
        q_tiles = max(q_tiles, MIN_DIM)
    kv_num = torch.tensor([len(t) for t in tables], dtype=torch.int32)
    # [B, 1, q_tiles, widest table]: a row lists its sequence's blocks; entries past its count
    # are never read (a width of num_blocks, FlexAttention's dense layout, would cost
    # B x num_blocks ints per step)
    kv_idx = torch.zeros((batch, max(MIN_DIM, *(len(t) for t in tables))), dtype=torch.int32)
    for b, t in enumerate(tables):
        kv_idx[b, : len(t)] = torch.tensor(t, dtype=torch.int32)
    # -3: no block's owner (owners are sequences >= 0, -1 for free blocks, -2 the decode
    # graphs' scratch block)
    seq_of = torch.tensor(members + [-3] * (batch - len(members)), dtype=torch.int32)
    arrays = (kv_num[:, None, None].expand(-1, 1, q_tiles).contiguous(),
              kv_idx[:, None, None, :].expand(-1, 1, q_tiles, -1).contiguous(), seq_of,
              torch.tensor(positions, dtype=torch.int32), torch.tensor(q_index, dtype=torch.int32),
              torch.tensor(valid, dtype=torch.int32), torch.tensor(rows, dtype=torch.int32))
    return _HostBatch(arrays=arrays, batch=batch, q_len=q_len)


# Compiled variants of FlexAttention one process may hold. Each engine compiles its own few
# (dtype, heads and head_dim are static; decode, prefill): a server has one engine, but
# gpu_check builds four, and past Dynamo's default of 8 per function every new variant would
# run as eager FlexAttention, scores over the whole cache.
RECOMPILE_LIMIT = 64


def compiled_flex_attention(backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """FlexAttention under torch.compile with dynamic shapes, as the GPU path runs it. (The
    tests compile with backend="eager": the same Dynamo front end and guards, no codegen.)"""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=True, backend=backend)


def paged_block_mask(kv_num: torch.Tensor, kv_idx: torch.Tensor, owner: torch.Tensor, logical: torch.Tensor,
                     seq_of: torch.Tensor, pos: torch.Tensor, block_size: int, q_len: int) -> BlockMask:
    """The block mask of one call (kv_num [B, 1, tiles], kv_idx [B, 1, tiles, width]) with the
    mask function of the module docstring over owner/logical [blocks] and seq_of [B'] / pos
    [B', Q] (B' >= B). One mask function for every caller, the decode graphs included:
    torch.compile guards on its code object. The tensors' sizes are marked dynamic up front
    (Dynamo otherwise compiles the first call for its exact sizes and only the second one
    for any); sizes of 1 stay specialised, hence MIN_DIM."""
    for t, dims in ((kv_num, (0, 2)), (kv_idx, (0, 2, 3)), (seq_of, (0,)), (pos, (0, 1))):
        for d in dims:
            if t.shape[d] > 1:
                torch._dynamo.maybe_mark_dynamic(t, d)

    def keep(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        block = kv // block_size
        return (owner[block] == seq_of[b]) & (logical[block] * block_size + kv % block_size <= pos[b, q])

    return BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(Q_BLOCK, block_size), mask_mod=keep,
                                    seq_lengths=(q_len, owner.numel() * block_size), compute_q_blocks=False)


@functools.cache
def _kernel(device_type: str) -> Callable[..., torch.Tensor]:
    """FlexAttention compiled once per process on CUDA (the fused kernel that reads only the
    listed blocks); eager elsewhere (it computes every score and masks: CPU tests only)."""
    if device_type == "cuda":
        return compiled_flex_attention()
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    return flex_attention


def _kernel_options(device_type: str, block_size: int) -> dict:
    """The compiled kernel's KV tile must divide the block mask's KV block (one cache block):
    Inductor's defaults (64/128) do not divide 16, and with a symbolic batch (dynamic shapes)
    decode runs the main kernel, which then has no valid configuration. Eager: nothing."""
    if device_type != "cuda":
        return {}
    return {"kernel_options": {"BLOCK_N": next(n for n in (64, 32, 16) if block_size % n == 0)}}


def check_block_size(block_size: int) -> None:
    """FlexAttention's compiled kernel tiles KV by >= 16 slots (tl.dot's minimum)."""
    if block_size % 16:
        raise ValueError(f"the flex attention backend on a GPU needs a KV block size that is a multiple of 16, "
                         f"got {block_size}; use block_size 16 (the default) or the sdpa backend")


def flex_paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: FlexMetadata, scale: float
) -> torch.Tensor:
    """q [N, H, D] (k/v of the step already in the cache) -> [N, H, D]."""
    _, heads, dim = q.shape
    kc = k_cache[None].transpose(1, 2)  # [1, Hkv, slots, D], a view
    vc = v_cache[None].transpose(1, 2)
    kernel = _kernel(q.device.type)
    out = torch.empty_like(q)
    q_pad = torch.cat([q, q.new_zeros((1, heads, dim))])  # row N: the pad query
    for fb in (meta.decode, meta.prefill):
        if fb is None:
            continue
        qb = q_pad.index_select(0, fb.q_index).view(fb.batch, fb.q_len, heads, dim).transpose(1, 2)
        ob = kernel(qb, kc, vc, block_mask=fb.block_mask, scale=scale, enable_gqa=True,
                    **_kernel_options(q.device.type, fb.block_mask.BLOCK_SIZE[1]))  # [B, H, Q, D]
        flat = ob.transpose(1, 2).reshape(fb.batch * fb.q_len, heads, dim)
        out.index_copy_(0, fb.rows, flat.index_select(0, fb.valid))
    return out
