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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear, LoRAPair
from lorafold.training.optim._base import ActivePair, PairOptimizer, shape_buckets, stack_bucket
from lorafold.training.optim._common import LINALG_DTYPE, compute_dtype, spd_inverse

FullGradFn = Callable[[str], torch.Tensor]

# Layout. The layers of one shape bucket are stacked (A [k, r, n], B [k, m, r], scales
# s [k, 1, 1]) so that every O((m + n) r²) operation is ONE r-wide batched matmul per bucket:
# the Grams, the quadratic forms of the statistic and the two r×r applies per direction.
# The r×r algebra in between runs on the Grams of ALL buckets of a rank at once (SmolLM2:
# 210 layers, 4 buckets, one batch): inverses (Cholesky, pinv fallback) in float64, the r×r
# products in the Grams' dtype (fp32 at least; float64 for float64 factors).


@dataclass(slots=True)
class Grams:
    """r×r Grams of a batch of layers (fp32 at least), each taken once per step and shared."""

    ga_a: torch.Tensor  # g_A Aᵀ
    bb: torch.Tensor | None = None  # BᵀB          (low-rank statistic only)
    aa: torch.Tensor | None = None  # AAᵀ
    b_gb: torch.Tensor | None = None  # Bᵀ g_B
    gb_gb: torch.Tensor | None = None  # g_Bᵀ g_B
    ga_ga: torch.Tensor | None = None  # g_A g_Aᵀ

    @staticmethod
    def cat(parts: Sequence[Grams]) -> Grams:
        def join(name: str) -> torch.Tensor | None:
            ts = [getattr(g, name) for g in parts]
            return None if ts[0] is None else torch.cat(ts)

        return Grams(*(join(f) for f in ("ga_a", "bb", "aa", "b_gb", "gb_gb", "ga_ga")))  # type: ignore[arg-type]


