"""LoRA-Pro (Wang et al., ICLR 2025): follow full fine-tuning's Adam step, projected to LoRA.

Per layer (``A: [r, n]``, ``B: [m, r]``, scale ``s``; r×r algebra in float64, batched):

1. ``P_B⁻¹ = pinv(BᵀB + δI)``, ``P_A⁻¹ = pinv(AAᵀ + δI)`` (δ = 1e-8).
2. ``g̃_A = s⁻² P_B⁻¹ g_A`` [r, n], ``g̃_B = s⁻² (I − B P_B⁻¹ Bᵀ) g_B P_A⁻¹`` [m, r].
3. Equivalent gradient ``ĝ = s (B g̃_A + g̃_B A)`` [m, n] — equals ``P_T(G)``.
4. Full-size Adam on ĝ: moments ``M, V`` [m, n] fp32, ``D = M̂ / (√V̂ + ε)``.
5. ``g_A' = s Bᵀ D``, ``g_B' = s D Aᵀ``.
6. Sylvester ``(BᵀB) X + X (AAᵀ) = −s⁻² P_B⁻¹ g_A' Aᵀ`` (X [r, r], eigh of both SPD sides).
7. ``Δ_A = s⁻² P_B⁻¹ g_A' + X A``, ``Δ_B = s⁻² (I − B P_B⁻¹ Bᵀ) g_B' P_A⁻¹ − B X``;
   ``A ← A − η Δ_A``, ``B ← B − η Δ_B``, then decoupled decay.

The product's first-order change ``s (B Δ_A + Δ_B A) = P_T(D)`` does not depend on X; X
only selects the minimum-norm factor pair. It is gauge invariant; the full step is gauge
invariant for orthogonal gauges, and for every gauge with ``min_norm=False`` (X = 0).

MEMORY: the Adam variant keeps two fp32 m×n moments PER LAYER — full fine-tuning's optimizer
memory (8·m·n bytes per layer), not LoRA-level memory — plus a transient m×n ĝ per layer
during the step. The SGD variant (``adam=False``: D = ĝ) keeps no state and never forms an
m×n matrix (``Bᵀĝ`` and ``ĝAᵀ`` are taken from the factored form), so it stays cheap.
The true scale ``s`` of each layer is used (the authors' code hard-codes s = 2).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRAPair
from lorafold.training.optim._base import ActivePair, PairOptimizer
from lorafold.training.optim._common import add_damping, group_by_rank, spd_inverse, stack_grams, sylvester_spd


@dataclass(slots=True)
class ProFactors:
    """Per-layer pieces of the equivalent gradient ``ĝ = s (B g̃_A + g̃_B A)``."""

    inv_b: torch.Tensor  # P_B⁻¹ [r, r]
    inv_a: torch.Tensor  # P_A⁻¹ [r, r]
    gram_b: torch.Tensor  # BᵀB + δI [r, r], float64
    gram_a: torch.Tensor  # AAᵀ + δI [r, r], float64


def pro_factors(pairs: Sequence[ActivePair], damping: float) -> list[ProFactors]:
    """Pseudo-inverses of the damped Grams, batched per rank."""
    out: list[ProFactors] = [None] * len(pairs)  # type: ignore[list-item]
    for idx in group_by_rank([p.rank for p in pairs]).values():
        sub = [pairs[i] for i in idx]
        gb, ga = stack_grams([p.B for p in sub], "cols"), stack_grams([p.A for p in sub], "rows")
        inv_b, inv_a = spd_inverse(gb, damping, "pinv"), spd_inverse(ga, damping, "pinv")
        gb, ga = add_damping(gb, damping), add_damping(ga, damping)
        for j, i in enumerate(idx):
            out[i] = ProFactors(inv_b[j], inv_a[j], gb[j], ga[j])
    return out


def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype)


def reduced_grads(p: ActivePair, f: ProFactors, ga: torch.Tensor, gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g̃_A [r, n], g̃_B [m, r])`` for factor gradients ``(ga, gb)`` (steps 2 / 7).

    ``(I − B P_B⁻¹ Bᵀ) g_B P_A⁻¹`` is formed as ``g_B P_A⁻¹ − B (P_B⁻¹ (Bᵀ g_B) P_A⁻¹)``: no m×m.
    """
    s2 = p.scale**-2
    inv_b, inv_a = _cast(f.inv_b, ga), _cast(f.inv_a, gb)
    gt_a = s2 * (inv_b @ ga)
    gb_inv = gb @ inv_a
    gt_b = s2 * (gb_inv - p.B @ (inv_b @ (p.B.T @ gb_inv)))
    return gt_a, gt_b


def equivalent_gradient(p: ActivePair, f: ProFactors) -> torch.Tensor:
    """``ĝ = s (B g̃_A + g̃_B A)``: [m, n] (= ``P_T(G)`` up to the damping)."""
    gt_a, gt_b = reduced_grads(p, f, p.gA, p.gB)
    return p.scale * (p.B @ gt_a + gt_b @ p.A)


