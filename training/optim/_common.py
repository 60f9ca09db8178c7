"""Shared numerics of the LoRA-pair optimizers.

- r×r algebra (inverse, eigh, Sylvester, geometric mean) runs in float64 (cheap for r ≤ 64,
  whatever the training dtype) and batched: the r×r matrices of all layers with the same
  rank are stacked to ``[k, r, r]`` and go through ONE batched ``torch.linalg`` call.
- Damping ``δ`` is added to Gram matrices; a factorization that fails (or yields a
  non-finite result) falls back to the identity for that layer only — never to NaN.
- ``adamw_fused`` (torch's fused multi-tensor kernel, falling back to ``adamw_foreach``) is
  the Adam(W) update every Adam-based pair method here shares.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

LINALG_DTYPE = torch.float64
DEFAULT_DAMPING = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: Grams of bf16/fp16 factors are accumulated in fp32."""
    return torch.promote_types(dtype, torch.float32)


def gram_cols(b: torch.Tensor) -> torch.Tensor:
    """``BᵀB``: [m, r] -> [r, r] in float64 (product taken in at least fp32)."""
    b = b.to(compute_dtype(b.dtype))
    return (b.T @ b).to(LINALG_DTYPE)


def gram_rows(a: torch.Tensor) -> torch.Tensor:
    """``AAᵀ``: [r, n] -> [r, r] in float64 (product taken in at least fp32)."""
    a = a.to(compute_dtype(a.dtype))
    return (a @ a.T).to(LINALG_DTYPE)


def stack_grams(mats: Sequence[torch.Tensor], side: str) -> torch.Tensor:
    """Stack per-layer Grams into ``[k, r, r]``; ``side`` = "cols" (BᵀB) or "rows" (AAᵀ)."""
    fn = gram_cols if side == "cols" else gram_rows
    return torch.stack([fn(m) for m in mats])


def _identity_like(mats: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)
    return eye.expand_as(mats).clone()


def _finite_batch(mats: torch.Tensor) -> torch.Tensor:
    """[k, r, r] -> [k] bool: every entry finite."""
    return torch.isfinite(mats).flatten(1).all(dim=1)


def _replace_failed(result: torch.Tensor, ok: torch.Tensor, what: str) -> torch.Tensor:
    ok = ok & _finite_batch(result)
    if bool(ok.all()):  # host sync: one bool per batched call, not per layer
        return result
    logger.warning("%s failed for %d of %d layers; using the identity there", what, int((~ok).sum()), len(ok))
    return torch.where(ok[:, None, None], result, _identity_like(result))


def add_damping(mats: torch.Tensor, damping: float) -> torch.Tensor:
    """``M + δI`` on a ``[k, r, r]`` stack (float64)."""
    mats = mats.to(LINALG_DTYPE)
    if damping == 0.0:
        return mats
    return mats + damping * torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)


def spd_inverse(mats: torch.Tensor, damping: float = DEFAULT_DAMPING, method: str = "cholesky") -> torch.Tensor:
    """``(M + δI)⁻¹`` for a stack of symmetric PSD ``[k, r, r]`` matrices, float64.

    ``method="cholesky"``: one batched Cholesky; a layer whose factorization fails (singular
    Gram, e.g. ``B = 0`` with ``δ = 0``) gets the identity. ``method="pinv"``: the
    Moore-Penrose pseudo-inverse (eigh-based, ``torch.linalg.pinv(hermitian=True)``), which
    maps a zero Gram to zero. It is computed the cheap way first: batched Cholesky, which
    gives the same matrix whenever pinv's cut-off (eigenvalues below ``rtol·λ_max``,
    ``rtol = r·eps``) removes nothing — guaranteed when ``tr(M)·tr(M⁻¹) < 1/rtol``, since
    ``λ_max ≤ tr(M)`` and ``1/λ_min ≤ tr(M⁻¹)``. Only the layers that fail that bound (or
    the factorization) go through the eigh-based pinv, so the result is pinv's exactly.
    """
    if method not in ("cholesky", "pinv"):
        raise ValueError(f"unknown inverse method {method!r}: use 'cholesky' or 'pinv'")
    damped = add_damping(mats, damping)
    finite = _finite_batch(damped)
    chol, info = torch.linalg.cholesky_ex(damped)
    ok = finite & (info == 0)
    if not bool(ok.all()):  # host sync: one per batched call; the rare path substitutes I
        chol = torch.where(ok[:, None, None], chol, _identity_like(chol))
    inv = torch.cholesky_inverse(chol)
    if method == "cholesky":
        return _replace_failed(inv, ok, "Cholesky inverse")
    rtol = torch.finfo(damped.dtype).eps * damped.shape[-1]  # torch.linalg.pinv's default
    bound = damped.diagonal(dim1=-2, dim2=-1).sum(-1) * inv.diagonal(dim1=-2, dim2=-1).sum(-1)
    exact = ok & (bound * rtol < 0.5)  # margin 2x against round-off in the bound itself
    if not bool(exact.all()):  # host sync: one per batched call
        redo = (~exact).nonzero().squeeze(-1)
        safe = torch.where(finite[:, None, None], damped, _identity_like(damped)).index_select(0, redo)
        inv = inv.index_copy(0, redo, torch.linalg.pinv(safe, hermitian=True))
    return _replace_failed(inv, finite, "pinv")


