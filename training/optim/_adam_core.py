"""Adam moments of the USV core ``S``, stored per layer at ``[r_max, r_max]`` and stacked per batch.

The moments live in the coordinates of the current bases; the rank-adaptive optimizers move
them across basis changes with :func:`~lorafold.training.optim._lowrank.transport_augment`
and :func:`~lorafold.training.optim._lowrank.transport_truncate`.
"""

from __future__ import annotations

import torch

from lorafold.training.adapters.usv import USVLinear
from lorafold.training.optim._usv_base import put_block


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def core_state(state: dict, mod: USVLinear) -> dict:
    """The (lazily created) Adam state of one layer: ``step``, ``exp_avg``, ``exp_avg_sq``."""
    st = state[mod.S]
    if "exp_avg" not in st:
        shape, dt = mod.S.shape, state_dtype(mod.S.dtype)
        st["step"] = 0
        st["exp_avg"] = torch.zeros(shape, dtype=dt, device=mod.S.device)
        st["exp_avg_sq"] = torch.zeros(shape, dtype=dt, device=mod.S.device)
    return st


def stack_moments(
    state: dict, mods: list[USVLinear], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Active blocks ``m, v: [L, r, r]`` and the per-layer step counts ``[L, 1, 1]`` of a batch.

    Step counts can differ inside a batch when a layer skipped a step (no or non-finite grad).
    """
    r = mods[0].rank
    sts = [core_state(state, mod) for mod in mods]
    m = torch.stack([st["exp_avg"][:r, :r].to(dtype) for st in sts])
    v = torch.stack([st["exp_avg_sq"][:r, :r].to(dtype) for st in sts])
    steps = torch.tensor([st["step"] for st in sts], dtype=dtype, device=m.device).view(-1, 1, 1)
    return m, v, steps


def store_moments(state: dict, mod: USVLinear, m: torch.Tensor, v: torch.Tensor, step: int) -> None:
    st = core_state(state, mod)
    put_block(st["exp_avg"], m)
    put_block(st["exp_avg_sq"], v)
    st["step"] = step


def store_moments_batch(
    state: dict, mods: list[USVLinear], m: torch.Tensor, v: torch.Tensor, steps: list[int]
) -> None:
    """:func:`store_moments` for a batch at one rank (``m, v: [L, r1, r1]``): the same result —
    block written, everything outside it zero — with multi-tensor ops instead of per layer."""
    r1 = m.shape[-1]
    sts = [core_state(state, mod) for mod in mods]
    partial = [st[k] for st in sts for k in ("exp_avg", "exp_avg_sq") if st[k].shape[-1] != r1]
    if partial:  # rank below r_max: zero outside the block first (put_block's invariant)
        torch._foreach_zero_(partial)
    torch._foreach_copy_([st["exp_avg"][:r1, :r1] for st in sts], list(m.unbind(0)))
    torch._foreach_copy_([st["exp_avg_sq"][:r1, :r1] for st in sts], list(v.unbind(0)))
    for st, t in zip(sts, steps, strict=True):
        st["step"] = t


def adam_direction(
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    step: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    v_floor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam moment update with gradient ``g`` at step ``step`` (1-based, ``[L, 1, 1]``).

    ``m ← β1 m + (1−β1) g``, ``v ← β2 v + (1−β2) g²``,
    direction ``D = (m / (1−β1^t)) / (√(v' / (1−β2^t)) + ε)`` with ``v' = max(v, ρ·mean(v))``
    (``ρ = v_floor``, mean over each layer's block; ``ρ = 0`` is plain Adam). Returns ``(D, m, v)``.
    """
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g.square()
    denom = v
    if v_floor > 0:
        denom = torch.maximum(v, v_floor * v.mean(dim=(-2, -1), keepdim=True))
    d = (m / (1 - torch.pow(b1, step))) / ((denom / (1 - torch.pow(b2, step))).sqrt() + eps)
    return d, m, v
