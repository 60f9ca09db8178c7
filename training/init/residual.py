"""Residual-base inits (PiSSA, LoRA-GA) and their export against the ORIGINAL base weight.

These inits move part of ``W0`` into the adapter: the layer computes with
``W_res = W0 − s B0 A0`` plus ``s B A``. A server loads the original ``W0``, so the adapter
to ship is ``ΔW = W_res + s B A − W0 = s (B A − B0 A0) = s [B | B0] [A ; −A0]``: a rank-2r
LoRA with the same scale s (``alpha' = s · 2r``, or ``s · √(2r)`` with rsLoRA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear
from lorafold.training.peft_export import peft_key, save_peft_adapter


@dataclass(frozen=True, slots=True, eq=False)
class InitialFactors:
    """``B0 [m, r]``, ``A0 [r, n]`` moved out of ``W0`` at init (kept for export)."""

    A0: torch.Tensor
    B0: torch.Tensor


@torch.no_grad()
def set_residual(layer: LoRALinear, b0: torch.Tensor, a0: torch.Tensor) -> InitialFactors:
    """Write ``B = b0``, ``A = a0`` and ``W0 ← W0 − s b0 a0`` (computed in fp32 at least)."""
    w = layer.base.weight
    work = torch.promote_types(w.dtype, torch.float32)
    w.copy_((w.to(work) - layer.scaling * (b0.to(work) @ a0.to(work))).to(w.dtype))
    layer.lora_B.copy_(b0)
    layer.lora_A.copy_(a0)
    return InitialFactors(A0=layer.lora_A.detach().clone(), B0=layer.lora_B.detach().clone())


def export_against_original(
    model: nn.Module,
    initial: dict[str, InitialFactors],
    folder: str | Path,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the rank-2r PEFT adapter ``s [B | B0] [A ; −A0]`` for every module in ``initial``."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    rslora = set()
    for name, init in initial.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALinear):
            raise TypeError(f"{name!r} is not a LoRALinear")
        tensors[peft_key(name, "A")] = torch.cat([layer.lora_A.detach(), -init.A0], dim=0)
        tensors[peft_key(name, "B")] = torch.cat([layer.lora_B.detach(), init.B0], dim=1)
        r2 = 2 * layer.r
        ranks[name] = r2
        alphas[name] = layer.scaling * (math.sqrt(r2) if layer.rslora else r2)
        rslora.add(layer.rslora)
    if len(rslora) != 1:
        raise ValueError("modules mix rsLoRA and plain scaling; PEFT stores one use_rslora flag")
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha0 = next(alphas[n] for n in ranks if ranks[n] == r0)
    config = {
        "r": r0,
        "lora_alpha": alpha0,
        "use_rslora": rslora.pop(),
        "rank_pattern": {n: r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha0 or ranks[n] != r0},
        "base_model_name_or_path": base_model_name_or_path,
    }
    return save_peft_adapter(folder, tensors, config)
