"""AdaPreLoRA's step through the compiled CPU kernels (``kernels/csrc/optim_ops.cpp``).

The same math as the torch path of :class:`~lorafold.training.optim.adaprelora.AdaPreLoRA`,
done per layer in one compiled task that reads the factors where they lie (no stacked
copies) and keeps them in cache across its passes:

    Grams → statistic kernels (r×r) → row/column sums of squares folded into the state →
    weights and weighted Grams → damped inverses and direction factors (r×r) → directions
    and the in-place update (momentum, weight decay).

Through torch the same step is 82 batched matmuls (torch profiler: the r-wide ones per shape
bucket, the r×r ones over all layers) with elementwise passes between them; on one CPU thread
that is ~2.4x torch's AdamW step
(``benchmarks/bench_optimizer_step.py`` has the measured ratios). Used for float32 CPU
factors where the kernels are built; everything else keeps the torch path. A layer whose
statistic needs the eigh-based pseudo-inverse (a near-singular Gram) is left untouched by
the kernel and takes the torch path's step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lorafold.kernels import cpu_ops
from lorafold.training.optim._base import ActivePair

logger = logging.getLogger(__name__)

# adapre_step's per-layer status codes
STATUS_OK, STATUS_IDENTITY, STATUS_FALLBACK = 0, 1, 2


def usable(pairs: list[ActivePair]) -> bool:
    """Whether the compiled passes take these pairs as they are (fp32, CPU, contiguous)."""
    return cpu_ops.usable(*(t for p in pairs for t in (p.A, p.B, p.gA, p.gB)))


def _by_rank(pairs: list[ActivePair]) -> list[list[ActivePair]]:
    out: dict[int, list[ActivePair]] = {}
    for p in pairs:
        out.setdefault(p.rank, []).append(p)
    return list(out.values())


def step(opt: Any, group: dict[str, Any], pairs: list[ActivePair], refresh: bool) -> None:
    """One step of the AdaPreLoRA ``opt`` over ``pairs`` (all float32 CPU); ``refresh``: this
    step measures the statistic. One fused call per rank (``adapre_step``: every pass and the
    r×r algebra of a layer in one task). The state bookkeeping is the optimizer's (``_plan``,
    ``_commit``), so both paths keep the same state. The exact statistic's sums come from the
    m×n gradient: they are folded into the state here, and the kernel only reads it."""
    exact = refresh and group["statistic"] == "full"
    for sub in _by_rank(pairs):
        states, folds = opt._plan(group, sub, refresh)
        if exact:
            opt._lerp_sums(states, folds, *opt._full_sq(sub))
        inv_corr = [1.0 / (1.0 - group["beta2"] ** (st.get("step", 0) + 1)) for st in states]
        mom_a = [_momentum(opt, p.A) for p in sub] if group["beta1"] else []
        mom_b = [_momentum(opt, p.B) for p in sub] if group["beta1"] else []
        status = cpu_ops.adapre_step(
            [p.A for p in sub],
            [p.B for p in sub],
            [p.gA for p in sub],
            [p.gB for p in sub],
            [st["row_sq"] for st in states],
            [st["col_sq"] for st in states],
            mom_a,
            mom_b,
            [p.scale for p in sub],
            inv_corr,
            folds,
            refresh and not exact,
            group["lr"],
            1.0 - group["lr"] * group["weight_decay"],
            group["beta1"],
            group["stat_eps"],
            group["damping"],
        ).tolist()
        _mark_modified(sub)
        opt._commit([st for st, code in zip(states, status, strict=True) if code != STATUS_FALLBACK], refresh)
        if STATUS_IDENTITY in status:
            logger.warning(
                "Cholesky inverse failed for %d of %d layers; using the identity there",
                status.count(STATUS_IDENTITY),
                len(status),
            )
        fallback = [p for p, code in zip(sub, status, strict=True) if code == STATUS_FALLBACK]
        if fallback:  # a pseudo-inverse needs eigh (near-singular Gram): the torch path, as a whole step
            opt._step_pairs_torch(group, fallback)


def _mark_modified(pairs: list[ActivePair]) -> None:
    """Bump the factors' autograd version counters, as torch's in-place ops do: the kernels
    write through raw pointers, and a graph that saved the old factors must see the change."""
    torch.autograd.graph.increment_version([t for p in pairs for t in (p.A, p.B)])


def _momentum(opt: Any, p: torch.Tensor) -> torch.Tensor:
    st = opt.state[p]
    if "momentum" not in st:
        st["momentum"] = torch.zeros_like(p)
    return st["momentum"]
