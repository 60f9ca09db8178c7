"""ETF-style init for ``A`` (Ding et al., ICML 2026): unit-norm tight frames of low coherence.

Goal: ``A ∈ R^{r×n}`` with unit-norm columns, ``A Aᵀ = (n/r) I`` and equal absolute column
inner products ``√((n−r)/(r(n−1)))`` (the Welch bound) — an equiangular tight frame; ``B = 0``.
A real ETF exists only for ``n ≤ r(r+1)/2`` (Gerzon); e.g. none for r = 8, n ≥ 37. So:

1. ``n = r``: the identity (orthonormal basis, coherence 0).
2. ``n = r + 1``: the regular simplex — an exact ETF.
3. otherwise: a real harmonic frame (rows ``√(2/r) cos(2π k_i j / n)``, ``√(2/r) sin(…)``, plus
   a ``1/√r`` row when r is odd; the frequency set is searched), which is an exact unit-norm
   tight frame; optionally polished by alternating projection (Tropp, Dhillon, Heath,
   Strohmer) on the Gram matrix and re-made exactly tight and unit-norm by alternating
   tight/normalize steps. The polish is kept only if it lowers the coherence *and* both
   exact properties hold to 1e-12.

Returns the frame with its coherence and the Welch and (real) Levenstein lower bounds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear

logger = logging.getLogger(__name__)

_TIGHT_TOL = 1e-12
_NORM_TOL = 1e-13


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """``matrix``: [r, n] float64; ``coherence`` = max_{i≠j} |⟨a_i, a_j⟩|."""

    matrix: torch.Tensor
    coherence: float
    welch_bound: float
    levenstein_bound: float | None  # real-frame bound, defined for n > r(r+1)/2
    kind: str  # "identity" | "simplex" | "harmonic" | "harmonic+ap"


def welch_bound(r: int, n: int) -> float:
    return math.sqrt((n - r) / (r * (n - 1))) if n > 1 else 0.0


def levenstein_bound(r: int, n: int) -> float | None:
    """Real Levenstein bound ``√((3n − r² − 2r) / ((r+2)(n−r)))`` for ``n > r(r+1)/2``."""
    if n <= r * (r + 1) // 2:
        return None
    return math.sqrt((3 * n - r * r - 2 * r) / ((r + 2) * (n - r)))


def coherence(a: torch.Tensor) -> float:
    gram = (a.T @ a).abs()
    gram.fill_diagonal_(0)
    return gram.max().item()


def simplex_frame(r: int) -> torch.Tensor:
    """Regular simplex: ``n = r + 1`` unit vectors in R^r with inner products −1/r."""
    n = r + 1
    centered = torch.eye(n, dtype=torch.float64) - 1.0 / n
    basis, _ = torch.linalg.qr(centered[:, :r])  # orthonormal basis of 1⊥ [n, r]
    a = basis.T @ centered  # [r, n]
    return a / a.norm(dim=0, keepdim=True)


def harmonic_frame(r: int, n: int, freqs: list[int]) -> torch.Tensor:
    """Rows ``√(2/r) cos/sin(2π k j / n)`` for ``k`` in ``freqs`` (+ ``1/√r`` row if r odd)."""
    j = torch.arange(n, dtype=torch.float64)
    rows = []
    for k in freqs:
        rows += [math.sqrt(2 / r) * torch.cos(2 * math.pi * k * j / n), math.sqrt(2 / r) * torch.sin(2 * math.pi * k * j / n)]
    if r % 2:
        rows.append(torch.full((n,), 1 / math.sqrt(r), dtype=torch.float64))
    return torch.stack(rows)


def best_harmonic(r: int, n: int, trials: int = 64, seed: int = 0) -> torch.Tensor:
    """Search frequency sets ``⊂ {1, …, ⌈n/2⌉ − 1}`` (k < n/2 keeps rows orthogonal)."""
    half = r // 2
    pool = list(range(1, (n + 1) // 2))
    if len(pool) < half:
        raise ValueError(f"harmonic frame needs n >= r + 1; got r={r}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    candidates = [pool[:half]]
    candidates += [sorted(torch.randperm(len(pool), generator=gen)[:half].add(1).tolist()) for _ in range(trials)]
    frames = [harmonic_frame(r, n, c) for c in candidates]
    return min(frames, key=coherence)


def make_tight_unit(a: torch.Tensor, iters: int = 2000) -> torch.Tensor | None:
    """Alternate ``A ← √(n/r) (AAᵀ)^{-1/2} A`` and column normalization until both hold."""
    r, n = a.shape
    eye = torch.eye(r, dtype=a.dtype)
    for _ in range(iters):
        a = a / a.norm(dim=0, keepdim=True)
        lam, v = torch.linalg.eigh(a @ a.T)
        if lam.min() <= 0:
            return None
        a = math.sqrt(n / r) * (v * lam.rsqrt()[None, :]) @ v.T @ a
        norms_ok = (a.norm(dim=0) - 1).abs().max() < _NORM_TOL
        if norms_ok and (a @ a.T - (n / r) * eye).abs().max() < _TIGHT_TOL:
            return a
    return None


def alternating_projection(a: torch.Tensor, iters: int, shrink: float = 0.9) -> torch.Tensor:
    """Tropp et al.: Gram ← structural (unit diagonal, off-diagonals clipped to μ) ↔ spectral
    (rank-r, eigenvalues n/r); μ tracks ``shrink`` × the current coherence, floored at Welch."""
    r, n = a.shape
    mu_floor = welch_bound(r, n)
    for _ in range(iters):
        gram = a.T @ a
        mu = max(mu_floor, shrink * coherence(a))
        gram = gram.clamp(-mu, mu)
        gram.fill_diagonal_(1.0)
        _, vecs = torch.linalg.eigh(gram)
        a = math.sqrt(n / r) * vecs[:, -r:].T  # nearest tight frame of the Gram's top-r space
    return a


def etf_frame(r: int, n: int, polish_iters: int = 1000, max_polish_n: int = 128, seed: int = 0) -> Frame:
    """Best available unit-norm tight frame ``[r, n]`` (see module docstring)."""
    if n < r:
        raise ValueError(f"a tight frame of n={n} vectors in R^{r} needs n >= r")
    lev = levenstein_bound(r, n)
    if n == r:
        a, kind = torch.eye(r, dtype=torch.float64), "identity"
    elif n == r + 1:
        a, kind = simplex_frame(r), "simplex"
    else:
        a, kind = best_harmonic(r, n, seed=seed), "harmonic"
        if polish_iters and n <= max_polish_n:  # the n×n eigh per iteration is the cost
            # μ pinned at Welch (Tropp's ETF target) and a shrinking μ each win on some (r, n).
            for shrink in (0.0, 0.9):
                polished = make_tight_unit(alternating_projection(a, polish_iters, shrink))
                if polished is not None and coherence(polished) < coherence(a):
                    a, kind = polished, "harmonic+ap"
    frame = Frame(a, coherence(a), welch_bound(r, n), lev, kind)
    logger.info("ETF r=%d n=%d (%s): coherence %.4f, Welch %.4f, Levenstein %s", r, n, kind, frame.coherence, frame.welch_bound, lev)
    return frame


@torch.no_grad()
def init_etf(model: nn.Module, polish_iters: int = 1000) -> dict[str, Frame]:
    """``A ←`` frame [r, n], ``B ← 0`` on every LoRALinear (frames cached per (r, n))."""
    cache: dict[tuple[int, int], Frame] = {}
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            key = (layer.r, layer.in_features)
            if key not in cache:
                cache[key] = etf_frame(*key, polish_iters=polish_iters)
            layer.lora_A.copy_(cache[key].matrix.to(layer.lora_A.dtype))
            layer.lora_B.zero_()
            out[name] = cache[key]
    return out
