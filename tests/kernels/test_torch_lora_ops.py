"""The plain-torch reference multi-LoRA ops against a float64 token loop, over adapter mixes."""

from __future__ import annotations

import pytest
import torch

from lorafold.kernels.meta import build_lora_meta
from lorafold.kernels.ops import expand, shrink

from .lora_cases import MIXES, loop_reference, make_pools, token_slots_for

RANK_CHOICES = torch.tensor([1, 4, 8, 16, 64, 128])


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("slice_widths", [[37], [96, 32, 32], [75, 75]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shrink_expand_match_loop(mix: str, slice_widths: list[int], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(hash((mix, len(slice_widths), str(dtype))) % 2**31)
    num_tokens, num_slots, d_in = 40, 12, 101
    n = len(slice_widths)
    ranks = RANK_CHOICES[torch.randint(0, len(RANK_CHOICES), (n, num_slots), generator=gen)]
    if n > 1:
        ranks[1, 0] = 0  # a slice this adapter does not target
    a_pool, b_pool, row_start, alloc = make_pools(ranks, d_in, slice_widths, dtype, gen)
    x = torch.randn(num_tokens, d_in, generator=gen).to(dtype)
    slots = token_slots_for(mix, num_tokens, num_slots, gen)
    meta = build_lora_meta(slots, row_start, alloc)
    y = shrink(x, a_pool, row_start, ranks.to(torch.int32), meta)
    y_ref, delta_ref = loop_reference(x, a_pool, b_pool, row_start, ranks, slice_widths, slots)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert y.dtype == torch.float32 and y.shape == (n, num_tokens, meta.max_rank)
    width = min(meta.max_rank, y_ref.shape[2])
    torch.testing.assert_close(y[:, :, :width].double(), y_ref[:, :, :width], rtol=tol, atol=tol)
    assert not y[:, :, width:].any()
    base = torch.randn(num_tokens, sum(slice_widths), generator=gen).to(dtype)
    out = base.clone()
    expand(y, b_pool, row_start, ranks.to(torch.int32), [0, *torch.tensor(slice_widths).cumsum(0).tolist()], meta, out)
    torch.testing.assert_close(out.double(), base.double() + delta_ref, rtol=tol, atol=tol)
    no_adapter = slots < 0
    assert torch.equal(out[no_adapter], base[no_adapter]), "rows without adapter must be untouched"


def test_meta_segments_sorted_and_complete() -> None:
    slots = torch.tensor([3, -1, 0, 3, 0, 7, -1, 3])
    row_start = torch.arange(8, dtype=torch.int32) * 16
    meta = build_lora_meta(slots, row_start, torch.full((8,), 16, dtype=torch.int32))
    assert meta.seg_slots.tolist() == [0, 3, 7]
    assert meta.seg_starts.tolist() == [0, 2, 5, 6]
    assert meta.sorted_tokens.tolist() == [2, 4, 0, 3, 7, 5]
    assert meta.max_seg_len == 3 and meta.max_rank == 16


def test_meta_rejects_out_of_range_slot() -> None:
    with pytest.raises(ValueError, match="out of range"):
        build_lora_meta(torch.tensor([0, 9]), torch.zeros(4, dtype=torch.int32), torch.ones(4, dtype=torch.int32))


def test_packed_metadata_parts_start_16_byte_aligned() -> None:
    """The metadata built from runs equals build_lora_meta's. What a step moves to a GPU in one
    copy (`aligned_cat`: the LoRA metadata in `LoRABatchMeta.to`, the flex attention metadata)
    starts each part on a 16-byte boundary, since Triton
    specialises kernels on pointer alignment (a misaligned view would compile another variant
    while serving) and Inductor assumes aligned inputs."""
    from lorafold.kernels.meta import lora_meta_from_runs
    from lorafold.kernels.transfer import aligned_cat
    from lorafold.server.engine.flex_paged import build_flex_metadata

    for runs in ([(0, 0, 1)], [(2, 0, 3), (-1, 3, 2), (0, 5, 1)], [(s, t, 1) for t, s in enumerate([1, 0, 1, 2, 3])]):
        meta = lora_meta_from_runs(runs, sum(n for *_, n in runs), {s: (s * 8, 8) for s in range(4)})
        ref = build_lora_meta(torch.tensor([s for s, _, n in runs for _ in range(n)]),
                              torch.arange(4, dtype=torch.int32) * 8, torch.full((4,), 8, dtype=torch.int32))
        assert [meta.sorted_tokens.tolist(), meta.seg_slots.tolist(), meta.seg_starts.tolist(), meta.segments] == [
            ref.sorted_tokens.tolist(), ref.seg_slots.tolist(), ref.seg_starts.tolist(), ref.segments]
    for dtype in (torch.int32, torch.int64):
        parts = [torch.arange(n, dtype=dtype) for n in (3, 0, 5, 1)]
        packed, spans = aligned_cat(parts)
        assert all(packed[span].data_ptr() % 16 == 0 and packed[span].tolist() == p.tolist()
                   for span, p in zip(spans, parts))
    seqs = [(0, 3, 3, [0]), (3, 1, 6, [1, 2]), (4, 1, 2, [3])]  # a prefill chunk and two decodes
    flex, slots = build_flex_metadata(seqs, 4, 9, 5, torch.device("cpu"), slot_mapping=[0, 1, 2, 9, 13])
    tensors = [slots, flex.decode.block_mask.kv_num_blocks, flex.decode.block_mask.kv_indices,
               flex.prefill.block_mask.kv_num_blocks, flex.prefill.block_mask.kv_indices]
    assert all(t.data_ptr() % 16 == 0 for t in tensors)
