"""Triton shrink/expand kernels for many LoRA adapters at their true ranks.

One design serves prefill (long segments) and decode (one token per adapter): tokens that
carry an adapter are stably sorted by slot into segments (`sorted_tokens`, `seg_slots`,
`seg_starts`), a program gathers its M-tile of tokens by index (never moved), and each
adapter runs at its own rank, rounded up only to BLOCK_R. Fused slices (q/k/v, gate/up)
are a grid axis of one launch.

Grid: (rank tiles x split-K for the shrink, N-tiles for the expand; slices; programs over
work items). A work item is one segment's M-tile (`work_items`, computed on the device once
per forward); each program of the third axis loops over every P-th item, P sized so that
the launch has about TARGET_PROGRAMS programs. A grid over (M-tiles x segments) instead must
cover the worst case of both at once, as a CUDA graph's fixed launch does: a decode graph of
512 sequences would launch cdiv(512, 64) x 512 programs per N-tile and slice (1.8 M for a
Llama-3-8B gate/up expand) for a step that has a few dozen items of work.

Block sizes (why):
- BLOCK_M 16/32/64 from `max_seg_len`: decode segments hold one token, and 16 is the
  smallest tile `tl.dot` accepts; prefill segments fill 64-row tiles.
- BLOCK_R 16 when every active rank is <= 16, else 32: small enough that a rank-8 adapter
  wastes little of a tile, large enough that rank 128-256 needs few tiles. The shrink puts
  rank tiles on the grid (more programs for decode, where M has one tile); the expand loops
  over them so that each (token, column) belongs to one program and needs no atomics.
- BLOCK_K 64 (shrink) and BLOCK_N 64 (expand): masked tails handle odd d_in / widths.
Split-K for the shrink at decode sizes: a decode step of a few adapters launches
(1 rank tile, 3 slices, 8 items) = 24 programs, each looping over all of d_in,
on a GPU of 132 SMs. SPLIT_K programs then share one (tile, slice, segment), each over a
contiguous run of d_in, writing fp32 partials that one sum reduces (deterministic, unlike
atomics; the partials are [SPLIT_K, slices, T, rank], small at decode). How far to split is
measured at start on the device, with the warps per program, per layer width and segment
count (`tune_shrink`), not guessed; prefill tiles (BLOCK_M > 16) never split.

Precision: fp16/bf16 shrink dots are native with fp32 accumulation (exact products).
fp32 data uses "ieee" dots (tf32 would miss the 1e-4 contract). The expand upcasts B to
fp32 and uses tf32 for 16-bit models (B is exact in tf32; y rounds to 10 bits, finer than
the bf16/fp16 output) and ieee for fp32 models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

# Read the same knob that `triton.jit` reads at decoration time, so the flag always matches
# the kind of kernel object created below (interpreted vs compiled).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
MAX_SLICES = 4  # slice offsets travel as scalar kernel args (no per-call host->device copy)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
logger = logging.getLogger(__name__)


@triton.jit
def _segment_info(seg_starts_ptr, seg_slots_ptr, ranks_ptr, stride_rank, slice_id, seg, max_rank):
    start = tl.load(seg_starts_ptr + seg)
    seg_len = tl.load(seg_starts_ptr + seg + 1) - start
    slot = tl.load(seg_slots_ptr + seg)
    # Clamp so that a rank above max_rank can never write past y's rank columns.
    rank = tl.minimum(tl.load(ranks_ptr + slice_id * stride_rank + slot), max_rank)
    return start, seg_len, slot, rank


# Ints that change from step to step or with the pools' size (pool rows, the batch's largest
# rank, y's strides, tile counts) are not specialised on: Triton would otherwise compile a
# new variant whenever one of them turns divisible by 16 or equal to 1, on the serving
# thread. What stays specialised (the layer's widths, the block sizes) is fixed per model
# and covered by `warm_up` at start.
_STEP_INTS_SHRINK = ["item_cap", "n_rows", "max_rank", "stride_as", "stride_ys", "stride_yt", "stride_yk"]
_STEP_INTS_EXPAND = ["item_cap", "n_rows", "max_rank", "stride_ys", "stride_yt"]


@triton.jit(do_not_specialize=_STEP_INTS_SHRINK)
def _shrink_kernel(
    x_ptr, a_ptr, y_ptr, row_start_ptr, ranks_ptr, tok_ptr, seg_slots_ptr, seg_starts_ptr, items_ptr, count_ptr,
    item_cap, d_in, n_rows, max_rank, stride_rank, stride_xt, stride_as, stride_ar, stride_ys, stride_yt,
    stride_yk, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, UPCAST: tl.constexpr,
):
    k_split = tl.program_id(0) % SPLIT_K
    r_tile = tl.program_id(0) // SPLIT_K
    slice_id = tl.program_id(1)
    # this program's run of d_in: whole BLOCK_K tiles, the last run possibly shorter
    k_per_split = tl.cdiv(tl.cdiv(d_in, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = k_split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, d_in)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    # the step's work items (segment, M-tile), shared out over the grid's third axis
    for item in range(tl.program_id(2), tl.load(count_ptr), tl.num_programs(2)):
        seg = tl.load(items_ptr + item)
        m_tile = tl.load(items_ptr + item_cap + item)
        start, seg_len, slot, rank = _segment_info(
            seg_starts_ptr, seg_slots_ptr, ranks_ptr, stride_rank, slice_id, seg, max_rank)
        if r_tile * BLOCK_R < rank:  # else beyond this adapter's true rank (rank 0: nothing)
            offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
            m_mask = offs_m < seg_len
            tok = tl.load(tok_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
            rows = tl.load(row_start_ptr + slot).to(tl.int64) + offs_r
            r_mask = (offs_r < rank) & (rows < n_rows)
            x_ptrs = x_ptr + tok[:, None] * stride_xt + (k_lo + offs_k)[None, :]
            a_ptrs = (a_ptr + slice_id.to(tl.int64) * stride_as + rows[None, :] * stride_ar
                      + (k_lo + offs_k)[:, None])
            # tl.full, not tl.zeros: tl.zeros is a @jit helper of triton.language.standard, frozen
            # in the mode triton was first imported in; builtins let a re-imported module switch.
            acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k_mask = offs_k < k_hi - k0
                xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # [K, R]
                if UPCAST:  # interpreter only: its bf16 dot multiplies raw bits (triton#11584)
                    xt = xt.to(tl.float32)
                    at = at.to(tl.float32)
                # "ieee" only affects fp32 data (tf32 would miss the 1e-4 contract); 16-bit is native.
                acc = tl.dot(xt, at, acc, input_precision="ieee")
                x_ptrs += BLOCK_K
                a_ptrs += BLOCK_K
            y_ptrs = (y_ptr + k_split * stride_yk + slice_id * stride_ys + tok[:, None] * stride_yt
                      + offs_r[None, :])
            tl.store(y_ptrs, acc, mask=m_mask[:, None] & (offs_r < rank)[None, :])


@triton.jit
def _slice_columns(slice_id, off1, off2, off3, off4):
    """Columns [lo, lo + width) of a slice from the scalar offsets (off0 = 0)."""
    lo = tl.where(slice_id == 0, 0,
                  tl.where(slice_id == 1, off1, tl.where(slice_id == 2, off2, off3)))
    hi = tl.where(slice_id == 0, off1,
                  tl.where(slice_id == 1, off2, tl.where(slice_id == 2, off3, off4)))
    return lo, hi - lo


@triton.jit(do_not_specialize=_STEP_INTS_EXPAND)
def _expand_kernel(
    y_ptr, b_ptr, out_ptr, row_start_ptr, ranks_ptr, tok_ptr, seg_slots_ptr, seg_starts_ptr, items_ptr, count_ptr,
    item_cap, off1, off2, off3, off4, n_rows, max_rank, stride_rank, stride_ys, stride_yt, stride_br, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    n_tile = tl.program_id(0)
    slice_id = tl.program_id(1)
    col_lo, width = _slice_columns(slice_id, off1, off2, off3, off4)
    if n_tile * BLOCK_N >= width:
        return  # past this slice's columns (slices differ in width)
    offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    cols = col_lo + offs_n
    offs_r = tl.arange(0, BLOCK_R)
    for item in range(tl.program_id(2), tl.load(count_ptr), tl.num_programs(2)):
        seg = tl.load(items_ptr + item)
        m_tile = tl.load(items_ptr + item_cap + item)
        start, seg_len, slot, rank = _segment_info(
            seg_starts_ptr, seg_slots_ptr, ranks_ptr, stride_rank, slice_id, seg, max_rank)
        if rank > 0:  # out is left untouched: a rank-0 slice adds nothing
            offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
            m_mask = offs_m < seg_len
            tok = tl.load(tok_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
            row0 = tl.load(row_start_ptr + slot).to(tl.int64)
            y_rows = y_ptr + slice_id * stride_ys + tok[:, None] * stride_yt
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for r0 in range(0, rank, BLOCK_R):  # true rank, rounded up to BLOCK_R only
                r_idx = r0 + offs_r
                r_mask = (r_idx < rank) & (row0 + r_idx < n_rows)
                yt = tl.load(y_rows + r_idx[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
                b_ptrs = b_ptr + (row0 + r_idx)[:, None] * stride_br + cols[None, :]
                bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
                acc = tl.dot(yt, bt, acc, input_precision=PRECISION)
            o_ptrs = out_ptr + tok[:, None] * stride_ot + cols[None, :]
            o_mask = m_mask[:, None] & n_mask[None, :]
            old = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
            tl.store(o_ptrs, (old + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


# ----------------------------------------------------------------------------- validation


def _check_tensor(name: str, t: object, dtypes: tuple, device: torch.device | None,
                  ndim: int) -> None:
    """device=None: `t` is the anchor (x or out) and must suit the compiled mode."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {dtypes}, got {t.dtype}")
    if device is None:
        _check_device(t.device)
    elif t.device != device:
        raise ValueError(f"{name} is on {t.device} but x/out is on {device}; move it there")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dim() > 0 and t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1)")


