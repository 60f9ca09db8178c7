"""The fused torch CPU path (`kernels.ops.apply` -> `lora_apply_torch`) against a float64 token loop.

Every adapter mix runs in two batch orders (as given, and ordered by adapter as the engine
orders it) over two pool layouts (shuffled rows with gaps, and packed rows), so both the
view fast paths and the gather/scatter fallbacks are checked. The compiled CPU kernel is
hidden (`apply` would otherwise take it for fp32; it has its own tests in
test_cpu_kernels.py), except in `test_apply_matches_loop`'s "compiled" cases."""

from __future__ import annotations

import pytest
import torch

from lorafold.kernels.meta import SHORT_SEGMENT, build_lora_meta
from lorafold.kernels import cpu_ops
from lorafold.kernels.ops import apply

from .lora_cases import MIXES, loop_reference, make_pools, token_slots_for

RANK_CHOICES = torch.tensor([1, 4, 8, 16, 64, 128])


@pytest.fixture(autouse=True)
def _torch_path(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "compiled":
        monkeypatch.setattr(cpu_ops, "usable", lambda *tensors: False)


def pack_rows(a_pool: torch.Tensor, b_pool: torch.Tensor, row_start: torch.Tensor, alloc: torch.Tensor):
    """Move every slot's rows next to each other, ordered by (alloc, slot): the layout in which
    a rank group's chunks are evenly spaced (its weights become strided views)."""
    order = sorted(range(alloc.numel()), key=lambda s: (int(alloc[s]), s))
    new_start = torch.zeros_like(row_start)
    a_new = torch.zeros(a_pool.shape[0], int(alloc.sum()) + 1, a_pool.shape[2], dtype=a_pool.dtype)
    b_new = torch.zeros(int(alloc.sum()) + 1, b_pool.shape[1], dtype=b_pool.dtype)
    cursor = 0
    for s in order:
        r0, al = int(row_start[s]), int(alloc[s])
        a_new[:, cursor : cursor + al] = a_pool[:, r0 : r0 + al]
        b_new[cursor : cursor + al] = b_pool[r0 : r0 + al]
        new_start[s] = cursor
        cursor += al
    return a_new, b_new, new_start


def order_by_adapter(slots: torch.Tensor, row_start: torch.Tensor, alloc: torch.Tensor) -> torch.Tensor:
    """The engine's batch order (`AdapterSlots.batch_order`): base tokens first, then by
    (alloc rank, adapter's tokens > SHORT_SEGMENT, first pool row)."""
    values, totals = torch.unique(slots, return_counts=True)
    counts = dict(zip(values.tolist(), totals.tolist()))
    keys = [(-1, False, -1) if s < 0 else (int(alloc[s]), int(counts[s]) > SHORT_SEGMENT, int(row_start[s]))
            for s in slots.tolist()]
    perm = sorted(range(len(keys)), key=lambda t: keys[t])
    return slots[torch.tensor(perm, dtype=torch.int64)]


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("slice_widths", [[37], [96, 32, 32]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_apply_matches_loop(
    mix: str, slice_widths: list[int], dtype: torch.dtype, ordered: bool, packed: bool, backend: str
) -> None:
    gen = torch.Generator().manual_seed(hash((mix, len(slice_widths), str(dtype), ordered, packed)) % 2**31)
    num_tokens, num_slots, d_in = 40, 12, 101
    n = len(slice_widths)
    ranks = RANK_CHOICES[torch.randint(0, 3, (n, num_slots), generator=gen)]  # ranks 1/4/8: repeats per group
    if n > 1:
        ranks[1, 0] = 0  # a slice this adapter does not target
    a_pool, b_pool, row_start, alloc = make_pools(ranks, d_in, slice_widths, dtype, gen)
    if packed:
        a_pool, b_pool, row_start = pack_rows(a_pool, b_pool, row_start, alloc)
    slots = token_slots_for(mix, num_tokens, num_slots, gen)
    if ordered:
        slots = order_by_adapter(slots, row_start, alloc)
    x = torch.randn(num_tokens, d_in, generator=gen).to(dtype)
    meta = build_lora_meta(slots, row_start, alloc)
    _, delta_ref = loop_reference(x, a_pool, b_pool, row_start, ranks, slice_widths, slots)
    base = torch.randn(num_tokens, sum(slice_widths), generator=gen).to(dtype)
    out = base.clone()
    offsets = [0, *torch.tensor(slice_widths).cumsum(0).tolist()]
    with torch.no_grad():  # "compiled": the compiled kernel for fp32, the torch path for bf16
        apply(x, a_pool, b_pool, row_start, ranks.to(torch.int32), offsets, meta, out)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), base.double() + delta_ref, rtol=tol, atol=tol)
    assert torch.equal(out[slots < 0], base[slots < 0]), "rows without adapter must be untouched"
    if ordered and meta.groups:
        assert all(g.token_lo >= 0 for g in meta.groups), "an adapter-ordered batch has contiguous rank groups"


def test_decode_batch_ordered_and_packed_takes_only_views() -> None:
    """64 decode tokens over 8 adapters of one rank, ordered: one full group, weights as a view."""
    slots = torch.arange(64) // 8
    row_start = torch.arange(8, dtype=torch.int32) * 16
    meta = build_lora_meta(slots, row_start, torch.full((8,), 16, dtype=torch.int32))
    (g,) = meta.groups
    assert (g.token_lo, g.num_tokens, g.full, g.row_first, g.row_stride) == (0, 64, True, 0, 16)
    assert tuple(g.chunk_tokens.shape) == (8, 8)


def test_unordered_batch_falls_back_to_scatter() -> None:
    slots = torch.tensor([1, 0, 1, 0])
    row_start = torch.tensor([0, 16], dtype=torch.int32)
    meta = build_lora_meta(slots, row_start, torch.full((2,), 16, dtype=torch.int32))
    (g,) = meta.groups
    assert g.token_lo == -1 and not g.full


def test_apply_with_gradients_uses_the_differentiable_path() -> None:
    gen = torch.Generator().manual_seed(0)
    ranks = torch.full((1, 3), 4)
    a_pool, b_pool, row_start, alloc = make_pools(ranks, 16, [8], torch.float64, gen)
    a_pool.requires_grad_(True)
    slots = torch.tensor([0, 0, 1, 2])
    x = torch.randn(4, 16, dtype=torch.float64, generator=gen)
    out = torch.zeros(4, 8, dtype=torch.float64)
    apply(x, a_pool, b_pool, row_start, ranks.to(torch.int32), [0, 8], build_lora_meta(slots, row_start, alloc), out)
    out.sum().backward()
    assert a_pool.grad is not None and a_pool.grad.abs().sum() > 0


@pytest.mark.parametrize("tokens_per_adapter", [1, 3])
@pytest.mark.parametrize("with_grad", [False, True])
def test_gapped_adapters_read_their_row_span_as_tiles(tokens_per_adapter: int, with_grad: bool) -> None:
    """A decode step where only some resident adapters are active: 7 of 10 packed rank-8 slots.
    The group reads the 10-tile row span as a view (inactive tiles get pad tokens only) and the
    result still equals the token loop, with the inactive adapters' weights left out."""
    gen = torch.Generator().manual_seed(7)
    num_slots, d_in, widths = 10, 33, [24, 8]
    ranks = torch.full((2, num_slots), 8)
    ranks[1, 2] = 4  # a slot whose second slice has a smaller rank (zero rows up to the alloc)
    a_pool, b_pool, row_start, alloc = make_pools(ranks, d_in, widths, torch.float64, gen)
    a_pool, b_pool, row_start = pack_rows(a_pool, b_pool, row_start, alloc)
    active = torch.tensor([0, 1, 3, 4, 6, 7, 9])  # inactive 2, 5, 8 hold real (finite) weights
    slots = order_by_adapter(active.repeat_interleave(tokens_per_adapter), row_start, alloc)
    meta = build_lora_meta(slots, row_start, alloc)
    (g,) = meta.groups
    assert (g.row_first, g.row_stride, g.token_lo) == (0, 8, 0)
    assert g.chunk_tokens.shape == (10, tokens_per_adapter) and g.compact is not None
    assert bool((g.chunk_tokens[[2, 5, 8]] == slots.numel()).all()), "inactive tiles hold pad tokens only"
    x = torch.randn(slots.numel(), d_in, dtype=torch.float64, generator=gen)
    _, delta_ref = loop_reference(x, a_pool, b_pool, row_start, ranks, widths, slots)
    out = torch.zeros(slots.numel(), sum(widths), dtype=torch.float64)
    a_pool.requires_grad_(with_grad)
    with torch.set_grad_enabled(with_grad):
        apply(x, a_pool, b_pool, row_start, ranks.to(torch.int32), [0, 24, 32], meta, out)
    tol = 1e-6 if with_grad else 1e-12  # the differentiable path's shrink output is float32
    torch.testing.assert_close(out.detach(), delta_ref, rtol=tol, atol=tol)
    if with_grad:
        out.sum().backward()
        for s in (2, 5, 8):  # no gradient reaches the adapters that had no tokens
            assert float(a_pool.grad[:, int(row_start[s]) : int(row_start[s]) + 8].abs().sum()) == 0.0


def test_gapped_span_too_wide_is_gathered() -> None:
    row_start = torch.arange(10, dtype=torch.int32) * 8
    meta = build_lora_meta(torch.tensor([0, 1, 9]), row_start, torch.full((10,), 8, dtype=torch.int32))
    (g,) = meta.groups
    assert g.row_first == -1 and g.chunk_tokens.shape[0] == 3


def test_mixed_decode_and_prefill_step_chunks_short_and_long_segments_apart() -> None:
    """Six one-token decodes and a 30-token prefill chunk, all rank 8, in the engine's order:
    two groups (the decodes are not padded to the prefill's chunk length), each contiguous,
    and the result equals the token loop."""
    gen = torch.Generator().manual_seed(3)
    ranks = torch.full((1, 7), 8)
    a_pool, b_pool, row_start, alloc = make_pools(ranks, 20, [12], torch.float64, gen)
    a_pool, b_pool, row_start = pack_rows(a_pool, b_pool, row_start, alloc)
    slots = order_by_adapter(torch.cat([torch.full((30,), 6), torch.arange(6)]), row_start, alloc)
    meta = build_lora_meta(slots, row_start, alloc)
    short, long = meta.groups
    assert tuple(short.chunk_tokens.shape) == (6, 1) and not short.padded and short.token_lo == 0
    assert short.row_first >= 0, "the decodes' adapters are evenly spaced in the packed pool: a view"
    assert long.token_lo == 6 and long.chunk_tokens.numel() >= 30
    x = torch.randn(36, 20, dtype=torch.float64, generator=gen)
    _, delta_ref = loop_reference(x, a_pool, b_pool, row_start, ranks, [12], slots)
    out = torch.zeros(36, 12, dtype=torch.float64)
    with torch.no_grad():
        apply(x, a_pool, b_pool, row_start, ranks.to(torch.int32), [0, 12], meta, out)
    torch.testing.assert_close(out, delta_ref, rtol=1e-12, atol=1e-12)


def test_zoned_mixed_rank_pool_reads_each_run_as_a_view() -> None:
    """Adapters of ranks 16 and 8 loaded in turns, placed by the serving allocator: each
    rank's adapters sit in zones (runs of evenly spaced rows) with the other rank's zones in
    between. A decode step over all of them splits each rank group into one view group per
    run of >= MIN_VIEW_RUN_ROWS rows and gathers the small runs; the result equals the loop."""
    from lorafold.kernels.meta import MIN_VIEW_RUN_ROWS
    from lorafold.server.lora.rows import RowAllocator

    gen = torch.Generator().manual_seed(11)
    # zones: rank 16 [0, 64), rank 8 [64, 96), rank 64 [96, 352), rank 16 [352, 416), rank 8 [416, 448)
    sizes = [16] * 4 + [8] * 4 + [64] * 4 + [16] * 4 + [8]
    rows = RowAllocator(1024)
    row_start = torch.tensor([rows.allocate(s, r) for s, r in enumerate(sizes)], dtype=torch.int32)
    alloc = torch.tensor(sizes, dtype=torch.int32)
    d_in, widths = 24, [20, 12]
    ranks = alloc.repeat(2, 1)
    ranks[1, 3], ranks[0, 9] = 5, 0  # rows past a module's rank stay zero; a slice left out
    a_pool = torch.zeros(2, rows.capacity, d_in, dtype=torch.float64)
    b_pool = torch.zeros(rows.capacity, sum(widths), dtype=torch.float64)
    offs = [0, 20, 32]
    for s, r0 in enumerate(row_start.tolist()):
        for i in range(2):
            r = int(ranks[i, s])
            a_pool[i, r0 : r0 + r] = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
            b_pool[r0 : r0 + r, offs[i] : offs[i + 1]] = torch.randn(r, widths[i], generator=gen, dtype=torch.float64)
    slots = order_by_adapter(torch.arange(len(sizes)), row_start, alloc)
    meta = build_lora_meta(slots, row_start, alloc)
    views = [g for g in meta.groups if g.row_first >= 0]
    gathers = [g for g in meta.groups if g.row_first < 0]
    assert row_start.tolist()[11:] == [288, 352, 368, 384, 400, 416]
    assert sorted((g.rank, g.row_first, g.chunk_tokens.shape[0]) for g in views) == [(16, 0, 4), (16, 352, 4), (64, 96, 4)]
    assert all(g.rank * g.num_tokens >= MIN_VIEW_RUN_ROWS and g.full for g in views)
    assert [(g.rank, g.chunk_tokens.shape[0]) for g in gathers] == [(8, 5)], "runs under MIN_VIEW_RUN_ROWS: one gather"
    x = torch.randn(len(sizes), d_in, dtype=torch.float64, generator=gen)
    _, delta_ref = loop_reference(x, a_pool, b_pool, row_start, ranks, widths, slots)
    out = torch.zeros(len(sizes), sum(widths), dtype=torch.float64)
    with torch.no_grad():
        apply(x, a_pool, b_pool, row_start, ranks.to(torch.int32), offs, meta, out)
    torch.testing.assert_close(out, delta_ref, rtol=1e-12, atol=1e-12)


def test_unequal_segments_become_equal_length_runs_of_views() -> None:
    """A decode step over 6 zipf-popular rank-16 adapters (tokens per adapter 9, 4, 4, 2, 1, 1)
    plus one adapter with a 300-token prefill chunk: each run of equal-length segments is one
    group, one chunk per segment however long, every group read through views, nothing padded;
    the result equals the token loop."""
    from lorafold.kernels.meta import SEGMENT_RUNS_MAX

    gen = torch.Generator().manual_seed(11)
    counts = [9, 4, 4, 2, 1, 1, 300]
    num_slots, d_in, widths = len(counts), 40, [24, 8, 8]
    ranks = torch.full((3, num_slots), 16)
    a_pool, b_pool, row_start, alloc = make_pools(ranks, d_in, widths, torch.float32, gen)
    a_pool, b_pool, row_start = pack_rows(a_pool, b_pool, row_start, alloc)
    slots = torch.repeat_interleave(torch.arange(num_slots), torch.tensor(counts))
    slots = order_by_adapter(slots, row_start, alloc)
    meta = build_lora_meta(slots, row_start, alloc)
    assert len(meta.groups) == 5 <= SEGMENT_RUNS_MAX
    assert sorted(tuple(g.chunk_tokens.shape) for g in meta.groups) == [(1, 2), (1, 9), (1, 300), (2, 1), (2, 4)]
    assert all(g.full and g.row_first >= 0 and not g.padded for g in meta.groups)
    x = torch.randn(slots.numel(), d_in, generator=gen)
    _, delta_ref = loop_reference(x, a_pool, b_pool, row_start, ranks, widths, slots)
    out = torch.zeros(slots.numel(), sum(widths))
    with torch.no_grad():
        apply(x, a_pool, b_pool, row_start, ranks.to(torch.int32), [0, 24, 32, 40], meta, out)
    torch.testing.assert_close(out.double(), delta_ref, rtol=1e-5, atol=1e-5)
