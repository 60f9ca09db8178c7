"""`token_loss_sum` (LM head on labeled positions only) equals the full-logits cross-entropy."""

from __future__ import annotations

import torch
from torch import nn

from lorafold.training.adapters.lora import inject_lora
from lorafold.training.evaluate import token_loss_sum
from tests.conftest import build_tiny_llama


def reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")


def test_labeled_rows_only_gives_the_full_logits_loss_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_tiny_llama(seed=1)
    inject_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :5] = -100  # prompt tokens carry no label
    labels[2, 8:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    loss, n = token_loss_sum(model, batch)
    assert n == int((labels[:, 1:] != -100).sum()) == 2 * 6 + 3
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    ref = reference(model, batch)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)
