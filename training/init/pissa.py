"""PiSSA init (Meng et al.): the adapter starts on W0's principal singular directions.

``W0 ≈ U_r diag(σ_r) V_rᵀ`` (top r); ``B = U_r diag(√(σ_r / s))`` [m, r],
``A = diag(√(σ_r / s)) V_rᵀ`` [r, n] (so ``s B A`` is W0's best rank-r part), and the frozen
base becomes ``W_res = W0 − s B A``. Export against the original W0 with
:func:`lorafold.training.init.residual.export_against_original` (rank 2r).
"""

from __future__ import annotations

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear
from lorafold.training.init.residual import InitialFactors, set_residual


def top_r_svd(
    w: torch.Tensor, r: int, method: str = "lowrank", niter: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U [m, r], σ [r], V [n, r])`` of ``w`` (fp32 at least). ``method``: "lowrank" uses
    ``torch.svd_lowrank`` (randomized, ``niter`` power iterations), "full" the exact SVD."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    if method == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r].T
    if method != "lowrank":
        raise ValueError(f"method must be 'lowrank' or 'full', got {method!r}")
    u, s, v = torch.svd_lowrank(w, q=min(r + 10, min(w.shape)), niter=niter)
    return u[:, :r], s[:r], v[:, :r]


def pissa_factors(w: torch.Tensor, r: int, scale: float, method: str = "lowrank", niter: int = 8):
    """``(B [m, r], A [r, n])`` with ``s B A`` = best rank-r approximation of ``w``."""
    u, sigma, v = top_r_svd(w, r, method, niter)
    root = (sigma / scale).sqrt()
    return u * root[None, :], root[:, None] * v.T


@torch.no_grad()
def init_pissa(model: nn.Module, method: str = "lowrank", niter: int = 8) -> dict[str, InitialFactors]:
    """PiSSA on every LoRALinear (base weights become residuals, in place).

    Returns ``{name: InitialFactors}``, needed to export against the original weights.
    """
    initial = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            b, a = pissa_factors(layer.base.weight, layer.r, layer.scaling, method, niter)
            initial[name] = set_residual(layer, b.to(layer.lora_B.dtype), a.to(layer.lora_A.dtype))
    return initial
