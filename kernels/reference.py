"""Pure-torch multi-LoRA shrink / expand: the reference semantics and the fast CPU path.

Weights of one layer group live in rank-row pools (see `kernels/meta.py` for the batch
metadata):

    a_pool [n_slices, R, d_in]   slice i, adapter slot s: rows row_start[s] : row_start[s]+ranks[i,s]
    b_pool [R, D_total]          rank rows of lora_B (transposed), LoRA scale folded in;
                                 slice i owns columns slice_offsets[i] : slice_offsets[i+1]

Pool invariant (kept by `lorafold.server.lora.slots`): rows of a slot past a module's own rank, up to
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


def _has_pads(groups: tuple[RankGroup, ...]) -> bool:
    """Some chunk position holds the pad index T (read as a zero row, its result dropped)."""
    return any(g.padded for g in groups)


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
    if _has_pads(groups):
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


def _chunk_deltas(y: torch.Tensor | list[torch.Tensor], bg: torch.Tensor, slice_offsets: list[int]) -> torch.Tensor:
    """Each chunk's expand output [n_chunks, C, D_total]: slice i's columns = y[i] @ bg[..., slice i]."""
    if len(slice_offsets) == 2:
        return torch.bmm(y[0], bg)
    n_chunks, chunk = y[0].shape[:2]
    delta = torch.empty((n_chunks, chunk, bg.shape[2]), dtype=bg.dtype)
    for i in range(len(slice_offsets) - 1):  # at most 3 slices (q/k/v)
        lo, hi = slice_offsets[i], slice_offsets[i + 1]
        delta[:, :, lo:hi] = torch.bmm(y[i], bg[:, :, lo:hi])
    return delta


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
    if _has_pads(groups):
        y_pad = torch.cat([y, y.new_zeros((n_slices, 1, y.shape[2]))], dim=1)
    else:
        y_pad = y
    for g in groups:
        n_chunks, chunk = g.chunk_tokens.shape
        tokens = g.chunk_tokens.reshape(-1)
        bg = b_pool.index_select(0, g.chunk_rows).to(cdt).view(n_chunks, g.rank, d_total)
        yg = y_pad[:, tokens, : g.rank].to(cdt).view(n_slices, n_chunks, chunk, g.rank)
        delta = _chunk_deltas(yg, bg, slice_offsets).reshape(-1, d_total)
        if g.padded:  # drop the pad positions
            valid = tokens < num_tokens
            tokens, delta = tokens[valid], delta[valid]
        # index_put_ with accumulate: measured 10-20x cheaper than index_add_ for the small row
        # counts of decode steps on CPU (index_add_ pays a parallel-region cost per call).
        out.index_put_((tokens,), delta.to(out.dtype), accumulate=True)


def _weight_views(
    a_pool: torch.Tensor, b_pool: torch.Tensor, g: RankGroup, n_chunks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk's adapter rows: [n_slices, n_chunks, rank, d_in] and [n_chunks, rank, D].

    Strided views into the pools when the chunks' rows are evenly spaced (`g.row_first`), so
    the matmuls read the adapter weights in place; otherwise one `index_select` copy each."""
    n_slices, rows, d_in = a_pool.shape
    d_total = b_pool.shape[1]
    if g.row_first >= 0 and a_pool.is_contiguous() and b_pool.is_contiguous():
        ag = a_pool.as_strided(
            (n_slices, n_chunks, g.rank, d_in),
            (rows * d_in, g.row_stride * d_in, d_in, 1),
            a_pool.storage_offset() + g.row_first * d_in,
        )
        bg = b_pool.as_strided(
            (n_chunks, g.rank, d_total), (g.row_stride * d_total, d_total, 1), b_pool.storage_offset() + g.row_first * d_total
        )
        return ag, bg
    ag = a_pool.index_select(1, g.chunk_rows).view(n_slices, n_chunks, g.rank, d_in)
    bg = b_pool.index_select(0, g.chunk_rows).view(n_chunks, g.rank, d_total)
    return ag, bg


