"""Decode steps on preallocated buffers, captured as CUDA graphs per batch-size bucket.

A decode step of the GPU path (FlexAttention + Triton LoRA kernels) is hundreds of small
launches, each with Python around it: host-bound. Here every per-step input lives in a buffer
sized for the largest bucket (token ids, positions, cache slots, the block mask's tables,
the LoRA segments), a step copies its values in and pads to its bucket, and the bucket's
forward runs on views of those buffers. On CUDA that forward is captured once at start and
replayed (the graph reads the buffers in place); elsewhere the same code runs eagerly, which
is how the CPU tests check the buffers, the padding and the metadata (`decode_graphs="eager"`).

Padding rows (bucket > batch): token 0 at position 0, written to and attending only a scratch
block past the cache's last (never a sequence's block), no adapter. Their outputs are dropped.
The LoRA metadata is padded with empty segments; its `max_seg_len` is the bucket and its
`max_rank` is GRAPH_MAX_RANK, so grids are fixed per bucket. A step falls back to the eager
path when it is not pure decode, has more sequences than the largest bucket, or an adapter
of a larger rank.
"""

from __future__ import annotations

import logging

import torch

from lorafold.kernels.meta import LoRABatchMeta
from lorafold.kernels.transfer import host_to_device
from lorafold.server.engine.attention import AttentionMetadata
from lorafold.server.engine.flex_paged import MIN_DIM, FlexBatch, FlexMetadata, paged_block_mask

logger = logging.getLogger(__name__)

GRAPH_MAX_RANK = 64


