"""Plain-torch multi-LoRA shrink / expand: the semantics, the oracle of the kernel tests,
and the fallback where no fast kernel runs (autograd, no compiler, a bf16 CPU model, float16
CPU pools).

Weights of one layer group live in rank-row pools (see `kernels/meta.py` for the batch
metadata):

    a_pool [n_slices, R, d_in]   slice i, adapter slot s: rows row_start[s] : row_start[s]+ranks[i,s]
    b_pool [R, D_total]          rank rows of lora_B (transposed), LoRA scale folded in;
                                 slice i owns columns slice_offsets[i] : slice_offsets[i+1]

Pool invariant (kept by `lorafold.server.lora.slots`): rows of a slot past a module's own
rank, up to the slot's allocated rank, are zero. This path computes every segment at its
slot's *allocated* rank and relies on those zero rows; the fast kernels stop at each
module's exact rank. One loop over the batch's segments (distinct adapters), each a gathered
block of tokens times its adapter's rows: differentiable, no per-token work.
"""

from __future__ import annotations

import torch

from lorafold.kernels.meta import LoRABatchMeta


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision matmuls on CPU are slow and lossy; accumulate in fp32 as the kernels do.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def lora_shrink_ref(x: torch.Tensor, a_pool: torch.Tensor, meta: LoRABatchMeta) -> torch.Tensor:
    """Semantics:
        for each token t with slot s >= 0, slice i, j < alloc(s):
            y[i, t, j] = sum_c x[t, c] * a_pool[i, row_start[s] + j, c]
        every other entry of y is 0.

    Args:
        x: [T, d_in] activations; a_pool: [n_slices, R, d_in] (lora_A rows).
    Returns:
        y: [n_slices, T, meta.max_rank] float32.
    """
    n_slices = a_pool.shape[0]
    y = x.new_zeros((n_slices, x.shape[0], meta.max_rank), dtype=torch.float32)
    if not meta.has_lora:
        return y
    cdt = _compute_dtype(x.dtype)
    tokens = meta.sorted_tokens.long()
    xs = x.index_select(0, tokens).to(cdt)
    parts = []
    for lo, hi, row, rows in meta.segments:
        a = a_pool[:, row : row + rows].to(cdt)  # [n_slices, rows, d_in]
        part = torch.matmul(xs[lo:hi], a.transpose(-1, -2))  # [n_slices, tokens, rows]
        parts.append(torch.nn.functional.pad(part.float(), (0, meta.max_rank - rows)))
    return y.index_copy(1, tokens, torch.cat(parts, dim=1))


def lora_expand_ref(
    y: torch.Tensor, b_pool: torch.Tensor, slice_offsets: list[int], meta: LoRABatchMeta, out: torch.Tensor
) -> None:
    """Semantics:
        for each token t with slot s >= 0, slice i, column c in [off_i, off_{i+1}):
            out[t, c] += sum_{j < alloc(s)} y[i, t, j] * b_pool[row_start[s] + j, c]
        rows of tokens without adapter are untouched.

    Args:
        y: [n_slices, T, max_rank] from the shrink; b_pool: [R, D_total];
        slice_offsets: n_slices + 1 column offsets; out: [T, D_total], updated in place.
    """
    if not meta.has_lora:
        return
    cdt = _compute_dtype(b_pool.dtype)
    tokens = meta.sorted_tokens.long()
    ys = y.index_select(1, tokens).to(cdt)
    parts = []
    for lo, hi, row, rows in meta.segments:
        b = b_pool[row : row + rows].to(cdt)
        parts.append(torch.cat([ys[i, lo:hi, :rows] @ b[:, slice_offsets[i] : slice_offsets[i + 1]]
                                for i in range(len(slice_offsets) - 1)], dim=1))
    # index_put_ with accumulate rather than index_add_: the same sum, without index_add_'s
    # parallel-region cost per call at the small row counts of decode steps on CPU
    out.index_put_((tokens,), torch.cat(parts).to(out.dtype), accumulate=True)
