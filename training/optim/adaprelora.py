"""AdaPreLoRA (Liu, Bian, Cai, arXiv 2605.08734) — a RECONSTRUCTION.

Verified from the paper: the W-space preconditioner is Adafactor's diagonal-Kronecker one;
among the (gauge-degenerate) factor updates it takes the one with minimum H-weighted
imbalance; memory O((m + n) r). The exact formulas below are reconstructed: the product
identity is checked numerically by the tests, the balanced tie-break is an assumption.

Per layer (``A: [r, n]``, ``B: [m, r]``, scale ``s``, ``G = ∂L/∂W: [m, n]``)::

    r_t = β2 r_{t−1} + (1 − β2) rowsum(Ĝ²)   [m]      c_t likewise with column sums [n]
    L = diag(√r̂_t),  R = diag(√ĉ_t) / √(1ᵀ r̂_t)       (bias-corrected; Adafactor: V̂ = r cᵀ / 1ᵀr)
    Δ = −L⁻¹ G R⁻¹                                      target direction, ⟨X, Y⟩_H = tr(Xᵀ L Y R)
    C  = −s⁻¹ (BᵀLB)⁻¹ g_A Aᵀ (ARAᵀ)⁻¹                  [r, r]
    dA = s⁻¹ [−s⁻¹ (BᵀLB)⁻¹ g_A R⁻¹ − ½ C A]            [r, n]
    dB = s⁻¹ [−s⁻¹ L⁻¹ g_B (ARAᵀ)⁻¹ − ½ B C]            [m, r]
    A ← A + η dA,  B ← B + η dB,  then decoupled weight decay.

Then ``s (B dA + dB A)`` is the H-orthogonal projection of Δ onto ``{B X + Y A}`` (with
``L = R = I`` it is ``−P_T(G)``), and the step is gauge equivariant.

Statistic ``Ĝ``: G itself is not available from autograd (only ``g_A = s BᵀG``,
``g_B = s G Aᵀ``). ``statistic="lowrank"`` (default, cheap, O((m + n) r²)) uses the
equivalent gradient ``Ĝ = P_T(G) = U Vᵀ`` (rank 2r, from LoRA-Pro's reduced gradients) and
takes its row/column sums of squares from the factors. ``statistic="full"`` asks
``full_grad_fn(layer_name)`` for the transient m×n G (see :class:`FullGradCapture`): a
per-layer memory spike, exact Adafactor statistics.

Damping: ``P_T(G)`` of the low-rank statistic uses ``pinv(BᵀB + δI)``; the weighted Grams get ``δ · mean(weights) · I`` — the spec's δ on ``BᵀB`` expressed
in the units of ``BᵀLB`` — so the result does not depend on the gradient's scale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear, LoRAPair
from lorafold.training.optim._base import ActivePair, PairOptimizer, shape_buckets, stack_bucket
from lorafold.training.optim._common import LINALG_DTYPE, compute_dtype, spd_inverse

FullGradFn = Callable[[str], torch.Tensor]

# Below, every tensor carries a leading batch dim k: the layers of one shape bucket
# (A [k, r, n], B [k, m, r], scales s [k, 1, 1]); one op serves all k layers.


def lowrank_row_col_sq(
    a: torch.Tensor, b: torch.Tensor, g_a: torch.Tensor, g_b: torch.Tensor, s: torch.Tensor, pinv_damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rowsum(ĝ²) [k, m], colsum(ĝ²) [k, n])`` of ``ĝ = P_T(G) = U Vᵀ`` without forming ĝ.

    With LoRA-Pro's reduced gradients ``g̃_A = s⁻² P_B⁻¹ g_A``, ``g̃_B = s⁻² (I − B P_B⁻¹ Bᵀ) g_B P_A⁻¹``:
    ``U = [B, s g̃_B]`` [m, 2r], ``V = [s g̃_Aᵀ, Aᵀ]`` [n, 2r];
    ``rowsum(ĝ²) = rowsum((U VᵀV) ∘ U)``, ``colsum(ĝ²) = rowsum((V UᵀU) ∘ V)``.
    """
    work = compute_dtype(a.dtype)  # Grams of bf16 factors in fp32 at least
    inv_b = spd_inverse((b.mT.to(work) @ b.to(work)).to(LINALG_DTYPE), pinv_damping, "pinv").to(a.dtype)
    inv_a = spd_inverse((a.to(work) @ a.mT.to(work)).to(LINALG_DTYPE), pinv_damping, "pinv").to(a.dtype)
    s_gt_a = (inv_b @ g_a) / s  # s · g̃_A
    gb_inv = g_b @ inv_a
    s_gt_b = (gb_inv - b @ (inv_b @ (b.mT @ gb_inv))) / s  # s · g̃_B
    u = torch.cat([b, s_gt_b], dim=-1)
    v = torch.cat([s_gt_a.mT, a.mT], dim=-1)
    return ((u @ (v.mT @ v)) * u).sum(-1), ((v @ (u.mT @ u)) * v).sum(-1)


