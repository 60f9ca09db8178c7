"""Batched low-rank algebra shared by DLRT, GeoLoRA and the geometric momentum methods.

Every function takes tensors stacked over ``L`` layers of equal shapes (leading dim ``L``) so
that one ``torch.linalg`` call serves a whole group of layers. Notation (one layer)::

    W = U S Vᵀ   U: [m, r], V: [n, r] orthonormal, S: [r, r]
    G: [m, n] gradient w.r.t. W, known only through GS = UᵀGV [r, r], GK = G V [m, r],
       GL = Gᵀ U [n, r]
    P_T(G) = U Uᵀ G + G V Vᵀ − U Uᵀ G V Vᵀ   (tangent projection at W)

All r×r factorizations run in float64 (cheap for r ≤ 64); tall QRs in float32 at least.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

CORE_DTYPE = torch.float64


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype for the tall [m, 2r] algebra: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def augment_basis(U: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of ``span[U, K]``, at most ``m`` wide: ``[L, m, r + min(k, m − r)]``.

    ``U: [L, m, r]`` orthonormal, ``K: [L, m, k]``. Householder QR of ``[U, K]`` keeps all of
    its columns orthonormal even when ``K`` is rank deficient (e.g. a zero gradient), and its
    first ``r`` columns re-orthonormalize ``U`` (they equal ``U`` up to signs and round-off),
    so drift in ``U`` never accumulates. Callers express old coordinates in the new basis
    through ``M = Ûᵀ U`` — never assume ``M = [I; 0]``.
    """
    m, r = U.shape[-2], U.shape[-1]
    width = r + min(K.shape[-1], m - r)
    Q = torch.linalg.qr(torch.cat([U, K], dim=-1)).Q
    return Q[..., :width]


def tangent_coordinates(
    GS: torch.Tensor,
    GK: torch.Tensor,
    GL: torch.Tensor,
    Uh: torch.Tensor,
    Vh: torch.Tensor,
    M: torch.Tensor,
    N: torch.Tensor,
) -> torch.Tensor:
    """``Ûᵀ P_T(G) V̂`` ([L, p, q]) from the gradient triple, for bases ``Û ⊇ span U``, ``V̂ ⊇ span V``.

    With ``M = Ûᵀ U`` ([p, r]) and ``N = Vᵀ V̂`` ([r, q])::

        Ûᵀ P_T(G) V̂ = M (GLᵀ V̂) + (Ûᵀ GK) N − M GS N

    Because ``span Û ⊇ span[U, G V]`` and ``span V̂ ⊇ span[V, Gᵀ U]``, ``Û (·) V̂ᵀ`` of this is
    exactly ``P_T(G)`` — GeoLoRA's augmented core ``[[UᵀGV, UᵀGṼ], [ŨᵀGV, 0]]`` written in a
    general orthonormal basis.
    """
    return M @ (GL.mT @ Vh) + (Uh.mT @ GK) @ N - M @ GS @ N


def rank_from_spectrum(sigma: torch.Tensor, tau: float, absolute: bool = False) -> list[int]:
    """Per layer: the smallest ``j`` with ``‖σ[j:]‖₂ ≤ τ‖σ‖₂`` (relative) or ``≤ τ`` (absolute).

    ``sigma: [L, p]`` descending → ``L`` ints in ``[0, p]`` (the caller clamps them to
    ``[r_min, r_max]``). Host sync (``tolist``).
    """
    sq = sigma.to(CORE_DTYPE).square()
    tails = sq.flip(-1).cumsum(-1).flip(-1).sqrt()
    tails = torch.cat([tails, torch.zeros_like(tails[..., :1])], dim=-1)
    thr = torch.full_like(tails[..., :1], tau) if absolute else tau * tails[..., :1]
    return (tails <= thr).to(torch.int64).argmax(dim=-1).tolist()


def safe_svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """float64 ``X = P diag(σ) Qᵀ`` for ``X: [L, p, q]``; ``None`` if it cannot be computed.

    Returns ``(P [L, p, k], σ [L, k], Q [L, q, k])``, ``k = min(p, q)``. A LAPACK convergence
    failure is retried once with a tiny diagonal shift (1e-12 relative), which moves σ by far
    less than any truncation tolerance; the caller skips the update on ``None``.
    """
    X64 = X.to(CORE_DTYPE)
    if not torch.isfinite(X64).all():
        logger.warning("non-finite augmented core; skipping this low-rank update")
        return None
    try:
        P, s, Qh = torch.linalg.svd(X64, full_matrices=False)
    except torch.linalg.LinAlgError:
        eye = torch.eye(X64.shape[-2], X64.shape[-1], dtype=CORE_DTYPE, device=X64.device)
        shift = 1e-12 * X64.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
        try:
            P, s, Qh = torch.linalg.svd(X64 + shift * eye, full_matrices=False)
        except torch.linalg.LinAlgError:
            logger.error("SVD of the augmented core failed twice; skipping this low-rank update")
            return None
    return P, s, Qh.mT


