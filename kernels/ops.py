"""The multi-LoRA ops as `torch.library` custom ops, dispatched to Triton or the torch path.

`lorafold::lora_shrink` and `lorafold::lora_expand` take the batch metadata as plain tensors
and ints (custom-op schemas allow nothing else), carry fake implementations for tracing and
`torch.compile`, and pick their backend per call:

- CUDA tensors: the Triton kernels (`triton_lora.py`).
- CPU tensors: the pure-torch gather-matmul path (`reference.py`), unless the backend is
  forced to "triton" (how the kernels are tested on CPU under TRITON_INTERPRET=1).
- Eager CPU inference (`apply`, no autograd): the compiled kernel of `cpu_ops` where it is
  built and the tensors are float32 ("auto", or forced with "cpp"), else the torch path.

`shrink(...)` / `expand(...)` below are the typed entry points the layers call.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from lorafold.kernels import cpu_ops
from lorafold.kernels.meta import LoRABatchMeta, RankGroup
from lorafold.kernels.reference import lora_apply_torch, lora_expand_torch, lora_shrink_torch

_BACKENDS = ("auto", "torch", "triton", "cpp")
_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("lorafold_lora_backend", default="auto")


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Force the ops' backend ("auto", "torch", "triton" or "cpp") inside the block. "cpp"
    (the compiled CPU kernel) covers `apply` only; autograd and shrink/expand stay torch."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown LoRA op backend {name!r}; use one of {', '.join(map(repr, _BACKENDS))}")
    token = _BACKEND.set(name)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def _use_triton(x: torch.Tensor) -> bool:
    backend = _BACKEND.get()
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def _groups(
    ranks: list[int], tokens: list[torch.Tensor], rows: list[torch.Tensor], num_tokens: int
) -> tuple[RankGroup, ...]:
    """The chunk plan back from the ops' flat arguments (tensors and lists only); `padded` is
    recomputed from the tokens (the pad index is `num_tokens`)."""
    return tuple(
        RankGroup(rank=r, chunk_tokens=t, chunk_rows=w, padded=bool((t >= num_tokens).any()))
        for r, t, w in zip(ranks, tokens, rows)
    )


@torch.library.custom_op("lorafold::lora_shrink", mutates_args=())
def _lora_shrink_op(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    row_start: torch.Tensor,
    ranks: torch.Tensor,
    sorted_tokens: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    group_ranks: list[int],
    group_tokens: list[torch.Tensor],
    group_rows: list[torch.Tensor],
    max_seg_len: int,
    max_rank: int,
) -> torch.Tensor:
    if _use_triton(x):
        from lorafold.kernels.triton_lora import shrink as triton_shrink

        # Metadata built by `build_lora_meta` is consistent by construction: skip the value
        # checks, which cost a device->host sync per call (and break CUDA-graph capture).
        return triton_shrink(
            x, a_pool, row_start, ranks, sorted_tokens, seg_slots, seg_starts, max_seg_len, max_rank,
            check_values=False,
        )
    _require_flat_plan(group_ranks, seg_slots)
    return lora_shrink_torch(x, a_pool, _groups(group_ranks, group_tokens, group_rows, x.shape[0]), max_rank)


def _require_flat_plan(group_ranks: list[int], seg_slots: torch.Tensor) -> None:
    """The torch path computes only what the chunk plan lists: without one (metadata built
    for the Triton kernels, as on CUDA) it would return zeros for every adapter. Say so."""
    if not group_ranks and seg_slots.numel():  # numel is a shape: no host sync
        raise ValueError(
            "the torch LoRA path needs the chunk plan, and this batch metadata has none (built for the Triton "
            "kernels); build it with build_lora_meta(..., with_cpu_plan=True) or use the 'triton' backend"
        )


@_lora_shrink_op.register_fake
def _(x, a_pool, row_start, ranks, sorted_tokens, seg_slots, seg_starts, group_ranks, group_tokens,
      group_rows, max_seg_len, max_rank):
    return x.new_empty((a_pool.shape[0], x.shape[0], max_rank), dtype=torch.float32)


@torch.library.custom_op("lorafold::lora_expand", mutates_args=("out",))
def _lora_expand_op(
    y: torch.Tensor,
    b_pool: torch.Tensor,
    row_start: torch.Tensor,
    ranks: torch.Tensor,
    slice_offsets: list[int],
    sorted_tokens: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    group_ranks: list[int],
    group_tokens: list[torch.Tensor],
    group_rows: list[torch.Tensor],
    max_seg_len: int,
    max_rank: int,
    out: torch.Tensor,
) -> None:
    if _use_triton(out):
        from lorafold.kernels.triton_lora import expand as triton_expand

        triton_expand(
            y, b_pool, row_start, ranks, slice_offsets, sorted_tokens, seg_slots, seg_starts,
            max_seg_len, max_rank, out, check_values=False,
        )
        return
    _require_flat_plan(group_ranks, seg_slots)
    lora_expand_torch(y, b_pool, _groups(group_ranks, group_tokens, group_rows, y.shape[1]), slice_offsets, out)


@_lora_expand_op.register_fake
def _(y, b_pool, row_start, ranks, slice_offsets, sorted_tokens, seg_slots, seg_starts, group_ranks,
      group_tokens, group_rows, max_seg_len, max_rank, out):
    return None


def _require_plan(meta: LoRABatchMeta) -> None:
    if meta.has_lora and not meta.groups:
        raise ValueError("gradients through the LoRA ops need the chunk plan: build_lora_meta(..., with_cpu_plan=True)")


def _plan(meta: LoRABatchMeta) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    return [g.rank for g in meta.groups], [g.chunk_tokens for g in meta.groups], [g.chunk_rows for g in meta.groups]


def _eager_cpu(t: torch.Tensor) -> bool:
    """Eager CPU calls skip the custom-op dispatcher and call the torch path directly: the
    dispatcher's Python wrapping measured ~230 us per call, ~30 ms per SmolLM2 forward (210
    LoRA layers x 2 ops) against a 0.17 s base. Under torch.compile, on CUDA, or with the
    "torch" or "triton" backend forced, the registered op is used ("cpp" stays eager)."""
    return not t.is_cuda and _compiled_allowed() and not torch.compiler.is_compiling()


def _compiled_allowed() -> bool:
    """The backend lets eager CPU calls run the compiled kernel ("auto" or "cpp")."""
    return _BACKEND.get() in ("auto", "cpp")


def compiled_cpu_covers(dtype: torch.dtype) -> bool:
    """Whether eager CPU `apply` on pools of `dtype` runs the compiled kernel, which needs
    no chunk plan (`build_lora_meta(..., with_cpu_plan=False)` then suffices)."""
    return dtype == torch.float32 and _compiled_allowed() and cpu_ops.usable()


def _use_compiled(floats: tuple[torch.Tensor, ...], indices: tuple[torch.Tensor, ...]) -> bool:
    if not _compiled_allowed():
        return False
    ints_ok = all(t.dtype == torch.int32 and t.is_contiguous() and t.device.type == "cpu" for t in indices)
    if ints_ok and cpu_ops.usable(*floats):
        return True
    if _BACKEND.get() == "cpp":
        raise RuntimeError(
            "LoRA backend 'cpp' forced, but the compiled CPU kernel is not built or the tensors are not "
            "contiguous float32 CPU tensors (int32 row_start / ranks); see lorafold.kernels.cpu_ext"
        )
    return False


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def shrink(
    x: torch.Tensor, a_pool: torch.Tensor, row_start: torch.Tensor, ranks: torch.Tensor, meta: LoRABatchMeta
) -> torch.Tensor:
    """y[i, t, :] = x[t] @ a_pool[i, rows of slot(t)].T  ->  [n_slices, T, meta.max_rank] fp32.

    Differentiable: when autograd needs gradients (training: the subject-conditioned layer),
    the torch path runs directly, built from differentiable gathers and matmuls; it needs
    the meta's chunk plan (`build_lora_meta(..., with_cpu_plan=True)` on GPU).
    """
    if _needs_grad(x, a_pool) or _eager_cpu(x):
        _require_plan(meta)
        return lora_shrink_torch(x, a_pool, meta.groups, meta.max_rank)
    g_ranks, g_tokens, g_rows = _plan(meta)
    return torch.ops.lorafold.lora_shrink(
        x, a_pool, row_start, ranks, meta.sorted_tokens, meta.seg_slots, meta.seg_starts,
        g_ranks, g_tokens, g_rows, meta.max_seg_len, meta.max_rank,
    )


def expand(
    y: torch.Tensor,
    b_pool: torch.Tensor,
    row_start: torch.Tensor,
    ranks: torch.Tensor,
    slice_offsets: list[int],
    meta: LoRABatchMeta,
    out: torch.Tensor,
) -> None:
    """out[t, slice i cols] += y[i, t, :] @ b_pool[rows of slot(t), slice i cols], in place.

    Differentiable in y, b_pool and out when autograd needs it (see `shrink`)."""
    if _needs_grad(y, b_pool, out) or _eager_cpu(out):
        _require_plan(meta)
        lora_expand_torch(y, b_pool, meta.groups, list(slice_offsets), out)
        return
    g_ranks, g_tokens, g_rows = _plan(meta)
    torch.ops.lorafold.lora_expand(
        y, b_pool, row_start, ranks, list(slice_offsets), meta.sorted_tokens, meta.seg_slots,
        meta.seg_starts, g_ranks, g_tokens, g_rows, meta.max_seg_len, meta.max_rank, out,
    )


def apply(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    row_start: torch.Tensor,
    ranks: torch.Tensor,
    slice_offsets: list[int],
    meta: LoRABatchMeta,
    out: torch.Tensor,
) -> None:
    """out[t, slice i cols] += (x[t] A_{i,s}ᵀ) B_{i,s}: `shrink` then `expand`, in place.

    Eager CPU inference takes the compiled kernel (`cpu_ops.lora_apply`: one call reading
    each adapter's rows in place, at each module's own rank) where it is built and the
    tensors are float32, else the fused torch path (`lora_apply_torch`: views instead of
    gathers when the batch is ordered by adapter, no [n_slices, T, max_rank] intermediate);
    autograd, CUDA, torch.compile and forced backends go through `shrink` / `expand`."""
    if _eager_cpu(out) and not _needs_grad(x, a_pool, b_pool, out):
        if not meta.has_lora:
            return
        if not x.is_contiguous():
            x = x.contiguous()
        if _use_compiled((x, a_pool, b_pool, out), (row_start, ranks)):
            cpu_ops.lora_apply(
                x, a_pool, b_pool, row_start, ranks, meta.sorted_tokens, meta.seg_slots, meta.seg_starts,
                slice_offsets, out,
            )
            return
        if meta.groups:
            lora_apply_torch(x, a_pool, b_pool, meta.groups, slice_offsets, out)
            return
    y = shrink(x, a_pool, row_start, ranks, meta)
    expand(y, b_pool, row_start, ranks, slice_offsets, meta, out)
