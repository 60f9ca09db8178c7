"""The compiled CPU kernels (`kernels/csrc/cpu_ops.cpp`) against float64 references, their
input checks, and how `cpu_ext` builds, finds and declines them."""

from __future__ import annotations

import logging
import subprocess
import zlib

import pytest
import torch

from lorafold.kernels import cpu_ext, cpu_ops
from lorafold.kernels.meta import build_lora_meta
from lorafold.kernels.ops import apply, choose_backend

from tests.conftest import require_cpu_kernels

from .lora_cases import MIXES, loop_reference, make_pools, token_slots_for


@pytest.fixture(autouse=True, scope="module")
def _built() -> None:
    require_cpu_kernels()


# --- LoRA --------------------------------------------------------------------------------


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("slice_widths", [[59], [96, 32, 32], [48, 48]])
@pytest.mark.parametrize("d_in", [123, 64])
def test_lora_apply_matches_loop(mix: str, slice_widths: list[int], d_in: int, pool_dtype: torch.dtype) -> None:
    """Ranks 1-128 (per-slice ranks differ inside an adapter), gapped shuffled pool rows, widths
    and d_in off the 8/16-float vector tiles, segments of every length mod the 4-token block.
    bfloat16 pools: the same float32 arithmetic on the widened rows (their 32- and
    16-at-a-time even/odd splits, the 8-at-a-time and the scalar tails all run at these
    widths: 123 = 3 x 32 + 16 + 8 + 3, 59 = 32 + 16 + 11), so the float64 loop over the same
    bfloat16 values is the reference, at float32 tolerance."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{mix}|{slice_widths}|{d_in}".encode()))
    num_tokens, num_slots, n = 45, 10, len(slice_widths)
    ranks = torch.tensor([1, 3, 4, 8, 16, 64, 128])[torch.randint(0, 7, (n, num_slots), generator=gen)]
    if n > 1:
        ranks[1, 0] = 0  # a slice this adapter does not target
    a_pool, b_pool, row_start, alloc = make_pools(ranks, d_in, slice_widths, pool_dtype, gen)
    slots = token_slots_for(mix, num_tokens, num_slots, gen)
    x = torch.randn(num_tokens, d_in, generator=gen)
    base = torch.randn(num_tokens, sum(slice_widths), generator=gen)
    out = base.clone()
    meta = build_lora_meta(slots, row_start, alloc, backend="cpp")
    offsets = [0, *torch.tensor(slice_widths).cumsum(0).tolist()]
    with torch.no_grad():
        apply(x, a_pool, b_pool, row_start, ranks.to(torch.int32), offsets, meta, out)
    _, delta = loop_reference(x, a_pool, b_pool, row_start, ranks, slice_widths, slots)
    torch.testing.assert_close(out.double(), base.double() + delta, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[slots < 0], base[slots < 0]), "rows without adapter must be untouched"


def test_lora_apply_reads_each_slice_at_its_own_rank() -> None:
    """Rows past a module's rank are never read: NaN there must not reach the output (the torch
    path computes at the allocated rank and needs them zero; the kernel stops at the rank)."""
    gen = torch.Generator().manual_seed(5)
    ranks = torch.tensor([[4, 16], [16, 2]])
    a_pool, b_pool, row_start, alloc = make_pools(ranks, 24, [8, 8], torch.float32, gen)
    for s in range(2):
        for i in range(2):
            r0, r = int(row_start[s]), int(ranks[i, s])
            a_pool[i, r0 + r : r0 + int(alloc[s])] = float("nan")
    slots = torch.tensor([0, 1, 1, 0, 1, 0, 0, 0, 0])
    x = torch.randn(9, 24, generator=gen)
    out = torch.zeros(9, 16)
    with torch.no_grad():
        apply(x, a_pool, b_pool, row_start, ranks.to(torch.int32), [0, 8, 16],
              build_lora_meta(slots, row_start, alloc, backend="cpp"), out)
    _, delta = loop_reference(x, a_pool.nan_to_num(0.0), b_pool, row_start, ranks, [8, 8], slots)
    torch.testing.assert_close(out.double(), delta, rtol=1e-5, atol=1e-5)


def test_lora_apply_rejects_inconsistent_metadata() -> None:
    gen = torch.Generator().manual_seed(0)
    ranks = torch.tensor([[4, 4]])
    a_pool, b_pool, row_start, alloc = make_pools(ranks, 16, [8], torch.float32, gen)
    meta = build_lora_meta(torch.tensor([0, 1, 1]), row_start, alloc, backend="cpp")
    x, out = torch.randn(3, 16), torch.zeros(3, 8)
    bad_tokens = meta.sorted_tokens.clone()
    bad_tokens[0] = 7
    with pytest.raises(RuntimeError, match="token index 7 out of range"):
        cpu_ops.lora_apply(x, a_pool, b_pool, row_start, ranks.to(torch.int32), bad_tokens, meta.seg_slots,
                           meta.seg_starts, [0, 8], out)
    with pytest.raises(RuntimeError, match="rows run past the pool"):
        cpu_ops.lora_apply(x, a_pool, b_pool, row_start + 1000, ranks.to(torch.int32), meta.sorted_tokens,
                           meta.seg_slots, meta.seg_starts, [0, 8], out)
    with pytest.raises(RuntimeError, match="must be float32"):
        cpu_ops.lora_apply(x.double(), a_pool, b_pool, row_start, ranks.to(torch.int32), meta.sorted_tokens,
                           meta.seg_slots, meta.seg_starts, [0, 8], out)
    with pytest.raises(RuntimeError, match="float32 or both bfloat16"):
        cpu_ops.lora_apply(x, a_pool.bfloat16(), b_pool, row_start, ranks.to(torch.int32), meta.sorted_tokens,
                           meta.seg_slots, meta.seg_starts, [0, 8], out)
    with pytest.raises(RuntimeError, match="float32 or both bfloat16"):
        cpu_ops.lora_apply(x, a_pool.half(), b_pool.half(), row_start, ranks.to(torch.int32), meta.sorted_tokens,
                           meta.seg_slots, meta.seg_starts, [0, 8], out)
    assert torch.equal(out, torch.zeros(3, 8)), "a refused call writes nothing"


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("slice_widths", [[59], [96, 32, 32], [70, 200]])
def test_lora_lay_out_equals_the_torch_layout_bit_for_bit(slice_widths: list[int], pool_dtype: torch.dtype) -> None:
    """An adapter load's compiled layout (`slots._lay_out` on the CPU) writes exactly what the
    torch ops write: A rows, (scale B)ᵀ in each slice's columns (B contiguous, transposed or
    a column slice: any strides), rounded to 16 bits as torch rounds, zeros past each
    slice's rank and over slices the adapter leaves alone, into rows of a pool with other
    rows around them that must stay untouched."""
    from types import SimpleNamespace

    from lorafold.server.lora.peft_format import ModuleLoRA
    from lorafold.server.lora.slots import _lay_out_torch

    gen = torch.Generator().manual_seed(len(slice_widths) * 7 + pool_dtype.itemsize)
    d_in, rows, start = 123, 24, 5
    offsets = [0]
    for w in slice_widths:
        offsets.append(offsets[-1] + w)
    layer = SimpleNamespace(slice_offsets=offsets)
    for case, ranks in enumerate([[24, 3, 17], [1, 0, 24], [0, 0, 0], [8, 24, 0]]):
        mods = {}
        for i, (w, r) in enumerate(zip(slice_widths, ranks)):
            if not r:
                continue
            b = torch.randn(w, r + 2, generator=gen)
            b = [b[:, :r], b[:, :r].contiguous(), torch.randn(r, w, generator=gen).t()][(i + case) % 3]
            mods[i] = ModuleLoRA(torch.randn(r, d_in, generator=gen), b, 0.25 + i + case / 3)
        pools = []
        for _ in range(2):
            a_pool = torch.full((len(slice_widths), 40, d_in), 7.0, dtype=pool_dtype)
            b_pool = torch.full((40, offsets[-1]), 7.0, dtype=pool_dtype)
            pools.append((a_pool, b_pool))
        (a1, b1), (a2, b2) = pools
        got = cpu_ops.lora_lay_out(a1[:, start : start + rows], b1[start : start + rows],
                                   [mods[i].lora_a if i in mods else None for i in range(len(slice_widths))],
                                   [mods[i].lora_b if i in mods else None for i in range(len(slice_widths))],
                                   [mods[i].scale if i in mods else 0.0 for i in range(len(slice_widths))], offsets)
        want = _lay_out_torch(layer, mods, a2[:, start : start + rows], b2[start : start + rows])
        assert torch.equal(got, want) and got.dtype == torch.int32
        assert torch.equal(a1, a2) and torch.equal(b1, b2), f"ranks {ranks}: the layouts differ"
        assert (a1[:, :start] == 7).all() and (a1[:, start + rows :] == 7).all(), "rows outside the range changed"
    with pytest.raises(RuntimeError, match="lora_a and lora_b must be given together"):
        cpu_ops.lora_lay_out(a1[:, :rows], b1[:rows], [torch.zeros(2, d_in)] + [None] * (len(slice_widths) - 1),
                             [None] * len(slice_widths), [1.0] * len(slice_widths), offsets)
    with pytest.raises(RuntimeError, match=r"expected lora_a \[r <= 24"):
        cpu_ops.lora_lay_out(a1[:, :rows], b1[:rows], [torch.zeros(25, d_in)] + [None] * (len(slice_widths) - 1),
                             [torch.zeros(slice_widths[0], 25)] + [None] * (len(slice_widths) - 1),
                             [1.0] * len(slice_widths), offsets)


def test_backend_choice_is_made_once_and_checked() -> None:
    """'auto' picks the compiled kernel for a float32 CPU model with float32 or bfloat16 pools
    and the reference for a bf16 model or float16 pools; a named backend that cannot run, or
    pools it cannot read, are refused when the model is built, not on a request."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend("auto", cpu, torch.float32) == "cpp"
    assert choose_backend("auto", cpu, torch.float32, torch.bfloat16) == "cpp"
    assert choose_backend("auto", cpu, torch.float32, torch.float16) == "torch"
    assert choose_backend("auto", cpu, torch.bfloat16) == "torch"
    assert choose_backend("torch", cpu, torch.float32) == "torch"
    assert choose_backend("auto", cuda, torch.bfloat16) == "triton"
    with pytest.raises(ValueError, match="compiled CPU kernel for a float32 model"):
        choose_backend("cpp", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="compiled CPU kernel for a float32 model"):
        choose_backend("cpp", cpu, torch.float32, torch.float16)
    with pytest.raises(ValueError, match="lora_dtype='auto'"):
        choose_backend("auto", cuda, torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        choose_backend("cuda", cpu, torch.float32)
    from lorafold.kernels.meta import BACKENDS
    from lorafold.server.engine.config import LORA_BACKENDS

    assert set(LORA_BACKENDS) == {"auto", *BACKENDS}, "the engine config's copy of the backend names drifted"


# --- paged decode attention ------------------------------------------------------------------


def _paged_case(lens: list[int], heads: int, kv_heads: int, dim: int, block_size: int, gen: torch.Generator):
    """Random caches with every sequence's blocks scattered through them; returns the op's
    inputs and the contiguous K/V of each sequence."""
    need = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=gen)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int64)
    per_seq, cursor = [], 0
    for b, n in enumerate(lens):
        blocks = perm[cursor : cursor + need[b]]
        cursor += need[b]
        tables[b, : need[b]] = torch.tensor(blocks)
        slots = torch.tensor([blocks[t // block_size] * block_size + t % block_size for t in range(n)])
        per_seq.append((k_cache[slots], v_cache[slots]))
    q = torch.randn(len(lens), heads, dim, generator=gen)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int64), per_seq


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 20), (8, 2, 128), (6, 1, 8)])
@pytest.mark.parametrize("block_size", [16, 5])
def test_paged_decode_attention_matches_float64_softmax(heads: int, kv_heads: int, dim: int, block_size: int) -> None:
    gen = torch.Generator().manual_seed(heads * 1000 + dim + block_size)
    lens = [1, block_size, block_size + 1, 3 * block_size, 77, 300]
    q, k_cache, v_cache, tables, ctx, per_seq = _paged_case(lens, heads, kv_heads, dim, block_size, gen)
    scale = dim**-0.5
    out = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, ctx, block_size, scale)
    group = heads // kv_heads
    for b, (k, v) in enumerate(per_seq):
        kh = k.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
        vh = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
        p = torch.softmax((kh @ q[b].double()[:, :, None])[..., 0] * scale, dim=-1)  # [H, L]
        want = (p[:, None, :] @ vh)[:, 0]
        torch.testing.assert_close(out[b].double(), want, rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_rejects_bad_tables() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k_cache, v_cache, tables, ctx, _ = _paged_case([5, 9], 4, 2, 8, 4, gen)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables + 100, ctx, 4, 0.3)
    with pytest.raises(RuntimeError, match="outside the block table"):
        cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, ctx + 100, 4, 0.3)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        cpu_ops.paged_decode_attention(q[:, :3].contiguous(), k_cache, v_cache, tables, ctx, 4, 0.3)


