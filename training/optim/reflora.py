"""RefLoRA and RefLoRA-S (Zhang, Li, Giannakis, NeurIPS 2025).

With ``P_B = BᵀB`` and ``P_A = AAᵀ`` (both [r, r]) the refactoring matrix is the geometric
mean ``S = P_B⁻¹ # P_A = P_B^{-1/2} (P_B^{1/2} P_A P_B^{1/2})^{1/2} P_B^{-1/2}``, the unique
SPD solution of ``S P_B S = P_A``. The update (SGD form)::

    B ← B − η g_B S⁻¹        # [m, r] @ [r, r]
    A ← A − η S g_A          # [r, r] @ [r, n]

is plain GD on the balanced pair ``B̃ = B S^{1/2}``, ``Ã = S^{-1/2} A`` (``B̃ᵀB̃ = ÃÃᵀ``),
mapped back. With an adaptive base (the authors' practice) the gradients are rewritten
``g_A ← S g_A``, ``g_B ← g_B S⁻¹`` and the unchanged AdamW runs.

``B = 0`` (the usual init) makes ``S⁻¹ = 0``: the first ``warmup_steps`` are plain base
steps, and at any step a pair whose Grams are numerically singular falls back to ``S = I``.
The class default is no warm-up (the fallback covers ``B = 0``); the trainer sizes it to the
run, a tenth of its steps (``trainer.adapters.RUN_SIZED``): the authors' fixed 100 would make
every run of ≤ 100 steps plain AdamW.

RefLoRA-S (``scalar=True``): plain base steps, then after each step (past warm-up)
``c = ‖B‖_F / ‖A‖_F``, ``A ← √c A``, ``B ← B / √c`` (equal norms), and the Adam state
follows: ``m_A /= √c``, ``v_A /= c``, ``m_B *= √c``, ``v_B *= c``.

Cost: two Grams per layer and two r×r ``eigh``, batched over all layers of equal shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRAPair
from lorafold.training.optim._base import ActivePair, PairOptimizer, flatten_pairs, rank_batches
from lorafold.training.optim._common import LINALG_DTYPE, compute_dtype, stack_grams, sym_eigh


def refactor_matrices(p_b: torch.Tensor, p_a: torch.Tensor, gram_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S⁻¹)`` for stacks ``P_B, P_A: [k, r, r]`` via two eigh (float64).

    1. ``P_A = V_A diag(σ_A²) V_Aᵀ``; 2. ``MᵀM = diag(σ_A) V_Aᵀ P_B V_A diag(σ_A)`` (M = B V_A diag(σ_A),
    formed from the Gram, never from B); 3. ``MᵀM = V_M diag(σ_M²) V_Mᵀ``;
    4. ``S⁻¹ = V_A diag(1/σ_A) V_M diag(σ_M) V_Mᵀ diag(1/σ_A) V_Aᵀ``;
    5. ``S = V_A diag(σ_A) V_M diag(1/σ_M) V_Mᵀ diag(σ_A) V_Aᵀ``.
    A layer where either Gram is singular to within ``r · gram_eps`` (relative) gets
    ``S = S⁻¹ = I`` (plain step) instead of inf/NaN.
    """
    eps = torch.finfo(LINALG_DTYPE).eps
    lam_a, v_a = sym_eigh(p_a)
    sig_a = lam_a.clamp_min(0).sqrt()
    vs = v_a * sig_a[:, None, :]  # V_A diag(σ_A)
    lam_m, v_m = sym_eigh(vs.mT @ p_b.to(LINALG_DTYPE) @ vs)
    sig_m = lam_m.clamp_min(0).sqrt()
    left_inv = (v_a / (sig_a + eps)[:, None, :]) @ v_m  # V_A diag(1/σ_A) V_M
    s_inv = (left_inv * sig_m[:, None, :]) @ left_inv.mT
    left = vs @ v_m  # V_A diag(σ_A) V_M
    s = (left / (sig_m + eps)[:, None, :]) @ left.mT
    tol = p_a.shape[-1] * gram_eps
    ok = (lam_a[:, 0] > tol * lam_a[:, -1]) & (lam_m[:, 0] > tol * lam_m[:, -1]) & (lam_a[:, -1] > 0)
    ok = ok & torch.isfinite(s).flatten(1).all(1) & torch.isfinite(s_inv).flatten(1).all(1)
    eye = torch.eye(p_a.shape[-1], dtype=LINALG_DTYPE, device=p_a.device).expand_as(s)
    keep = ok[:, None, None]
    return torch.where(keep, s, eye), torch.where(keep, s_inv, eye)


