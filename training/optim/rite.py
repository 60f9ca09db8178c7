"""LoRA-RITE (Yen et al., ICLR 2025): transformation-invariant adaptive preconditioning.

Per layer, with ``A' = Aᵀ`` [n, r] and ``B`` [m, r] (batched over layers of equal shape)::

    A' = U_A R_A,  B = U_B R_B                          (QR)
    ḡ_A = ∇_{A'} R_B⁻¹ [n, r],  ḡ_B = ∇_B R_A⁻¹ [m, r]  ("unmagnified": expressed in the
                                                          other factor's orthonormal basis)
    skip a side whose rms(ḡ) > skip_threshold × its running rms (a spike); clip the global norm
    P_A = U_Bᵀ U_B^{old}  (r×r; P_B = U_Aᵀ U_A^{old})    basis change since the last step
    V̄_A ← P_A V̄_A P_Aᵀ,  M̄_A ← M̄_A P_Aᵀ                  state transported to the new basis
    β̂(t) = β (1 − β^{t−1}) / (1 − β^t)                  bias-corrected decay (β̂(1) = 0)
    V̄_A = (1 − β̂2) ḡ_Aᵀ ḡ_A / n + β̂2 V̄_A
    M̄_A = (1 − β̂1) ḡ_A V̄_A^{-1/2} + β̂1 M̄_A            (V^{-1/2} = V diag(1/(√λ + ε)) Vᵀ)
    A' ← A' − η (M̄_A R_B⁻ᵀ + λ A')                      and symmetrically for B

The skip rule is relative here ([R], not the authors' absolute ``rms(ḡ) > 1``): an absolute
threshold depends on the loss scale, and on the spec's test bed it skips every step of a run
(f stays where it started). A layer's first step is never skipped; the running
rms is an EMA (0.9) of the observed rms, each observation capped at ``skip_threshold ×`` the
EMA, so one spike does not raise the bar but a lasting change of scale is accepted after a few
steps (at the default 10: the cap grows 1.9× per step). Every skip is logged as a warning.

Because ḡ, V̄, M̄ live in orthonormal bases of the factors' spans, the update of the product
``B A`` is the same for every factorization ``(B Q, Q⁻¹ A)`` — even with the adaptive
second moment. State per layer: two r×r second moments, first moments and bases of the
factors' shapes (≈ 2× AdamW's memory for the factors).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRAPair
from lorafold.training.optim._base import ActivePair, PairOptimizer, shape_buckets, stack_bucket
from lorafold.training.optim._common import LINALG_DTYPE, compute_dtype, sym_eigh

logger = logging.getLogger(__name__)

RMS_DECAY = 0.9  # EMA of a side's unmagnified-gradient rms, the skip rule's reference


def _bias_corrected(beta: float, steps: torch.Tensor) -> torch.Tensor:
    """``β (1 − β^{t−1}) / (1 − β^t)`` for 1-based steps ``t`` [k] -> [k, 1, 1]."""
    return (beta * (1 - beta ** (steps - 1)) / (1 - beta**steps))[:, None, None]


def _inv_sqrt(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``V diag(1 / (√max(λ, 0) + ε)) Vᵀ`` for symmetric [k, r, r] (float64)."""
    lam, vec = sym_eigh(v)
    return (vec / (lam.clamp_min(0).sqrt() + eps)[:, None, :]) @ vec.mT


def _sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.mT)


