"""``train(cfg)``: the loop itself. Bookkeeping (data order, schedule) is plain Python.

Data parallel under ``torchrun`` (see :mod:`lorafold.training.distributed`): every rank
draws the same global micro-batches and keeps ``batch[rank::world]``; the loss is divided by
the *global* label count and the gradients are summed over ranks, so N processes take the
same steps as one process on the same global batches. Evaluation is sharded the same way.
Rank 0 alone writes checkpoints, the adapter folder, the report, and registers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorafold.training import evaluate
from lorafold.training.config import TrainConfig
from lorafold.training.data.jsonl import Example, collate, load_splits
from lorafold.training.distributed import (DistContext, all_reduce_grads, all_reduce_sum, broadcast_params,
                                           init_from_env, shard, shutdown)
from lorafold.training.trainer import adapters, checkpoint
from lorafold.training.trainer.progress import EvalProgress, Progress

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TrainResult:
    out: Path
    model: nn.Module  # the trained model, adapters in place
    tokenizer: Any
    report: dict[str, Any]
    registered: dict[str, Any] | None = None


@dataclass(slots=True)
class History:
    losses: list[float] = field(default_factory=list)  # per optimizer step
    evals: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


class BatchOrder:
    """Micro-batch ``i`` of a run: a seeded permutation per epoch, so resuming needs only ``i``."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._perm: tuple[int, list[int]] | None = None

    def indices(self, i: int) -> list[int]:
        epoch, pos = divmod(i, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1][pos * self.bs : (pos + 1) * self.bs]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if not cfg.bf16:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--bf16: this GPU does not support bfloat16; drop the flag")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * math.ceil(n_train / cfg.batch_size) / cfg.grad_accum))


def run_eval(model: nn.Module, tok: Any, val: list[Example], cfg: TrainConfig, device: torch.device,
             step: int, with_accuracy: bool, ctx: DistContext | None = None) -> dict[str, Any]:
    """Validation loss (and greedy accuracy) on the first ``cfg.eval_samples`` rows (0: all)."""
    ctx = ctx or DistContext()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = val[: cfg.eval_samples] if cfg.eval_samples else val
    mine = shard(rows, ctx)
    what = "loss and accuracy" if with_accuracy else "loss"
    # each example is counted once for the loss and once more for the accuracy pass
    bar = EvalProgress(step, len(rows), len(mine) * (2 if with_accuracy else 1), what, cfg.progress,
                       silent=not ctx.is_main)
    t0 = time.perf_counter()
    try:
        total, count = evaluate.validation_loss_sums(model, mine, pad, cfg.batch_size, device, bar.update)
        sums = [total, count]
        if with_accuracy:
            sums += evaluate.greedy_correct(model, tok, mine, device, on_batch=bar.update)
    finally:
        bar.close()
    sums = all_reduce_sum(torch.tensor(sums, dtype=torch.float64, device=device), ctx).tolist()
    result: dict[str, Any] = {"step": step, "val_loss": sums[0] / max(sums[1], 1) if rows else None,
                              "val_rows": len(rows)}
    if with_accuracy:
        result["accuracy"] = sums[2] / sums[3] if sums[3] else None
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if ctx.is_main:
        logger.info("eval at step %d: %s", step, result)
    return result


def _payload(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, state: adapters.AdapterState,
             hist: History, cfg: TrainConfig) -> dict[str, Any]:
    initial = {n: {"A0": f.A0.cpu(), "B0": f.B0.cpu()} for n, f in state.initial.items()}
    return {"adapter": adapters.adapter_state_dict(model), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "initial": initial, "losses": list(hist.losses),
            "evals": list(hist.evals), "tokens": hist.tokens, "seconds": hist.seconds,
            "config": cfg.public_dict()}  # secrets redacted: checkpoints are shared with the run folder


def train_step(model: nn.Module, micro: list[dict[str, torch.Tensor] | None], cfg: TrainConfig,
               device: torch.device, ctx: DistContext | None = None) -> tuple[torch.Tensor, int]:
    """Forward/backward over this rank's micro-batches of one step (``None``: an empty shard).

    The loss is the token mean over the whole global step, so the gradients summed over ranks
    (:func:`all_reduce_grads`, done here) equal the one-process gradient. Returns the global
    mean loss and the global token count.
    """
    ctx = ctx or DistContext()
    local = [b for b in micro if b is not None]
    n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in local)
    n_labels = n_local
    if ctx.enabled:  # the global label count (a host sync; one small collective per step)
        n_labels = int(all_reduce_sum(torch.tensor(n_local, dtype=torch.int64, device=device), ctx))
    total = torch.zeros((), device=device)
    tokens = 0
    for batch in local:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(cfg, device):
            loss_sum, _ = evaluate.token_loss_sum(model, batch)
        (loss_sum / max(n_labels, 1)).backward()
        total += loss_sum.detach().float()
        tokens += int(batch["attention_mask"].sum())
    if ctx.enabled:
        all_reduce_grads(adapters.gradient_leaves(model), ctx)
        stats = all_reduce_sum(torch.stack([total.double(), torch.tensor(float(tokens), dtype=torch.float64,
                                                                          device=device)]), ctx)
        total, tokens = stats[0].float(), int(stats[1])
    return total / max(n_labels, 1), tokens


