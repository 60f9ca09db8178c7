"""LoRA-GA init (Wang et al., 2024): align the first LoRA step with full fine-tuning's gradient.

``Ĝ`` = average of ``∂L/∂W0`` [m, n] over a few batches; ``svd_lowrank(Ĝ, q = 4r)``;
``B = U[:, r:2r]`` [m, r], ``A = V[:, :r]ᵀ`` [r, n], both times the stable scale
``m^{1/4} / √γ`` (γ = 16); the base becomes ``W_res = W0 − s B A``.
Export against the original W0 as PiSSA does (rank 2r, :mod:`.residual`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear
from lorafold.training.init.residual import InitialFactors, set_residual

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def average_weight_grads(model: nn.Module, batches: Iterable[Any], loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """``{LoRALinear name: mean over batches of ∂L/∂W0}`` (fp32). Base weights get
    ``requires_grad`` only for the duration of this call."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise ValueError("no LoRALinear modules; call inject_lora(model, ...) first")
    sums = {n: torch.zeros_like(m.base.weight, dtype=torch.float32) for n, m in layers.items()}
    count = 0
    try:
        for m in layers.values():
            m.base.weight.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for n, m in layers.items():
                sums[n] += m.base.weight.grad.float()
            count += 1
    finally:
        for m in layers.values():
            m.base.weight.requires_grad_(False)
            m.base.weight.grad = None
        model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("batches was empty: LoRA-GA needs at least one batch")
    return {n: s / count for n, s in sums.items()}


def lora_ga_factors(grad: torch.Tensor, r: int, gamma: float = 16.0, niter: int = 4, seed: int = 0):
    """``(B [m, r], A [r, n])`` from an averaged gradient ``grad`` [m, n]."""
    q = min(4 * r, min(grad.shape))
    if q < 2 * r:
        raise ValueError(f"LoRA-GA needs min(m, n) >= 2r; got shape {tuple(grad.shape)} and r={r}")
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global RNG
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(grad.float(), q=q, niter=niter)
    stable = grad.shape[0] ** 0.25 / math.sqrt(gamma)
    return u[:, r : 2 * r] * stable, v[:, :r].T * stable


@torch.no_grad()
def init_lora_ga(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, gamma: float = 16.0, niter: int = 4
) -> dict[str, InitialFactors]:
    """LoRA-GA on every LoRALinear; returns ``{name: InitialFactors}`` for the export."""
    with torch.enable_grad():
        grads = average_weight_grads(model, batches, loss_fn)
    initial = {}
    for i, (name, grad) in enumerate(grads.items()):
        layer = model.get_submodule(name)
        b, a = lora_ga_factors(grad, layer.r, gamma, niter, seed=i)
        initial[name] = set_residual(layer, b.to(layer.lora_B.dtype), a.to(layer.lora_A.dtype))
    return initial
