"""Paged attention through FlashInfer, the optional GPU backend (`attention_backend="flashinfer"`).

FlashInfer's batch prefill kernel over a paged KV cache serves a whole step, prefill chunks
and decode tokens alike (a decode token is a chunk of one query), as vLLM and SGLang run it:
`plan` once per step on the host, from the step's block tables in FlashInfer's CSR layout
(`PagedLayout`), then `run` once per layer on the layer's cache, viewed in place as pages
([num_blocks, block_size, Hkv, D], FlashInfer's "NHD" layout; nothing is copied). Its causal
mask is aligned bottom-right: the j-th of a chunk's q queries sees the context's first
kv_len - q + 1 + j keys, which is the engine's "a token sees its own position and before".

FlashInfer is not a dependency: it is CUDA-only (fp16/bf16), large, and compiles its kernels
at first use; `pip install flashinfer-python` where it is wanted. Without it (or on the CPU)
the backend refuses to start with the fix in its message. The engine runs this backend
without decode graphs (FlashInfer's graph mode needs a wrapper and fixed buffers per batch
bucket). `ReferencePagedAttention` is the same plan/run contract in plain torch: the CPU
tests run the engine through it, and `benchmarks/gpu_check.py` compares FlashInfer with it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from lorafold.kernels.transfer import aligned_cat

# FlashInfer's recommended split-k workspace for its batch kernels.
WORKSPACE_BYTES = 128 << 20
_DTYPES = (torch.float16, torch.bfloat16)


class PagedWrapper(Protocol):
    """The part of flashinfer.BatchPrefillWithPagedKVCacheWrapper the engine calls."""

    def plan(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor, paged_kv_indices: torch.Tensor,
             paged_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int,
             page_size: int, *, causal: bool, sm_scale: float, q_data_type: torch.dtype,
             kv_data_type: torch.dtype) -> None: ...

    def run(self, q: torch.Tensor, paged_kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class PagedLayout:
    """One step in FlashInfer's paged-KV layout, int32 host tensors; request i owns query
    rows qo_indptr[i]:qo_indptr[i+1] and pages kv_indices[kv_indptr[i]:kv_indptr[i+1]], of
    which the last holds last_page_len[i] tokens."""

    qo_indptr: torch.Tensor  # [S + 1]
    kv_indptr: torch.Tensor  # [S + 1]
    kv_indices: torch.Tensor  # [kv_indptr[-1]]
    last_page_len: torch.Tensor  # [S], in 1..block_size


def paged_layout(seqs: Sequence[tuple[int, int, int, list[int]]], block_size: int) -> PagedLayout:
    """seqs: (q_start, q_len, ctx_len, block_table) per sequence, as the model runner lays out
    a step: the flat batch's rows are the sequences' chunks in order, so q_start must be
    the running sum of q_len (FlashInfer reads each request's queries as one run of rows)."""
    qo, kv, indices, last = [0], [0], [], []
    for q_start, q_len, ctx_len, table in seqs:
        if q_start != qo[-1] or not 1 <= q_len <= ctx_len:
            raise ValueError(f"a chunk must start where the previous ended and hold 1..ctx_len queries: "
                             f"got q_start {q_start} (expected {qo[-1]}), q_len {q_len}, ctx_len {ctx_len}")
        pages = -(-ctx_len // block_size)
        if len(table) < pages:
            raise ValueError(f"block table covers {len(table) * block_size} tokens but the context has {ctx_len}")
        qo.append(qo[-1] + q_len)
        kv.append(kv[-1] + pages)
        indices += table[:pages]
        last.append(ctx_len - (pages - 1) * block_size)

    def int32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    return PagedLayout(int32(qo), int32(kv), int32(indices), int32(last))


def flashinfer_available() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def check_usable(device: torch.device, dtype: torch.dtype) -> None:
    """Raises ValueError, naming the fix, where the backend cannot run (`lorafold serve` asks
    before loading the model)."""
    if device.type != "cuda":
        raise ValueError(f"attention_backend 'flashinfer' needs a CUDA device, the model is on {device}; "
                         "use 'auto' (FlexAttention on a GPU, SDPA on the CPU)")
    if dtype not in _DTYPES:
        raise ValueError(f"FlashInfer attends in float16 or bfloat16, the model is {dtype}; "
                         "serve with --dtype bfloat16 or use attention_backend 'flex'")
    if not flashinfer_available():
        raise ValueError("attention_backend 'flashinfer' needs FlashInfer: pip install flashinfer-python "
                         "(or use 'auto': FlexAttention, which ships with torch)")


def make_wrapper(device: torch.device, dtype: torch.dtype) -> PagedWrapper:
    """FlashInfer's batch prefill wrapper on `device`, with its workspace (`check_usable` first)."""
    check_usable(device, dtype)
    import flashinfer

    if not hasattr(flashinfer.BatchPrefillWithPagedKVCacheWrapper, "plan"):  # 0.1.x: begin_forward
        raise ValueError(f"FlashInfer {getattr(flashinfer, '__version__', '?')} predates plan/run: "
                         "pip install -U flashinfer-python (>= 0.2)")
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD")


class FlashInferAttention:
    """The model runner's FlashInfer state: one wrapper, planned once per step."""

    def __init__(self, wrapper: PagedWrapper, *, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, scale: float) -> None:
        self.wrapper = wrapper
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype = dtype
        self.scale = scale

    def plan(self, seqs: Sequence[tuple[int, int, int, list[int]]], block_size: int) -> FlashInferStep:
        """Lay the step out and plan it. The layout stays on the host (FlashInfer's planner
        reads it there and moves what its kernels need); pinned and 16-byte aligned so that
        move is one asynchronous copy."""
        layout = paged_layout(seqs, block_size)
        parts = (layout.qo_indptr, layout.kv_indptr, layout.kv_indices, layout.last_page_len)
        host, spans = aligned_cat(list(parts))
        if torch.cuda.is_available():
            host = host.pin_memory()
        qo, kv, indices, last = (host[span] for span in spans)
        self.wrapper.plan(qo, kv, indices, last, self.num_heads, self.num_kv_heads, self.head_dim, block_size,
                          causal=True, sm_scale=self.scale, q_data_type=self.dtype, kv_data_type=self.dtype)
        return FlashInferStep(self.wrapper, block_size, int(layout.qo_indptr[-1]))


@dataclass(frozen=True, slots=True)
class FlashInferStep:
    """A planned step: every layer's attention is one `run` on its own cache."""

    wrapper: PagedWrapper
    block_size: int
    num_tokens: int

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q [N, H, D]; k_cache, v_cache [slots, Hkv, D] (k/v of the step already written)."""
        if q.shape[0] != self.num_tokens:
            raise ValueError(f"the step was planned for {self.num_tokens} query rows, got {q.shape[0]}")
        pages = (k_cache.view(-1, self.block_size, *k_cache.shape[1:]),
                 v_cache.view(-1, self.block_size, *v_cache.shape[1:]))
        return self.wrapper.run(q.contiguous(), pages)


class ReferencePagedAttention:
    """FlashInfer's BatchPrefillWithPagedKVCacheWrapper contract (NHD pages, causal aligned
    bottom-right, GQA) in plain torch: one SDPA call per request over its gathered pages."""

    def plan(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor, paged_kv_indices: torch.Tensor,
             paged_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int,
             page_size: int, *, causal: bool, sm_scale: float, q_data_type: torch.dtype,
             kv_data_type: torch.dtype) -> None:
        self._plan = ([int(v) for v in qo_indptr], [int(v) for v in paged_kv_indptr], paged_kv_indices.long(),
                      [int(v) for v in paged_kv_last_page_len], num_qo_heads, num_kv_heads, head_dim_qk, page_size,
                      causal, sm_scale, q_data_type)

    def run(self, q: torch.Tensor, paged_kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qo, kv, indices, last, heads, kv_heads, dim, page, causal, scale, q_dtype = self._plan
        k_pages, v_pages = paged_kv_cache
        if q.shape != (qo[-1], heads, dim) or q.dtype != q_dtype or k_pages.shape[1:] != (page, kv_heads, dim):
            raise ValueError(f"run does not match the plan: q {tuple(q.shape)} {q.dtype}, pages "
                             f"{tuple(k_pages.shape)}; planned q ({qo[-1]}, {heads}, {dim}) {q_dtype}, "
                             f"pages (*, {page}, {kv_heads}, {dim})")
        out = torch.empty_like(q)
        for i in range(len(qo) - 1):
            pages = indices[kv[i] : kv[i + 1]].to(k_pages.device)
            kv_len = (len(pages) - 1) * page + last[i]
            k = k_pages.index_select(0, pages).flatten(0, 1)[:kv_len].transpose(0, 1)[None]  # [1, Hkv, L, D]
            v = v_pages.index_select(0, pages).flatten(0, 1)[:kv_len].transpose(0, 1)[None]
            qi = q[qo[i] : qo[i + 1]].transpose(0, 1)[None]  # [1, H, q, D]
            mask = None
            if causal:
                q_len = qo[i + 1] - qo[i]
                rows = torch.arange(kv_len - q_len, kv_len, device=q.device)
                mask = torch.arange(kv_len, device=q.device)[None, :] <= rows[:, None]
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
            out[qo[i] : qo[i + 1]] = o[0].transpose(0, 1)
        return out
