"""Rank-adaptive truncation of an augmented core, written back into the USV layers.

Semantics (one layer; the batch runs one float64 SVD for all ``L`` layers)::

    Û: [m, p], V̂: [n, q] orthonormal, S̃: [p, q]   (the new W = Û S̃ V̂ᵀ)
    S̃ = P diag(σ) Qᵀ;  r1 = clamp(smallest j with ‖σ[j:]‖ ≤ τ‖σ‖ (or ≤ τ), r_min, r_max)
    U ← Û P[:, :r1],  V ← V̂ Q[:, :r1],  S ← diag(σ[:r1])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lorafold.training.adapters.usv import USVLinear
from lorafold.training.optim._lowrank import rank_from_spectrum, safe_svd
from lorafold.training.optim._usv_base import write_factors

# Called per layer after its write-back with (batch index, module, P_r [p, r1], Q_r [q, r1]),
# e.g. to transport optimizer state onto the kept directions.
OnTruncate = Callable[[int, USVLinear, torch.Tensor, torch.Tensor], None]


def truncate_into(
    modules: Sequence[USVLinear],
    Uh: torch.Tensor,
    S_new: torch.Tensor,
    Vh: torch.Tensor,
    tau: float,
    absolute: bool = False,
    on_truncate: OnTruncate | None = None,
) -> list[int] | None:
    """Truncate ``Û S̃ V̂ᵀ`` per layer and store it; returns the new ranks, ``None`` if skipped.

    ``Uh: [L, m, p]``, ``S_new: [L, p, q]``, ``Vh: [L, n, q]``. The SVD result is cast to the
    bases' dtype before the (tall) products. On an SVD failure nothing is written.
    """
    svd = safe_svd(S_new)
    if svd is None:
        return None
    P, sigma, Q = svd
    firsts = rank_from_spectrum(sigma, tau, absolute)  # host sync
    P, Q, sigma = P.to(Uh.dtype), Q.to(Vh.dtype), sigma.to(Uh.dtype)
    ranks = []
    for i, (mod, first) in enumerate(zip(modules, firsts)):
        hi = min(mod.r_max, sigma.shape[-1])
        r1 = max(min(first, hi), min(mod.r_min, hi))
        Pr, Qr = P[i, :, :r1], Q[i, :, :r1]
        write_factors(mod, Uh[i] @ Pr, torch.diag(sigma[i, :r1]), Vh[i] @ Qr)
        if on_truncate is not None:
            on_truncate(i, mod, Pr, Qr)
        ranks.append(r1)
    return ranks
