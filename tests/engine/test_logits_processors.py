"""Logits processors against a plain per-row reference, and the grammar-mask unpacking
against xgrammar's own mask application."""

from __future__ import annotations

import torch
import xgrammar as xgr

from lorafold.server.engine.logits_processors import SamplingContext, apply_processors
from lorafold.server.engine.sampling_params import SamplingParams


def _reference(row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int], suppress: list[int]):
    row = row.clone().double()
    for t, b in p.logit_bias.items():
        row[t] += b
    for t in set(prompt) | set(output):
        if p.repetition_penalty != 1:
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    for t in suppress:
        row[t] = float("-inf")
    return row


def test_processors_match_the_reference_row_by_row():
    vocab = 40
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, vocab, generator=g) * 3
    params = [
        SamplingParams(),  # untouched
        SamplingParams(frequency_penalty=0.7, presence_penalty=-0.3),
        SamplingParams(repetition_penalty=1.8, logit_bias={3: 5.0, 39: -100.0}),
        SamplingParams(presence_penalty=2.0, frequency_penalty=-1.0, repetition_penalty=0.5, min_tokens=4),
        SamplingParams(logit_bias={0: 100.0}),
    ]
    prompts = [[1, 2], [4, 4, 5], [6, 7, 3], [8, 9, 9, 10], []]
    outputs = [[1], [5, 5, 6, 11], [3, 12], [9, 13, 13, 13], [2]]
    suppress = [[], [], [], [0, 1], []]
    ctx = SamplingContext(prompt_ids=prompts, output_ids=outputs, suppress=suppress)
    got = apply_processors(logits.clone(), params, ctx)
    for i, p in enumerate(params):
        want = _reference(logits[i], p, prompts[i], outputs[i], suppress[i])
        assert torch.allclose(got[i].double(), want, atol=1e-5), i


def test_grammar_mask_unpacks_like_xgrammar():
    vocab, rows = 100, 4
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2, (rows, vocab), generator=g).bool()
    bits[:, 0] = True
    mask = xgr.allocate_token_bitmask(rows, vocab)
    mask.zero_()
    for r in range(rows):  # pack bit t of word t // 32
        for t in bits[r].nonzero().flatten().tolist():
            word, bit = divmod(t, 32)
            mask[r, word] |= torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32) if bit < 31 else torch.tensor(
                -(1 << 31), dtype=torch.int32)
    logits = torch.randn(rows, vocab, generator=g)
    ours = apply_processors(logits.clone(), [SamplingParams()] * rows,
                            SamplingContext(suppress=[[]] * rows, grammar_mask=mask, grammar_rows=[0, 2, 3]))
    theirs = logits.clone()
    xgr.apply_token_bitmask_inplace(theirs, mask, indices=[0, 2, 3])
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[1], logits[1])  # an unconstrained row is untouched
    assert torch.equal(torch.isfinite(ours[0]), bits[0])