def transport_augment(
    m: torch.Tensor, v: torch.Tensor, M: torch.Tensor, N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam state into the augmented basis: ``m ← M m N``, ``v ← (M √v N)²``.

    ``m, v: [L, r, r]``, ``M = Ûᵀ U: [L, p, r]``, ``N = Vᵀ V̂: [L, r, q]`` → ``[L, p, q]``.
    ``m`` transforms like the coefficient gradient (exact); ``v`` has no exact transform — its
    square root is moved like ``m`` (exact for signed permutations, zero for new directions).
    """
    return M @ m @ N, (M @ v.clamp_min(0).sqrt() @ N).square()


def fill_fresh(v: torch.Tensor, r: int) -> torch.Tensor:
    """Second moments of the new augmented directions: the mean of the old ``[r, r]`` block.

    ``v: [L, p, q]`` after :func:`transport_augment`, whose rows/columns past ``r`` belong to
    the new directions Ũ, Ṽ and are zero by the formula. [R] reconstruction, not from the
    papers: with zeros there, and Adam's global-step bias correction, every fresh entry would
    take a full ``±lr·(1−β1)/√(1−β2)`` step (≈3·lr) whatever its gradient size — on every
    augmentation, so the iterate never settles. Seeding them with the layer's typical second
    moment makes a fresh direction's step proportional to its gradient instead.
    """
    fill = v[..., :r, :r].mean(dim=(-2, -1), keepdim=True)
    fresh = torch.ones_like(v, dtype=torch.bool)
    fresh[..., :r, :r] = False
    return torch.where(fresh, fill.expand_as(v), v)


def seed_fresh(
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    r: int,
    step: torch.Tensor,
    beta1: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam state of the new augmented directions so that their step follows their gradient.

    ``m, v: [L, p, q]`` after :func:`transport_augment` (zero past the old ``[r, r]`` block),
    ``g: [L, p, q]`` the augmented-core gradient, ``step: [L, 1, 1]`` the 1-based step about to
    be taken. Returns the *pre-update* ``(m, v)`` with the fresh entries set to::

        m_fresh = (1 − β1^{t−1}) · g      v_fresh = mean of the old [r, r] block of v

    so that after Adam's update and bias correction a fresh entry has ``m̂ = g`` exactly and
    ``v̂ ≈`` the layer's typical second moment: its step is ``λ g / √v̄`` — proportional to
    its gradient, at the layer's own scale. [R] reconstruction, not from the papers. Why:
    the [V] formula leaves zeros there, and with Adam's global step count a zero first moment
    lets only ``(1 − β1) g`` (10 %) of the gradient through, seeding the second moment with the
    mean (``fill_fresh``, ``fresh_v="mean"``) keeps that 10 % — either way a new direction's
    first singular value is an order of magnitude too small to survive the truncation that
    follows, and rank-adaptive Adam cannot grow rank (from r0 = 1 toward a rank-4 target it
    stays at rank 1–2). At ``t = 1`` (no history) this is Adam's first step: ``m̂ = g``,
    ``v̂ = g²``.
    """
    fresh = torch.ones_like(v, dtype=torch.bool)
    fresh[..., :r, :r] = False
    fill = v[..., :r, :r].mean(dim=(-2, -1), keepdim=True).expand_as(v)
    m_seed = g * (1 - torch.pow(beta1, step - 1))
    return torch.where(fresh, m_seed, m), torch.where(fresh, fill, v)


def transport_truncate(
    m: torch.Tensor, v: torch.Tensor, P: torch.Tensor, Q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam state onto the kept singular directions: ``m ← Pᵀ m Q``, ``v ← (Pᵀ √v Q)²``.

    ``m, v: [..., p, q]``, ``P: [..., p, r1]``, ``Q: [..., q, r1]`` → ``[..., r1, r1]``.
    """
    return P.mT @ m @ Q, (P.mT @ v.clamp_min(0).sqrt() @ Q).square()