def sym_eigh(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ``eigh`` of symmetric ``[k, r, r]`` (float64); non-finite inputs -> identity.

    Returns ``(eigenvalues [k, r] ascending, eigenvectors [k, r, r])``.
    """
    mats = mats.to(LINALG_DTYPE)
    mats = 0.5 * (mats + mats.transpose(-1, -2))  # exact symmetry: eigh reads one triangle
    finite = _finite_batch(mats)
    safe = torch.where(finite[:, None, None], mats, _identity_like(mats))
    try:
        return torch.linalg.eigh(safe)
    except torch.linalg.LinAlgError:
        # Rare (ill-posed input): redo per layer so one bad layer does not take the batch down.
        logger.warning("batched eigh failed; retrying per layer")
        vals, vecs = [], []
        for m in safe:
            try:
                w, v = torch.linalg.eigh(m)
            except torch.linalg.LinAlgError:
                w, v = torch.ones(m.shape[-1], dtype=m.dtype), torch.eye(m.shape[-1], dtype=m.dtype)
            vals.append(w)
            vecs.append(v)
        return torch.stack(vals), torch.stack(vecs)


def sylvester_spd(p: torch.Tensor, q: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``P X + X Q = C`` for SPD ``P, Q`` (all ``[k, r, r]``, float64).

    ``P = U diag(λ) Uᵀ``, ``Q = V diag(μ) Vᵀ`` ⇒ ``X = U [(Uᵀ C V) / (λ_i + μ_j)] Vᵀ``.
    A non-positive denominator (degenerate input) gives 0 for that entry, not inf.
    """
    lam, u = sym_eigh(p)
    mu, v = sym_eigh(q)
    denom = lam[:, :, None] + mu[:, None, :]
    core = u.transpose(-1, -2) @ rhs.to(LINALG_DTYPE) @ v
    core = torch.where(denom > 0, core / denom.clamp_min(torch.finfo(LINALG_DTYPE).tiny), torch.zeros_like(core))
    return u @ core @ v.transpose(-1, -2)


def group_by_rank(ranks: Sequence[int]) -> dict[int, list[int]]:
    """Indices of layers sharing a rank (their r×r matrices stack into one batch)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(ranks):
        groups.setdefault(r, []).append(i)
    return groups


def adamw_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """Bias-corrected Adam step, then decoupled weight decay ``p ← p − η λ p`` (in place).

    ``steps[i]`` is parameter i's step count *after* this step (≥ 1). Multi-tensor ops:
    one kernel launch per operation for the whole list instead of one per parameter.
    """
    if not params:
        return
    beta1, beta2 = betas
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**t) for t in steps])
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)


_FUSED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def adamw_fused(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """Same update as :func:`adamw_foreach` (Adam step, *then* decay), through torch's fused
    multi-tensor Adam kernel (``torch._fused_adamw_``, one pass over the data instead of ~7).

    The kernel is called with ``weight_decay = 0`` — torch's AdamW decays *before* the Adam
    step — and the decay is applied afterwards, so the result is the one of
    :func:`adamw_foreach` to round-off. Per-parameter step counts are passed as one shared
    0-d float32 tensor per distinct value (the kernel only reads them). Falls back to
    :func:`adamw_foreach` for tensors the kernel does not take (mixed devices or dtypes,
    non-contiguous, non-float) or if it raises.
    """
    if not params:
        return
    dev, dt = params[0].device, params[0].dtype
    fusable = dt in _FUSED_DTYPES and all(
        t.device == dev and t.dtype == dt and t.is_contiguous()
        for ts in (params, grads, exp_avgs, exp_avg_sqs)
        for t in ts
    )
    if fusable:
        table: dict[int, torch.Tensor] = {}
        step_ts = []
        for t in steps:
            if t not in table:
                table[t] = torch.tensor(float(t), dtype=torch.float32, device=dev)
            step_ts.append(table[t])
        try:
            torch._fused_adamw_(
                params, grads, exp_avgs, exp_avg_sqs, [], step_ts,
                lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=0.0, eps=eps,
                amsgrad=False, maximize=False,
            )  # fmt: skip
        except (RuntimeError, NotImplementedError):  # e.g. a build without the CPU kernel
            fusable = False
        else:
            if weight_decay:
                torch._foreach_mul_(params, 1.0 - lr * weight_decay)
            return
    adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas, eps, weight_decay)


def sgd_foreach(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float, weight_decay: float) -> None:
    """``p ← p − η g``, then ``p ← p − η λ p`` (in place)."""
    if not params:
        return
    torch._foreach_add_(params, grads, alpha=-lr)
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
