"""Joint training of three synthetic subjects on a tiny random Llama; per-subject PEFT export
reproduces each subject's trained logits through PEFT itself."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from lorafold.training.subject.layer import subject_batch, subject_pairs
from lorafold.training.subject.train import SubjectRow, global_batches, subject_eval_losses, train_subjects
from tests.conftest import build_tiny_llama
from tests.training.helpers import one_thread_fixture

SUBJECTS = ["s0", "s1", "s2"]
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


_one_thread = one_thread_fixture()


def tiny_model(dtype: torch.dtype = torch.float32):
    return build_tiny_llama(seed=0, vocab_size=96, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, initializer_range=0.2).to(dtype)


def synthetic_rows(n_per_subject: int = 8, length: int = 10, seed: int = 0) -> list[SubjectRow]:
    """Subject k continues a shared 3-token prompt with tokens from its own band [32k, 32k+32)."""
    rng = random.Random(seed)
    rows = []
    for k, s in enumerate(SUBJECTS):
        for _ in range(n_per_subject):
            prompt = [rng.randrange(96) for _ in range(3)]
            body = [32 * k + rng.randrange(8) for _ in range(length)]
            rows.append(SubjectRow(prompt + body, [-100] * 3 + body, s))
    rng.shuffle(rows)
    return rows


def test_global_batches_are_mixed_and_deterministic() -> None:
    a, b = global_batches(24, 6, 5, seed=3), global_batches(24, 6, 5, seed=3)
    assert a == b and all(len(x) == 6 for x in a)
    assert sorted(i for batch in a[:4] for i in batch) == list(range(24))  # one epoch = a permutation


def test_joint_training_lowers_each_loss_and_peft_export_matches(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    base = tiny_model()
    model = copy.deepcopy(base)
    rows = synthetic_rows()
    result = train_subjects(model, rows, SUBJECTS, "adamw", rank=4, targets=TARGETS, steps=30, batch_size=8,
                            lr=1e-2, out_dir=tmp_path)
    after = subject_eval_losses(model, rows, SUBJECTS)
    with torch.no_grad():  # the same model with every B zeroed = the untrained adapters
        zeroed = copy.deepcopy(model)
        for p in subject_pairs(zeroed):
            p.B.zero_()
    before = subject_eval_losses(zeroed, rows, SUBJECTS)
    for s in SUBJECTS:
        assert after[s] < 0.7 * before[s], (s, before[s], after[s])
    assert result.losses[-1] < result.losses[0]

    ids = torch.tensor([r.input_ids for r in rows[:4]])
    for k, s in enumerate(SUBJECTS):
        cfg = json.loads((tmp_path / s / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == sorted(TARGETS)
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / s)).eval()
        with torch.no_grad(), subject_batch(torch.full((4,), k), len(SUBJECTS)):
            ours = model(input_ids=ids).logits
        with torch.no_grad():
            theirs = peft_model(input_ids=ids).logits
            plain = base(input_ids=ids).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        assert (theirs - plain).abs().max() > 1e-2  # the adapter does something