def _apply_views(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    g: RankGroup,
    slice_offsets: list[int],
    out: torch.Tensor,
) -> None:
    """`lora_apply_torch` for one rank group whose tokens, chunks and pool rows are all evenly
    laid out (an adapter-ordered batch): every operand is ONE `as_strided` view, straight in
    the shape the matmul wants, and the expand accumulates into `out` in place.

    Written for dispatch count, not brevity: a SmolLM2 decode step makes 120-210 of these
    calls, each a few tiny matmuls, so every extra view/slice/transpose/`.to` (~1-2 us each)
    measured as several ms per forward. All tensors are contiguous and of one dtype here.
    """
    n_slices, rows, d_in = a_pool.shape
    d_total = b_pool.shape[1]
    n_chunks, chunk = g.chunk_tokens.shape
    rank, stride = g.rank, g.row_stride
    xg = x.as_strided((n_chunks, chunk, d_in), (chunk * d_in, d_in, 1), x.storage_offset() + g.token_lo * d_in)
    a_off = a_pool.storage_offset() + g.row_first * d_in
    b_off = b_pool.storage_offset() + g.row_first * d_total
    o_off = out.storage_offset() + g.token_lo * d_total
    # chunk k's A_iᵀ [d_in, rank] / B_i [rank, cols] / output rows, read in place
    a_t_shape, a_t_strides = (n_chunks, d_in, rank), (stride * d_in, 1, d_in)
    accumulate = n_slices == 1 or n_chunks == 1
    for i in range(n_slices):
        lo, hi = slice_offsets[i], slice_offsets[i + 1]
        a_t = a_pool.as_strided(a_t_shape, a_t_strides, a_off + i * rows * d_in)
        bg = b_pool.as_strided((n_chunks, rank, hi - lo), (stride * d_total, d_total, 1), b_off + lo)
        ov = out.as_strided((n_chunks, chunk, hi - lo), (chunk * d_total, d_total, 1), o_off + lo)
        y = torch.bmm(xg, a_t)
        if accumulate:
            ov.baddbmm_(y, bg)
        else:
            # baddbmm_ into a column slice of several chunks falls back to one addmm per
            # chunk: measured 2x slower than a batched bmm plus one strided add
            ov.add_(torch.bmm(y, bg))


def lora_apply_torch(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    groups: tuple[RankGroup, ...],
    slice_offsets: list[int],
    out: torch.Tensor,
) -> None:
    """Fused shrink + expand, no autograd: the eager CPU serving path.

    Semantics: `lora_expand_torch(lora_shrink_torch(x, ...), ...)`, i.e. for each token t with
    slot s >= 0 and each slice i, out[t, slice i] += (x[t] A_{i,s}ᵀ) B_{i,s}.

    Per rank group it uses views wherever the meta's layout facts allow (tokens contiguous,
    chunks full, adapter rows evenly spaced): a batch ordered by adapter then costs one batched
    shrink matmul and one batched expand matmul per slice, with no copy of activations, adapter
    weights or deltas; anything else falls back to gathers and an accumulating scatter.

    Args:
        x: [T, d_in]; a_pool: [n_slices, R, d_in]; b_pool: [R, D_total];
        slice_offsets: n_slices + 1 column offsets; out: [T, D_total], updated in place.
    """
    n_slices, _, d_in = a_pool.shape
    d_total = b_pool.shape[1]
    cdt = _compute_dtype(x.dtype)
    if not x.is_contiguous():  # the full-chunk views below need it (layer activations are)
        x = x.contiguous()
    direct = (
        x.dtype == cdt
        and a_pool.dtype == cdt
        and b_pool.dtype == cdt
        and out.dtype == cdt
        and a_pool.is_contiguous()
        and b_pool.is_contiguous()
        and out.is_contiguous()
    )
    x_pad: torch.Tensor | None = None
    for g in groups:
        if direct and g.row_first >= 0 and g.full:
            _apply_views(x, a_pool, b_pool, g, slice_offsets, out)
            continue
        n_chunks, chunk = g.chunk_tokens.shape
        span = slice(g.token_lo, g.token_lo + g.num_tokens)
        if g.full:
            xg = x[span].view(n_chunks, chunk, d_in)
        else:
            if x_pad is None:
                x_pad = torch.cat([x, x.new_zeros((1, d_in))])
            xg = x_pad.index_select(0, g.chunk_tokens.reshape(-1)).view(n_chunks, chunk, d_in)
        ag, bg = _weight_views(a_pool, b_pool, g, n_chunks)
        xg, ag, bg = xg.to(cdt), ag.to(cdt), bg.to(cdt)
        # one bmm per slice: measured ~2x faster than one matmul broadcasting x over the slices
        y = [torch.bmm(xg, ag[i].transpose(-1, -2)) for i in range(n_slices)]  # n_slices x [n_chunks, C, rank]
        if g.full and out.dtype == cdt and out.is_contiguous():
            # accumulate straight into the output rows: no delta buffer, no scatter
            ov = out[span].view(n_chunks, chunk, d_total)
            for i in range(n_slices):
                lo, hi = slice_offsets[i], slice_offsets[i + 1]
                if n_slices == 1 or n_chunks == 1:
                    ov[:, :, lo:hi].baddbmm_(y[i], bg[:, :, lo:hi])
                else:
                    # baddbmm_ into a column slice falls back to one addmm per chunk:
                    # measured 2x slower than a batched bmm plus one strided add
                    ov[:, :, lo:hi].add_(torch.bmm(y[i], bg[:, :, lo:hi]))
            continue
        flat = _chunk_deltas(y, bg, slice_offsets).view(-1, d_total)
        if g.token_lo >= 0:
            rows = flat if g.full else flat.index_select(0, g.compact)
            out[span] += rows.to(out.dtype)
        else:
            tokens = g.chunk_tokens.reshape(-1)
            if g.padded:  # drop pad positions
                valid = tokens < x.shape[0]
                tokens, flat = tokens[valid], flat[valid]
            out.index_put_((tokens,), flat.to(out.dtype), accumulate=True)
