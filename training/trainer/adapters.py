"""Adapter setup for training: injection, initialization, export — LoRA (B A) or USV (U S Vᵀ)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafold.training.config import TrainConfig
from lorafold.training.data.jsonl import Example, collate

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class AdapterState:
    """What export and checkpoints need beyond the modules: residual-init factors, if any."""

    kind: str  # "lora" | "usv"
    initial: dict[str, Any] = field(default_factory=dict)  # name -> InitialFactors (PiSSA, LoRA-GA)


def _init_batches(examples: Sequence[Example], pad_id: int, cfg: TrainConfig, device: torch.device, n: int = 4):
    bs = cfg.batch_size
    return [{k: v.to(device) for k, v in collate(examples[i : i + bs], pad_id).items()}
            for i in range(0, min(len(examples), n * bs), bs)]


def _ga_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from lorafold.training.evaluate import token_loss_sum

    total, n = token_loss_sum(model, batch)
    return total / max(n, 1)


def inject_adapters(model: nn.Module, cfg: TrainConfig, examples: Sequence[Example], pad_id: int,
                    device: torch.device, fresh: bool = True) -> AdapterState:
    """Inject adapters per ``cfg`` and initialize them (``fresh=False``: leave for a checkpoint)."""
    if cfg.uses_usv:
        from lorafold.training.adapters.usv import inject_usv

        # s = alpha / rank keeps the LoRA scale convention; the USV scale never changes with rank.
        inject_usv(model, cfg.targets, r0=cfg.rank, r_min=1, r_max=cfg.rank, alpha=cfg.alpha / cfg.rank)
        return AdapterState("usv")
    from lorafold.training.adapters.lora import inject_lora

    inject_lora(model, cfg.targets, r=cfg.rank, alpha=cfg.alpha, init="default")
    state = AdapterState("lora")
    if not fresh or cfg.init == "default":
        return state
    model.to(device)
    if cfg.init == "pissa":
        from lorafold.training.init.pissa import init_pissa

        state.initial = init_pissa(model)
    elif cfg.init == "lora_ga":
        from lorafold.training.init.lora_ga import init_lora_ga

        state.initial = init_lora_ga(model, _init_batches(examples, pad_id, cfg, device), _ga_loss)
    elif cfg.init == "nystrom":
        from lorafold.training.init.nystrom import init_nystrom

        init_nystrom(model, seed=cfg.seed)
    elif cfg.init == "etf":
        from lorafold.training.init.etf import init_etf

        init_etf(model)
    logger.info("initialized adapters with %s", cfg.init)
    return state


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    from lorafold.training.adapters.lora import LoRALinear
    from lorafold.training.adapters.usv import USVLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, USVLinear))}


def gradient_leaves(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor whose ``.grad`` the optimizer reads: trainable parameters + USV gradient probes.

    The order is the same in every process, so data-parallel ranks can all-reduce the list.
    """
    from lorafold.training.adapters.usv import USVLinear

    leaves = [p for p in model.parameters() if p.requires_grad]
    for mod in model.modules():
        if isinstance(mod, USVLinear):
            leaves.extend(mod.probe_leaves())
    return leaves


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (parameters and buffers), base weights excluded, cloned to CPU."""
    out = {}
    for name, mod in adapter_modules(model).items():
        for key, value in mod.state_dict().items():
            if not key.startswith("base."):
                out[f"{name}.{key}"] = value.detach().to("cpu").clone()
    return out


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    mods = adapter_modules(model)
    for name, mod in mods.items():
        own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        missing = [k for k in mod.state_dict() if not k.startswith("base.") and k not in own]
        if missing:
            raise ValueError(f"checkpoint lacks {name}.{missing[0]}: it was written for other adapters/targets")
        mod.load_state_dict(own, strict=False)


def restore_residual(model: nn.Module, initial: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Re-apply a residual init (``W0 ← W0 − s B0 A0``) from checkpointed factors."""
    from lorafold.training.init.residual import set_residual

    out = {}
    for name, f in initial.items():
        out[name] = set_residual(model.get_submodule(name), f["B0"], f["A0"])
    return out


def export_adapter(model: nn.Module, state: AdapterState, folder: Path, base_name: str | None) -> Path:
    """Write the PEFT folder that reproduces the trained model on the ORIGINAL base weights."""
    if state.kind == "usv":
        from lorafold.training.export_usv import export_usv_model

        return export_usv_model(model, folder, base_model_name_or_path=base_name)
    if state.initial:
        from lorafold.training.init.residual import export_against_original

        return export_against_original(model, state.initial, folder, base_model_name_or_path=base_name)
    from lorafold.training.peft_export import export_lora_model

    return export_lora_model(model, folder, base_model_name_or_path=base_name)


# Optimizer keywords the trainer sizes to the run unless --optimizer-arg sets them: a fraction
# of its total steps (at least 1). Why: RefLoRA's published warm-up (100 steps) made every
# run of <= 100 steps plain AdamW; a tenth of the run keeps its purpose (let B leave 0 before
# the refactoring divides by B's Gram) at any length.
RUN_SIZED: dict[str, dict[str, float]] = {
    "reflora": {"warmup_steps": 0.1},
    "reflora_s": {"warmup_steps": 0.1},
}


def run_sized_args(name: str, total_steps: int) -> dict[str, int]:
    """The run-sized keywords of optimizer ``name`` for a run of ``total_steps``."""
    return {key: max(1, int(frac * total_steps)) for key, frac in RUN_SIZED.get(name, {}).items()}


def build_optimizer_for(model: nn.Module, cfg: TrainConfig, total_steps: int | None = None) -> torch.optim.Optimizer:
    from lorafold.training.optim.registry import build_optimizer

    overrides: dict[str, Any] = {}
    if total_steps is not None:
        overrides.update(run_sized_args(cfg.optimizer, total_steps))
    if cfg.lr is not None:
        overrides["lr"] = cfg.lr
    if cfg.weight_decay is not None:
        overrides["weight_decay"] = cfg.weight_decay
    overrides.update(cfg.optimizer_args)
    try:
        return build_optimizer(cfg.optimizer, model, **overrides)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ValueError(
            f"optimizer {cfg.optimizer!r} does not take {sorted(cfg.optimizer_args)} ({exc}); "
            "check --optimizer-arg against its class's keyword arguments"
        ) from None


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's base lr: linear warmup, then cosine / linear decay or constant."""
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
