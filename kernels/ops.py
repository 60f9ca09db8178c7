"""The multi-LoRA ops the layers call, dispatched on the backend their metadata names.

One fast implementation per device plus the plain reference:

- "triton" (CUDA; CPU only under TRITON_INTERPRET=1, how the kernels are tested): the Triton
  shrink/expand, registered as the `torch.library` custom ops `lorafold::lora_shrink` /
  `lorafold::lora_expand` with fake implementations, so `torch.compile` and CUDA-graph
  capture see one opaque op per call.
- "cpp" (CPU, float32 activations; float32 or bfloat16 pools): `apply` is the compiled
  kernel of `cpu_ops` (one call per layer, each slice at its own rank); `shrink` / `expand`
  alone use the reference.
- "torch": the reference (`reference.py`), also whatever autograd needs (training), since
  neither kernel has a backward.

The backend is chosen once, by whoever owns the pools (`choose_backend`), and travels in
`LoRABatchMeta.backend`: no per-call device or dtype sniffing, no global switch.
"""

from __future__ import annotations

import torch

from lorafold.kernels import cpu_ops
from lorafold.kernels.meta import BACKENDS, LoRABatchMeta
from lorafold.kernels.reference import lora_expand_ref, lora_shrink_ref


# Pool dtypes the compiled CPU kernel reads (its activations are always float32).
CPP_POOL_DTYPES = (torch.float32, torch.bfloat16)


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype,
                   pool_dtype: torch.dtype | None = None) -> str:
    """The backend for a model of `dtype` on `device` whose adapter pools are `pool_dtype`
    (None: `dtype`). "auto": Triton on CUDA, the compiled kernel for a float32 model on the
    CPU where it is built, else the reference. A named backend, and pools the chosen one
    cannot read, are refused here, at start, rather than on the first request."""
    pool_dtype = dtype if pool_dtype is None else pool_dtype
    if requested == "auto":
        if device.type == "cuda":
            requested = "triton"
        elif (device.type == "cpu" and dtype == torch.float32 and pool_dtype in CPP_POOL_DTYPES
              and cpu_ops.available()):
            return "cpp"
        else:
            return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {requested!r}; use 'auto' or one of {', '.join(map(repr, BACKENDS))}")
    if requested == "triton" and device.type != "cuda":
        from lorafold.kernels.triton_lora import INTERPRET

        if not INTERPRET:
            raise ValueError("lora_backend='triton' on the CPU runs only under Triton's interpreter: set "
                             "TRITON_INTERPRET=1 before lorafold is imported (tests), or use 'auto'")
    if requested == "triton" and pool_dtype != dtype:
        raise ValueError(f"the Triton LoRA kernels read adapter pools of the model's dtype ({dtype}), not "
                         f"{pool_dtype}: use lora_dtype='auto'")
    if requested == "cpp":
        if device.type != "cpu" or dtype != torch.float32 or pool_dtype not in CPP_POOL_DTYPES:
            raise ValueError(f"lora_backend='cpp' is the compiled CPU kernel for a float32 model with float32 or "
                             f"bfloat16 adapter pools; here the model is {dtype} on {device}, the pools "
                             f"{pool_dtype}: use 'auto'")
        if not cpu_ops.available():
            raise ValueError("lora_backend='cpp' but the compiled CPU kernel could not be built (see the log); "
                             "use 'auto'")
    return requested


@torch.library.custom_op("lorafold::lora_shrink", mutates_args=())
def _lora_shrink_op(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    row_start: torch.Tensor,
    ranks: torch.Tensor,
    sorted_tokens: torch.Tensor,
    seg_slots: torch.Tensor,
    seg_starts: torch.Tensor,
    items: torch.Tensor,
    item_count: torch.Tensor,
    max_seg_len: int,
    max_rank: int,
) -> torch.Tensor:
    from lorafold.kernels.triton_lora import shrink as triton_shrink

    # Metadata built by kernels/meta.py is consistent by construction: skip the value
    # checks, which cost a device->host sync per call (and break CUDA-graph capture).
    return triton_shrink(x, a_pool, row_start, ranks, sorted_tokens, seg_slots, seg_starts, max_seg_len, max_rank,
                         check_values=False, items=(items, item_count))


@_lora_shrink_op.register_fake
def _(x, a_pool, row_start, ranks, sorted_tokens, seg_slots, seg_starts, items, item_count, max_seg_len, max_rank):
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
    items: torch.Tensor,
    item_count: torch.Tensor,
    max_seg_len: int,
    max_rank: int,
    out: torch.Tensor,
) -> None:
    from lorafold.kernels.triton_lora import expand as triton_expand

    triton_expand(y, b_pool, row_start, ranks, slice_offsets, sorted_tokens, seg_slots, seg_starts,
                  max_seg_len, max_rank, out, check_values=False, items=(items, item_count))


@_lora_expand_op.register_fake
def _(y, b_pool, row_start, ranks, slice_offsets, sorted_tokens, seg_slots, seg_starts, items, item_count, max_seg_len,
      max_rank, out):
    return None


def _work_items(meta: LoRABatchMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton launches' work items of this forward: computed once, on the device, for
    every layer (`triton_lora.forward_items`)."""
    if "triton_items" not in meta.cache:
        from lorafold.kernels.triton_lora import forward_items

        meta.cache["triton_items"] = forward_items(meta.seg_starts, meta.sorted_tokens.numel(), meta.max_seg_len)
    return meta.cache["triton_items"]


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def shrink(
    x: torch.Tensor, a_pool: torch.Tensor, row_start: torch.Tensor, ranks: torch.Tensor, meta: LoRABatchMeta
) -> torch.Tensor:
    """y[i, t, :] = x[t] @ a_pool[i, rows of slot(t)].T  ->  [n_slices, T, meta.max_rank] fp32.

    Differentiable: when autograd needs gradients (training: the subject-conditioned layer)
    the reference runs, whatever the backend."""
    if meta.backend == "triton" and not _needs_grad(x, a_pool):
        return torch.ops.lorafold.lora_shrink(
            x, a_pool, row_start, ranks, meta.sorted_tokens, meta.seg_slots, meta.seg_starts, *_work_items(meta),
            meta.max_seg_len, meta.max_rank,
        )
    return lora_shrink_ref(x, a_pool, meta)


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
    if meta.backend == "triton" and not _needs_grad(y, b_pool, out):
        torch.ops.lorafold.lora_expand(
            y, b_pool, row_start, ranks, list(slice_offsets), meta.sorted_tokens, meta.seg_slots,
            meta.seg_starts, *_work_items(meta), meta.max_seg_len, meta.max_rank, out,
        )
        return
    lora_expand_ref(y, b_pool, list(slice_offsets), meta, out)


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
    """out[t, slice i cols] += (x[t] A_{i,s}ᵀ) B_{i,s} for every token t of slot s, in place:
    one call of the compiled CPU kernel, else `shrink` then `expand` (Triton or the reference)."""
    if not meta.has_lora:
        return
    if meta.backend == "cpp" and not _needs_grad(x, a_pool, b_pool, out):
        cpu_ops.lora_apply(x.contiguous(), a_pool, b_pool, row_start, ranks, meta.sorted_tokens, meta.seg_slots,
                           meta.seg_starts, slice_offsets, out)
        return
    expand(shrink(x, a_pool, row_start, ranks, meta), b_pool, row_start, ranks, slice_offsets, meta, out)
