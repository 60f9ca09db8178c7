"""The factorization test bed (spec §0) in USV form, for the rank-adaptive optimizers.

``f(W) = ½‖A* − W‖²_F`` with ``W = U S Vᵀ`` held by a :class:`USVLinear` over a zero base
``[m, n]`` and scale 1: feeding the identity ``x = I_n`` gives ``out = Wᵀ``, so
``f = ½‖out − A*ᵀ‖²`` runs through the real adapter forward/backward (probes included) and
``G = ∂f/∂W = W − A*``. Dense references below form ``G`` explicitly (tests only).
"""

from __future__ import annotations

import torch
from torch import nn

from lorafold.training.adapters.usv import USVLinear


def usv_layer(
    m: int = 30,
    n: int = 20,
    r0: int = 4,
    r_min: int = 1,
    r_max: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> USVLinear:
    """A USV adapter over a zero ``[m, n]`` base; ``U``, ``V`` random orthonormal (seeded), ``S = 0``."""
    base = nn.Linear(n, m, bias=False, dtype=dtype)
    nn.init.zeros_(base.weight)
    torch.manual_seed(seed)
    return USVLinear(base, r0=r0, r_min=r_min, r_max=r_max, alpha=1.0)


def usv_loss(layer: USVLinear, target: torch.Tensor) -> torch.Tensor:
    """``½‖A* − W‖²`` through the layer's forward (``x = I_n`` gives ``Wᵀ``)."""
    eye = torch.eye(layer.in_features, dtype=layer.U.dtype, device=layer.U.device)
    return 0.5 * (layer(eye) - target.T).square().sum()


def usv_step(layer: USVLinear, opt: torch.optim.Optimizer, target: torch.Tensor) -> float:
    """``opt.step(closure)`` with a same-batch closure (DLRT runs it twice); returns f before."""

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = usv_loss(layer, target)
        loss.backward()
        return loss

    return float(opt.step(closure).detach())


def set_factors(layer: USVLinear, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
    """Overwrite the active factors (rank = ``S.shape[0]``)."""
    from lorafold.training.optim._usv_base import write_factors

    write_factors(layer, U, S, V)


def tangent_project(U: torch.Tensor, V: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Dense ``P_T(X) = UUᵀX + XVVᵀ − UUᵀXVVᵀ``."""
    pu, pv = U @ U.T, V @ V.T
    return pu @ X + X @ pv - pu @ X @ pv


def truncated_svd(X: torch.Tensor, tau: float, r_min: int, r_max: int) -> tuple[torch.Tensor, int]:
    """Dense §6 rule: smallest ``j`` with ``‖σ[j:]‖ ≤ τ‖σ‖``, clamped; returns ``(X_j, j)``."""
    u, s, vh = torch.linalg.svd(X, full_matrices=False)
    tails = [float(s[j:].norm()) for j in range(len(s) + 1)]
    j = next(j for j, t in enumerate(tails) if t <= tau * tails[0])
    j = max(min(j, r_max), r_min)
    return u[:, :j] @ torch.diag(s[:j]) @ vh[:j], j


def tiny_llama(seed: int = 0) -> nn.Module:
    """Random Llama: hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128, vocab 128, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def fixed_batch(batch: int = 4, seq: int = 16, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    """Random token ids ``[batch, seq]``."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def train_llama(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, steps: int) -> list[float]:
    """``steps`` optimizer steps of next-token loss on one fixed batch; returns the losses seen."""
    losses = []

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(float(opt.step(closure).detach()))
    return losses
