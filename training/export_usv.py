"""Export USV adapters (``ΔW = s · U S Vᵀ``) as a standard PEFT LoRA folder, for serving.

Per module, in float64 (spec §10)::

    S = P diag(σ) Qᵀ          (SVD; S is diagonal after a truncation, not after coefficient steps)
    U ← U P,  V ← V Q
    lora_B = B = √s · U diag(√σ)    [m, r]      lora_A = A = √s · diag(√σ) Vᵀ    [r, n]
    ⇒ B A = s · U S Vᵀ = ΔW,  BᵀB = A Aᵀ = s · diag(σ)  (balanced)

The scale is folded into the factors, so PEFT must apply scale 1: the config sets
``lora_alpha = r`` for the most common rank and writes every other module's rank to
``rank_pattern`` with ``alpha_pattern[name] = its rank`` (PEFT scale ``alpha / r = 1``).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lorafold.training.adapters.usv import USVLinear, usv_modules
from lorafold.training.peft_export import peft_key, save_peft_adapter

logger = logging.getLogger(__name__)


def balanced_factors(layer: USVLinear, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A [r, n], lora_B [m, r])`` with ``lora_B @ lora_A = s · U S Vᵀ`` and ``BᵀB = AAᵀ``."""
    U, S, V = (t.detach().to(torch.float64) for t in layer.factors())
    P, sigma, Qh = torch.linalg.svd(S)
    root = (sigma.clamp_min(0) * layer.scale).sqrt()
    B = (U @ P) * root
    A = root[:, None] * (Qh @ V.T)
    out = dtype or layer.U.dtype
    return A.to(out).contiguous(), B.to(out).contiguous()


def export_usv_model(
    model: nn.Module,
    folder: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write every ``USVLinear`` of ``model`` as one PEFT LoRA adapter in ``folder``.

    Module names are the paths inside ``model`` (``inject_usv`` keeps the base's names), so the
    folder loads with ``PeftModel.from_pretrained(base, folder)`` on the un-adapted base.
    """
    modules = usv_modules(model)
    if not modules:
        raise ValueError("model has no USVLinear modules; call inject_usv(model, ...) first")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in modules.items():
        A, B = balanced_factors(layer, dtype)
        tensors[peft_key(name, "A")], tensors[peft_key(name, "B")] = A, B
        ranks[name] = layer.rank
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    differing = {name: r for name, r in ranks.items() if r != r0}
    config = {
        "r": r0,
        "lora_alpha": r0,
        "use_rslora": False,
        "rank_pattern": differing,
        "alpha_pattern": dict(differing),
        "target_modules": sorted(modules),
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type,
    }
    logger.info("exporting %d USV adapters, ranks %s", len(modules), dict(Counter(ranks.values())))
    return save_peft_adapter(folder, tensors, config)