def refactored_gradients(pairs: Sequence[ActivePair]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(S g_A, g_B S⁻¹)`` per pair: Grams and products batched per shape bucket, the two
    eigh batched over all layers of a rank."""
    ga: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    gb: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    for batches in rank_batches(pairs):
        grams_b, grams_a, gram_eps = [], [], 0.0
        for _, (a, b, _, _) in batches:
            work = compute_dtype(a.dtype)
            gram_eps = max(gram_eps, torch.finfo(work).eps)
            grams_b.append((b.mT.to(work) @ b.to(work)).to(LINALG_DTYPE))
            grams_a.append((a.to(work) @ a.mT.to(work)).to(LINALG_DTYPE))
        sizes = [len(idx) for idx, _ in batches]
        s, s_inv = refactor_matrices(torch.cat(grams_b), torch.cat(grams_a), gram_eps)
        for (idx, (_, _, g_a, g_b)), sb, sib in zip(batches, s.split(sizes), s_inv.split(sizes), strict=True):
            out_a, out_b = sb.to(g_a.dtype) @ g_a, g_b @ sib.to(g_b.dtype)
            for j, i in enumerate(idx):
                ga[i], gb[i] = out_a[j], out_b[j]
    return ga, gb


def balance_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Ã, B̃) = (S^{-1/2} A, B S^{1/2})``: same product, ``B̃ᵀB̃ = ÃÃᵀ``."""
    s, _ = refactor_matrices(
        stack_grams([b], "cols"), stack_grams([a], "rows"), torch.finfo(compute_dtype(a.dtype)).eps
    )
    lam, v = sym_eigh(s)
    root = lam.clamp_min(0).sqrt()
    half = (v * root[:, None, :]) @ v.mT
    half_inv = (v / root[:, None, :]) @ v.mT
    return (half_inv[0].to(a.dtype) @ a, b @ half[0].to(b.dtype))


class RefLoRA(PairOptimizer):
    """RefLoRA over an AdamW (``base="adamw"``) or SGD (``base="sgd"``) base; ``scalar`` = RefLoRA-S.

    Reference: DeBERTaV3-base GLUE r = 8, α = 8, lr 1e-3, warm-up 100 (here 0, or a tenth of
    the run under the trainer);
    LLaMA-7B commonsense r = 32, α = 64, lr 2e-4 (the default here: this project tunes LLMs).
    """

    def __init__(
        self,
        pairs: Sequence[LoRAPair],
        lr: float = 2e-4,
        base: str = "adamw",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        scalar: bool = False,
        extra_params: Iterable[nn.Parameter] = (),
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if base not in ("adamw", "sgd"):
            raise ValueError(f"base must be 'adamw' or 'sgd', got {base!r}")
        defaults: dict[str, Any] = {
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup_steps": warmup_steps,
            "scalar": scalar,
            "step_count": 0,
        }
        if base == "adamw":
            defaults.update(betas=tuple(betas), eps=eps)
        super().__init__(pairs, defaults, extra_params)

    def _base_update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        if "betas" in group:
            self.adam_update(group, params, grads)
        else:
            self.sgd_update(group, params, grads)

    def _step_pairs(self, group: dict[str, Any], pairs: list[ActivePair]) -> None:
        refactor = group["step_count"] >= group["warmup_steps"]
        group["step_count"] += 1
        if group["scalar"] or not refactor:
            ga, gb = [p.gA for p in pairs], [p.gB for p in pairs]
        else:
            ga, gb = refactored_gradients(pairs)
        self._base_update(group, *flatten_pairs(pairs, ga, gb))
        if group["scalar"] and refactor:
            self._rebalance(pairs)

    @torch.no_grad()
    def _rebalance(self, pairs: list[ActivePair]) -> None:
        """RefLoRA-S: equalize ‖A‖ and ‖B‖ of each pair; move the Adam state along."""
        norms_a = torch.stack(torch._foreach_norm([p.A for p in pairs])).double()
        norms_b = torch.stack(torch._foreach_norm([p.B for p in pairs])).double()
        ratio = norms_b / norms_a
        ok = torch.isfinite(ratio) & (ratio > 0)
        c_list = torch.where(ok, ratio, torch.ones_like(ratio)).tolist()  # host sync: one per step
        for pair, c in zip(pairs, c_list, strict=True):
            if c == 1.0:
                continue
            root = math.sqrt(c)
            pair.A.mul_(root)
            pair.B.div_(root)
            state_a, state_b = self.state.get(pair.A, {}), self.state.get(pair.B, {})
            if "exp_avg" in state_a:
                state_a["exp_avg"].div_(root)
                state_a["exp_avg_sq"].div_(c)
            if "exp_avg" in state_b:
                state_b["exp_avg"].mul_(root)
                state_b["exp_avg_sq"].mul_(c)
