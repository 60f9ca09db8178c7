"""Optimizer plumbing for USV adapters: collection by module, grouping, stacking, write-back.

The rank-adaptive optimizers update ``(U, S, V)`` of each :class:`USVLinear` as a unit, so
they are ``torch.optim.Optimizer`` subclasses whose per-layer state is keyed by the layer's
``S`` parameter and whose layers are collected *by module* (never by parameter order).
Layers with equal ``(m, n, r, dtype, device)`` are stacked so that the r×r algebra of a whole
group runs as one batched ``torch.linalg`` call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorafold.training.adapters.usv import USVLinear, USVTriple, usv_modules
from lorafold.training.optim._lowrank import work_dtype

logger = logging.getLogger(__name__)

USVTarget = nn.Module | Iterable[USVLinear | USVTriple | tuple[str, USVLinear]]


def collect_usv(target: USVTarget) -> list[tuple[str, USVLinear]]:
    """``[(name, module)]`` from a model, ``usv_triples(model)``, modules or ``(name, module)``."""
    if isinstance(target, USVLinear):
        return [("usv", target)]
    if isinstance(target, nn.Module):
        found = list(usv_modules(target).items())
    else:
        found = []
        for i, item in enumerate(target):
            if isinstance(item, USVLinear):
                found.append((f"usv{i}", item))
            elif isinstance(item, USVTriple):
                found.append((item.name, item.module))
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], USVLinear):
                found.append((str(item[0]), item[1]))
            else:
                raise TypeError(f"expected USVLinear, USVTriple or (name, USVLinear); got {type(item).__name__}")
    if not found:
        raise ValueError("no USVLinear modules to optimize; call inject_usv(model, ...) first")
    return found


@dataclass(slots=True)
class USVBatch:
    """Layers of equal shape stacked along dim 0 (work dtype); grads only where requested.

    With ``core_only`` (see :func:`batches`) only ``S`` and ``GS`` are stacked; ``U``, ``V``,
    ``GK``, ``GL`` are ``None``."""

    modules: list[USVLinear]
    U: torch.Tensor | None  # [L, m, r]
    S: torch.Tensor  # [L, r, r]
    V: torch.Tensor | None  # [L, n, r]
    GS: torch.Tensor | None = None  # [L, r, r]  UᵀG_Z V
    GK: torch.Tensor | None = None  # [L, m, r]  G_Z V
    GL: torch.Tensor | None = None  # [L, n, r]  G_Zᵀ U

    @property
    def rank(self) -> int:
        return self.S.shape[-1]


def _grad_triple(mod: USVLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    pg = mod.probe_grads()
    if pg is None or mod.S.grad is None:
        return None
    r = mod.rank
    return pg[0], pg[1], mod.S.grad[:r, :r]


def with_finite_grads(modules: Iterable[USVLinear]) -> list[USVLinear]:
    """The modules whose gradient triple ``(G V, Gᵀ U, UᵀGV)`` exists and is finite.

    One batched test for all layers (a multi-tensor 2-norm per gradient, one host sync): a
    finite norm means finite entries; a non-finite norm (NaN/inf entries, or an overflow of
    the norm itself) is re-checked entry-wise for that layer only, so the verdict is exactly
    ``isfinite(g).all()`` per tensor."""
    mods, grads = [], []
    for mod in modules:
        triple = _grad_triple(mod)
        if triple is not None:
            mods.append(mod)
            grads.extend(triple)
    if not mods:
        return []
    norms = torch._foreach_norm(grads, 2)
    try:
        ok = torch.isfinite(torch.stack(norms).view(len(mods), 3)).all(dim=1)
    except RuntimeError:  # mixed dtypes or devices across layers
        ok = torch.tensor([bool(torch.isfinite(n)) for n in norms]).view(len(mods), 3).all(dim=1)
    if bool(ok.all()):  # host sync: one per step
        return mods
    kept = []
    for mod, fine in zip(mods, ok.tolist(), strict=True):
        if not fine and not all(bool(torch.isfinite(t).all()) for t in _grad_triple(mod)):  # type: ignore[union-attr]
            logger.warning("non-finite gradient in a USV layer (%s); skipping its update this step", mod.extra_repr())
            continue
        kept.append(mod)
    return kept


def batches(modules: Iterable[USVLinear], with_grads: bool, core_only: bool = False) -> list[USVBatch]:
    """Group by ``(m, n, r, dtype, device)`` and stack. With ``with_grads``, layers without
    (finite) gradients are left out — they get no update and no state drift this step.
    ``core_only``: stack only ``S`` (and ``GS``) — what a coefficient step needs."""
    if with_grads:
        modules = with_finite_grads(modules)
    groups: dict[tuple[Any, ...], list[USVLinear]] = {}
    for mod in modules:
        key = (mod.out_features, mod.in_features, mod.rank, mod.U.dtype, mod.U.device)
        groups.setdefault(key, []).append(mod)
    out = []
    for mods in groups.values():
        wd = work_dtype(mods[0].U.dtype)
        r = mods[0].rank
        S = torch.stack([m.S.detach()[:r, :r].to(wd) for m in mods])
        if core_only:
            batch = USVBatch(mods, None, S, None)
        else:
            U = torch.stack([m.U.detach()[:, :r].to(wd) for m in mods])
            V = torch.stack([m.V.detach()[:, :r].to(wd) for m in mods])
            batch = USVBatch(mods, U, S, V)
        if with_grads:
            batch.GS = torch.stack([m.S.grad[:r, :r].to(wd) for m in mods])
            if not core_only:
                grads = [m.probe_grads() for m in mods]
                batch.GK = torch.stack([g[0].to(wd) for g in grads])  # type: ignore[index]
                batch.GL = torch.stack([g[1].to(wd) for g in grads])  # type: ignore[index]
        out.append(batch)
    return out


@torch.no_grad()
def write_factors(mod: USVLinear, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
    """Store ``U: [m, r1]``, ``S: [r1, r1]``, ``V: [n, r1]`` and zero everything outside."""
    r1 = S.shape[-1]
    for param, value in ((mod.U, U), (mod.V, V)):
        param[:, r1:] = 0
        param[:, :r1] = value.to(param.dtype)
    mod.S.zero_()
    mod.S[:r1, :r1] = S.to(mod.S.dtype)
    mod.set_rank(r1)


@torch.no_grad()
def write_factors_batch(mods: list[USVLinear], U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
    """:func:`write_factors` for layers truncated to the same rank ``r1`` (``U: [k, m, r1]``,
    ``S: [k, r1, r1]``, ``V: [k, n, r1]``): multi-tensor zero/copy instead of per-layer ops."""
    r1 = S.shape[-1]
    for params, value in (([mod.U for mod in mods], U), ([mod.V for mod in mods], V)):
        tails = [p[:, r1:] for p in params if p.shape[1] > r1]
        if tails:
            torch._foreach_zero_(tails)
        torch._foreach_copy_([p[:, :r1] for p in params], list(value.unbind(0)))
    cores = [mod.S for mod in mods]
    torch._foreach_zero_(cores)
    torch._foreach_copy_([c[:r1, :r1] for c in cores], list(S.unbind(0)))
    for mod in mods:
        mod.set_rank(r1)


@torch.no_grad()
def write_full_factors(
    mods: list[USVLinear], U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, ranks: list[int]
) -> None:
    """Whole parameters at once: ``U: [k, m, r_max]``, ``S: [k, r_max, r_max]``,
    ``V: [k, n, r_max]``, already zero outside each layer's active block of rank ``ranks[i]``
    (what :func:`write_factors` leaves behind)."""
    for params, value in (([m.U for m in mods], U), ([m.S for m in mods], S), ([m.V for m in mods], V)):
        torch._foreach_copy_(params, list(value.unbind(0)))
    for mod, r1 in zip(mods, ranks, strict=True):
        mod.set_rank(r1)


@torch.no_grad()
def write_cores(mods: list[USVLinear], S: torch.Tensor) -> None:
    """Store the active cores of a batch (``S: [L, r, r]``, all at their current rank r; bases
    and ranks unchanged): one multi-tensor copy instead of one op per layer."""
    r = S.shape[-1]
    torch._foreach_copy_([mod.S[:r, :r] for mod in mods], list(S.unbind(0)))


def put_block(buf: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value: [r1, r1]`` into the top-left of a square ``buf`` and zero the rest."""
    r1 = value.shape[-1]
    buf.zero_()
    buf[:r1, :r1] = value.to(buf.dtype)


