"""AdaPreLoRA's step through the compiled CPU passes (``kernels/csrc/optim_ops.cpp``).

The same math as the torch path of :class:`~lorafold.training.optim.adaprelora.AdaPreLoRA`
(whose functions it reuses for the r×r algebra), with the O((m + n) r²) work done by four
compiled passes that read each layer's factors in place instead of stacked copies:

    Grams (per layer) → statistic kernels (r×r, batched) → row/column sums of squares →
    EMA and weights (foreach) → weighted Grams → inverses and direction factors (r×r,
    batched) → directions and the in-place update (momentum, weight decay).

On one CPU thread this brings the step from ~2.4x to about the time of torch's AdamW
(``benchmarks/bench_optimizer_step.py``). Used for float32 CPU factors when the kernels are
available; every other case keeps the torch path.
"""

from __future__ import annotations

from typing import Any

import torch

from lorafold.kernels import cpu_ops
from lorafold.training.optim._base import ActivePair
from lorafold.training.optim._common import LINALG_DTYPE, spd_inverse

def usable(pairs: list[ActivePair]) -> bool:
    """Whether the compiled passes take these pairs as they are (fp32, CPU, contiguous)."""
    return cpu_ops.usable(*(t for p in pairs for t in (p.A, p.B, p.gA, p.gB)))


def _by_rank(pairs: list[ActivePair]) -> list[list[ActivePair]]:
    out: dict[int, list[ActivePair]] = {}
    for p in pairs:
        out.setdefault(p.rank, []).append(p)
    return list(out.values())


def _sym(top_left: torch.Tensor, top_right: torch.Tensor, bottom_right: torch.Tensor) -> torch.Tensor:
    """``[[X, Y], [Yᵀ, Z]]`` as a contiguous float32 [k, 2r, 2r] batch."""
    top = torch.cat([top_left, top_right], -1)
    bottom = torch.cat([top_right.mT, bottom_right], -1)
    return torch.cat([top, bottom], -2).to(torch.float32).contiguous()


def _damped(gram: torch.Tensor, means: torch.Tensor, damping: float) -> torch.Tensor:
    """``gram + δ mean(w) I`` in float64 (the torch path's :func:`weighted_grams` damping)."""
    eye = torch.eye(gram.shape[-1], dtype=LINALG_DTYPE)
    return gram.to(LINALG_DTYPE) + damping * means.to(LINALG_DTYPE)[:, None, None] * eye


def step(opt: Any, group: dict[str, Any], pairs: list[ActivePair], refresh: bool) -> None:
    """One step of the AdaPreLoRA ``opt`` over ``pairs`` (all float32 CPU); ``refresh``: this
    step measures the statistic. The state bookkeeping is the optimizer's (``_advance``,
    ``_fold``), so both paths keep the same state."""
    # imported here: adaprelora imports this module
    from lorafold.training.optim.adaprelora import Grams, direction_factors, stat_kernels

    lowrank = refresh and group["statistic"] == "lowrank"
    damping = group["damping"]
    for sub in _by_rank(pairs):
        r = sub[0].rank
        a, b = [p.A for p in sub], [p.B for p in sub]
        g_a, g_b = [p.gA for p in sub], [p.gB for p in sub]
        s = torch.tensor([p.scale for p in sub], dtype=LINALG_DTYPE)
        gm, gn = cpu_ops.adapre_grams(a, b, g_a, g_b, lowrank)
        ga_a = gn[:, :r, r:]
        k_row = k_col = None
        if lowrank:
            grams = Grams(ga_a, gm[:, :r, :r], gn[:, r:, r:], gm[:, :r, r:], gm[:, r:, r:], gn[:, :r, :r])
            k = stat_kernels(grams, s, damping, compiled=True)
            k_row = _sym(k.row11, k.row21.mT, k.row22)
            k_col = _sym(k.col11, k.col12, k.col22)
            states, folds = opt._advance(group, sub, True)  # the kernel folds the new sums
        else:
            rows, cols = opt._full_sq(sub) if refresh else (None, None)
            states, folds = opt._fold(group, sub, rows, cols), []
        inv_corr = [1.0 / (1.0 - group["beta2"] ** st["step"]) for st in states]
        ell, rho, bl, ar, means = cpu_ops.adapre_weights(
            a,
            b,
            g_a,
            g_b,
            [st["row_sq"] for st in states],
            [st["col_sq"] for st in states],
            inv_corr,
            group["stat_eps"],
            k_row,
            k_col,
            folds,
        )
        # one batched inverse for both sides
        inv = spd_inverse(
            torch.cat([_damped(bl, means[:, 0], damping), _damped(ar, means[:, 1], damping)]), 0.0, compiled=True
        )
        inv_l, inv_r = inv.split(len(sub))
        left, right, half_c = (f.to(torch.float32).contiguous() for f in direction_factors(inv_l, inv_r, ga_a, s))
        mom_a = mom_b = None
        if group["beta1"]:
            mom_a = [_momentum(opt, p.A) for p in sub]
            mom_b = [_momentum(opt, p.B) for p in sub]
        decay = 1.0 - group["lr"] * group["weight_decay"]
        cpu_ops.adapre_update(
            a, b, g_a, g_b, ell, rho, left, right, half_c, group["lr"], decay, mom_a, mom_b, group["beta1"]
        )


def _momentum(opt: Any, p: torch.Tensor) -> torch.Tensor:
    st = opt.state[p]
    if "momentum" not in st:
        st["momentum"] = torch.zeros_like(p)
    return st["momentum"]
