"""Joint training of per-subject adapters on mixed-subject batches, and per-subject PEFT export.

One step: draw a global batch (seeded, same on every rank), keep this rank's shard, forward it
with each row routed to its subject's adapter (:func:`subject_batch`), normalise the summed
loss by the *global* count, backward, all-reduce gradients (``None`` kept where no rank saw
the subject), step. Subjects absent from the global batch keep ``grad = None`` and are left
untouched by AdamW and the registry's pair optimizers.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafold.training.data.jsonl import IGNORE, collate
from lorafold.training.distributed import DistContext, all_reduce_grads, all_reduce_sum, broadcast_params, shard
from lorafold.training.optim.registry import build_optimizer
from lorafold.training.peft_export import peft_key, save_peft_adapter
from lorafold.training.subject.layer import inject_subject_lora, subject_batch, subject_layers

logger = logging.getLogger(__name__)

#: ``loss_fn(model, rows, device) -> (summed loss, number of loss terms)``; called inside the
#: routing context, so it only runs the model on its rows.
LossFn = Callable[[nn.Module, Sequence[Any], torch.device], tuple[torch.Tensor, int]]


@dataclass(slots=True)
class SubjectRow:
    """One tokenized example of one subject: ``input_ids``/``labels`` [T] (labels -100 = no loss)."""

    input_ids: list[int]
    labels: list[int]
    subject: str


@dataclass(slots=True)
class SubjectTrainResult:
    losses: list[float]  # global mean loss per step
    subject_losses: dict[str, list[float]]  # per-step mean loss of each subject present
    seconds: float
    subjects: list[str]
    folders: dict[str, Path] = field(default_factory=dict)


def global_batches(n_rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Index lists of ``steps`` global batches: seeded epoch permutations, identical on all ranks."""
    rng, order, out = random.Random(seed), [], []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(n_rows))
            rng.shuffle(perm)
            order += perm
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def pad_rows(rows: Sequence[SubjectRow], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels`` and ``attention_mask`` [B, T] on ``device``."""
    return {k: v.to(device) for k, v in collate(rows, pad_id).items()}


def token_losses(model: nn.Module, rows: Sequence[SubjectRow], device: torch.device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token loss [B] and per-row label counts [B] (shifted, -100 ignored)."""
    batch = pad_rows(rows, pad_id, device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    return loss.sum(1), (labels != IGNORE).sum(1)


def causal_lm_loss(pad_id: int = 0) -> LossFn:
    def loss_fn(model: nn.Module, rows: Sequence[SubjectRow], device: torch.device) -> tuple[torch.Tensor, int]:
        sums, counts = token_losses(model, rows, device, pad_id)
        return sums.sum(), int(counts.sum())

    return loss_fn


def _subject_ids(rows: Sequence[Any], index: dict[str, int]) -> torch.Tensor:
    return torch.tensor([index[r.subject] if r.subject is not None else -1 for r in rows], dtype=torch.long)


def joint_train(
    model: nn.Module,
    rows: Sequence[Any],
    subjects: Sequence[str],
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
    ctx: DistContext | None = None,
    max_grad_norm: float | None = None,
    log_every: int = 10,
) -> SubjectTrainResult:
    """Train on mixed-subject global batches; rows need a ``.subject`` (a name, or None = base)."""
    ctx = ctx or DistContext()
    index = {s: i for i, s in enumerate(subjects)}
    params = [p for p in model.parameters() if p.requires_grad]
    broadcast_params(params, ctx)
    losses: list[float] = []
    per_subject: dict[str, list[float]] = {s: [] for s in subjects}
    start = time.perf_counter()
    model.train()
    for step, idx in enumerate(global_batches(len(rows), batch_size, steps, seed)):
        global_rows = [rows[i] for i in idx]
        local = shard(global_rows, ctx)
        counts = torch.tensor([sum(1 for r in global_rows if r.subject == s) for s in subjects])
        optimizer.zero_grad(set_to_none=True)
        loss_val = torch.zeros((), dtype=torch.float64)
        if local:
            with subject_batch(_subject_ids(local, index), len(subjects)):
                total, n = loss_fn(model, local, ctx.device)
            denom = all_reduce_sum(torch.tensor(float(n), device=ctx.device), ctx)
            (total / denom).backward()
            loss_val = (total.detach() / denom).double().cpu()
        else:
            all_reduce_sum(torch.tensor(0.0, device=ctx.device), ctx)  # keep collectives in step
        all_reduce_grads(params, ctx)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
        optimizer.step()
        losses.append(float(all_reduce_sum(loss_val.to(ctx.device), ctx)))
        for s, c in zip(subjects, counts.tolist()):
            if c:
                per_subject[s].append(losses[-1])
        if ctx.is_main and (step % log_every == 0 or step == steps - 1):
            logger.info("step %d/%d loss %.4f", step + 1, steps, losses[-1])
    model.eval()
    return SubjectTrainResult(losses, per_subject, time.perf_counter() - start, list(subjects))


@torch.no_grad()
def subject_eval_losses(
    model: nn.Module,
    rows: Sequence[SubjectRow],
    subjects: Sequence[str],
    batch_size: int = 16,
    as_subject: str | None = None,
    device: torch.device | str = "cpu",
    pad_id: int = 0,
) -> dict[str, float]:
    """Mean token loss per data subject; ``as_subject`` routes every row to that one adapter."""
    index = {s: i for i, s in enumerate(subjects)}
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for k in range(0, len(rows), batch_size):
        chunk = rows[k : k + batch_size]
        ids = torch.full((len(chunk),), index[as_subject]) if as_subject else _subject_ids(chunk, index)
        with subject_batch(ids, len(subjects)):
            s, n = token_losses(model, chunk, torch.device(device), pad_id)
        for r, ls, c in zip(chunk, s.tolist(), n.tolist()):
            sums[r.subject] = sums.get(r.subject, 0.0) + ls
            counts[r.subject] = counts.get(r.subject, 0) + c
    return {s: sums[s] / max(counts[s], 1) for s in sums}


def subject_tensors(model: nn.Module, subject: str) -> dict[str, torch.Tensor]:
    """PEFT tensors of one subject: ``lora_A = A_s [r, n]``, ``lora_B = B_s [m, r]``."""
    out = {}
    for name, layer in subject_layers(model).items():
        ad = layer.adapters[subject]
        out[peft_key(name, "A")] = ad.lora_A.detach()
        out[peft_key(name, "B")] = ad.lora_B.detach()
    return out


def export_subjects(
    model: nn.Module, out_dir: str | Path, subjects: Sequence[str] | None = None, base_model_name_or_path: str | None = None,
    ctx: DistContext | None = None,
) -> dict[str, Path]:
    """One PEFT folder per subject under ``out_dir/<subject>``; written by rank 0 only."""
    layers = subject_layers(model)
    if not layers:
        raise ValueError("model has no SubjectLoRALinear modules; call inject_subject_lora first")
    first = next(iter(layers.values()))
    subjects = list(subjects or first.subjects)
    folders = {s: Path(out_dir) / s for s in subjects}
    if ctx is not None and not ctx.is_main:
        return folders
    config = {
        "r": first.r, "lora_alpha": first.alpha, "use_rslora": first.rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
        "base_model_name_or_path": base_model_name_or_path,
    }
    for s in subjects:
        save_peft_adapter(folders[s], subject_tensors(model, s), config)
    return folders


def train_subjects(
    model: nn.Module,
    rows: Sequence[SubjectRow],
    subjects: Sequence[str],
    optimizer_name: str = "adamw",
    rank: int = 8,
    *,
    alpha: float | None = None,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    steps: int = 100,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    pad_id: int = 0,
    optimizer_overrides: dict[str, Any] | None = None,
    max_grad_norm: float | None = 1.0,
    out_dir: str | Path | None = None,
    ctx: DistContext | None = None,
) -> SubjectTrainResult:
    """Inject per-subject adapters (rank ``rank``, alpha defaults to ``2·rank``) into a causal
    LM, train them jointly with optimizer ``optimizer_name`` from the registry, and export one
    PEFT folder per subject under ``out_dir`` when given."""
    alpha = float(2 * rank if alpha is None else alpha)
    torch.manual_seed(seed)  # A_s init; identical on every rank (and broadcast anyway)
    inject_subject_lora(model, subjects, targets=targets, r=rank, alpha=alpha)
    opt = build_optimizer(optimizer_name, model, lr=lr, **(optimizer_overrides or {}))
    result = joint_train(model, rows, subjects, opt, causal_lm_loss(pad_id), steps=steps, batch_size=batch_size,
                         seed=seed, ctx=ctx, max_grad_norm=max_grad_norm)
    if out_dir is not None:
        result.folders = export_subjects(model, out_dir, subjects, ctx=ctx)
    return result