def _setup(cfg: TrainConfig, base: Any, device: torch.device):
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if base is None:
        from lorafold.server.models.loader import load_base_model

        logger.info("loading the base model (%s)", cfg.model or "the packaged SmolLM2-135M-Instruct")
        # the frozen base in bf16 straight onto a GPU (fp32 on the CPU); the adapters keep
        # fp32 master weights whatever the base's dtype (training.adapters)
        base = load_base_model(cfg.model, dtype="auto", device=device)
    model, tok = base.model, base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train_ex, val_ex = load_splits(cfg.data, tok, cfg.max_length, cfg.val, cfg.val_fraction, cfg.seed)
    logger.info("data: %d train / %d validation examples", len(train_ex), len(val_ex))
    ckpt = checkpoint.load_checkpoint(cfg.resume) if cfg.resume else None
    state = adapters.inject_adapters(model, cfg, train_ex, pad, device, fresh=ckpt is None)
    model.to(device)
    if ckpt is not None:
        if ckpt["initial"]:
            state.initial = adapters.restore_residual(model, ckpt["initial"])
        adapters.load_adapter_state(model, ckpt["adapter"])
    return base, model, tok, pad, train_ex, val_ex, state, ckpt


def train(cfg: TrainConfig, base: Any = None, ctx: DistContext | None = None) -> TrainResult:
    """Train per ``cfg``. ``base``: an object with ``.model`` and ``.tokenizer`` (default: load ``cfg.model``).

    ``ctx``: the data-parallel context; by default it is read from ``torchrun``'s environment
    (one process without it) and the process group is shut down on return.
    """
    own_ctx = ctx is None
    if ctx is None:
        # a long collective timeout: rank 0 may checkpoint or export while the others wait
        ctx = init_from_env(None if cfg.device == "auto" else cfg.device, timeout_s=1800)
    try:
        return _train(cfg, base, ctx)
    finally:
        if own_ctx:
            shutdown(ctx)


def _train(cfg: TrainConfig, base: Any, ctx: DistContext) -> TrainResult:
    from lorafold.training import register, report

    device = ctx.device if ctx.enabled else pick_device(cfg.device)
    out = Path(cfg.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    base, model, tok, pad, train_ex, val_ex, state, ckpt = _setup(cfg, base, device)
    # identical start on every rank whatever each rank's init did (seeded, so normally a no-op)
    broadcast_params([p for p in model.parameters() if p.requires_grad], ctx)
    steps = total_steps(cfg, len(train_ex))
    opt = adapters.build_optimizer_for(model, cfg, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, adapters.lr_lambda(cfg, steps))
    hist, start = History(), 0
    with_acc = cfg.accuracy == "on" or (cfg.accuracy == "auto" and evaluate.accuracy_applies(val_ex, tok))
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]
        hist = History(ckpt["losses"], ckpt["evals"], ckpt["tokens"], ckpt["seconds"])
    else:
        hist.evals.append(run_eval(model, tok, val_ex, cfg, device, 0, with_acc, ctx))
    needs_closure = bool(getattr(opt, "needs_closure", False))
    if needs_closure and ctx.enabled:
        raise ValueError(f"--optimizer {cfg.optimizer} runs a second pass with substituted factors each step, which "
                         "data-parallel training does not synchronise; run it in one process (or pick geolora, "
                         "its one-pass variant)")
    order = BatchOrder(len(train_ex), cfg.batch_size, cfg.seed)
    if ctx.enabled and ctx.is_main:
        logger.info("data parallel: %d ranks (%s) share every global batch of %d rows",
                    ctx.world_size, ctx.backend, cfg.batch_size)
    model.train()
    progress = Progress(steps, start, cfg.progress, silent=not ctx.is_main)
    for step in range(start, steps):
        t0 = time.perf_counter()
        micro = []
        for k in range(cfg.grad_accum):
            mine = shard(order.indices(step * cfg.grad_accum + k), ctx)
            micro.append(collate([train_ex[j] for j in mine], pad) if mine else None)
        loss, tokens = train_step(model, micro, cfg, device, ctx)
        if needs_closure:  # DLRT: its S-step needs a second pass over the same batch
            opt.step(lambda: train_step(model, micro, cfg, device, ctx)[0])
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        hist.losses.append(float(loss))  # host sync: one per optimizer step
        hist.tokens += tokens
        hist.seconds += time.perf_counter() - t0
        progress.update(step + 1, hist.losses[-1], tokens / max(time.perf_counter() - t0, 1e-9))
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
            hist.evals.append(run_eval(model, tok, val_ex, cfg, device, done, with_acc, ctx))
            model.train()
        if ctx.is_main and cfg.save_every and done % cfg.save_every == 0 and done < steps:
            checkpoint.save_checkpoint(out, done, _payload(model, opt, sched, state, hist, cfg))
    progress.close()
    model.eval()
    hist.evals.append(run_eval(model, tok, val_ex, cfg, device, steps, with_acc, ctx))
    rep = report.build_report(cfg, hist, len(train_ex), len(val_ex), steps, str(device))
    rep["world_size"] = ctx.world_size
    result = TrainResult(out, model, tok, rep)
    if ctx.is_main:
        checkpoint.save_checkpoint(out, steps, _payload(model, opt, sched, state, hist, cfg))
        base_name = str(getattr(base, "folder", None) or cfg.model or "") or None
        adapters.export_adapter(model, state, out, base_name)
        report.write_report(out, rep, hist)
        if cfg.register:
            result.registered = register.register_adapter(cfg.register, out, cfg.name or out.name, cfg.admin_key)
    if ctx.enabled:
        dist.barrier()  # every rank returns once the adapter folder is complete
    return result
