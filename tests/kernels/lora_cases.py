"""Adapter-mix fixtures shared by the multi-LoRA op tests (torch path and Triton)."""

from __future__ import annotations

import torch

MIXES = ("distinct", "uniform", "zipf", "identical", "skewed", "some_base", "all_base")


def token_slots_for(mix: str, num_tokens: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """Per-token slots for a named popularity mix (-1 = base only)."""
    if mix == "distinct":
        perm = torch.randperm(num_slots, generator=gen)
        return perm[torch.arange(num_tokens) % num_slots]
    if mix == "uniform":
        return torch.randint(0, num_slots, (num_tokens,), generator=gen)
    if mix == "zipf":
        w = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64)
        return torch.multinomial(w, num_tokens, replacement=True, generator=gen)
    if mix == "identical":
        return torch.full((num_tokens,), int(torch.randint(0, num_slots, (1,), generator=gen)))
    if mix == "skewed":  # one huge segment plus singletons
        slots = torch.zeros(num_tokens, dtype=torch.int64)
        k = min(num_slots - 1, num_tokens // 4)
        slots[torch.randperm(num_tokens, generator=gen)[:k]] = torch.arange(1, k + 1)
        return slots
    if mix == "some_base":
        slots = torch.randint(0, num_slots, (num_tokens,), generator=gen)
        slots[torch.rand(num_tokens, generator=gen) < 0.3] = -1
        return slots
    if mix == "all_base":
        return torch.full((num_tokens,), -1)
    raise ValueError(mix)


def make_pools(
    ranks: torch.Tensor, d_in: int, slice_widths: list[int], dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random pools honouring the pool invariant (rows past a module's rank are zero).

    ranks: [n_slices, num_slots]. Slots get shuffled, gapped row ranges.
    Returns a_pool [n, R, d_in], b_pool [R, D], row_start [num_slots], alloc [num_slots].
    """
    n_slices, num_slots = ranks.shape
    alloc = ranks.max(0).values
    order = torch.randperm(num_slots, generator=gen)
    row_start = torch.zeros(num_slots, dtype=torch.int64)
    cursor = 3  # leading garbage rows
    for s in order.tolist():
        row_start[s] = cursor
        cursor += int(alloc[s]) + 2  # gaps between slots
    total = cursor + 1
    a_pool = torch.randn(n_slices, total, d_in, generator=gen) * 0.1
    b_pool = torch.randn(total, sum(slice_widths), generator=gen) * 0.1
    offs = [0]
    for w in slice_widths:
        offs.append(offs[-1] + w)
    for s in range(num_slots):
        r0, al = int(row_start[s]), int(alloc[s])
        for i in range(n_slices):
            r = int(ranks[i, s])
            a_pool[i, r0 + r : r0 + al] = 0
            b_pool[r0 + r : r0 + al, offs[i] : offs[i + 1]] = 0
    return a_pool.to(dtype), b_pool.to(dtype), row_start.to(torch.int32), alloc.to(torch.int32)


def loop_reference(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    row_start: torch.Tensor,
    ranks: torch.Tensor,
    slice_widths: list[int],
    token_slots: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 token-by-token loop: returns (y [n, T, max_rank_all], delta [T, D])."""
    n_slices = a_pool.shape[0]
    max_r = int(ranks.max())
    y = torch.zeros(n_slices, x.shape[0], max_r, dtype=torch.float64)
    delta = torch.zeros(x.shape[0], sum(slice_widths), dtype=torch.float64)
    offs = [0]
    for w in slice_widths:
        offs.append(offs[-1] + w)
    for t, s in enumerate(token_slots.tolist()):
        if s < 0:
            continue
        for i in range(n_slices):
            r, r0 = int(ranks[i, s]), int(row_start[s])
            if r == 0:
                continue
            a = a_pool[i, r0 : r0 + r].double()
            b = b_pool[r0 : r0 + r, offs[i] : offs[i + 1]].double()
            y[i, t, :r] = a @ x[t].double()
            delta[t, offs[i] : offs[i + 1]] = y[i, t, :r] @ b
    return y, delta
