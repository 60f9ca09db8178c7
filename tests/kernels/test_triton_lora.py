"""Triton shrink/expand kernels against an independent float64 Python-loop reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (set by this folder's
conftest.py before the kernels are imported); with a GPU they run compiled on CUDA.
The reference takes the per-token slot list, not the sorted metadata, so metadata
construction is checked too. Pool rows an adapter does not own, rank rows past a slice's
true rank, and x rows of tokens without adapter are NaN: reading any of them fails a test.
"""

import random

import pytest
import torch

from lorafold.kernels import triton_lora as tlora

DEVICE = "cpu" if tlora.INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(
    not tlora.INTERPRET and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/kernels/conftest.py)")

RANKS = (1, 4, 8, 16, 64, 128)
MIXES = ("distinct", "uniform", "zipf", "identical", "skewed", "some_none", "all_none")
# (slice widths, d_in): odd widths/D_total, q/k/v 96/32/32, gate/up, widths over 2 N-tiles.
SHAPES = (([67], 100), ([96, 32, 32], 257), ([75, 75], 64), ([33, 129, 31], 131))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Expand tolerances: about one ulp of the output dtype (the shrink output is fp32 always).
EXPAND_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ----------------------------------------------------------------------------- case builders


def make_slots(mix: str, T: int, num_slots: int, rng: random.Random) -> list[int]:
    if mix == "distinct":
        return rng.sample(range(num_slots), T)
    if mix == "uniform":
        return [rng.randrange(num_slots) for _ in range(T)]
    if mix == "zipf":
        weights = [1.0 / (k + 1) ** 1.2 for k in range(num_slots)]
        return rng.choices(range(num_slots), weights=weights, k=T)
    if mix == "identical":
        return [3] * T
    if mix == "skewed":  # one huge segment plus singletons, interleaved
        slots = [5] * (T - 6) + [0, 1, 2, 3, 4, 6]
        rng.shuffle(slots)
        return slots
    if mix == "some_none":
        return [rng.randrange(num_slots) if rng.random() < 0.6 else -1 for _ in range(T)]
    assert mix == "all_none"
    return [-1] * T


def build_meta(slots: list[int], ranks: torch.Tensor) -> dict:
    """Stable sort of the slotted tokens -> sorted_tokens / seg_slots / seg_starts."""
    order = sorted((s, t) for t, s in enumerate(slots) if s >= 0)
    seg_slots, seg_starts = [], [0]
    for pos, (s, _) in enumerate(order):
        if not seg_slots or seg_slots[-1] != s:
            if seg_slots:
                seg_starts.append(pos)
            seg_slots.append(s)
    seg_starts.append(len(order))
    if not seg_slots:
        seg_starts = [0]
    lens = [b - a for a, b in zip(seg_starts, seg_starts[1:])]
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return dict(
        sorted_tokens=torch.tensor([t for _, t in order], **i32),
        seg_slots=torch.tensor(seg_slots, **i32), seg_starts=torch.tensor(seg_starts, **i32),
        max_seg_len=max(lens, default=0),
        max_rank=max((int(ranks[:, s].max()) for s in seg_slots), default=0))


def build_pools(widths: list[int], d_in: int, num_slots: int, dtype, rng: random.Random):
    """Rank pools with shuffled, gapped slot rows; every row not owned by (slot, slice) is NaN."""
    n = len(widths)
    ranks = torch.tensor([[rng.choice(RANKS) if rng.random() > 0.2 else 0
                           for _ in range(num_slots)] for _ in range(n)], dtype=torch.int32)
    ranks[0, rng.randrange(num_slots)] = 128  # always one multi-tile rank
    alloc = [max(1, int(ranks[:, s].max())) for s in range(num_slots)]
    row_start, nxt = [0] * num_slots, 3
    for s in rng.sample(range(num_slots), num_slots):
        row_start[s], nxt = nxt, nxt + alloc[s] + rng.randrange(4)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    a_pool = torch.full((n, nxt, d_in), float("nan"))
    b_pool = torch.full((nxt, sum(widths)), float("nan"))
    offs = [sum(widths[:i]) for i in range(n + 1)]
    for s in range(num_slots):
        for i in range(n):
            r, r0 = int(ranks[i, s]), row_start[s]
            a_pool[i, r0:r0 + r] = torch.randn(r, d_in, generator=g) / d_in ** 0.5
            b = torch.randn(r, widths[i], generator=g) / r ** 0.5
            b_pool[r0:r0 + r, offs[i]:offs[i + 1]] = b
    return dict(a_pool=a_pool.to(dtype).to(DEVICE), b_pool=b_pool.to(dtype).to(DEVICE),
                row_start=torch.tensor(row_start, dtype=torch.int32, device=DEVICE),
                ranks=ranks.to(DEVICE), slice_offsets=offs)


