"""PEFT's default LoRA init: ``A ~ kaiming_uniform(a=√5)`` [r, n], ``B = 0`` [m, r] (ΔW = 0)."""

from __future__ import annotations

from torch import nn

from lorafold.training.adapters.lora import LoRALinear


def init_default(model: nn.Module) -> int:
    """Re-initialize every LoRALinear of ``model`` the PEFT way; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.reset_default()
    return len(layers)
