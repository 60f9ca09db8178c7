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
from lorafold.training.optim._usv_base import write_factors_batch, write_full_factors

# Called once per group of layers truncated to the same rank r1, after their write-back, with
# (batch indices, modules, P_r [k, p, r1], Q_r [k, q, r1]), e.g. to transport optimizer state
# onto the kept directions.
OnTruncate = Callable[[list[int], list[USVLinear], torch.Tensor, torch.Tensor], None]


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
    bases' dtype before the (tall) products. On an SVD failure nothing is written. The
    write-back is batched: when the layers share ``r_max``, one product per factor with
    ``P``, ``Q`` zero-padded past each layer's ``r1`` (multi-tensor copies of whole
    parameters); otherwise one product per distinct ``r1``. ``on_truncate`` is called once
    per distinct ``r1``.
    """
    svd = safe_svd(S_new)
    if svd is None:
        return None
    P, sigma, Q = svd
    firsts = rank_from_spectrum(sigma, tau, absolute)  # host sync
    P, Q, sigma = P.to(Uh.dtype), Q.to(Vh.dtype), sigma.to(Uh.dtype)
    ranks = []
    for mod, first in zip(modules, firsts, strict=True):
        hi = min(mod.r_max, sigma.shape[-1])
        ranks.append(max(min(first, hi), min(mod.r_min, hi)))
    groups: dict[int, list[int]] = {}
    for i, r1 in enumerate(ranks):
        groups.setdefault(r1, []).append(i)
    r_max = modules[0].r_max
    if all(mod.r_max == r_max for mod in modules):
        # One padded product for all layers: P_r zero-padded to r_max columns makes
        # Û P_pad = [Û P_r, 0], i.e. exactly the stored U (active block, zeros after it).
        width = min(r_max, sigma.shape[-1])
        keep = (torch.arange(width, device=sigma.device)[None, :] < torch.tensor(ranks, device=sigma.device)[:, None])
        keep = keep.to(sigma.dtype)
        pad = (0, r_max - width)
        P_pad = torch.nn.functional.pad(P[..., :width] * keep[:, None, :], pad)
        Q_pad = torch.nn.functional.pad(Q[..., :width] * keep[:, None, :], pad)
        S_pad = torch.diag_embed(torch.nn.functional.pad(sigma[:, :width] * keep, pad))
        write_full_factors(list(modules), Uh @ P_pad, S_pad, Vh @ Q_pad, ranks)
    else:
        for r1, idx in groups.items():
            sel = torch.tensor(idx, device=Uh.device)
            Pr, Qr = P.index_select(0, sel)[..., :r1], Q.index_select(0, sel)[..., :r1]
            Us, Vs = Uh.index_select(0, sel) @ Pr, Vh.index_select(0, sel) @ Qr
            write_factors_batch([modules[i] for i in idx], Us, torch.diag_embed(sigma.index_select(0, sel)[:, :r1]), Vs)
    if on_truncate is not None:
        for r1, idx in groups.items():
            sel = torch.tensor(idx, device=P.device)
            on_truncate(idx, [modules[i] for i in idx], P.index_select(0, sel)[..., :r1], Q.index_select(0, sel)[..., :r1])
    return ranks