def _check_device(device: torch.device) -> None:
    if not INTERPRET and device.type != "cuda":
        raise ValueError(
            f"Triton LoRA kernels need CUDA tensors, got {device}; use the torch reference "
            "on CPU, or set TRITON_INTERPRET=1 before importing triton (tests)")


def _check_int(name: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{name} must be a non-negative Python int, got {v!r}")


def _check_meta(device, n_slices, row_start, ranks, sorted_tokens, seg_slots, seg_starts,
                max_seg_len, max_rank) -> None:
    for name, t, ndim in (("row_start", row_start, 1), ("ranks", ranks, 2),
                          ("sorted_tokens", sorted_tokens, 1), ("seg_slots", seg_slots, 1),
                          ("seg_starts", seg_starts, 1)):
        _check_tensor(name, t, (torch.int32,), device, ndim)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if tuple(ranks.shape) != (n_slices, row_start.numel()):
        raise ValueError(f"ranks must be [n_slices={n_slices}, num_slots={row_start.numel()}], "
                         f"got {tuple(ranks.shape)}")
    if seg_starts.numel() != seg_slots.numel() + 1:
        raise ValueError(f"seg_starts must have len(seg_slots) + 1 = {seg_slots.numel() + 1} "
                         f"entries, got {seg_starts.numel()}")
    _check_int("max_seg_len", max_seg_len)
    _check_int("max_rank", max_rank)


def _check_values(T, n_rows, row_start, ranks, sorted_tokens, seg_slots, seg_starts,
                  max_seg_len, max_rank) -> None:
    """Metadata value checks. Costs one device->host sync (illegal under CUDA-graph capture:
    pass check_values=False there)."""
    if seg_slots.numel() == 0:
        return
    if row_start.numel() == 0:
        raise ValueError("seg_slots names adapter slots but row_start/ranks have none")
    slots = seg_slots.long().clamp(0, row_start.numel() - 1)
    active = ranks[:, slots].long()  # [n_slices, S]
    lens = seg_starts[1:].long() - seg_starts[:-1].long()
    toks = sorted_tokens.long()
    conds = [
        ("seg_slots must lie in [0, num_slots)",
         ((seg_slots >= 0) & (seg_slots < row_start.numel())).all()),
        ("seg_starts must be non-decreasing, start >= 0 and end <= len(sorted_tokens)",
         (lens >= 0).all() & (seg_starts[0] >= 0) & (seg_starts[-1] <= toks.numel())),
        (f"a segment is longer than max_seg_len={max_seg_len}", lens.max() <= max_seg_len),
        ("sorted_tokens must lie in [0, T)", ((toks >= 0) & (toks < T)).all()),
        ("ranks must be >= 0", (ranks >= 0).all()),
        (f"an active rank exceeds max_rank={max_rank}", active.max() <= max_rank),
        ("row_start[s] + ranks[:, s] must fit in the pool rows for every active slot",
         (row_start[slots] >= 0).all() & ((row_start[slots].long() + active.max(0).values)
                                           <= n_rows).all()),
    ]
    ok = torch.stack([c for _, c in conds]).tolist()  # the one host sync
    for (msg, _), good in zip(conds, ok):
        if not good:
            raise ValueError(msg)


# (max_seg_len, max_rank) that reach every (BLOCK_M, BLOCK_R) the launchers pick.
WARM_UP_SHAPES: tuple[tuple[int, int], ...] = tuple((m, r) for m in (1, 17, 33) for r in (16, 17))


def warm_up(a_pool: torch.Tensor, b_pool: torch.Tensor, row_start: torch.Tensor, ranks: torch.Tensor,
            slice_offsets: list[int]) -> int:
    """Compile shrink and expand for every block-size variant on one layer's own pools (so
    every specialised argument matches serving), before the server takes requests: a compile
    on the serving thread stalls every request in flight. Reads the pools, writes only
    temporaries. Returns the launches made (two per variant)."""
    device, dtype = a_pool.device, a_pool.dtype
    width = b_pool.shape[1]
    launches = 0
    for max_seg_len, max_rank in WARM_UP_SHAPES:
        x = torch.zeros((max_seg_len, a_pool.shape[2]), dtype=dtype, device=device)
        tokens = torch.arange(max_seg_len, dtype=torch.int32, device=device)
        seg_slots = torch.zeros(1, dtype=torch.int32, device=device)
        seg_starts = torch.tensor([0, max_seg_len], dtype=torch.int32, device=device)
        meta = (row_start, ranks, tokens, seg_slots, seg_starts, max_seg_len, max_rank)
        y = shrink(x, a_pool, *meta, check_values=False)
        out = torch.zeros((max_seg_len, width), dtype=dtype, device=device)
        expand(y, b_pool, row_start, ranks, list(slice_offsets), tokens, seg_slots, seg_starts, max_seg_len, max_rank,
               out, check_values=False)
        launches += 2
    return launches


def variant(max_seg_len: int, max_rank: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_R) of a launch: with `_STEP_INTS_*` unspecialised, the only thing
    besides the layer's shapes that selects a compiled kernel."""
    return _block_m(max_seg_len), _block_r(max_rank)


# ----------------------------------------------------------------------------- launch config, measured

BLOCK_K_SHRINK = 64
SPLIT_K_CHOICES: tuple[int, ...] = (1, 2, 4, 8)
# Warps per program: Triton's default is 4; a decode tile (16 tokens x 16-32 rank rows) may
# run better on 2. Each choice is a compiled variant of its own.
NUM_WARPS_CHOICES: tuple[int, ...] = (2, 4)
DEFAULT_CONFIG: tuple[int, int] = (1, 4)  # (SPLIT_K, num_warps) wherever nothing was measured
# Decode segment counts the tuning measures; a launch uses the largest bucket <= its count.
SEGMENT_BUCKETS: tuple[int, ...] = (1, 4, 16, 64)
# (d_in, n_slices, BLOCK_R, segment bucket) -> (SPLIT_K, num_warps), filled by `tune_shrink`
_SHRINK_TABLE: dict[tuple[int, int, int, int], tuple[int, int]] = {}


def chosen_shrink_config(d_in: int, n_slices: int, block_m: int, block_r: int, n_segments: int) -> tuple[int, int]:
    """The measured (SPLIT_K, num_warps) of a decode launch (BLOCK_M 16); DEFAULT_CONFIG for
    prefill tiles and for shapes never measured (the CPU, the interpreter, or a GPU before
    `tune_shrink`)."""
    if block_m != 16:
        return DEFAULT_CONFIG
    # the largest measured bucket at or below the count (buckets above num_slots are not
    # measured; SEGMENT_BUCKETS ascend)
    for bucket in reversed(SEGMENT_BUCKETS):
        key = (d_in, n_slices, block_r, bucket)
        if bucket <= n_segments and key in _SHRINK_TABLE:
            return _SHRINK_TABLE[key]
    return DEFAULT_CONFIG


def shrink_table() -> dict[tuple[int, int, int, int], tuple[int, int]]:
    """A copy of the measured choices, (d_in, n_slices, BLOCK_R, segment bucket) ->
    (SPLIT_K, num_warps)."""
    return dict(_SHRINK_TABLE)


def tune_shrink(a_pool: torch.Tensor, ranks: torch.Tensor,
                timer: Callable[[Callable[[], object]], float] | None = None,
                ) -> dict[tuple[int, int, int, int], dict[tuple[int, int], float]]:
    """Measure the decode shrink of a layer shaped like `a_pool` ([n_slices, R, d_in]) with
    slots like `ranks` ([n_slices, num_slots]) for every (SPLIT_K, num_warps) of
    SPLIT_K_CHOICES x NUM_WARPS_CHOICES, segment bucket (up to num_slots: a step has no more
    distinct adapters) and BLOCK_R variant, on synthetic adapters at full rank (the pools hold
    none yet at start), and record the fastest in the table `shrink` reads. Every choice is
    compiled here, so serving never compiles one: the synthetic tensors share the layer's
    shapes because Triton specialises integer arguments (ranks' row stride is num_slots) and
    would otherwise compile again. A choice Triton cannot compile or launch on this device
    (out of registers or shared memory) is logged and left out. `timer(fn)` returns a time
    for one call of fn (default `triton.testing.do_bench`, CUDA events, shortened: 5 ms
    warm-up, 20 ms of repeats). Returns the measurements made (shapes measured before in
    this process are skipped), keyed as the table, then by choice."""
    if timer is None:
        from triton.testing import do_bench

        def timer(fn: Callable[[], object]) -> float:
            return do_bench(fn, warmup=5, rep=20)
    n_slices, _, d_in = a_pool.shape
    num_slots = ranks.shape[1]
    device, dtype = a_pool.device, a_pool.dtype
    gen = torch.Generator(device=device).manual_seed(0)
    times: dict[tuple[int, int, int, int], dict[tuple[int, int], float]] = {}
    for max_rank in (16, 32):  # BLOCK_R 16 and 32
        for segments in (b for b in SEGMENT_BUCKETS if b <= num_slots):
            key = (d_in, n_slices, _block_r(max_rank), segments)
            if key in _SHRINK_TABLE:  # measured by an earlier engine in this process
                continue
            # rows for the `segments` adapters only (the row count is not specialised on)
            pool = torch.randn((n_slices, segments * max_rank, d_in), generator=gen, device=device).to(dtype)
            row_start = torch.zeros(num_slots, dtype=torch.int32, device=device)
            row_start[:segments] = torch.arange(0, segments * max_rank, max_rank, dtype=torch.int32, device=device)
            slot_ranks = torch.zeros((n_slices, num_slots), dtype=torch.int32, device=device)
            slot_ranks[:, :segments] = max_rank
            x = torch.randn((segments, d_in), generator=gen, device=device).to(dtype)
            tokens = torch.arange(segments, dtype=torch.int32, device=device)
            meta = (row_start, slot_ranks, tokens, tokens,
                    torch.arange(segments + 1, dtype=torch.int32, device=device), 1, max_rank)
            times[key] = {}
            for split_k in SPLIT_K_CHOICES:
                for num_warps in NUM_WARPS_CHOICES:
                    try:
                        times[key][split_k, num_warps] = float(timer(lambda k=split_k, w=num_warps: shrink(
                            x, pool, *meta, check_values=False, split_k=k, num_warps=w)))
                    except (OutOfResources, CompilationError) as exc:  # this device cannot run the variant
                        logger.warning("shrink split_k=%d num_warps=%d skipped for %s: %s", split_k, num_warps, key,
                                       exc)
            if times[key]:
                _SHRINK_TABLE[key] = min(times[key], key=times[key].get)
    return times


def _block_m(max_seg_len: int) -> int:
    return 16 if max_seg_len <= 16 else (32 if max_seg_len <= 32 else 64)


def _block_r(max_rank: int) -> int:
    return 16 if max_rank <= 16 else 32


# ----------------------------------------------------------------------------- work items

# Programs a launch aims at along the work-item axis, times the other two axes: enough to
# fill a large GPU several times over; each program loops over the items left to it.
TARGET_PROGRAMS = 8192


def item_capacity(n_segments: int, n_sorted: int, block_m: int) -> int:
    """An upper bound, from host-known sizes, on the work items of a launch: the sum over
    segments of ceil(len / BLOCK_M) is at most S + T_a / BLOCK_M."""
    return n_segments + triton.cdiv(n_sorted, block_m)


def work_items(seg_starts: torch.Tensor, block_m: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch's work items, one per (segment, BLOCK_M rows of it): ([2, capacity] int32,
    segment then M-tile of item i, valid for i < count; [1] int32 count). Device ops only, no
    host read: a CUDA graph replays it with each step's segments.

    Why items: a grid over (M-tiles x segments) must be sized for the worst case of both, one
    segment holding every token and every token its own segment; a decode graph of 512
    sequences then launched 8 x 512 programs per N-tile where a step had a few dozen of work.
    Items are the work itself; the grid's third axis shares them out."""
    device = seg_starts.device
    if seg_starts.numel() < 2:  # no segment: no item
        return torch.zeros((2, capacity), dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32,
                                                                                        device=device)
    lens = (seg_starts[1:] - seg_starts[:-1]).to(torch.int64)
    tiles = (lens + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)  # items up to each segment's end
    index = torch.arange(capacity, device=device)
    seg = torch.searchsorted(ends, index, right=True).clamp_(max=lens.numel() - 1)
    first = (ends - tiles).index_select(0, seg)  # each item's segment's first item
    return torch.stack([seg, index - first]).to(torch.int32), ends[-1:].to(torch.int32)


def forward_items(seg_starts: torch.Tensor, n_sorted: int, max_seg_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`work_items` of a forward's metadata, as every launch of that forward sizes them (the
    BLOCK_M of `max_seg_len`; capacity from the segment and sorted-token counts)."""
    block_m = _block_m(max_seg_len)
    return work_items(seg_starts, block_m, item_capacity(seg_starts.numel() - 1, n_sorted, block_m))


def _programs(capacity: int, other: int) -> int:
    """Grid size along the item axis: all items at once when that stays near TARGET_PROGRAMS
    with the other axes (`other` programs per item), else fewer, each looping (65,535: CUDA's
    limit on a grid's third axis)."""
    return max(1, min(capacity, triton.cdiv(TARGET_PROGRAMS, other), 65535))


# ----------------------------------------------------------------------------- launchers


def shrink(x: torch.Tensor, a_pool: torch.Tensor, row_start: torch.Tensor, ranks: torch.Tensor,
           sorted_tokens: torch.Tensor, seg_slots: torch.Tensor, seg_starts: torch.Tensor,
           max_seg_len: int, max_rank: int, *, check_values: bool = True,
           split_k: int | None = None, num_warps: int | None = None,
           items: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """LoRA shrink (d_in -> rank) for every token's own adapter, all slices in one launch.

    Semantics:
        y = zeros(n_slices, T, max_rank, float32)
        for k, s in enumerate(seg_slots):
            for t in sorted_tokens[seg_starts[k]:seg_starts[k + 1]]:
                for i in range(n_slices):
                    r = ranks[i, s]
                    y[i, t, :r] = x[t] @ a_pool[i, row_start[s]:row_start[s] + r].T  # fp32 acc
    Args:
        x: [T, d_in] fp32/fp16/bf16, last dim contiguous.
        a_pool: [n_slices, R, d_in], dtype of x, contiguous (rank rows of every slot).
        row_start: [num_slots] int32. ranks: [n_slices, num_slots] int32 (0 = not adapted).
        sorted_tokens: [T_a] int32; seg_slots: [S] int32; seg_starts: [S + 1] int32.
        max_seg_len, max_rank: host ints bounding segment lengths and active ranks.
        check_values: validate metadata values (one device->host sync).
        split_k, num_warps: d_in runs per (tile, slice, segment) and warps per program;
            None: the measured choice for this layer and segment count (`tune_shrink`),
            DEFAULT_CONFIG where none was measured or BLOCK_M > 16.
        items: `work_items` for this launch's BLOCK_M and `item_capacity` (every layer of a
            forward shares them); None: computed here.
    Returns: y [n_slices, T, max_rank] float32; zero outside adapted (token, j < rank).
    """
    _check_tensor("x", x, _FLOAT_DTYPES, None, 2)
    _check_tensor("a_pool", a_pool, (x.dtype,), x.device, 3)
    if not a_pool.is_contiguous() or a_pool.shape[2] != x.shape[1] or a_pool.shape[0] < 1:
        raise ValueError(f"a_pool must be contiguous [n_slices, R, d_in={x.shape[1]}], "
                         f"got shape {tuple(a_pool.shape)}")
    n_slices, n_rows, d_in = a_pool.shape
    meta = (row_start, ranks, sorted_tokens, seg_slots, seg_starts, max_seg_len, max_rank)
    _check_meta(x.device, n_slices, *meta)
    if check_values:
        _check_values(x.shape[0], n_rows, *meta)
    block_m, block_r = _block_m(max_seg_len), _block_r(max_rank)
    chosen = chosen_shrink_config(d_in, n_slices, block_m, block_r, seg_slots.numel())
    split_k = chosen[0] if split_k is None else split_k
    num_warps = chosen[1] if num_warps is None else num_warps
    for name, v in (("split_k", split_k), ("num_warps", num_warps)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive Python int, got {v!r}")
    # split_k partials [split_k, n_slices, T, max_rank], summed below (split_k 1: y itself)
    y = torch.zeros((split_k, n_slices, x.shape[0], max_rank), dtype=torch.float32, device=x.device)
    if seg_slots.numel() == 0 or max_rank == 0 or max_seg_len == 0 or d_in == 0:
        return y[0]
    item_list, count = items if items is not None else forward_items(seg_starts, sorted_tokens.numel(), max_seg_len)
    other = triton.cdiv(max_rank, block_r) * split_k
    grid = (other, n_slices, _programs(item_list.shape[1], other * n_slices))
    _shrink_kernel[grid](
        x, a_pool, y, row_start, ranks, sorted_tokens, seg_slots, seg_starts, item_list, count, item_list.shape[1],
        d_in, n_rows, max_rank, ranks.stride(0), x.stride(0), a_pool.stride(0),
        a_pool.stride(1), y.stride(1), y.stride(2), y.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=BLOCK_K_SHRINK,
        SPLIT_K=split_k, UPCAST=INTERPRET and x.dtype == torch.bfloat16, num_warps=num_warps)
    return y[0] if split_k == 1 else y.sum(0)


def expand(y: torch.Tensor, b_pool: torch.Tensor, row_start: torch.Tensor, ranks: torch.Tensor,
           slice_offsets: list[int], sorted_tokens: torch.Tensor, seg_slots: torch.Tensor,
           seg_starts: torch.Tensor, max_seg_len: int, max_rank: int, out: torch.Tensor,
           *, check_values: bool = True, items: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """LoRA expand (rank -> d_out) for every token's own adapter, added into `out` in place.

    Semantics:
        for k, s in enumerate(seg_slots):
            for t in sorted_tokens[seg_starts[k]:seg_starts[k + 1]]:
                for i in range(n_slices):
                    r, lo, hi = ranks[i, s], slice_offsets[i], slice_offsets[i + 1]
                    rows = b_pool[row_start[s]:row_start[s] + r, lo:hi]  # scale folded in
                    out[t, lo:hi] = cast(float(out[t, lo:hi]) + y[i, t, :r] @ float(rows))
    Args:
        y: [n_slices, T, max_rank] float32, contiguous (the shrink output).
        b_pool: [R, D_total] model dtype, contiguous; b_pool[row_start[s] + j, c] is
            scale * lora_B[c - lo_i, j] (lora_B transposed).
        slice_offsets: n_slices + 1 Python ints, 0 = off_0 < off_1 < ... = D_total.
        out: [T, D_total] model dtype (dtype of b_pool), last dim contiguous; rows of tokens
            without adapter and columns of rank-0 slices stay bit-identical.
        Other args (and `items`) as in `shrink`.
    """
    _check_tensor("out", out, _FLOAT_DTYPES, None, 2)
    _check_tensor("b_pool", b_pool, (out.dtype,), out.device, 2)
    _check_tensor("y", y, (torch.float32,), out.device, 3)
    n_slices, T = y.shape[0], out.shape[0]
    _check_slices(slice_offsets, n_slices, out.shape[1])
    if not b_pool.is_contiguous() or b_pool.shape[1] != out.shape[1]:
        raise ValueError(f"b_pool must be contiguous [R, D_total={out.shape[1]}], "
                         f"got shape {tuple(b_pool.shape)}")
    if not y.is_contiguous() or tuple(y.shape) != (n_slices, T, max_rank):
        raise ValueError(f"y must be contiguous [n_slices, T={T}, max_rank={max_rank}], "
                         f"got shape {tuple(y.shape)}")
    meta = (row_start, ranks, sorted_tokens, seg_slots, seg_starts, max_seg_len, max_rank)
    _check_meta(out.device, n_slices, *meta)
    if check_values:
        _check_values(T, b_pool.shape[0], *meta)
    if seg_slots.numel() == 0 or max_rank == 0 or max_seg_len == 0:
        return
    block_m, block_n = _block_m(max_seg_len), 64
    widths = [hi - lo for lo, hi in zip(slice_offsets, slice_offsets[1:])]
    n_tiles = triton.cdiv(max(widths), block_n)
    offs = list(slice_offsets[1:]) + [slice_offsets[-1]] * (MAX_SLICES - n_slices)
    item_list, count = items if items is not None else forward_items(seg_starts, sorted_tokens.numel(), max_seg_len)
    grid = (n_tiles, n_slices, _programs(item_list.shape[1], n_tiles * n_slices))
    _expand_kernel[grid](
        y, b_pool, out, row_start, ranks, sorted_tokens, seg_slots, seg_starts, item_list, count, item_list.shape[1],
        *offs, b_pool.shape[0], max_rank, ranks.stride(0), y.stride(0), y.stride(1),
        b_pool.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(max_rank),
        PRECISION="ieee" if out.dtype == torch.float32 else "tf32")


def _check_slices(slice_offsets: list[int], n_slices: int, d_total: int) -> None:
    offs = list(slice_offsets) if isinstance(slice_offsets, (list, tuple)) else None
    if offs is None or any(not isinstance(o, int) or isinstance(o, bool) for o in offs):
        raise ValueError(f"slice_offsets must be a list of Python ints, got {slice_offsets!r}")
    if not 1 <= n_slices <= MAX_SLICES or len(offs) != n_slices + 1:
        raise ValueError(f"need 1 <= n_slices <= {MAX_SLICES} and len(slice_offsets) == "
                         f"n_slices + 1; got n_slices={n_slices} (y.shape[0]), {offs}")
    if offs[0] != 0 or offs[-1] != d_total or any(a >= b for a, b in zip(offs, offs[1:])):
        raise ValueError(f"slice_offsets must rise strictly from 0 to D_total={d_total}, "
                         f"got {offs}")