class LoRARite(PairOptimizer):
    """LoRA-RITE. Defaults follow the authors' PyTorch port (eps 1e-6, clip 1.0) except the skip
    rule: ``skip_threshold`` is relative to the side's running rms (default 10; 0 disables)."""

    def __init__(
        self,
        pairs: Sequence[LoRAPair],
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        clip_norm: float = 1.0,
        skip_threshold: float = 10.0,
        extra_params: Iterable[nn.Parameter] = (),
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "clip_norm": clip_norm,
            "skip_threshold": skip_threshold,
        }
        super().__init__(pairs, defaults, extra_params)

    def _state(self, p: ActivePair, n: int, m: int, r: int, like: torch.Tensor) -> dict[str, Any]:
        st = self.state[p.A]
        if not st:
            zeros = lambda *shape: torch.zeros(*shape, dtype=like.dtype, device=like.device)  # noqa: E731
            st.update(step=0, v_a=zeros(r, r), v_b=zeros(r, r), m_a=zeros(n, r), m_b=zeros(m, r))
            st.update(basis_a=zeros(n, r), basis_b=zeros(m, r), rms_a=0.0, rms_b=0.0)
        return st

    def _unmagnified(self, group: dict[str, Any], pairs: list[ActivePair], idx: list[int]) -> dict[str, Any]:
        """First pass for one bucket: bases, R⁻¹, unmagnified (skipped) gradients."""
        a, b, g_a, g_b = stack_bucket(pairs, idx)
        work = compute_dtype(a.dtype)
        u_a, r_a = torch.linalg.qr(a.mT.to(work))  # A' = U_A R_A
        u_b, r_b = torch.linalg.qr(b.to(work))
        rinv_a = torch.linalg.pinv(r_a.to(LINALG_DTYPE)).to(work)  # pinv: B = 0 gives R = 0, not NaN
        rinv_b = torch.linalg.pinv(r_b.to(LINALG_DTYPE)).to(work)
        gbar_a = g_a.mT.to(work) @ rinv_b
        gbar_b = g_b.to(work) @ rinv_a
        if group["skip_threshold"] > 0:
            r, n, m = pairs[idx[0]].A.shape[0], pairs[idx[0]].A.shape[1], pairs[idx[0]].B.shape[0]
            states = [self._state(pairs[i], n, m, r, gbar_a) for i in idx]
            for side, g in (("a", gbar_a), ("b", gbar_b)):
                rms = g.square().mean((-1, -2)).sqrt()
                keep = self._spike_filter(states, side, rms.tolist(), group["skip_threshold"])  # host sync
                g.mul_(torch.tensor(keep, dtype=work, device=g.device)[:, None, None])
        return {"idx": idx, "u_a": u_a, "u_b": u_b, "rinv_a": rinv_a, "rinv_b": rinv_b, "g_a": gbar_a, "g_b": gbar_b}

    @staticmethod
    def _spike_filter(states: list[dict[str, Any]], side: str, rms: list[float], threshold: float) -> list[bool]:
        """Per layer: keep this side's gradient unless its rms is a spike (> threshold × running rms).

        Updates the running rms (EMA of observations capped at ``threshold ×`` it); the first
        observation (no history) is always kept, a NaN/inf rms never.
        """
        keep = []
        for st, x in zip(states, rms, strict=True):
            ref = st[f"rms_{side}"]
            finite = x == x and x != float("inf")
            ok = finite and (ref <= 0 or x <= threshold * ref)
            if finite:
                seen = x if ref <= 0 else min(x, threshold * ref)
                st[f"rms_{side}"] = seen if ref <= 0 else RMS_DECAY * ref + (1 - RMS_DECAY) * seen
            if not ok:
                logger.warning("LoRA-RITE: skipping the %s-side update of a layer (gradient rms %.3g, running rms "
                               "%.3g, skip_threshold %g)", side.upper(), x, ref, threshold)
            keep.append(ok)
        return keep

    def _step_pairs(self, group: dict[str, Any], pairs: list[ActivePair]) -> None:
        buckets = [self._unmagnified(group, pairs, idx) for idx in shape_buckets(pairs).values()]
        sq = sum(bk["g_a"].square().sum() + bk["g_b"].square().sum() for bk in buckets)
        norm = float(torch.as_tensor(sq).sqrt())  # host sync: one per step (global clip)
        clip = group["clip_norm"] / norm if group["clip_norm"] > 0 and norm > group["clip_norm"] else 1.0
        for bk in buckets:
            self._update_bucket(group, pairs, bk, clip)

    def _update_bucket(self, group: dict[str, Any], pairs: list[ActivePair], bk: dict[str, Any], clip: float) -> None:
        sub = [pairs[i] for i in bk["idx"]]
        r, n, m = sub[0].A.shape[0], sub[0].A.shape[1], sub[0].B.shape[0]
        work = bk["g_a"].dtype
        states = [self._state(p, n, m, r, bk["g_a"]) for p in sub]
        for st in states:
            st["step"] += 1
        steps = torch.tensor([st["step"] for st in states], dtype=LINALG_DTYPE)
        beta1, beta2 = group["betas"]
        b1, b2 = _bias_corrected(beta1, steps), _bias_corrected(beta2, steps)
        new = {}
        for side, other, rows in (("a", "b", n), ("b", "a", m)):
            g = bk[f"g_{side}"] * clip
            # the side's gradient lives in the OTHER factor's basis: transport by its change
            p_mat = (bk[f"u_{other}"].mT @ torch.stack([st[f"basis_{other}"] for st in states])).to(LINALG_DTYPE)
            v_old = torch.stack([st[f"v_{side}"] for st in states]).to(LINALG_DTYPE)
            v = _sym((1 - b2) * _sym(g.mT @ g).to(LINALG_DTYPE) / rows + b2 * _sym(p_mat @ v_old @ p_mat.mT))
            u = g @ _inv_sqrt(v, group["eps"]).to(work)
            mom = torch.stack([st[f"m_{side}"] for st in states]) @ p_mat.mT.to(work)
            mom = (1 - b1).to(work) * u + b1.to(work) * mom
            new[side] = (v.to(work), mom)
        self._apply(group, sub, states, bk, new)

    def _apply(
        self,
        group: dict[str, Any],
        sub: list[ActivePair],
        states: list[dict[str, Any]],
        bk: dict[str, Any],
        new: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Store the new state and take ``A' ← A' − η (M̄_A R_B⁻ᵀ + λ A')`` (and B's)."""
        lr, wd = group["lr"], group["weight_decay"]
        step_a = new["a"][1] @ bk["rinv_b"].mT  # [k, n, r] update of A'
        step_b = new["b"][1] @ bk["rinv_a"].mT  # [k, m, r] update of B
        for j, (p, st) in enumerate(zip(sub, states, strict=True)):
            st["v_a"], st["m_a"], st["v_b"], st["m_b"] = new["a"][0][j], new["a"][1][j], new["b"][0][j], new["b"][1][j]
            st["basis_a"], st["basis_b"] = bk["u_a"][j], bk["u_b"][j]
            da, db = step_a[j].mT.to(p.A.dtype), step_b[j].to(p.B.dtype)
            if wd:
                da, db = da + wd * p.A, db + wd * p.B
            p.A.add_(da, alpha=-lr)
            p.B.add_(db, alpha=-lr)
