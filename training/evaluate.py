"""Evaluation: validation loss (mean token cross-entropy) and greedy task accuracy."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lorafold.training.data.jsonl import Example, collate

logger = logging.getLogger(__name__)


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, LM head) of a Llama-family causal LM, whose logits are exactly
    ``lm_head(body(...).last_hidden_state)``; None for anything else (full-logits path)."""
    body, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    cfg = getattr(model, "config", None)
    if body is None or not isinstance(head, nn.Linear) or cfg is None:
        return None
    if getattr(cfg, "model_type", None) not in ("llama", "mistral", "qwen2"):
        return None
    return body, head


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(sum of next-token CE over labeled tokens, number of labeled tokens)`` of one batch.

    The LM head runs only on the positions that carry a label: a prompt/completion task with a
    two-token answer needs 2 of ~40 rows of the [49152-wide] head, and no [B, L, vocab] logits
    tensor (400 MB at 8 x 256 tokens) is built, kept for backward, or copied to fp32."""
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    parts = _decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum")
        return loss, int(keep.sum())
    body, head = parts
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = head(hidden[:, :-1][keep]).float()  # [n_labeled, vocab]
    loss = nn.functional.cross_entropy(logits, labels[keep], reduction="sum")
    return loss, int(keep.sum())


@torch.no_grad()
def validation_loss_sums(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int,
                         device: torch.device, on_batch: Callable[[int], None] | None = None) -> tuple[float, int]:
    """``(sum of CE over labeled tokens, number of labeled tokens)`` over ``examples``.

    Sums, not a mean, so that data-parallel ranks can add up their shards.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        loss, n = token_loss_sum(model, batch)
        total += float(loss)  # host sync, once per eval batch
        count += n
        if on_batch is not None:
            on_batch(len(batch["input_ids"]))
    model.train(was_training)
    return total, count


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def is_correct(generated: str, target: str) -> bool:
    """The generation starts with the target, followed by nothing or a non-word character."""
    gen, want = _normalize(generated), _normalize(target)
    if not gen.startswith(want):
        return False
    rest = gen[len(want):]
    if not rest:
        return True
    # "12" must not match "123" or "12.5"; "positive" matches "positive." and "positive\n..."
    return not re.match(r"\w", rest[0]) and not (rest[0] == "." and rest[1:2].isdigit())


def accuracy_applies(examples: Sequence[Example], tokenizer: Any, max_target_tokens: int = 12) -> bool:
    """Verifiable task: every example is prompt/completion with a short completion."""
    return bool(examples) and all(
        e.target is not None and len(tokenizer(e.target, add_special_tokens=False)["input_ids"]) <= max_target_tokens
        for e in examples
    )


@torch.no_grad()
def greedy_correct(model: nn.Module, tokenizer: Any, examples: Sequence[Example], device: torch.device,
                   batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> tuple[int, int]:
    """``(correct, scored)``: greedy continuations of the prompts that match their completion.

    Counts, not a share, so that data-parallel ranks can add up their shards.
    """
    usable = [e for e in examples if e.target is not None]
    if not usable:
        return 0, 0
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct = 0
    for i in range(0, len(usable), batch_size):
        chunk = usable[i : i + batch_size]
        prompts = [e.input_ids[: e.prompt_len] for e in chunk]
        width = max(len(p) for p in prompts)
        # left padding so every row's next token is at the last position
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        n_new = max(len(e.labels) - e.prompt_len for e in chunk) + 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                             pad_token_id=pad)
        for e, row in zip(chunk, out[:, width:].tolist()):
            correct += is_correct(tokenizer.decode(row, skip_special_tokens=True), e.target)
        if on_batch is not None:
            on_batch(len(chunk))
    model.train(was_training)
    return correct, len(usable)


def greedy_accuracy(model: nn.Module, tokenizer: Any, examples: Sequence[Example], device: torch.device,
                    batch_size: int = 16) -> float | None:
    """Share of examples whose greedy continuation of the prompt matches the completion."""
    correct, scored = greedy_correct(model, tokenizer, examples, device, batch_size)
    return correct / scored if scored else None
