"""The invariant the product rests on: a mixed-adapter batch through the serving decoder
(`LeanLlama`, its LoRA backend chosen as in serving) equals each adapter merged alone."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafold.server.engine.llama import LeanLlama
from lorafold.server.lora.peft_format import load_adapter
from lorafold.server.models.loader import module_specs
from tests.conftest import build_tiny_llama, lean_logits, make_peft_adapter, merged_model


def mixed_batch_check(base, folders, tmp_path, rows_slots, seq_len=7):
    """Run a mixed batch; compare each row with the merged model of its adapter."""
    adapters = [load_adapter(f, module_specs(base)) for f in folders]
    # pools of exactly the adapters' rows: each range ends where the next begins, or the pool
    model = LeanLlama(copy.deepcopy(base), num_slots=4, rows=sum(ad.max_rank for ad in adapters))
    slots = model.slots
    for i, ad in enumerate(adapters):
        slots.fill(i, ad)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (len(rows_slots), seq_len), generator=gen)
    mixed = lean_logits(model, ids, rows_slots)
    outs = {}
    with torch.no_grad():
        for row, s in enumerate(rows_slots):
            ref_model = base if s < 0 else merged_model(base, adapters[s])
            ref = ref_model(ids[row : row + 1]).logits[0]
            # fp32 noise floor: a base-only row of this batch already differs from its own
            # single-row forward by ~5e-5 (batch-shape-dependent matmul blocking); the LoRA
            # kernels' summation order adds about as much. A wrong adapter is off by > 1e-2.
            torch.testing.assert_close(mixed[row], ref, rtol=1e-4, atol=2e-4)
            outs.setdefault(s, mixed[row])
    return model, slots, adapters, ids, outs


def test_mixed_batch_equals_merged_smollm2(smollm2, tmp_path, cpu_path):
    base = smollm2.model
    f1 = make_peft_adapter(base, tmp_path / "a1", r=8, seed=1)
    f2 = make_peft_adapter(base, tmp_path / "a2", r=64, alpha=32, seed=2)
    # rows: base, adapter 1 (r=8), adapter 2 (r=64), adapter 1 again
    _, _, adapters, ids, outs = mixed_batch_check(base, [f1, f2], tmp_path, [-1, 0, 1, 0])
    assert adapters[0].max_rank == 8 and adapters[1].max_rank == 64
    assert len(adapters[0].modules) == 30 * 7, "all seven projections of all 30 layers"
    # different adapters must give different outputs (the test can tell them apart)
    assert (outs[-1] - outs[0]).abs().max() > 1e-2
    assert (outs[0] - outs[1]).abs().max() > 1e-2


def test_peft_made_adapter_gives_peft_logits(smollm2, tmp_path):
    from peft import PeftModel

    base = smollm2.model
    folder = make_peft_adapter(base, tmp_path / "peft", r=16, alpha=8, seed=3, use_rslora=True)
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()(ids).logits
    model = LeanLlama(copy.deepcopy(base), num_slots=2, rows=16)
    model.slots.fill(1, load_adapter(folder, module_specs(base)))
    ours = lean_logits(model, ids, [1, 1])
    # the fp32 noise floor of fused, prepacked matmuls (see mixed_batch_check); a wrong
    # scale or rank is off by > 1e-2
    torch.testing.assert_close(ours, peft_logits, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("rows", [[0, 1, 2, -1, 2], [2, 2, 2, 2], [-1, -1]])
def test_mixed_batch_tiny_heterogeneous(tmp_path, rows, cpu_path):
    """Three adapters with ranks 1 / 4 (rank_pattern: v_proj 12) / 128 on a tiny model."""
    base = build_tiny_llama()
    folders = [
        make_peft_adapter(base, tmp_path / "r1", r=1, seed=4),
        make_peft_adapter(base, tmp_path / "r4", r=4, seed=5, rank_pattern={"v_proj": 12}, alpha_pattern={"o_proj": 3.0}),
        make_peft_adapter(base, tmp_path / "r128", r=128, seed=6, targets=["q_proj", "down_proj"]),
    ]
    mixed_batch_check(base, folders, tmp_path, rows)


def test_fill_clear_refill_keeps_base_weights(tmp_path):
    base = build_tiny_llama()
    model = LeanLlama(copy.deepcopy(base), num_slots=3, rows=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slots = model.slots
    ad = load_adapter(make_peft_adapter(base, tmp_path / "a", r=8, seed=7), slots.base_modules())
    ids = torch.randint(0, 256, (1, 5))
    plain_before = lean_logits(model, ids, [-1])
    slots.fill(2, ad)
    first = lean_logits(model, ids, [2])
    assert (first - plain_before).abs().max() > 1e-3, "the adapter must change the logits"
    slots.clear(2)
    torch.testing.assert_close(lean_logits(model, ids, [-1]), plain_before, rtol=0, atol=0)
    torch.testing.assert_close(plain_before[0], base(ids).logits[0], rtol=1e-4, atol=1e-4)
    slots.fill(0, ad)  # another slot, other rows
    torch.testing.assert_close(lean_logits(model, ids, [0]), first, rtol=1e-6, atol=1e-6)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"base weight {k} changed"
    with pytest.raises(ValueError, match="holds no adapter"):
        slots.meta([2])