def weighted_inverses(
    a: torch.Tensor, b: torch.Tensor, ell: torch.Tensor, rho: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(BᵀLB + δ mean(ℓ) I)⁻¹``, ``(ARAᵀ + δ mean(ρ) I)⁻¹``: [k, r, r] each, float64."""
    eye = torch.eye(a.shape[-2], dtype=LINALG_DTYPE, device=a.device)
    bl = (b.mT @ (ell[..., None] * b)).to(LINALG_DTYPE)
    ar = ((a * rho[:, None, :]) @ a.mT).to(LINALG_DTYPE)
    bl = bl + damping * ell.mean(-1).to(LINALG_DTYPE)[:, None, None] * eye
    ar = ar + damping * rho.mean(-1).to(LINALG_DTYPE)[:, None, None] * eye
    return spd_inverse(bl, 0.0), spd_inverse(ar, 0.0)


def balanced_directions(
    a: torch.Tensor,
    b: torch.Tensor,
    g_a: torch.Tensor,
    g_b: torch.Tensor,
    s: torch.Tensor,
    ell: torch.Tensor,
    rho: torch.Tensor,
    inv_l: torch.Tensor,
    inv_r: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dA [k, r, n], dB [k, m, r])`` from the module formulas; ``ell`` = diag(L) [k, m],
    ``rho`` = diag(R) [k, n], ``s`` [k, 1, 1]."""
    inv_l, inv_r = inv_l.to(g_a.dtype), inv_r.to(g_a.dtype)
    c = -(inv_l @ (g_a @ a.mT) @ inv_r) / s
    d_a = (-(inv_l @ (g_a / rho[:, None, :])) / s - 0.5 * c @ a) / s
    d_b = (-((g_b / ell[..., None]) @ inv_r) / s - 0.5 * b @ c) / s
    return d_a, d_b


class AdaPreLoRA(PairOptimizer):
    """Adafactor-preconditioned LoRA with the balanced (minimum H-imbalance) factor split.

    ``beta1 > 0`` adds a momentum on ``(dA, dB)`` (an extension; default off). State per
    layer: ``r_t`` [m] and ``c_t`` [n] (plus (m + n) r momentum when ``beta1 > 0``).
    """

    def __init__(
        self,
        pairs: Sequence[LoRAPair],
        lr: float = 1e-3,
        beta2: float = 0.999,
        beta1: float = 0.0,
        eps: float = 1e-30,
        damping: float = 1e-6,
        weight_decay: float = 0.0,
        statistic: str = "lowrank",
        full_grad_fn: FullGradFn | None = None,
        extra_params: Iterable[nn.Parameter] = (),
    ) -> None:
        if statistic not in ("lowrank", "full"):
            raise ValueError(f"statistic must be 'lowrank' or 'full', got {statistic!r}")
        if statistic == "full" and full_grad_fn is None:
            raise ValueError("statistic='full' needs full_grad_fn(name) -> G; see FullGradCapture")
        defaults = {
            "lr": lr,
            "beta2": beta2,
            "beta1": beta1,
            "stat_eps": eps,
            "damping": damping,
            "weight_decay": weight_decay,
            "statistic": statistic,
            # the plain group (non-LoRA parameters) runs AdamW with these
            "betas": (beta1 if beta1 > 0 else 0.9, beta2),
            "eps": 1e-8,
        }
        super().__init__(pairs, defaults, extra_params)
        self.full_grad_fn = full_grad_fn

    def _row_col_sq(
        self,
        group: dict[str, Any],
        pairs: list[ActivePair],
        a: torch.Tensor,
        b: torch.Tensor,
        g_a: torch.Tensor,
        g_b: torch.Tensor,
        s: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rowsum(Ĝ²) [k, m], colsum(Ĝ²) [k, n])`` for one shape bucket."""
        if group["statistic"] == "lowrank":
            return lowrank_row_col_sq(a, b, g_a, g_b, s, group["damping"])
        work = torch.promote_types(a.dtype, torch.float32)
        g2 = torch.stack([self.full_grad_fn(p.name).to(work) for p in pairs]).square()  # type: ignore[misc]
        return g2.sum(-1), g2.sum(-2)

    def _weights(
        self, group: dict[str, Any], pairs: list[ActivePair], row: torch.Tensor, col: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update every layer's ``r_t, c_t``; return ``(ℓ = diag(L) [k, m], ρ = diag(R) [k, n])``."""
        states = [self.state[p.A] for p in pairs]
        for st, rw, cl in zip(states, row, col, strict=True):
            if "row_sq" not in st:
                st["stat_step"] = 0
                st["row_sq"], st["col_sq"] = torch.zeros_like(rw), torch.zeros_like(cl)
            st["stat_step"] += 1
        beta2, eps = group["beta2"], group["stat_eps"]
        rows, cols = [st["row_sq"] for st in states], [st["col_sq"] for st in states]
        torch._foreach_lerp_(rows, list(row.unbind(0)), 1.0 - beta2)
        torch._foreach_lerp_(cols, list(col.unbind(0)), 1.0 - beta2)
        correction = torch.tensor([1.0 - beta2 ** st["stat_step"] for st in states], dtype=row.dtype, device=row.device)
        r_hat = torch.stack(rows) / correction[:, None] + eps
        c_hat = torch.stack(cols) / correction[:, None] + eps
        return r_hat.sqrt(), c_hat.sqrt() / r_hat.sum(-1, keepdim=True).sqrt()

    def _apply(self, group: dict[str, Any], params: list[torch.Tensor], directions: list[torch.Tensor]) -> None:
        """``p ← p + η d`` (d through a momentum when β1 > 0), then decoupled decay."""
        if group["beta1"]:
            bufs = []
            for p, d in zip(params, directions, strict=True):
                st = self.state[p]
                if "momentum" not in st:
                    st["momentum"] = torch.zeros_like(d)
                bufs.append(st["momentum"])
            torch._foreach_lerp_(bufs, directions, 1.0 - group["beta1"])
            directions = bufs
        torch._foreach_add_(params, directions, alpha=group["lr"])
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])

    def _step_pairs(self, group: dict[str, Any], pairs: list[ActivePair]) -> None:
        for idx in shape_buckets(pairs).values():
            sub = [pairs[i] for i in idx]
            a, b, g_a, g_b = stack_bucket(pairs, idx)
            s = torch.tensor([p.scale for p in sub], dtype=a.dtype, device=a.device)[:, None, None]
            row, col = self._row_col_sq(group, sub, a, b, g_a, g_b, s)
            ell, rho = self._weights(group, sub, row, col)
            ell, rho = ell.to(a.dtype), rho.to(a.dtype)
            inv_l, inv_r = weighted_inverses(a, b, ell, rho, group["damping"])
            d_a, d_b = balanced_directions(a, b, g_a, g_b, s, ell, rho, inv_l, inv_r)
            params = [t for p in sub for t in (p.A, p.B)]
            dirs = [t for pair in zip(d_a.unbind(0), d_b.unbind(0), strict=True) for t in pair]
            self._apply(group, params, dirs)


class FullGradCapture:
    """Transient ``G = ∂L/∂W`` [m, n] of every LoRALinear, for ``statistic="full"``.

    Hooks save each layer's input ``x`` (forward) and output gradient ``dy`` (backward);
    ``G = dyᵀ x`` summed over tokens is formed on request, one layer at a time. Costs one
    extra activation reference per layer until :meth:`clear` and an m×n matrix per call.
    """

    def __init__(self, model: nn.Module) -> None:
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._handles = [
            mod.register_forward_hook(self._forward_hook(name))
            for name, mod in model.named_modules()
            if isinstance(mod, LoRALinear)
        ]

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self._inputs[name] = args[0].detach()
            if out.requires_grad:
                out.register_hook(lambda g: self._grads.__setitem__(name, g.detach()))

        return hook

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._grads:
            raise KeyError(f"no captured gradient for {name!r}: run forward and backward after creating the capture")
        x, dy = self._inputs[name], self._grads[name]
        return dy.reshape(-1, dy.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()

    def clear(self) -> None:
        self._inputs.clear()
        self._grads.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.clear()