def buckets_for(max_num_seqs: int) -> list[int]:
    """2, 4, 8, ... up to max_num_seqs: no bucket of 1, which torch.compile would specialise
    FlexAttention for (see flex_paged.MIN_DIM); one sequence runs padded to 2."""
    out, b = [], MIN_DIM
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return out + [max(max_num_seqs, MIN_DIM)]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list, *, num_blocks: int, block_size: int,
                 max_num_seqs: int, max_blocks_per_seq: int, capture: bool) -> None:
        """num_blocks: cache blocks including the scratch block (the last one). capture: CUDA
        graphs (else the same buffers run eagerly). Nothing runs until `prepare` (the
        runner's warm-up)."""
        self.model, self.kv_caches, self.capture = model, kv_caches, capture
        self.block_size, self.scratch = block_size, num_blocks - 1
        self.buckets = buckets_for(max_num_seqs)
        dev = kv_caches[0][0].device
        i32, i64 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.int64, device=dev)
        bmax = self.buckets[-1]
        # inference tensors, as the eager path's per-step metadata is: torch.compile guards on
        # the kind, so both paths share the compiled FlexAttention variants
        with torch.inference_mode():
            self.ids, self.positions, self.slots = (torch.zeros(bmax, **i64) for _ in range(3))
            self.owner = torch.full((num_blocks,), -1, **i32)
            self.logical = torch.zeros(num_blocks, **i32)
            self.seq_of = torch.arange(bmax, **i32)
            self.pos = torch.zeros(bmax, 1, **i32)
            self.kv_num = torch.zeros(bmax, 1, 1, **i32)
            self.kv_idx = torch.zeros(bmax, 1, 1, max(max_blocks_per_seq, MIN_DIM), **i32)
            self.sorted_tokens = torch.zeros(bmax, **i32)
            self.seg_slots = torch.zeros(bmax, **i32)
            self.seg_starts = torch.zeros(bmax + 1, **i32)
            self.arange = torch.arange(bmax, **i64)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.steps = 0  # decode steps run on the buffers (replayed or eager)
        self.captures = 0

    # -------------------------------------------------------------------- per bucket
    def _metadata(self, b: int) -> tuple[AttentionMetadata, LoRABatchMeta]:
        mask = paged_block_mask(self.kv_num[:b], self.kv_idx[:b], self.owner, self.logical, self.seq_of, self.pos,
                                self.block_size, 1)
        rows = self.arange[:b]
        flex = FlexMetadata(decode=FlexBatch(q_index=rows, valid=rows, rows=rows, batch=b, q_len=1, block_mask=mask),
                            prefill=None)
        empty = self.ids[:0]
        attn = AttentionMetadata(slot_mapping=self.slots[:b], decode_rows=empty, decode_blocks=empty,
                                 decode_mask=empty.float(), decode_lens=empty, prefills=(), block_size=self.block_size,
                                 flex=flex)
        lora = LoRABatchMeta(sorted_tokens=self.sorted_tokens[:b], seg_slots=self.seg_slots[:b],
                             seg_starts=self.seg_starts[: b + 1], max_seg_len=b, max_rank=GRAPH_MAX_RANK, num_tokens=b,
                             backend="triton")
        return attn, lora

    def _forward(self, b: int) -> torch.Tensor:
        attn, lora = self._metadata(b)
        return self.model(self.ids[:b], self.positions[:b], self.kv_caches, attn, lora)

    @torch.inference_mode()
    def prepare(self) -> None:
        """Run every bucket's forward on padding rows (compiling what it compiles: the start,
        not a request, pays for it), then, when capturing, capture them, from the largest bucket
        down, sharing one memory pool (as vLLM does)."""
        self._fill_padding(0, self.buckets[-1])
        none = self.seg_slots[:0]
        self._fill_lora(none, none, none, self.buckets[-1])
        if not self.capture:
            for b in reversed(self.buckets):
                self._forward(b)
            return
        self.graphs.clear()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile and autotune outside the capture
                    self._forward(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(b)
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize()
        self.captures += 1
        logger.info("CUDA graphs captured for decode batches of %s sequences", self.buckets)

    # -------------------------------------------------------------------- per step
    def bucket(self, num_seqs: int, max_rank: int) -> int | None:
        if max_rank > GRAPH_MAX_RANK:
            return None
        return next((b for b in self.buckets if b >= num_seqs), None)

    def _fill_padding(self, n: int, b: int) -> None:
        # fill_ with Python numbers: a kernel each, no tensor made from host data
        self.ids[n:b].fill_(0)
        self.positions[n:b].fill_(0)
        self.slots[n:b].fill_(self.scratch * self.block_size)
        self.pos[n:b].fill_(0)
        self.seq_of[n:b].fill_(-2)  # the scratch block's owner
        self.kv_num[n:b].fill_(1)
        self.kv_idx[n:b, 0, 0, 0].fill_(self.scratch)
        self.owner[self.scratch].fill_(-2)
        self.logical[self.scratch].fill_(0)

    @torch.inference_mode()
    def run(self, ids: list[int], positions: list[int], slot_mapping: list[int], tables: list[list[int]],
            lora: LoRABatchMeta | None, bucket: int) -> torch.Tensor:
        """One decode step of len(ids) sequences (row i: its token, position, cache slot and
        block table covering position + 1 tokens) in `bucket`; `lora` on the host. Returns
        logits [n, vocab].

        The step's values travel in one host-to-device copy (`host_to_device`) and reach the
        buffers by device ops: no host sync, and no copy per buffer."""
        n, bs, width = len(ids), self.block_size, self.kv_idx.shape[-1]
        used = [t[: p // bs + 1] for t, p in zip(tables, positions)]
        blocks = [blk for t in used for blk in t]
        m = len(blocks)
        host = [*ids, *positions, *slot_mapping, *(len(t) for t in used)]
        host += [blk for t in used for blk in (*t, *[0] * (width - len(t)))]  # kv_idx rows
        host += blocks
        host += [i for i, t in enumerate(used) for _ in t]  # the sequence owning each block
        host += [j for t in used for j in range(len(t))]  # its index in that sequence's table
        staged = torch.tensor(host, dtype=torch.int64)
        if lora is not None:  # int32 values, exact in int64
            staged = torch.cat([staged, lora.sorted_tokens, lora.seg_slots, lora.seg_starts])
        sizes = [n, n, n, n, n * width, m, m, m]
        moved = host_to_device(staged, self.ids.device)
        ids_v, pos_v, slots_v, kv_num_v, kv_idx_v, blocks_v, owner_v, logical_v, lora_v = torch.split(
            moved, [*sizes, moved.numel() - sum(sizes)])
        self.ids[:n].copy_(ids_v)
        self.positions[:n].copy_(pos_v)
        self.slots[:n].copy_(slots_v)
        self.pos[:n, 0].copy_(pos_v)
        self.kv_num[:n, 0, 0].copy_(kv_num_v)
        self.kv_idx[:n, 0, 0].copy_(kv_idx_v.view(n, width))
        self.owner.fill_(-1)
        self.owner.index_copy_(0, blocks_v, owner_v.to(torch.int32))
        self.logical.index_copy_(0, blocks_v, logical_v.to(torch.int32))
        self.seq_of[:n].copy_(self.arange[:n])
        self._fill_padding(n, bucket)
        t_a, s = (0, 0) if lora is None else (lora.sorted_tokens.numel(), lora.seg_slots.numel())
        self._fill_lora(lora_v[:t_a], lora_v[t_a : t_a + s], lora_v[t_a + s :], bucket)
        self.steps += 1
        if bucket in self.graphs:
            graph, out = self.graphs[bucket]
            graph.replay()
            return out[:n]
        return self._forward(bucket)[:n]

    def _fill_lora(self, sorted_tokens: torch.Tensor, seg_slots: torch.Tensor, seg_starts: torch.Tensor,
                   b: int) -> None:
        """The step's segments (seg_starts: len(seg_slots) + 1 entries, or none without an
        adapter), then empty ones up to the bucket (length 0: no program works)."""
        t_a, s = sorted_tokens.numel(), seg_slots.numel()
        self.sorted_tokens[:t_a].copy_(sorted_tokens)
        self.seg_slots[:s].copy_(seg_slots)
        self.seg_starts[: seg_starts.numel()].copy_(seg_starts)
        self.seg_slots[s:b].fill_(0)
        self.seg_starts[s + 1 : b + 1].fill_(t_a)  # entry 0 is always 0 (zeros, and every copy starts with 0)
