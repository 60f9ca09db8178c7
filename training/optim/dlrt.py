"""DLRT: the rank-adaptive augmented BUG integrator (Schotthöfer et al., NeurIPS 2022) for USV adapters.

``W = W0 + s · U S Vᵀ``; ``G = ∂L/∂(U S Vᵀ)``. One step (one layer; all r×r and 2r×2r algebra
batched over layers of equal shape)::

    K-step:  K1 = U S − λ G V,    Û = orth[U, K1]  ([m, 2r]),  M̂ = Ûᵀ U
    L-step:  L1 = V Sᵀ − λ Gᵀ U,  V̂ = orth[V, L1]  ([n, 2r]),  N̂ = V̂ᵀ V
    S-step:  S̃ = M̂ S N̂ᵀ − λ Ûᵀ G' V̂        (G' = gradient at Û (M̂ S N̂ᵀ) V̂ᵀ = W)
    truncate S̃ = P Σ Qᵀ at tolerance τ (relative, or absolute), r1 ∈ [r_min, r_max]:
             U ← Û P[:, :r1],  V ← V̂ Q[:, :r1],  S ← Σ[:r1, :r1]

``G V`` and ``Gᵀ U`` come from the layers' gradient probes (no ``S⁻¹``). The S-step needs the
gradient w.r.t. the augmented core, which one backward pass cannot give (the block
``ŨᵀGṼ`` involves directions found only after that pass). Choice made here: a **second
forward/backward pass through ``closure``**, run with every layer temporarily written over
its augmented bases (``USVLinear.substituted``) and a fresh leaf core ``M̂ S N̂ᵀ``. Since
``Û M̂ S N̂ᵀ V̂ᵀ = W``, on the same batch ``G' = G`` and the step is the fixed-batch identity
``W − λ P_Û G P_V̂`` (then truncated). The closure must therefore re-evaluate **the same
batch** (no new sampling, no dropout randomness) and call ``backward``; it may call
``optimizer.zero_grad()``. Cost: two forward/backward passes per step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from lorafold.training.adapters.usv import USVLinear
from lorafold.training.optim._lowrank import augment_basis
from lorafold.training.optim._truncate import truncate_into
from lorafold.training.optim._usv_base import USVOptimizer, USVTarget, batches

logger = logging.getLogger(__name__)


class DLRT(USVOptimizer):
    """Rank-adaptive augmented BUG over every USV layer of ``target``; ``step(closure)`` required.

    Args:
        lr: λ. tau: truncation tolerance θ (relative ``‖σ_tail‖ ≤ θ‖σ‖`` unless ``absolute_tau``).
    """

    #: the trainer passes ``step`` a closure that re-runs the step's batch (forward + backward)
    needs_closure = True

    def __init__(self, target: USVTarget, lr: float = 1e-2, tau: float = 0.15, absolute_tau: bool = False) -> None:
        if lr <= 0 or tau < 0:
            raise ValueError(f"need lr > 0 and tau >= 0; got lr={lr}, tau={tau}")
        super().__init__(target, dict(lr=lr, tau=tau, absolute_tau=absolute_tau))

    def _first_pass(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        # Reuse gradients when the caller already ran backward on this batch.
        if all(mod.probe_grads() is not None and mod.S.grad is not None for mod in self.modules):
            return None
        with torch.enable_grad():
            return closure()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):  # type: ignore[override]
        """K/L steps from the current gradients, S-step from a second pass of ``closure``."""
        if closure is None:
            raise ValueError("DLRT.step needs a closure that re-evaluates the same batch and calls backward()")
        loss = self._first_pass(closure)
        lr = self.hparams["lr"]
        plans = []
        for b in batches(self.modules, with_grads=True):
            Uh = augment_basis(b.U, b.U @ b.S - lr * b.GK)
            Vh = augment_basis(b.V, b.V @ b.S.mT - lr * b.GL)
            S0 = (Uh.mT @ b.U) @ b.S @ (b.V.mT @ Vh)
            cores = [S0[i].to(mod.S.dtype).requires_grad_(True) for i, mod in enumerate(b.modules)]
            plans.append((b.modules, Uh, Vh, cores))
        if not plans:
            logger.warning("DLRT: no layer has gradients; nothing to do")
            return loss
        self._second_pass(closure, plans)
        for mods, Uh, Vh, cores in plans:
            grads = [c.grad if c.grad is not None else torch.zeros_like(c) for c in cores]
            S_new = torch.stack([c.detach() - lr * g for c, g in zip(cores, grads)]).to(Uh.dtype)
            if truncate_into(mods, Uh, S_new, Vh, self.hparams["tau"], self.hparams["absolute_tau"]) is None:
                logger.warning("DLRT: update skipped for %d layers (SVD failed)", len(mods))
        self.zero_grad()
        return loss

    @staticmethod
    def _second_pass(closure: Callable[[], torch.Tensor], plans: list) -> None:
        with contextlib.ExitStack() as stack:
            for mods, Uh, Vh, cores in plans:
                for i, mod in enumerate(mods):
                    assert isinstance(mod, USVLinear)
                    dt = mod.U.dtype
                    stack.enter_context(mod.substituted(Uh[i].to(dt), cores[i], Vh[i].to(dt)))
            with torch.enable_grad():
                closure()