# --- building and loading ---------------------------------------------------------------------


def test_prebuilt_library_loads_without_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container ships the library built at image time and has no gcc: loading must not build."""
    monkeypatch.setattr(cpu_ext, "_loaded", None)

    def no_compiler(folder):  # noqa: ANN001, ANN202
        raise AssertionError("the prebuilt library must be loaded, not rebuilt")

    monkeypatch.setattr(cpu_ext, "_build", no_compiler)
    assert cpu_ext.library_path().exists()
    assert cpu_ext.available()


def test_build_failure_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path, caplog) -> None:
    monkeypatch.setattr(cpu_ext, "_loaded", None)
    monkeypatch.setenv("LORAFOLD_CACHE", str(tmp_path))  # no prebuilt library there

    def failing_build(folder):  # noqa: ANN001, ANN202
        raise subprocess.CalledProcessError(1, ["ninja"])

    monkeypatch.setattr(cpu_ext, "_build", failing_build)
    with caplog.at_level(logging.WARNING, logger="lorafold.kernels.cpu_ext"):
        assert not cpu_ext.available()
    assert "using the slower torch path" in caplog.text
    assert not cpu_ops.usable(torch.zeros(1))
    from lorafold.kernels.ops import choose_backend

    assert choose_backend("auto", torch.device("cpu"), torch.float32) == "torch", "no kernel: the reference serves"


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_ext, "_loaded", None)
    monkeypatch.setenv("LORAFOLD_CPU_KERNELS", "0")
    assert not cpu_ext.available()


def test_build_folder_changes_with_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library built for one -march (an image built for many machines) is never loaded for another."""
    native = cpu_ext.build_dir()
    monkeypatch.setenv("LORAFOLD_CPU_MARCH", "x86-64-v3")
    assert cpu_ext.build_dir() != native


def test_one_openmp_runtime_in_the_process() -> None:
    """The kernels share torch's OpenMP pool (same soname) instead of starting a second one."""
    maps = open("/proc/self/maps").read().splitlines()
    runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) <= 1, runtimes
