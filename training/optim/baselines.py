"""Baselines: plain AdamW and plain SGD over the trainable parameters, and LoRA+ (``η_B = λ η_A``).

Both return a stock ``torch.optim.AdamW``; LoRA+ only splits the parameters into groups:
every pair's ``A`` at ``lr``, every pair's ``B`` at ``ratio · lr`` (λ = 16 by default; the
paper uses 16-80), other trainable parameters at ``lr``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRAPair


def build_adamw(
    params: Iterable[nn.Parameter],
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """Stock AdamW; reference LoRA baseline lr 2e-4 (Zhang & Pilanci's GPT-2 setting).

    ``foreach`` / ``fused`` pick torch's implementation (default: torch's choice, which on CPU
    is the per-parameter for-loop)."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters; did you call inject_lora(model, ...)?")
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused
    )


def build_sgd(
    params: Iterable[nn.Parameter], lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.SGD:
    """Stock SGD on the LoRA factors: the plain-gradient control for the geometric SGD forms
    (ScaledGD, LoRA-Pro SGD, RefLoRA-SGD). Default lr 1e-2: the best of the test bed's
    grid; a real task sweeps it."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters; did you call inject_lora(model, ...)?")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def build_loraplus(
    pairs: Sequence[LoRAPair],
    extra_params: Iterable[nn.Parameter] = (),
    lr: float = 2e-4,
    ratio: float = 16.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    foreach: bool | None = None,
) -> torch.optim.AdamW:
    """LoRA+: AdamW with ``B``'s learning rate ``ratio`` times ``A``'s."""
    if not pairs:
        raise ValueError("LoRA+ needs LoRA pairs; call inject_lora(model, ...) first")
    groups = [
        {"params": [p.A for p in pairs], "lr": lr},
        {"params": [p.B for p in pairs], "lr": ratio * lr},
    ]
    extra = list(extra_params)
    if extra:
        groups.append({"params": extra, "lr": lr})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
