"""The shared factorization test bed ``f(X, Y) = ½‖A* − X Yᵀ‖²_F`` (spec §0).

``X = B = lora_B: [m, r]`` and ``Y = Aᵀ`` (``lora_A = Yᵀ: [r, n]``), scale 1, so the full
gradient is ``G = X Yᵀ − A*`` and autograd gives ``g_A = Bᵀ G``, ``g_B = G Aᵀ`` — the same
shapes and conventions as a LoRA layer, so every pair optimizer runs on it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRAPair, lora_pairs


class FactorModel(nn.Module):
    """One factor pair; ``loss(target) = ½‖target − B A‖²``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"X [m, r] and Y [n, r] need the same r, got {tuple(x.shape)} and {tuple(y.shape)}")
        self.lora_B = nn.Parameter(x.detach().clone())
        self.lora_A = nn.Parameter(y.detach().T.clone())
        self.scaling = 1.0

    def product(self) -> torch.Tensor:
        """``X Yᵀ = B A``: [m, n]."""
        return self.lora_B @ self.lora_A

    def loss(self, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (target - self.product()).pow(2).sum()

    def full_grad(self, target: torch.Tensor) -> torch.Tensor:
        """``G = ∂f/∂W = B A − A*`` (what a transient-G statistic would see)."""
        with torch.no_grad():
            return self.product() - target

    def pairs(self) -> list[LoRAPair]:
        return lora_pairs(self)


def make_target(
    m: int = 30, n: int = 20, r: int = 4, kappa: float | None = None, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Rank-r ``A* = U diag(σ) Vᵀ``; with ``kappa`` the σ are geometric from 1 down to 1/κ,
    otherwise ``A*`` is the product of two Gaussian factors."""
    gen = torch.Generator().manual_seed(seed)
    if kappa is None:
        return torch.randn(m, r, generator=gen, dtype=dtype) @ torch.randn(r, n, generator=gen, dtype=dtype)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=dtype))
    sigma = torch.logspace(0, -torch.log10(torch.tensor(float(kappa))).item(), r, dtype=dtype)
    return u @ torch.diag(sigma) @ v.T


def random_factors(
    m: int = 30, n: int = 20, r: int = 4, seed: int = 1, std: float = 1.0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian ``(X [m, r], Y [n, r])``."""
    gen = torch.Generator().manual_seed(seed)
    return (
        std * torch.randn(m, r, generator=gen, dtype=dtype),
        std * torch.randn(n, r, generator=gen, dtype=dtype),
    )


def one_step(model: FactorModel, opt: torch.optim.Optimizer, target: torch.Tensor) -> torch.Tensor:
    """Zero grads, backprop f, take one step; returns f before the step."""
    opt.zero_grad(set_to_none=True)
    loss = model.loss(target)
    loss.backward()
    opt.step()
    return loss.detach()


def gauge_transform(x: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X Q, Y Q⁻ᵀ)``: same product ``X Yᵀ``, different factors (i.e. ``B Q``, ``Q⁻¹ A``)."""
    return x @ q, y @ torch.linalg.inv(q).T


def random_gauge(r: int = 4, seed: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random well-conditioned but far-from-orthogonal ``Q ∈ GL(r)``."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=dtype))
    return u @ torch.diag(torch.logspace(0, 1, r, dtype=dtype)) @ v.T


class single_thread:
    """Context manager: run torch on one intra-op thread, restoring the old count afterwards.

    Why: the r×r and 30×20 ops of the test bed are far too small to gain from threads, and on
    a shared, oversubscribed CPU every OpenMP parallel region can stall for a scheduler slice
    (milliseconds per tiny op). Tests and the test-bed benchmark use this.
    """

    def __enter__(self) -> "single_thread":
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._threads)