def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` (an r×r Gram) in at least fp32."""
    work = compute_dtype(x.dtype)
    return x.to(work) @ y.to(work)


def bucket_grams(a: torch.Tensor, b: torch.Tensor, g_a: torch.Tensor, g_b: torch.Tensor, lowrank: bool) -> Grams:
    """The r×r Grams a step needs: ``g_A Aᵀ`` for the direction; with the low-rank statistic
    (on the steps that refresh it) also the five the statistic's kernels are built from."""
    grams = Grams(_gram(g_a, a.mT))
    if lowrank:
        grams.bb, grams.aa = _gram(b.mT, b), _gram(a, a.mT)
        grams.b_gb, grams.gb_gb, grams.ga_ga = _gram(b.mT, g_b), _gram(g_b.mT, g_b), _gram(g_a, g_a.mT)
    return grams


@dataclass(slots=True)
class StatKernels:
    """Per layer, the symmetric 2r×2r kernels of the low-rank statistic in r×r blocks:
    ``rowsum(ĝ²) = diag([B, g_B] K_row [B, g_B]ᵀ)``, ``colsum(ĝ²) = diag([g_Aᵀ, Aᵀ] K_col [g_A; A])``."""

    row11: torch.Tensor
    row21: torch.Tensor
    row22: torch.Tensor
    col11: torch.Tensor
    col12: torch.Tensor
    col22: torch.Tensor

    def split(self, sizes: Sequence[int]) -> list[StatKernels]:
        parts = [t.split(list(sizes)) for t in (self.row11, self.row21, self.row22, self.col11, self.col12, self.col22)]
        return [StatKernels(*p) for p in zip(*parts, strict=True)]


def stat_kernels(grams: Grams, s: torch.Tensor, pinv_damping: float) -> StatKernels:
    """The statistic's kernels from the Grams (all r×r; ``s`` is ``[k]`` or ``[k, 1, 1]``).

    With ``P_B⁻¹ = pinv(BᵀB + δI)``, ``P_A⁻¹ = pinv(AAᵀ + δI)`` and LoRA-Pro's reduced gradients
    ``g̃_A = s⁻² P_B⁻¹ g_A``, ``g̃_B = s⁻² (I − B P_B⁻¹ Bᵀ) g_B P_A⁻¹``, the equivalent gradient
    is ``ĝ = P_T(G) = U Vᵀ``, ``U = [B, s g̃_B]`` [m, 2r], ``V = [s g̃_Aᵀ, Aᵀ]`` [n, 2r], so
    ``rowsum(ĝ²) = diag(U VᵀV Uᵀ)`` and ``colsum(ĝ²) = diag(V UᵀU Vᵀ)``. Both factors are the
    raw data times a 2r×2r matrix::

        U = [B, g_B] T,    T   = [[I, X₂], [0, X₁]],  X₁ = P_A⁻¹ / s,  X₂ = −P_B⁻¹ (Bᵀg_B) X₁
        V = [g_Aᵀ, Aᵀ] T_A, T_A = [[Z, 0], [0, I]],   Z  = P_B⁻¹ / s

    hence ``K_row = T (VᵀV) Tᵀ`` and ``K_col = T_A (UᵀU) T_Aᵀ``, with ``VᵀV = T_Aᵀ Q_A T_A``,
    ``UᵀU = Tᵀ Q_B T`` and ``Q_A``, ``Q_B`` the 2r×2r Grams of ``[g_Aᵀ, Aᵀ]`` and ``[B, g_B]``.
    Written out in r×r blocks (X₁, Z symmetric)::

        M₁₁ = Z (g_A g_Aᵀ) Z,  M₁₂ = Z (g_A Aᵀ),  M₂₂ = AAᵀ               (VᵀV)
        N = M₁₂ + X₂ M₂₂
        K_row: ₁₁ = M₁₁ + X₂ M₁₂ᵀ + N X₂ᵀ,  ₂₁ = X₁ Nᵀ,  ₂₂ = X₁ M₂₂ X₁
        P = (BᵀB) X₂ + (Bᵀg_B) X₁                                           (UᵀU)₁₂
        (UᵀU)₂₂ = X₂ᵀ P + X₁ ((Bᵀg_B)ᵀ X₂ + (g_Bᵀg_B) X₁)
        K_col: ₁₁ = Z (BᵀB) Z,  ₁₂ = Z P,  ₂₂ = (UᵀU)₂₂
    """
    assert grams.bb is not None and grams.aa is not None, "the statistic's kernels need bucket_grams(lowrank=True)"
    assert grams.b_gb is not None and grams.gb_gb is not None and grams.ga_ga is not None
    work = grams.bb.dtype
    sw = s.to(work).reshape(-1, 1, 1)
    # float64 factorizations, one batch for both
    inv = spd_inverse(torch.cat([grams.bb, grams.aa]), pinv_damping, "pinv").to(work)
    inv_b, inv_a = inv.split(grams.bb.shape[0])
    x1, z = inv_a / sw, inv_b / sw
    x2 = -(inv_b @ grams.b_gb) @ x1
    m12 = z @ grams.ga_a
    n = m12 + x2 @ grams.aa
    row11 = z @ grams.ga_ga @ z + x2 @ m12.mT + n @ x2.mT
    p = grams.bb @ x2 + grams.b_gb @ x1
    u22 = x2.mT @ p + x1 @ (grams.b_gb.mT @ x2 + grams.gb_gb @ x1)
    return StatKernels(row11, x1 @ n.mT, x1 @ grams.aa @ x1, z @ grams.bb @ z, z @ p, u22)


def quad_rows(
    b: torch.Tensor, g_b: torch.Tensor, k11: torch.Tensor, k21: torch.Tensor, k22: torch.Tensor
) -> torch.Tensor:
    """``diag([B, g_B] K [B, g_B]ᵀ)`` -> ``[k, m]`` for ``B, g_B: [k, m, r]``, symmetric ``K`` in
    blocks: ``rowsum((B K₁₁ + g_B (2K₂₁)) ∘ B + (g_B K₂₂) ∘ g_B)`` — three r-wide matmuls (two
    fused in one), no concatenation of the data."""
    work = compute_dtype(b.dtype)
    b, g_b = b.to(work), g_b.to(work)
    out = g_b @ torch.cat([2.0 * k21, k22], -1).to(work)  # [k, m, 2r]
    acc = torch.baddbmm(out[..., : b.shape[-1]], b, k11.to(work)).mul_(b)
    acc.addcmul_(out[..., b.shape[-1] :], g_b)
    return acc @ torch.ones(b.shape[-1], dtype=work, device=b.device)


def quad_cols(
    g_a: torch.Tensor, a: torch.Tensor, k11: torch.Tensor, k12: torch.Tensor, k22: torch.Tensor
) -> torch.Tensor:
    """``diag([g_Aᵀ, Aᵀ] K [g_A; A])`` -> ``[k, n]`` for ``g_A, A: [k, r, n]`` (column-wise
    counterpart of :func:`quad_rows`): ``colsum((K₁₁ g_A + 2K₁₂ A) ∘ g_A + (K₂₂ A) ∘ A)``."""
    work = compute_dtype(a.dtype)
    a, g_a = a.to(work), g_a.to(work)
    r = a.shape[-2]
    out = torch.cat([2.0 * k12, k22], -2).to(work) @ a  # [k, 2r, n]
    acc = torch.baddbmm(out[:, :r], k11.to(work), g_a).mul_(g_a)
    acc.addcmul_(out[:, r:], a)
    return torch.ones(r, dtype=work, device=a.device) @ acc


def lowrank_row_col_sq(
    a: torch.Tensor,
    b: torch.Tensor,
    g_a: torch.Tensor,
    g_b: torch.Tensor,
    s: torch.Tensor,
    pinv_damping: float,
    kernels: StatKernels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rowsum(ĝ²) [k, m], colsum(ĝ²) [k, n])`` of ``ĝ = P_T(G)`` without forming ĝ (or any
    m×2r / n×2r intermediate): the kernels of :func:`stat_kernels` (computed here from the
    bucket's Grams unless given) and one quadratic form per row / column of the raw data."""
    if kernels is None:
        kernels = stat_kernels(bucket_grams(a, b, g_a, g_b, lowrank=True), s, pinv_damping)
    k = kernels
    return quad_rows(b, g_b, k.row11, k.row21, k.row22), quad_cols(g_a, a, k.col11, k.col12, k.col22)


def weighted_grams(
    a: torch.Tensor, b: torch.Tensor, ell: torch.Tensor, rho: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``BᵀLB + δ mean(ℓ) I``, ``ARAᵀ + δ mean(ρ) I``: [k, r, r] each, float64."""
    eye = torch.eye(a.shape[-2], dtype=LINALG_DTYPE, device=a.device)
    bl = (b.mT @ (ell[..., None] * b)).to(LINALG_DTYPE)
    ar = ((a * rho[:, None, :]) @ a.mT).to(LINALG_DTYPE)
    bl = bl + damping * ell.mean(-1).to(LINALG_DTYPE)[:, None, None] * eye
    ar = ar + damping * rho.mean(-1).to(LINALG_DTYPE)[:, None, None] * eye
    return bl, ar


def weighted_inverses(
    a: torch.Tensor, b: torch.Tensor, ell: torch.Tensor, rho: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(BᵀLB + δ mean(ℓ) I)⁻¹``, ``(ARAᵀ + δ mean(ρ) I)⁻¹``: [k, r, r] each, float64."""
    bl, ar = weighted_grams(a, b, ell, rho, damping)
    return spd_inverse(bl, 0.0), spd_inverse(ar, 0.0)


def direction_factors(
    inv_l: torch.Tensor, inv_r: torch.Tensor, ga_a: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(−s⁻² (BᵀLB)⁻¹, −s⁻² (ARAᵀ)⁻¹, −½ s⁻¹ C)`` with ``C = −s⁻¹ (BᵀLB)⁻¹ (g_A Aᵀ) (ARAᵀ)⁻¹``
    (all r×r, in ``g_A Aᵀ``'s dtype), so that (see :func:`apply_directions`)::

        dA = ((−s⁻² (BᵀLB)⁻¹) g_A) / ρ + (−½ s⁻¹ C) A
        dB = (g_B (−s⁻² (ARAᵀ)⁻¹)) / ℓ + B (−½ s⁻¹ C)
    """
    work = ga_a.dtype
    s2 = s.to(work).reshape(-1, 1, 1).square()
    inv_l, inv_r = inv_l.to(work), inv_r.to(work)
    half_c = (0.5 / s2) * (inv_l @ ga_a @ inv_r)
    return -inv_l / s2, -inv_r / s2, half_c


def apply_directions(
    a: torch.Tensor,
    b: torch.Tensor,
    g_a: torch.Tensor,
    g_b: torch.Tensor,
    ell: torch.Tensor,
    rho: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    half_c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dA, dB)`` from the factors of :func:`direction_factors`: two r-wide matmuls and one
    fused ``addcdiv`` per direction."""
    dt = g_a.dtype
    hc = half_c.to(dt)
    d_a = (hc @ a).addcdiv_(left.to(dt) @ g_a, rho[:, None, :].to(dt))
    d_b = (b @ hc).addcdiv_(g_b @ right.to(dt), ell[..., None].to(dt))
    return d_a, d_b


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
    factors = direction_factors(inv_l, inv_r, _gram(g_a, a.mT), s)
    return apply_directions(a, b, g_a, g_b, ell, rho, *factors)


class AdaPreLoRA(PairOptimizer):
    """Adafactor-preconditioned LoRA with the balanced (minimum H-imbalance) factor split.

    ``beta1 > 0`` adds a momentum on ``(dA, dB)`` (an extension; default off). State per
    layer: ``r_t`` [m] and ``c_t`` [n] (plus (m + n) r momentum when ``beta1 > 0``).

    ``stat_interval = k > 1`` (an extension; default 1 = the per-step rule) measures the
    Adafactor statistic only every k steps, like Shampoo's preconditioner update frequency,
    and reuses the stored ``r_t, c_t`` in between. The statistic is about half of a step's
    cost (``benchmarks/bench_optimizer_step.py`` measures it). The trade-off
    is the statistic's staleness: on the factorization test bed at κ = 1000, where the
    gradient shrinks by orders of magnitude within the run, k = 10 needs 3x the iterations
    of k = 1 and k = 20 reaches f ≤ 1e-8 at no step size (``benchmarks/bench_optimizers.py``),
    so it is not the default.
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
        stat_interval: int = 1,
    ) -> None:
        if statistic not in ("lowrank", "full"):
            raise ValueError(f"statistic must be 'lowrank' or 'full', got {statistic!r}")
        if not isinstance(stat_interval, int) or stat_interval < 1:
            raise ValueError(f"stat_interval must be an integer >= 1, got {stat_interval!r}")
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
            "stat_interval": stat_interval,
            # the plain group (non-LoRA parameters) runs AdamW with these
            "betas": (beta1 if beta1 > 0 else 0.9, beta2),
            "eps": 1e-8,
        }
        super().__init__(pairs, defaults, extra_params)
        self.full_grad_fn = full_grad_fn

    def _refresh_due(self, group: dict[str, Any], pairs: list[ActivePair]) -> bool:
        """Whether this step measures the Adafactor statistic (every ``stat_interval`` steps,
        and always while some layer has none yet)."""
        interval = group["stat_interval"]
        for p in pairs:
            st = self.state[p.A]
            if "row_sq" not in st or st.get("step", 0) + 1 - st["stat_at"] >= interval:
                return True
        return False

    def _plan(
        self, group: dict[str, Any], pairs: list[ActivePair], refresh: bool
    ) -> tuple[list[dict[str, Any]], list[float]]:
        """The layers' states and, on a refresh step, each layer's EMA weight for the new sums
        (creating zero statistics the first time); the step counts are left to :meth:`_commit`.

        A refresh ``j`` steps after the previous one weighs the new sums by ``1 − β2^j``: the
        EMA the per-step rule gives when the sums stay constant in between, so the bias
        correction ``1 − β2^t`` holds for every interval (``j = 1`` is the per-step rule)."""
        states = [self.state[p.A] for p in pairs]
        beta2 = group["beta2"]
        folds: list[float] = []
        if refresh:
            for p, st in zip(pairs, states, strict=True):
                if "row_sq" not in st:
                    work = compute_dtype(p.A.dtype)
                    st["stat_at"] = 0
                    st["row_sq"] = torch.zeros(p.B.shape[0], dtype=work, device=p.B.device)
                    st["col_sq"] = torch.zeros(p.A.shape[1], dtype=work, device=p.A.device)
                folds.append(1.0 - beta2 ** (st.get("step", 0) + 1 - st["stat_at"]))
        return states, folds

    @staticmethod
    def _commit(states: list[dict[str, Any]], refresh: bool) -> None:
        """Count the step (and the refresh) of layers that took it."""
        for st in states:
            st["step"] = st.get("step", 0) + 1
            if refresh:
                st["stat_at"] = st["step"]

    def _advance(
        self, group: dict[str, Any], pairs: list[ActivePair], refresh: bool
    ) -> tuple[list[dict[str, Any]], list[float]]:
        """:meth:`_plan` then :meth:`_commit`: states and EMA weights of a step being taken."""
        states, folds = self._plan(group, pairs, refresh)
        self._commit(states, refresh)
        return states, folds

    def _fold(
        self,
        group: dict[str, Any],
        pairs: list[ActivePair],
        row: torch.Tensor | Sequence[torch.Tensor] | None,
        col: torch.Tensor | Sequence[torch.Tensor] | None,
    ) -> list[dict[str, Any]]:
        """:meth:`_advance`, then on a refresh step (``row``/``col`` given, one entry per layer)
        fold the new sums into ``r_t, c_t``. Returns the layers' states."""
        refresh = row is not None and col is not None
        states, folds = self._advance(group, pairs, refresh)
        if refresh:
            self._lerp_sums(states, folds, row, col)  # type: ignore[arg-type]
        return states

    @staticmethod
    def _lerp_sums(
        states: list[dict[str, Any]],
        folds: list[float],
        row: torch.Tensor | Sequence[torch.Tensor],
        col: torch.Tensor | Sequence[torch.Tensor],
    ) -> None:
        """``r_t ← r_t + w (sums − r_t)`` (and ``c_t``), one foreach lerp per distinct weight."""
        lists: dict[float, tuple[list[torch.Tensor], ...]] = {}
        for st, rw, cl, w in zip(states, row, col, folds, strict=True):
            group_lists = lists.setdefault(w, ([], [], [], []))
            for dst, t in zip(group_lists, (st["row_sq"], rw, st["col_sq"], cl), strict=True):
                dst.append(t)
        for w, (rows_, new_rows, cols_, new_cols) in lists.items():  # one weight in lockstep
            torch._foreach_lerp_(rows_, [t.to(rows_[0].dtype) for t in new_rows], w)
            torch._foreach_lerp_(cols_, [t.to(cols_[0].dtype) for t in new_cols], w)

    def _weights(
        self,
        group: dict[str, Any],
        pairs: list[ActivePair],
        row: torch.Tensor | None,
        col: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_fold`, then ``(ℓ = diag(L) [k, m], ρ = diag(R) [k, n])`` of one shape bucket."""
        states = self._fold(group, pairs, row, col)
        beta2, eps = group["beta2"], group["stat_eps"]
        rows, cols = [st["row_sq"] for st in states], [st["col_sq"] for st in states]
        dtype, device = rows[0].dtype, rows[0].device
        correction = torch.tensor([1.0 - beta2 ** st["step"] for st in states], dtype=dtype, device=device)
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

    def _row_col_sq(
        self, group: dict[str, Any], bucket: _Bucket, kernels: StatKernels | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rowsum(Ĝ²) [k, m], colsum(Ĝ²) [k, n])`` for one shape bucket."""
        if kernels is not None:
            k = kernels
            return quad_rows(bucket.b, bucket.g_b, k.row11, k.row21, k.row22), quad_cols(
                bucket.g_a, bucket.a, k.col11, k.col12, k.col22
            )
        rows, cols = self._full_sq(bucket.pairs)
        return torch.stack(rows), torch.stack(cols)

    def _full_sq(self, pairs: list[ActivePair]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Row and column sums of the exact ``G²`` per layer (``statistic="full"``), in at
        least fp32."""
        rows, cols = [], []
        for p in pairs:
            g2 = self.full_grad_fn(p.name).to(compute_dtype(p.A.dtype)).square()  # type: ignore[misc]
            rows.append(g2.sum(-1))
            cols.append(g2.sum(-2))
        return rows, cols

    def _step_pairs(self, group: dict[str, Any], pairs: list[ActivePair]) -> None:
        """Phases over all shape buckets, so the r×r algebra of all layers of a rank is one
        batch: stack + Grams (per bucket) → statistic kernels (one batch per rank) →
        statistics and weights (per bucket) → weighted Grams (per bucket) → inverses and
        direction factors (one batch per rank) → directions (per bucket) → one update."""
        refresh = self._refresh_due(group, pairs)
        lowrank = refresh and group["statistic"] == "lowrank"
        buckets = []
        for idx in shape_buckets(pairs).values():
            sub = [pairs[i] for i in idx]
            a, b, g_a, g_b = stack_bucket(pairs, idx)
            s = torch.tensor([p.scale for p in sub], dtype=LINALG_DTYPE, device=a.device)
            buckets.append(_Bucket(sub, a, b, g_a, g_b, s, bucket_grams(a, b, g_a, g_b, lowrank)))
        for batch in _by_rank(buckets):
            sizes = [len(bk.pairs) for bk in batch]
            grams, s = Grams.cat([bk.grams for bk in batch]), torch.cat([bk.s for bk in batch])
            kernels = stat_kernels(grams, s, group["damping"]).split(sizes) if lowrank else [None] * len(batch)
            weighted_l, weighted_r = [], []
            for bk, kern in zip(batch, kernels, strict=True):
                row, col = self._row_col_sq(group, bk, kern) if refresh else (None, None)
                ell, rho = self._weights(group, bk.pairs, row, col)
                bk.ell, bk.rho = ell.to(bk.a.dtype), rho.to(bk.a.dtype)
                bl, ar = weighted_grams(bk.a, bk.b, bk.ell, bk.rho, group["damping"])
                weighted_l.append(bl)
                weighted_r.append(ar)
            inv_l, inv_r = spd_inverse(torch.cat(weighted_l), 0.0), spd_inverse(torch.cat(weighted_r), 0.0)
            factors = [f.split(sizes) for f in direction_factors(inv_l, inv_r, grams.ga_a, s)]
            for bk, left, right, half_c in zip(batch, *factors, strict=True):
                bk.d_a, bk.d_b = apply_directions(bk.a, bk.b, bk.g_a, bk.g_b, bk.ell, bk.rho, left, right, half_c)
        params = [t for bk in buckets for p in bk.pairs for t in (p.A, p.B)]
        dirs = [t for bk in buckets for pair in zip(bk.d_a.unbind(0), bk.d_b.unbind(0), strict=True) for t in pair]
        self._apply(group, params, dirs)


@dataclass(slots=True)
class _Bucket:
    """One shape bucket during a step: stacked data, its Grams, then weights and directions."""

    pairs: list[ActivePair]
    a: torch.Tensor
    b: torch.Tensor
    g_a: torch.Tensor
    g_b: torch.Tensor
    s: torch.Tensor  # [k] float64
    grams: Grams
    ell: torch.Tensor | None = None
    rho: torch.Tensor | None = None
    d_a: torch.Tensor | None = None
    d_b: torch.Tensor | None = None


def _by_rank(buckets: list[_Bucket]) -> list[list[_Bucket]]:
    out: dict[int, list[_Bucket]] = {}
    for bk in buckets:
        out.setdefault(bk.a.shape[-2], []).append(bk)
    return list(out.values())


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
