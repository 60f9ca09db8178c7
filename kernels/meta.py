"""Per-forward batch metadata for the multi-LoRA ops.

Built once per forward pass from the per-token adapter slots and shared, read-only, by every
LoRA layer of the model (210 of them on SmolLM2): anything that depends only on *which token
uses which slot* is computed here, so the per-layer ops do no sorting or host syncs.

Layout (the contract with `reference.py` and `triton_lora.py`):

    sorted_tokens [T_a]  int32   tokens with slot >= 0, stably sorted by their slot's first pool row
    seg_slots     [S]    int32   distinct active slots, in order of their first pool row
    seg_starts    [S+1]  int32   segment k = sorted_tokens[seg_starts[k]:seg_starts[k+1]]
    max_seg_len   host int
    max_rank      host int       largest alloc rank among active slots (ops' y width)

The CPU path additionally uses a *chunk plan*: each segment cut into chunks of at most C
tokens, chunks grouped by the slot's allocated rank, so one batched matmul per rank group
computes every adapter at its own rank without a Python loop over tokens or adapters.
Segments are ordered by pool row (not slot id) so that a batch the caller ordered the same
way (`AdapterSlots.batch_order_key`) has contiguous tokens *and* contiguous weights per rank
group: the CPU path then reads both through strided views instead of copying them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class RankGroup:
    """Chunks whose adapters share one allocated rank `rank` (CPU path).

    chunk_tokens [n_chunks, C] int64: token index per chunk position, T (a zero pad row) when
        the chunk is shorter than C.
    chunk_rows   [n_chunks * rank] int64: pool rows of each chunk's adapter, flattened, for an
        `index_select` that copies each adapter's rows once per chunk.
    """

    rank: int
    chunk_tokens: torch.Tensor
    chunk_rows: torch.Tensor
    # Layout facts for the fused no-grad CPU path (`reference.lora_apply_torch`), host values.
    # When the caller orders its batch by adapter (the engine does), they turn gathers and
    # scatters into views: no per-layer copy of activations or adapter weights.
    token_lo: int = -1  # >= 0: the group's tokens are token_lo .. token_lo+num_tokens-1, in chunk order
    row_first: int = -1  # >= 0: chunk k uses pool rows row_first + k*row_stride + [0, rank)
    row_stride: int = 0
    compact: torch.Tensor | None = None  # token_lo >= 0 with pad positions: flat padded position of each token
    padded: bool = False  # some chunk position is the pad index T (short chunks, empty row tiles)

    @property
    def full(self) -> bool:
        """Tokens contiguous and every chunk holds C real tokens (no pad positions)."""
        return self.token_lo >= 0 and self.compact is None

    @property
    def num_tokens(self) -> int:
        """Real tokens of the group (meaningful when token_lo >= 0)."""
        return int(self.compact.numel()) if self.compact is not None else int(self.chunk_tokens.numel())


@dataclass(frozen=True, slots=True)
class LoRABatchMeta:
    sorted_tokens: torch.Tensor
    seg_slots: torch.Tensor
    seg_starts: torch.Tensor
    max_seg_len: int
    max_rank: int
    num_tokens: int
    groups: tuple[RankGroup, ...] = field(default=())

    @property
    def num_segments(self) -> int:
        return int(self.seg_slots.numel())

    @property
    def has_lora(self) -> bool:
        return self.num_segments > 0


_MAX_FULL_CHUNK = 256  # equal segments longer than this are cut like unequal ones
# Segments of at most this many tokens (decode tokens, a few sequences of one adapter) are
# chunked apart from longer ones (prefill chunks). A mixed step of 40 one-token decodes of
# distinct adapters and prefill chunks of 200 and 56 tokens (64 rank-16 slots, the lean
# decoder's 120 fused LoRA calls): 264.5 ms as one group (every decode padded to 10 rows)
# against 197.8 ms split, timed interleaved in one process.
SHORT_SEGMENT = 8


def _chunk_size(num_tokens: int, num_segments: int, rank: int) -> int:
    """Tokens per chunk for the CPU gather-matmul path.

    A chunk copies its adapter's `rank` rows once and pads its tokens up to C. Copy cost
    ~ (S + T/C)·rank, padding cost ~ S·C, minimised near C = sqrt(rank·T/S). Decode batches
    (one token per adapter) get C = 1: no padding at all.
    """
    if num_segments == 0:
        return 1
    c = int((rank * num_tokens / num_segments) ** 0.5)
    return max(1, min(c, 256))


def build_lora_meta(
    token_slots: torch.Tensor,
    row_start: torch.Tensor,
    slot_alloc: torch.Tensor,
    *,
    with_cpu_plan: bool | None = None,
) -> LoRABatchMeta:
    """Sort tokens by adapter slot and describe the segments.

    Args:
        token_slots: [T] integer slot per token, -1 for base-only tokens.
        row_start: [num_slots] int first pool row of each slot.
        slot_alloc: [num_slots] int rows allocated to each slot (its largest module rank).
        with_cpu_plan: build the chunk plan used by the CPU path (default: on CPU tensors).

    Note: reads segment sizes on the host (one sync per forward, not per layer).
    """
    if token_slots.dim() != 1:
        raise ValueError(f"token_slots must be 1-D [T], got shape {tuple(token_slots.shape)}")
    device = token_slots.device
    slots = token_slots.to(torch.int64)
    num_tokens = int(slots.numel())
    if num_tokens and int(slots.max()) >= row_start.numel():
        raise ValueError(f"slot {int(slots.max())} out of range: only {row_start.numel()} adapter slots exist")
    if num_tokens and int(slots.min()) < -1:
        raise ValueError("token slots must be >= -1 (-1 means no adapter)")
    active = torch.nonzero(slots >= 0).flatten()
    # order by first pool row (distinct per occupied slot), see the module docstring
    order = torch.argsort(row_start.to(device=device, dtype=torch.int64)[slots[active]], stable=True)
    sorted_tokens = active[order]
    seg_slots, counts = torch.unique_consecutive(slots[sorted_tokens], return_counts=True)
    seg_starts = torch.zeros(seg_slots.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=seg_starts[1:])
    # host sync: segment lengths and ranks size the ops' outputs and grids.
    max_seg_len = int(counts.max()) if counts.numel() else 0
    alloc = slot_alloc.to(device=device, dtype=torch.int64)[seg_slots]
    max_rank = int(alloc.max()) if alloc.numel() else 0
    if with_cpu_plan is None:
        with_cpu_plan = device.type == "cpu"
    groups: tuple[RankGroup, ...] = ()
    if with_cpu_plan and seg_slots.numel():
        # The plan is cut on the host (it reads segment sizes anyway) and its index tensors
        # moved to the tokens' device: one plan for the CPU path and for autograd on a GPU.
        host = [t.cpu() for t in (sorted_tokens, seg_slots, counts, alloc, row_start)]
        groups = tuple(_to_device(g, device) for g in _cpu_plan(*host, num_tokens))
    return LoRABatchMeta(
        sorted_tokens=sorted_tokens.to(torch.int32),
        seg_slots=seg_slots.to(torch.int32),
        seg_starts=seg_starts.to(torch.int32),
        max_seg_len=max_seg_len,
        max_rank=max_rank,
        num_tokens=num_tokens,
        groups=groups,
    )


def _to_device(group: RankGroup, device: torch.device) -> RankGroup:
    if device.type == "cpu":
        return group
    return dataclasses.replace(
        group, chunk_tokens=group.chunk_tokens.to(device), chunk_rows=group.chunk_rows.to(device),
        compact=None if group.compact is None else group.compact.to(device),
    )


@dataclass(frozen=True, slots=True)
class _Segments:
    """The sorted batch the chunk plan is cut from (host tensors, int64)."""

    sorted_tokens: torch.Tensor  # [T_a] tokens with an adapter, by segment
    seg_slots: torch.Tensor  # [S] slot of each segment, in pool-row order
    counts: torch.Tensor  # [S] tokens per segment
    row_start: torch.Tensor  # [num_slots] first pool row of each slot
    seg_ids: torch.Tensor  # [T_a] segment of each sorted token
    pos_in_seg: torch.Tensor  # [T_a] its position inside the segment
    num_tokens: int  # T, also the pad index


def _cpu_plan(
    sorted_tokens: torch.Tensor,
    seg_slots: torch.Tensor,
    counts: torch.Tensor,
    alloc: torch.Tensor,
    row_start: torch.Tensor,
    num_tokens: int,
) -> tuple[RankGroup, ...]:
    """Cut segments into chunks and group the chunks by allocated rank (vectorised)."""
    groups = []
    seg_ids = torch.repeat_interleave(torch.arange(seg_slots.numel()), counts)
    seg_first = torch.cumsum(counts, 0) - counts
    pos_in_seg = torch.arange(sorted_tokens.numel()) - seg_first[seg_ids]
    row_start = row_start.to(torch.int64)
    sg = _Segments(sorted_tokens, seg_slots, counts, row_start, seg_ids, pos_in_seg, num_tokens)
    # Groups: distinct allocated ranks (a handful). A rank with a few unequal segments is
    # cut into runs of equal ones (see SEGMENT_RUNS_MAX); otherwise it is split into short
    # and long segments when it has both, so a step mixing decode tokens with prefill chunks
    # does not pad every decode token to the prefill chunks' length (see SHORT_SEGMENT).
    short = counts <= SHORT_SEGMENT
    classes = [short, ~short] if bool(short.any()) and not bool(short.all()) else [torch.ones_like(short)]
    for rank in torch.unique(alloc).tolist():
        if rank == 0:
            continue
        runs = _equal_runs(torch.nonzero(alloc == rank).flatten(), counts)
        if runs is not None:
            groups.extend(_rank_group(sg, run, int(rank), whole=True) for run in runs)
            continue
        for in_class in classes:
            in_group = (alloc == rank) & in_class
            if not bool(in_group.any()):
                continue
            g_segs = torch.nonzero(in_group).flatten()
            for part in _split_runs(g_segs, row_start[seg_slots[g_segs].to(torch.int64)], int(rank)):
                groups.append(_rank_group(sg, part, int(rank)))
    return tuple(groups)


def _rank_group(sg: _Segments, g_segs: torch.Tensor, rank: int, *, whole: bool = False) -> RankGroup:
    """The chunks of segments `g_segs` (all of allocated rank `rank`) as one RankGroup;
    whole: the segments (equal in length, from `_equal_runs`) are one chunk each however
    long, past the `_MAX_FULL_CHUNK` cap that applies otherwise."""
    seg_slots, counts, num_tokens = sg.seg_slots, sg.counts, sg.num_tokens
    in_group = torch.zeros(seg_slots.numel(), dtype=torch.bool)
    in_group[g_segs] = True
    g_counts = counts[g_segs]
    if whole or int(g_counts.min()) == int(g_counts.max()) <= _MAX_FULL_CHUNK:
        chunk = int(g_counts[0])  # equal segments: one chunk each, no padding at all
    else:
        chunk = _chunk_size(int(g_counts.sum()), int(g_segs.numel()), rank)
    chunks_per_seg = (counts[g_segs] + chunk - 1) // chunk
    # chunk id of every token of this group: its segment's first chunk + pos // chunk
    first_chunk = torch.cumsum(chunks_per_seg, 0) - chunks_per_seg
    seg_to_group = torch.full((seg_slots.numel(),), -1, dtype=torch.int64)
    seg_to_group[g_segs] = torch.arange(g_segs.numel())
    tok_mask = in_group[sg.seg_ids]
    local_seg = seg_to_group[sg.seg_ids[tok_mask]]
    pos = sg.pos_in_seg[tok_mask]
    chunk_id = first_chunk[local_seg] + pos // chunk
    n_chunks = int(chunks_per_seg.sum())
    chunk_slot = torch.repeat_interleave(seg_slots[g_segs].to(torch.int64), chunks_per_seg)
    chunk_first_row = sg.row_start[chunk_slot]
    tiles = _tile_gaps(chunk_first_row, rank) if n_chunks == g_segs.numel() else None
    if tiles is not None:
        # one chunk per adapter with gaps between their pool rows: chunk k becomes the
        # k-th rank-row tile of the rows' span (empty tiles: pad tokens only), so the
        # weights stay views instead of per-layer copies (see `_tile_gaps`)
        chunk_id = tiles[chunk_id]
        n_chunks = int((chunk_first_row[-1] - chunk_first_row[0]) // rank + 1)
        chunk_first_row = chunk_first_row[0] + rank * torch.arange(n_chunks)
    chunk_tokens = torch.full((n_chunks, chunk), num_tokens, dtype=torch.int64)
    chunk_tokens[chunk_id, pos % chunk] = sg.sorted_tokens[tok_mask]
    rows = (chunk_first_row[:, None] + torch.arange(rank)).reshape(-1)
    return RankGroup(
        rank=int(rank),
        chunk_tokens=chunk_tokens,
        chunk_rows=rows,
        padded=n_chunks * chunk != int(tok_mask.sum()),
        **_layout(sg.sorted_tokens[tok_mask], chunk_id * chunk + pos % chunk, n_chunks * chunk, chunk_first_row),
    )


# A rank whose segments have unequal lengths (zipf-popular adapters in a decode step: 24,
# 12, 8, ... tokens each) is planned as one group per run of equal-length segments when that
# makes at most this many groups: every such group is one chunk per segment, read through
# views, where one chunked group pads tokens and gathers the weights, activations and deltas
# of every chunk. A group costs ~6 dispatches in each of the forward's ~120 fused LoRA calls.
# Measured on SmolLM2 (engine decode steps, 8 rank-16 adapters with zipf popularity, timed
# interleaved with the chunked plan): 64 sequences 0.383 -> 0.342 s, 35 sequences 0.248 ->
# 0.234 s (all on the base: 0.268 / ~0.16 s). Each matmul call costs ~10 us at these sizes,
# so with many runs the chunked plan's few gathers win again.
SEGMENT_RUNS_MAX = 16


def _equal_runs(g_segs: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor] | None:
    """`g_segs` (one rank's segments, in pool-row order) cut into maximal runs of consecutive
    segments with equal token counts, when they are unequal and make at most
    `SEGMENT_RUNS_MAX` runs; None otherwise (the chunked plan). A run is one chunk per
    segment however long (a prefill chunk plus decodes of one adapter: 300 tokens): the
    fused path reads its tokens, weights and outputs as views, so nothing is padded."""
    c = counts[g_segs].tolist()
    if len(set(c)) < 2:
        return None
    cuts = [0] + [i for i in range(1, len(c)) if c[i] != c[i - 1]] + [len(c)]
    if len(cuts) - 1 > SEGMENT_RUNS_MAX:
        return None
    return [g_segs[a:b] for a, b in zip(cuts, cuts[1:])]


# A gapped span is read whole when it is at most this many times the adapters' own rows: a
# view reads every row of the span once, a gather reads the adapters' rows, writes a copy and
# reads it again. Measured on SmolLM2 decode (64 rank-16 slots, 120 fused LoRA calls): per
# adapter a gather cost 1.6-1.9x a tile of the view (35 active: gather 55 ms, span view
# 63 ms; 50 active: gather 94 ms, span view 65 ms).
_MAX_TILE_SPAN = 1.5


def _tile_gaps(chunk_first_row: torch.Tensor, rank: int) -> torch.Tensor | None:
    """Tile index of each chunk when its adapters' rows, in increasing order, all lie on a
    grid of `rank`-row tiles from the first one and the span is short enough to read whole
    (`_MAX_TILE_SPAN`); None otherwise (evenly spaced rows need no tiling either)."""
    if chunk_first_row.numel() < 2:
        return None
    steps = chunk_first_row[1:] - chunk_first_row[:-1]
    if bool((steps == steps[0]).all()):
        return None  # already a view (or a repeated row: not tileable)
    offset = chunk_first_row - chunk_first_row[0]
    if bool((steps <= 0).any()) or bool((offset % rank != 0).any()):
        return None
    tiles = offset // rank
    if int(tiles[-1]) + 1 > _MAX_TILE_SPAN * chunk_first_row.numel():
        return None
    return tiles


# A run of same-rank adapters becomes a group of its own (read as views) when it holds at
# least this many pool rows; smaller runs join one gather group. The trade-off, estimated
# for a SmolLM2 decode step, not tuned: a group adds ~6 dispatches to each of the forward's
# ~120 fused LoRA calls (a few ms), while gathering an adapter writes a copy of its rows
# and reads them twice (~1.2 MB per row over the model: ~1 ms at rank 16, a few ms at 64).
MIN_VIEW_RUN_ROWS = 64


def _split_runs(g_segs: torch.Tensor, first_rows: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """Split a rank group's segments (in pool-row order, `first_rows` ascending) into runs
    that each read their weights as one view: rows on a grid of `rank`-row tiles from the
    run's first row, the span within `_MAX_TILE_SPAN` of the run's rows. Runs of fewer than
    `MIN_VIEW_RUN_ROWS` rows are put together in one last part (gathered).

    A group that is one view already (evenly spaced or tileable rows) is not split."""
    rows = first_rows.tolist()
    if len(rows) < 2 or len(set(rows)) != len(rows):  # (distinct slots never share rows)
        return [g_segs]
    steps = {b - a for a, b in zip(rows, rows[1:])}
    if len(steps) == 1 or _tile_gaps(first_rows, rank) is not None:
        return [g_segs]
    runs: list[list[int]] = [[0]]
    for i in range(1, len(rows)):
        first = rows[runs[-1][0]]
        span = (rows[i] - first) // rank + 1
        if (rows[i] - first) % rank == 0 and span <= _MAX_TILE_SPAN * (len(runs[-1]) + 1):
            runs[-1].append(i)
        else:
            runs.append([i])
    parts, rest = [], []
    for run in runs:
        if len(run) * rank >= MIN_VIEW_RUN_ROWS:
            parts.append(g_segs[torch.tensor(run)])
        else:
            rest += run  # runs are in row order, so `rest` stays sorted
    if rest:
        parts.append(g_segs[torch.tensor(rest)])
    return parts


def _layout(tokens: torch.Tensor, flat_pos: torch.Tensor, padded: int, chunk_first_row: torch.Tensor) -> dict:
    """Which gathers of the group are views (see RankGroup). `tokens` in chunk order."""
    facts: dict = {}
    if tokens.numel() == 1 or bool((tokens[1:] - tokens[:-1] == 1).all()):
        facts["token_lo"] = int(tokens[0])
        if padded != tokens.numel():
            facts["compact"] = flat_pos
    steps = chunk_first_row[1:] - chunk_first_row[:-1]
    if steps.numel() == 0 or (bool((steps == steps[0]).all()) and int(steps[0]) >= 0):
        facts["row_first"] = int(chunk_first_row[0])
        facts["row_stride"] = int(steps[0]) if steps.numel() else 0
    return facts