def min_norm_x(pairs: Sequence[ActivePair], factors: Sequence[ProFactors], gas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Step 6 for every layer: Sylvester solves batched per rank (float64 [r, r] each)."""
    xs: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    for idx in group_by_rank([p.rank for p in pairs]).values():
        rhs = torch.stack(
            [-(pairs[i].scale**-2) * (factors[i].inv_b @ (gas[i] @ pairs[i].A.T).double()) for i in idx]
        )
        x = sylvester_spd(torch.stack([factors[i].gram_b for i in idx]), torch.stack([factors[i].gram_a for i in idx]), rhs)
        for j, i in enumerate(idx):
            xs[i] = x[j]
    return xs


def lora_pro_deltas(
    pairs: Sequence[ActivePair],
    factors: Sequence[ProFactors],
    gas: Sequence[torch.Tensor],
    gbs: Sequence[torch.Tensor],
    min_norm: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Step 7: ``(Δ_A list, Δ_B list)`` from the projected-back gradients ``g_A', g_B'``."""
    xs = min_norm_x(pairs, factors, gas) if min_norm else [None] * len(pairs)
    deltas_a, deltas_b = [], []
    for p, f, ga, gb, x in zip(pairs, factors, gas, gbs, xs, strict=True):
        da, db = reduced_grads(p, f, ga, gb)
        if x is not None:
            x = x.to(p.A.dtype)
            da, db = da + x @ p.A, db - p.B @ x
        deltas_a.append(da)
        deltas_b.append(db)
    return deltas_a, deltas_b


class LoRAPro(PairOptimizer):
    """LoRA-Pro with full-size Adam (``adam=True``, m×n state) or its SGD variant (``adam=False``)."""

    def __init__(
        self,
        pairs: Sequence[LoRAPair],
        lr: float = 2e-5,
        adam: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        damping: float = 1e-8,
        min_norm: bool = True,
        extra_params: Iterable[nn.Parameter] = (),
    ) -> None:
        defaults: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay, "damping": damping, "min_norm": min_norm}
        if adam:
            defaults.update(betas=tuple(betas), eps=eps)
        super().__init__(pairs, defaults, extra_params)

    def _projected_grads(self, group: dict[str, Any], pairs: list[ActivePair], factors: list[ProFactors]):
        """Steps 3-5: ``(g_A', g_B')`` per layer."""
        gas, gbs = [], []
        adam = "betas" in group
        for p, f in zip(pairs, factors, strict=True):
            if adam:
                d = self._full_adam_direction(group, p, equivalent_gradient(p, f))
                gas.append(p.scale * (p.B.T @ d).to(p.A.dtype))
                gbs.append(p.scale * (d @ p.A.T).to(p.B.dtype))
            else:
                # D = ĝ = s (B g̃_A + g̃_B A): Bᵀ D and D Aᵀ from the factors, no m×n matrix.
                gt_a, gt_b = reduced_grads(p, f, p.gA, p.gB)
                s2 = p.scale**2
                gas.append(s2 * ((p.B.T @ p.B) @ gt_a + (p.B.T @ gt_b) @ p.A))
                gbs.append(s2 * (p.B @ (gt_a @ p.A.T) + gt_b @ (p.A @ p.A.T)))
        return gas, gbs

    def _full_adam_direction(self, group: dict[str, Any], p: ActivePair, g_hat: torch.Tensor) -> torch.Tensor:
        """Step 4: ``D = M̂ / (√V̂ + ε)`` with fp32 m×n moments stored in ``state[A]``."""
        state = self.state[p.A]
        g32 = g_hat.to(torch.promote_types(g_hat.dtype, torch.float32))
        if "full_exp_avg" not in state:
            state["full_step"] = 0
            state["full_exp_avg"] = torch.zeros_like(g32)
            state["full_exp_avg_sq"] = torch.zeros_like(g32)
        beta1, beta2 = group["betas"]
        state["full_step"] += 1
        t = state["full_step"]
        m, v = state["full_exp_avg"], state["full_exp_avg_sq"]
        m.lerp_(g32, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        denom = (v / (1.0 - beta2**t)).sqrt_().add_(group["eps"])
        return (m / (1.0 - beta1**t)).div_(denom).to(p.A.dtype)

    def _step_pairs(self, group: dict[str, Any], pairs: list[ActivePair]) -> None:
        factors = pro_factors(pairs, group["damping"])
        gas, gbs = self._projected_grads(group, pairs, factors)
        deltas_a, deltas_b = lora_pro_deltas(pairs, factors, gas, gbs, group["min_norm"])
        lr, wd = group["lr"], group["weight_decay"]
        for p, da, db in zip(pairs, deltas_a, deltas_b, strict=True):
            p.A.add_(da, alpha=-lr)
            p.B.add_(db, alpha=-lr)
            if wd:
                p.A.mul_(1.0 - lr * wd)
                p.B.mul_(1.0 - lr * wd)
