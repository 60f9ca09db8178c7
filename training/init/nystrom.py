"""Nyström init: ``X0 = A* Φ`` (Φ ∈ R^{n×r} Gaussian), ``Y0 = 0`` — i.e. ``B = A* Φ``, ``A = 0``.

With ``r = rank(A*)`` the column space of B is exactly that of A*, so one ScaledGD step
(η = 1, pseudo-inverse) from here solves the factorization test bed:
``A⁺ = (BᵀB)⁻¹ Bᵀ A*`` ⇒ ``B A⁺ = P_B A* = A*``.
For a real layer A* is unknown: sketch the pre-trained weight (NoRA-style, default) or a
first gradient (pass it as ``source``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear


def nystrom_factors(
    target: torch.Tensor, r: int, seed: int = 0, phi_std: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B = target Φ [m, r], A = 0 [r, n])`` with ``Φ ~ N(0, phi_std²)`` [n, r]."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    phi = phi_std * torch.randn(target.shape[1], r, generator=gen, dtype=target.dtype).to(target.device)
    return target @ phi, torch.zeros(r, target.shape[1], dtype=target.dtype, device=target.device)


@torch.no_grad()
def init_nystrom(model: nn.Module, sources: dict[str, torch.Tensor] | None = None, seed: int = 0) -> int:
    """``B = S Φ / √n``, ``A = 0`` for every LoRALinear, ``S`` = ``sources[name]`` or the
    layer's base weight. Φ / √n keeps B at the scale of S's rows. Returns how many layers."""
    count = 0
    for i, (name, layer) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)):
        src = (sources or {}).get(name, layer.base.weight).float()
        b, a = nystrom_factors(src, layer.r, seed=seed + i, phi_std=1.0 / math.sqrt(src.shape[1]))
        layer.lora_B.copy_(b)
        layer.lora_A.copy_(a)
        count += 1
    return count