def make_case(mix: str, widths: list[int], d_in: int, dtype, seed: int, T: int = 24,
              num_slots: int = 24) -> dict:
    rng = random.Random(seed)
    slots = make_slots(mix, T, num_slots, rng)
    case = build_pools(widths, d_in, num_slots, dtype, rng)
    x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(seed))
    x[torch.tensor(slots) < 0] = float("nan")  # tokens without adapter are never read
    case.update(build_meta(slots, case["ranks"].cpu()), slots=slots, x=x.to(dtype).to(DEVICE))
    return case


# ----------------------------------------------------------------------------- float64 reference


def ref_shrink(c: dict) -> torch.Tensor:
    x, a = c["x"].double().cpu(), c["a_pool"].double().cpu()
    y = torch.zeros(a.shape[0], x.shape[0], c["max_rank"], dtype=torch.float64)
    for t, s in enumerate(c["slots"]):
        for i in range(a.shape[0] if s >= 0 else 0):
            r, r0 = int(c["ranks"][i, s]), int(c["row_start"][s])
            for j in range(r):
                y[i, t, j] = (x[t] * a[i, r0 + j]).sum()
    return y


def ref_expand(c: dict, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    res, b, offs = out.double().cpu(), c["b_pool"].double().cpu(), c["slice_offsets"]
    for t, s in enumerate(c["slots"]):
        for i in range(len(offs) - 1 if s >= 0 else 0):
            r, r0 = int(c["ranks"][i, s]), int(c["row_start"][s])
            for j in range(r):
                res[t, offs[i]:offs[i + 1]] += y[i, t, j].double() * b[r0 + j, offs[i]:offs[i + 1]]
    return res.to(out.dtype)


def meta_args(c: dict) -> tuple:
    return (c["sorted_tokens"], c["seg_slots"], c["seg_starts"], c["max_seg_len"], c["max_rank"])


def run_shrink(c: dict, **kw) -> torch.Tensor:
    return tlora.shrink(c["x"], c["a_pool"], c["row_start"], c["ranks"], *meta_args(c), **kw)


def run_expand(c: dict, y: torch.Tensor, out: torch.Tensor, **kw) -> None:
    tlora.expand(y, c["b_pool"], c["row_start"], c["ranks"], c["slice_offsets"],
                 *meta_args(c), out, **kw)


def input_y(c: dict) -> torch.Tensor:
    """Expand input: reference y with NaN wherever expand must not read."""
    y = ref_shrink(c).float()
    for t, s in enumerate(c["slots"]):
        for i in range(y.shape[0]):
            y[i, t, int(c["ranks"][i, s]) if s >= 0 else 0:] = float("nan")
    return y.to(DEVICE)


def check_expand(c: dict, y: torch.Tensor, out0: torch.Tensor, out: torch.Tensor, dtype) -> None:
    tol = EXPAND_TOL[dtype]
    expected = ref_expand(c, torch.nan_to_num(y.cpu()), out0)
    torch.testing.assert_close(out.cpu(), expected, rtol=tol, atol=tol)
    offs = c["slice_offsets"]
    for t, s in enumerate(c["slots"]):  # untouched entries must be bit-identical
        for i in range(len(offs) - 1):
            if s < 0 or int(c["ranks"][i, s]) == 0:
                assert torch.equal(out[t, offs[i]:offs[i + 1]], out0[t, offs[i]:offs[i + 1]])


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_shrink_expand_match_reference(mix: str, dtype) -> None:
    k = MIXES.index(mix) + DTYPES.index(dtype)  # rotate shapes so each mix meets several
    widths, d_in = SHAPES[k % len(SHAPES)]
    c = make_case(mix, widths, d_in, dtype, seed=17 * k + DTYPES.index(dtype))
    y = run_shrink(c)
    assert y.dtype == torch.float32 and y.shape == (len(widths), 24, c["max_rank"])
    torch.testing.assert_close(y.cpu().double(), ref_shrink(c), rtol=1e-4, atol=1e-4)

    out0 = torch.randn(24, sum(widths), generator=torch.Generator().manual_seed(k)).to(dtype)
    out = out0.clone().to(DEVICE)
    y_in = input_y(c)
    run_expand(c, y_in, out)
    check_expand(c, y_in, out0, out, dtype)


def test_decode_one_token_per_adapter_high_ranks() -> None:
    """Decode shape: every segment holds one token, ranks up to 128 in one batch."""
    c = make_case("distinct", [96, 32, 32], 100, torch.float16, seed=5, T=16, num_slots=16)
    assert c["max_seg_len"] == 1
    torch.testing.assert_close(run_shrink(c).cpu().double(), ref_shrink(c), rtol=1e-4, atol=1e-4)


def test_long_prefill_segment_spans_many_m_tiles() -> None:
    c = make_case("skewed", [67], 100, torch.float32, seed=9, T=150, num_slots=8)
    assert c["max_seg_len"] > 128  # three 64-row M-tiles
    torch.testing.assert_close(run_shrink(c).cpu().double(), ref_shrink(c), rtol=1e-4, atol=1e-4)
    out0 = torch.randn(150, 67)
    out = out0.clone()
    y = input_y(c)
    run_expand(c, y, out)
    check_expand(c, y, out0, out, torch.float32)


def test_work_items_are_every_tile_of_every_segment_once() -> None:
    """A launch's work items: one per (segment, BLOCK_M rows of it), empty segments none, all
    within the capacity the launchers compute from host sizes."""
    lens = [0, 1, 16, 17, 0, 64, 65, 3, 0]
    starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    for block_m in (16, 32, 64):
        cap = tlora.item_capacity(len(lens), sum(lens), block_m)
        items, count = tlora.work_items(starts, block_m, cap)
        want = [(s, t) for s, n in enumerate(lens) for t in range(-(-n // block_m))]
        assert int(count) == len(want) <= cap and items.shape == (2, cap)
        assert list(zip(*items[:, : len(want)].tolist())) == want
    empty = tlora.work_items(torch.zeros(1, dtype=torch.int32, device=DEVICE), 16, 0)
    assert empty[0].shape == (2, 0) and int(empty[1]) == 0


@pytest.mark.parametrize("case", ["long prefill", "zipf decode"])
def test_few_programs_loop_over_the_items(case: str, monkeypatch) -> None:
    """Where a launch has more work items than programs along that axis (a large GPU's
    budget, or a CUDA graph's worst case), each program loops over its share: here one
    program per (tile, slice) does every item, with the same result."""
    monkeypatch.setattr(tlora, "TARGET_PROGRAMS", 1)
    assert tlora._programs(50, 3) == 1
    c = (make_case("skewed", [67, 33], 100, torch.float32, seed=9, T=150, num_slots=8) if case == "long prefill"
         else make_case("zipf", [75, 75], 64, torch.float32, seed=11))
    torch.testing.assert_close(run_shrink(c).cpu().double(), ref_shrink(c), rtol=1e-4, atol=1e-4)
    out0 = torch.randn(len(c["slots"]), 100 if case == "long prefill" else 150)
    out = out0.clone().to(DEVICE)
    y = input_y(c)
    run_expand(c, y, out)
    check_expand(c, y, out0, out, torch.float32)


def test_padded_metadata_like_cuda_graphs() -> None:
    """Extra empty segments and generous max_seg_len / max_rank change nothing."""
    c = make_case("zipf", [75, 75], 64, torch.float32, seed=11)
    y_in = input_y(c)
    c.update(max_seg_len=c["max_seg_len"] + 20, max_rank=256,
             seg_slots=torch.cat([c["seg_slots"], c["seg_slots"].new_zeros(3)]),
             seg_starts=torch.cat([c["seg_starts"], c["seg_starts"][-1:].repeat(3)]))
    y = run_shrink(c, check_values=False)
    torch.testing.assert_close(y.cpu().double(), ref_shrink(c), rtol=1e-4, atol=1e-4)
    y_pad = torch.full((2, 24, 256), float("nan"), device=DEVICE)
    y_pad[:, :, :y_in.shape[2]] = y_in
    out0 = torch.randn(24, 150)
    out = out0.clone().to(DEVICE)
    run_expand(c, y_pad, out)
    check_expand(c, y_pad, out0, out, torch.float32)


def test_chain_matches_peft_style_lora() -> None:
    """shrink -> expand equals base + scale * (x A^T) B^T with PEFT-shaped A [r, d_in],
    B [d_out, r], pooled as a_pool rows = A and b_pool rows = scale * B^T."""
    g, widths, d_in = torch.Generator().manual_seed(0), [40, 24], 70
    ranks = torch.tensor([[8, 16], [0, 4]], dtype=torch.int32)  # [slice, slot]
    row_start, scale = torch.tensor([20, 0], dtype=torch.int32), [0.5, 2.0]
    a_pool, b_pool = torch.zeros(2, 40, d_in), torch.zeros(40, 64)
    x, slots = torch.randn(10, d_in, generator=g), [1, 0, -1, 1, 1, 0, -1, 0, 1, 1]
    expected = torch.randn(10, 64, generator=g)
    out = expected.clone()
    for i, lo in enumerate((0, 40)):
        for s in range(2):
            r, r0 = int(ranks[i, s]), int(row_start[s])
            A, B = torch.randn(r, d_in, generator=g), torch.randn(widths[i], r, generator=g)
            a_pool[i, r0:r0 + r], b_pool[r0:r0 + r, lo:lo + widths[i]] = A, scale[s] * B.T
            rows = [t for t in range(10) if slots[t] == s]
            expected[rows, lo:lo + widths[i]] += scale[s] * (x[rows] @ A.T) @ B.T
    c = dict(x=x, a_pool=a_pool, b_pool=b_pool, row_start=row_start, ranks=ranks,
             slice_offsets=[0, 40, 64], slots=slots, **build_meta(slots, ranks))
    c = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in c.items()}
    out = out.to(DEVICE)
    run_expand(c, run_shrink(c), out)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_custom_ops_on_the_triton_backend_match_the_reference() -> None:
    """The ops layer (`lorafold::lora_shrink` / `lora_expand` custom ops) drives these
    launchers when the metadata names the Triton backend; the plain reference is the oracle."""
    import dataclasses

    from lorafold.kernels.meta import build_lora_meta
    from lorafold.kernels.ops import expand, shrink

    c = make_case("some_none", [96, 32, 32], 100, torch.float16, seed=21)
    a_pool, b_pool = (torch.nan_to_num(c[k]) for k in ("a_pool", "b_pool"))  # zero past rank
    alloc = c["ranks"].max(0).values
    meta = build_lora_meta(torch.tensor(c["slots"], device=DEVICE), c["row_start"], alloc, backend="triton")
    x, out0 = torch.nan_to_num(c["x"]), torch.randn(24, 160).to(torch.float16).to(DEVICE)
    results = []
    for m in (dataclasses.replace(meta, backend="torch"), meta):
        y = shrink(x, a_pool, c["row_start"], c["ranks"], m)
        out = out0.clone()
        expand(y, b_pool, c["row_start"], c["ranks"], c["slice_offsets"], m, out)
        results.append((y, out))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=2e-3, atol=2e-3)
    assert results[0][0].abs().sum() > 0, "the reference must compute the adapters, not return zeros"


# ----------------------------------------------------------------------------- validation


def _valid() -> dict:
    c = make_case("uniform", [20, 12], 40, torch.float32, seed=3, T=8, num_slots=4)
    c["y"] = run_shrink(c)
    c["out"] = torch.zeros(8, 32, device=DEVICE)
    return c


SHRINK_BAD = {
    "x dtype": (lambda c: c.update(x=c["x"].to(torch.int32)), "x must have dtype"),
    "a_pool dtype": (lambda c: c.update(a_pool=c["a_pool"].half()), "a_pool must have dtype"),
    "a_pool d_in": (lambda c: c.update(a_pool=c["a_pool"][:, :, :30].contiguous()), "a_pool"),
    "a_pool strides": (lambda c: c.update(a_pool=c["a_pool"].transpose(1, 2)), "a_pool"),
    "x strides": (lambda c: c.update(x=c["x"].t().contiguous().t()), "x must have a contig"),
    "row_start int64": (lambda c: c.update(row_start=c["row_start"].long()), "row_start"),
    "meta device": (lambda c: c.update(seg_slots=c["seg_slots"].to("meta")), "seg_slots is on"),
    "ranks n_slices": (lambda c: c.update(ranks=c["ranks"][:1].contiguous()), "ranks must be"),
    "seg_starts len": (lambda c: c.update(seg_starts=c["seg_starts"][:-1]), "seg_starts must"),
    "max_rank small": (lambda c: c.update(max_rank=c["max_rank"] - 1), "exceeds max_rank"),
    "max_rank type": (lambda c: c.update(max_rank=float(c["max_rank"])), "max_rank must"),
    "max_seg_len": (lambda c: c.update(max_seg_len=c["max_seg_len"] - 1), "max_seg_len"),
    "token range": (lambda c: c["sorted_tokens"].fill_(8), "sorted_tokens must lie"),
    "slot range": (lambda c: c["seg_slots"].fill_(4), "seg_slots must lie"),
    "seg_starts order": (lambda c: c.update(seg_starts=c["seg_starts"].flip(0).contiguous()),
                         "seg_starts must be non-decreasing"),
    "pool rows": (lambda c: c["row_start"].add_(10_000), "fit in the pool rows"),
}
EXPAND_BAD = {
    "y dtype": (lambda c: c.update(y=c["y"].half()), "y must have dtype"),
    "y shape": (lambda c: c.update(y=c["y"][:, :4].contiguous()), "y must be contiguous"),
    "b_pool dtype": (lambda c: c.update(b_pool=c["b_pool"].double()), "b_pool must have dtype"),
    "b_pool width": (lambda c: c.update(b_pool=c["b_pool"][:, :31].contiguous()), "b_pool"),
    "offsets len": (lambda c: c.update(slice_offsets=[0, 32]),
                    r"len\(slice_offsets\) == n_slices \+ 1"),
    "offsets end": (lambda c: c.update(slice_offsets=[0, 20, 31]), "rise strictly"),
    "offsets order": (lambda c: c.update(slice_offsets=[0, 0, 32]), "rise strictly"),
    "offsets type": (lambda c: c.update(slice_offsets=torch.tensor([0, 20, 32])), "Python ints"),
    "out strides": (lambda c: c.update(out=torch.zeros(32, 8, device=DEVICE).t()), "out must"),
    "ranks slices": (lambda c: c.update(ranks=c["ranks"].repeat(2, 1)), "ranks must be"),
    "y vs max_rank": (lambda c: c.update(max_rank=c["max_rank"] - 1), "y must be contiguous"),
    "max_rank small": (lambda c: c.update(max_rank=c["max_rank"] - 1,
                                          y=c["y"][:, :, :-1].contiguous()), "exceeds max_rank"),
}


@pytest.mark.parametrize("name", list(SHRINK_BAD))
def test_shrink_rejects_bad_inputs(name: str) -> None:
    c = _valid()
    mutate, msg = SHRINK_BAD[name]
    mutate(c)
    with pytest.raises(ValueError, match=msg):
        run_shrink(c)


@pytest.mark.parametrize("name", list(EXPAND_BAD))
def test_expand_rejects_bad_inputs(name: str) -> None:
    c = _valid()
    mutate, msg = EXPAND_BAD[name]
    mutate(c)
    with pytest.raises(ValueError, match=msg):
        run_expand(c, c["y"], c["out"])


def test_warm_up_covers_every_launch_variant_and_writes_nothing() -> None:
    """Start-up compiles: every (BLOCK_M, BLOCK_R) a launch can pick is among the warm-up's,
    and warming up on a layer's own pools leaves them untouched."""
    seen = {tlora.variant(m, r) for m in range(1, 300, 7) for r in range(1, 257, 3)}
    assert seen == {tlora.variant(m, r) for m, r in tlora.WARM_UP_SHAPES}
    c = make_case("uniform", [20, 12], 40, torch.float16, seed=4, T=8, num_slots=4)
    a_pool, b_pool = c["a_pool"].clone(), c["b_pool"].clone()
    assert tlora.warm_up(c["a_pool"], c["b_pool"], c["row_start"], c["ranks"], c["slice_offsets"]) == \
        2 * len(tlora.WARM_UP_SHAPES)
    assert torch.equal(a_pool.nan_to_num(7), c["a_pool"].nan_to_num(7))
    assert torch.equal(b_pool.nan_to_num(7), c["b_pool"].nan_to_num(7))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("split_k", (2, 3, 4, 8))
def test_split_k_shrink_matches_reference(split_k: int, dtype) -> None:
    """Decode shapes (a token or two per segment) split over d_in: 257 = 5 tiles of 64, so 3 gives
    runs of 2/2/1 tiles and 8 leaves three programs per tile without any (zero partials);
    ranks 1-128 (BLOCK_R 32, several rank tiles) and tokens without adapter (y stays 0)."""
    c = make_case("some_none", [96, 32, 32], 257, dtype, seed=31 + split_k, T=16, num_slots=16)
    assert c["max_seg_len"] <= 16  # decode tiles (BLOCK_M 16)
    y = run_shrink(c, split_k=split_k)
    assert y.shape == (3, 16, c["max_rank"]) and y.dtype == torch.float32
    torch.testing.assert_close(y.cpu().double(), ref_shrink(c), rtol=1e-4, atol=1e-4)
    # the split sums the same products: equal to the unsplit launch within fp32 reassociation
    torch.testing.assert_close(y, run_shrink(c, split_k=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="split_k"):
        run_shrink(c, split_k=0)


@pytest.fixture()
def shrink_table():
    """`tune_shrink` writes a process-wide table: leave it as found."""
    saved = tlora.shrink_table()
    tlora._SHRINK_TABLE.clear()
    yield
    tlora._SHRINK_TABLE.clear()
    tlora._SHRINK_TABLE.update(saved)


def test_tune_shrink_records_the_fastest_measured_choice(shrink_table, monkeypatch) -> None:
    """The tuning measures every (SPLIT_K, num_warps) for each segment bucket and BLOCK_R
    (here with a wall clock under the interpreter: real timings, just not a GPU's), records
    the fastest, and decode launches read it by the largest bucket at or below their segment
    count; prefill tiles and unmeasured widths keep the default launch. A choice the device
    cannot compile is left out, not fatal."""
    import time

    from triton.runtime.errors import OutOfResources

    def wall(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # fewer buckets and choices than a GPU measures: the interpreter runs programs one by one
    monkeypatch.setattr(tlora, "SEGMENT_BUCKETS", (1, 4, 8))
    monkeypatch.setattr(tlora, "SPLIT_K_CHOICES", (1, 2, 3))
    monkeypatch.setattr(tlora, "NUM_WARPS_CHOICES", (2, 4))
    real = tlora._shrink_kernel

    class RefusesOneVariant:  # as a device short of registers or shared memory refuses one
        def __getitem__(self, grid):
            def run(*args, **kw):
                if kw["SPLIT_K"] == 3 and kw["num_warps"] == 2:
                    raise OutOfResources(1 << 20, 1 << 16, "shared memory")
                return real[grid](*args, **kw)
            return run

    monkeypatch.setattr(tlora, "_shrink_kernel", RefusesOneVariant())
    a_pool = torch.randn(2, 8, 130).to(DEVICE)
    ranks = torch.zeros(2, 6, dtype=torch.int32, device=DEVICE)  # 6 slots: bucket 8 cannot occur
    assert tlora.chosen_shrink_config(130, 2, 16, 16, 64) == tlora.DEFAULT_CONFIG == (1, 4)  # nothing measured
    times = tlora.tune_shrink(a_pool, ranks, timer=wall)
    assert set(times) == {(130, 2, br, s) for br in (16, 32) for s in (1, 4)}
    table = tlora.shrink_table()
    for key, by_config in times.items():
        assert set(by_config) == {(k, w) for k in (1, 2, 3) for w in (2, 4)} - {(3, 2)}
        assert all(t > 0 for t in by_config.values())
        assert table[key] == min(by_config, key=by_config.get)
    assert tlora.chosen_shrink_config(130, 2, 16, 16, 5) == table[(130, 2, 16, 4)]
    assert tlora.chosen_shrink_config(130, 2, 16, 32, 500) == table[(130, 2, 32, 4)]
    assert tlora.tune_shrink(a_pool, ranks, timer=wall) == {}  # measured once per process
    assert tlora.chosen_shrink_config(130, 2, 32, 16, 64) == (1, 4)  # prefill tile
    assert tlora.chosen_shrink_config(131, 2, 16, 16, 64) == (1, 4)  # another layer width
