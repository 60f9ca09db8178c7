"""The lean serving decoder matches transformers' forward (fp32, 1e-4), prefill and decode,
with and without adapters on the fused q/k/v and gate/up slices."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafold.server.engine.attention import build_attention_metadata
from lorafold.server.engine.llama import LeanLlama
from lorafold.server.lora.peft_format import load_adapter
from tests.conftest import build_tiny_llama, make_peft_adapter

BLOCK = 4


def new_caches(model: LeanLlama, num_blocks: int):
    shape = (num_blocks * BLOCK, model.num_kv_heads, model.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in model.layers]


def run_steps(model, caches, seqs_tokens, steps, slots_per_seq=None):
    """Feed sequences chunk by chunk: steps[i] = tokens to process per sequence in step i."""
    done = [0] * len(seqs_tokens)
    tables = [[j * 16 + b for b in range(16)] for j in range(len(seqs_tokens))]  # disjoint blocks
    outputs = []
    for step in steps:
        ids, pos, slot_map, seqs, lora, rows = [], [], [], [], [], []
        for j, n in enumerate(step):
            if n == 0:
                continue
            toks = seqs_tokens[j][done[j] : done[j] + n]
            q_start = len(ids)
            ids += toks
            pos += list(range(done[j], done[j] + n))
            slot_map += [tables[j][p // BLOCK] * BLOCK + p % BLOCK for p in range(done[j], done[j] + n)]
            seqs.append((q_start, n, done[j] + n, tables[j]))
            lora += [(slots_per_seq or [-1] * len(seqs_tokens))[j]] * n
            rows.append(len(ids) - 1)
            done[j] += n
        meta = build_attention_metadata(slot_map, seqs, BLOCK, torch.device("cpu"))
        lmeta = model.slots.meta(lora) if any(s >= 0 for s in lora) else None
        with torch.no_grad():
            logits = model(torch.tensor(ids), torch.tensor(pos), caches, meta, lmeta, torch.tensor(rows))
        outputs.append(logits)
    return outputs


@pytest.mark.parametrize("arch", ["llama", "qwen2_bias"])
def test_prefill_and_decode_match_transformers(arch, cpu_path):
    overrides = {"attention_bias": True} if arch == "qwen2_bias" else {}
    hf = build_tiny_llama(seed=3, **overrides)
    lean = LeanLlama(copy.deepcopy(hf), num_slots=2, rows=8)
    caches = new_caches(lean, 64)
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (13,), generator=gen).tolist()
    b = torch.randint(0, 256, (9,), generator=gen).tolist()
    # step 1: a's first chunk of 6 + b's whole prompt of 5; then a's rest (7) + b decodes one by one
    steps = [[6, 5], [7, 1], [0, 1], [0, 1], [0, 1]]
    outs = run_steps(lean, caches, [a, b], steps)
    with torch.no_grad():
        ref_a = hf(torch.tensor([a])).logits[0]
        ref_b = hf(torch.tensor([b])).logits[0]
    torch.testing.assert_close(outs[0][0], ref_a[5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[0][1], ref_b[4], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[1][0], ref_a[12], rtol=1e-4, atol=1e-4)
    for i in range(1, 5):
        torch.testing.assert_close(outs[i][-1], ref_b[4 + i], rtol=1e-4, atol=1e-4)


def test_fused_slices_with_adapters_match_peft(tmp_path, cpu_path):
    from peft import PeftModel

    hf = build_tiny_llama(seed=4)
    f1 = make_peft_adapter(hf, tmp_path / "a", r=8, seed=1, rank_pattern={"k_proj": 2})
    f2 = make_peft_adapter(hf, tmp_path / "b", r=32, seed=2, targets=["v_proj", "up_proj"])
    lean = LeanLlama(copy.deepcopy(hf), num_slots=3, rows=8 + 32)
    for slot, folder in ((0, f1), (2, f2)):
        lean.slots.fill(slot, load_adapter(folder, lean.slots.base_modules()))
    caches = new_caches(lean, 64)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (7,), generator=gen).tolist() for _ in range(3)]
    outs = run_steps(lean, caches, seqs, [[6, 6, 6], [1, 1, 1]], slots_per_seq=[0, -1, 2])
    with torch.no_grad():
        refs = [
            PeftModel.from_pretrained(copy.deepcopy(hf), f1)(torch.tensor([seqs[0]])).logits[0],
            hf(torch.tensor([seqs[1]])).logits[0],
            PeftModel.from_pretrained(copy.deepcopy(hf), f2)(torch.tensor([seqs[2]])).logits[0],
        ]
    for j in range(3):
        torch.testing.assert_close(outs[0][j], refs[j][5], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outs[1][j], refs[j][6], rtol=1e-4, atol=1e-4)
    assert (outs[1][0] - outs[1][1]).abs().max() > 1e-3
