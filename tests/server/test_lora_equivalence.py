"""The invariant the product rests on: a mixed-adapter batch equals each adapter merged alone."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafold.server.lora.context import lora_batch
from lorafold.server.lora.peft_format import load_adapter
from lorafold.server.lora.wrap import wrap_linears
from tests.conftest import build_tiny_llama, make_peft_adapter, merged_model


def mixed_batch_check(base, folders, tmp_path, rows_slots, seq_len=7):
    """Run a mixed batch; compare each row with the merged model of its adapter."""
    model = copy.deepcopy(base)
    slots = wrap_linears(model, num_slots=4, rows=16)  # small on purpose: forces pool growth
    adapters = [load_adapter(f, slots.base_modules()) for f in folders]
    for i, ad in enumerate(adapters):
        slots.fill(i, ad)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (len(rows_slots), seq_len), generator=gen)
    token_slots = torch.tensor(rows_slots).repeat_interleave(seq_len)
    with torch.no_grad(), lora_batch(slots.meta(token_slots)):
        mixed = model(ids).logits
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


def test_mixed_batch_equals_merged_smollm2(smollm2, tmp_path):
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
        model = copy.deepcopy(base)
        slots = wrap_linears(model, num_slots=2)
        slots.fill(1, load_adapter(folder, slots.base_modules()))
        with lora_batch(slots.meta(torch.full((ids.numel(),), 1))):
            ours = model(ids).logits
    torch.testing.assert_close(ours, peft_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [[0, 1, 2, -1, 2], [2, 2, 2, 2], [-1, -1]])
def test_mixed_batch_tiny_heterogeneous(tmp_path, rows):
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
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slots = wrap_linears(model, num_slots=3, rows=8)
    folder = make_peft_adapter(base, tmp_path / "a", r=8, seed=7)
    ad = load_adapter(folder, slots.base_modules())
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        slots.fill(2, ad)
        with lora_batch(slots.meta([2] * 5)):
            first = model(ids).logits
        slots.clear(2)
        with lora_batch(None):
            plain = model(ids).logits
        torch.testing.assert_close(plain, base(ids).logits, rtol=0, atol=0)
        slots.fill(0, ad)  # another slot, other rows
        with lora_batch(slots.meta([0] * 5)):
            again = model(ids).logits
    torch.testing.assert_close(again, first, rtol=1e-6, atol=1e-6)
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    for k, v in before.items():
        assert torch.equal(after[k], v), f"base weight {k} changed"
    with pytest.raises(ValueError, match="holds no adapter"):
        slots.meta([2])
