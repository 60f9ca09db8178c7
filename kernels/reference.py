"""Pure-torch multi-LoRA shrink / expand: the reference semantics and the fast CPU path.

Weights of one layer group live in rank-row pools (see `kernels/meta.py` for the batch
metadata):

    a_pool [n_slices, R, d_in]   slice i, adapter slot s: rows row_start[s] : row_start[s]+ranks[i,s]
    b_pool [R, D_total]          rank rows of lora_B (transposed), LoRA scale folded in;
                                 slice i owns columns slice_offsets[i] : slice_offsets[i+1]

Pool invariant (kept by `server.lora.pool`): rows of a slot past a module's own rank, up to
the slot's allocated rank, are zero. The CPU path computes each chunk at its adapter's
*allocated* rank (its largest module rank, never a global maximum) and relies on those zero
rows; the Triton kernels stop at each module's exact rank.

The CPU path is a gather-matmul over the chunk plan: for each distinct allocated rank, one
`index_select` copies every chunk's adapter rows once and one batched matmul computes all
chunks. No Python loop over tokens or adapters.
"""

from __future__ import annotations

import torch

from lorafold.kernels.meta import RankGroup


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision matmuls on CPU are slow and lossy; accumulate in fp32 as the GPU kernels do.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _has_short_chunks(groups: tuple[RankGroup, ...]) -> bool:
    """Chunks of more than one token may be padded with the index T (a zero pad row)."""
    return any(g.chunk_tokens.shape[1] > 1 for g in groups)


def lora_shrink_torch(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    groups: tuple[RankGroup, ...],
    max_rank: int,
) -> torch.Tensor:
    """Semantics:
        for each token t with slot s >= 0, slice i, j < alloc(s):
            y[i, t, j] = sum_c x[t, c] * a_pool[i, row_start[s] + j, c]
        every other entry of y is 0.

    Args:
        x: [T, d_in] activations.
        a_pool: [n_slices, R, d_in] shrink weights (lora_A rows).
        groups: the meta's CPU chunk plan (rows and tokens per allocated rank).
        max_rank: width of y (the meta's max_rank).
    Returns:
        y: [n_slices, T, max_rank] float32.
    """
    n_slices, _, d_in = a_pool.shape
    num_tokens = x.shape[0]
    y = x.new_zeros((n_slices, num_tokens + 1, max_rank), dtype=torch.float32)
    if not groups:
        return y[:, :num_tokens]
    cdt = _compute_dtype(x.dtype)
    if _has_short_chunks(groups):
        # one zero pad row (index T) for the unused positions of short chunks
        x_pad = torch.cat([x.to(cdt), x.new_zeros((1, d_in), dtype=cdt)])
    else:  # decode-shaped: one token per chunk, nothing to pad (saves a copy per layer)
        x_pad = x.to(cdt)
    for g in groups:
        n_chunks, chunk = g.chunk_tokens.shape
        xg = x_pad.index_select(0, g.chunk_tokens.reshape(-1)).view(n_chunks, chunk, d_in)
        ag = a_pool.index_select(1, g.chunk_rows).to(cdt).view(n_slices, n_chunks, g.rank, d_in)
        yg = torch.matmul(xg.unsqueeze(0), ag.transpose(-1, -2))  # [n_slices, n_chunks, C, rank]
        y[:, g.chunk_tokens.reshape(-1), : g.rank] = yg.reshape(n_slices, -1, g.rank).float()
    return y[:, :num_tokens]


def lora_expand_torch(
    y: torch.Tensor,
    b_pool: torch.Tensor,
    groups: tuple[RankGroup, ...],
    slice_offsets: list[int],
    out: torch.Tensor,
) -> None:
    """Semantics:
        for each token t with slot s >= 0, slice i, column c in [off_i, off_{i+1}):
            out[t, c] += sum_{j < alloc(s)} y[i, t, j] * b_pool[row_start[s] + j, c]
        rows of tokens without adapter are untouched.

    Args:
        y: [n_slices, T, max_rank] float32 from the shrink.
        b_pool: [R, D_total] expand weights (lora_B transposed, scale folded in).
        groups: the meta's CPU chunk plan.
        slice_offsets: n_slices + 1 column offsets; D_total = slice_offsets[-1].
        out: [T, D_total], updated in place.
    """
    n_slices, num_tokens, _ = y.shape
    d_total = b_pool.shape[1]
    cdt = _compute_dtype(b_pool.dtype)
    if _has_short_chunks(groups):
        y_pad = torch.cat([y, y.new_zeros((n_slices, 1, y.shape[2]))], dim=1)
    else:
        y_pad = y
    for g in groups:
        n_chunks, chunk = g.chunk_tokens.shape
        tokens = g.chunk_tokens.reshape(-1)
        bg = b_pool.index_select(0, g.chunk_rows).to(cdt).view(n_chunks, g.rank, d_total)
        yg = y_pad[:, tokens, : g.rank].to(cdt).view(n_slices, n_chunks, chunk, g.rank)
        if n_slices == 1:
            delta = torch.bmm(yg[0], bg)
        else:
            delta = torch.empty((n_chunks, chunk, d_total), dtype=cdt)
            for i in range(n_slices):  # at most 3 slices (q/k/v)
                lo, hi = slice_offsets[i], slice_offsets[i + 1]
                delta[:, :, lo:hi] = torch.bmm(yg[i], bg[:, :, lo:hi])
        delta = delta.reshape(-1, d_total)
        if chunk > 1:  # drop the pad positions of short chunks
            valid = tokens < num_tokens
            tokens, delta = tokens[valid], delta[valid]
        # index_put_ with accumulate: measured 10-20x cheaper than index_add_ for the small row
        # counts of decode steps on CPU (index_add_ pays a parallel-region cost per call).
        out.index_put_((tokens,), delta.to(out.dtype), accumulate=True)