class USVOptimizer(torch.optim.Optimizer):
    """Base class: one param group holding every layer's ``U``, ``S``, ``V``; state keyed by ``S``.

    Hyper-parameters live in ``param_groups[0]`` so LR schedulers work unchanged.
    """

    def __init__(self, target: USVTarget, defaults: dict[str, Any]) -> None:
        self.named_modules = collect_usv(target)
        params = [p for _, mod in self.named_modules for p in (mod.U, mod.S, mod.V)]
        super().__init__([{"params": params}], defaults)

    @property
    def modules(self) -> list[USVLinear]:
        return [mod for _, mod in self.named_modules]

    @property
    def hparams(self) -> dict[str, Any]:
        return self.param_groups[0]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for mod in self.modules:
            mod.clear_probe_grads()

    def ranks(self) -> dict[str, int]:
        """Active rank per layer name."""
        return {name: mod.rank for name, mod in self.named_modules}


def usv_builder(cls: type[USVOptimizer], **preset: Any):
    """Registry builder ``build(model, **overrides) -> cls(model, **preset, **overrides)``.

    Trainable parameters outside the USV layers are not updated by these optimizers; they are
    reported (logged) rather than silently ignored.
    """

    def build(model: nn.Module | None, **overrides: Any) -> USVOptimizer:
        if model is None or "pairs" in overrides:
            raise ValueError(f"{cls.__name__} needs a model with USV adapters (inject_usv), not LoRA pairs")
        opt = cls(model, **{**preset, **overrides})
        owned = {id(p) for g in opt.param_groups for p in g["params"]}
        others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
        if others:
            logger.warning(
                "%s leaves %d trainable parameters untouched (e.g. %s)", cls.__name__, len(others), others[0]
            )
        return opt

    build.__doc__ = f"{cls.__name__}({preset or ''}) over the model's USV adapters."
    return build
