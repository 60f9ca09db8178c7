"""The shape-bucketed, batched pair optimizers against straightforward per-pair references.

Several layers of differing shapes (two buckets of equal shape, odd shapes, a second rank,
differing scales), float64, a few steps with fresh gradients, one pair without gradients
in one step (it must be skipped: no update, no state drift). The references below are
written per pair, directly from the formulas of the design spec, with no batching.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafold.training.adapters.lora import LoRAPair
from lorafold.training.optim.adaprelora import AdaPreLoRA
from lorafold.training.optim.reflora import RefLoRA
from lorafold.training.optim.scaled import ScaledAdamW
from lorafold.training.optim.testbed import single_thread

# (m, n, r, scale): shape buckets {0, 1, 5}, {2}, {3} (rank 4) and {4} (rank 3)
SHAPES = [(12, 10, 4, 2.0), (12, 10, 4, 0.5), (7, 10, 4, 2.0), (12, 5, 4, 1.0), (9, 9, 3, 3.0), (12, 10, 4, 1.5)]
STEPS = 3
SKIP = (1, 2)  # (step, pair): this pair gets no gradient in this step
TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _pairs(seed: int = 0) -> list[LoRAPair]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (m, n, r, s) in enumerate(SHAPES):
        a = nn.Parameter(torch.randn(r, n, generator=gen, dtype=torch.float64) / n**0.5)
        b = nn.Parameter(torch.randn(m, r, generator=gen, dtype=torch.float64) / m**0.5)
        out.append(LoRAPair(f"layer{i}", a, b, s))
    return out


def _grads(step: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per pair ``(G, None)``: the full gradient; ``g_A = s BᵀG``, ``g_B = s G Aᵀ`` are formed
    from the current factors, as autograd would."""
    gen = torch.Generator().manual_seed(100 + step)
    out: list = []
    for i, (m, n, _, _) in enumerate(SHAPES):
        g = torch.randn(m, n, generator=gen, dtype=torch.float64)
        out.append(None if (step, i) == SKIP else g)
    return out


def _run(opt_factory, reference_step) -> float:
    """Max |difference| of all factors after ``STEPS`` steps: optimizer vs reference."""
    pairs = _pairs()
    ref = [(p.A.detach().clone(), p.B.detach().clone(), p.scale) for p in pairs]
    ref_state: list[dict] = [{} for _ in pairs]
    opt = opt_factory(pairs)
    for step in range(STEPS):
        grads = _grads(step)
        for p, g in zip(pairs, grads, strict=True):
            if g is None:
                p.A.grad = p.B.grad = None
            else:
                p.A.grad = p.scale * p.B.detach().T @ g
                p.B.grad = p.scale * g @ p.A.detach().T
        opt.step()
        for i, g in enumerate(grads):
            if g is None:
                continue
            a, b, s = ref[i]
            ref[i] = (*reference_step(a, b, s * b.T @ g, s * g @ a.T, s, ref_state[i]), s)
    return max(
        max((p.A.detach() - a).abs().max().item(), (p.B.detach() - b).abs().max().item())
        for p, (a, b, _) in zip(pairs, ref, strict=True)
    )


def _adam(p, g, st, key, lr, betas, eps, wd):
    """One bias-corrected Adam step on tensor ``p`` with gradient ``g``, then decoupled decay."""
    b1, b2 = betas
    t = st.get(key + "t", 0) + 1
    m = b1 * st.get(key + "m", torch.zeros_like(p)) + (1 - b1) * g
    v = b2 * st.get(key + "v", torch.zeros_like(p)) + (1 - b2) * g * g
    st[key + "t"], st[key + "m"], st[key + "v"] = t, m, v
    p = p - lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps)
    return p * (1 - lr * wd)


SCALED = {"lr": 1e-2, "betas": (0.7, 0.8), "eps": 1e-6, "weight_decay": 0.1, "damping": 1e-6}


def _scaled_reference(a, b, g_a, g_b, s, st):
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    d = SCALED["damping"]
    gh_a = torch.linalg.solve(b.T @ b + d * eye, g_a)  # (BᵀB + δI)⁻¹ g_A
    gh_b = torch.linalg.solve(a @ a.T + d * eye, g_b.T).T  # g_B (AAᵀ + δI)⁻¹
    hp = (SCALED["lr"], SCALED["betas"], SCALED["eps"], SCALED["weight_decay"])
    return _adam(a, gh_a, st, "A", *hp), _adam(b, gh_b, st, "B", *hp)


def test_scaled_adamw_matches_per_pair_reference() -> None:
    assert _run(lambda pairs: ScaledAdamW(pairs, **SCALED), _scaled_reference) < TOL


REFLORA = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05, "warmup_steps": 0}


def _sqrtm(x: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    lam, vec = torch.linalg.eigh(x)
    return vec @ torch.diag(lam**power) @ vec.T


def _reflora_reference(a, b, g_a, g_b, s, st):
    p_b, p_a = b.T @ b, a @ a.T
    half, half_inv = _sqrtm(p_b), _sqrtm(p_b, -0.5)
    refactor = half_inv @ _sqrtm(half @ p_a @ half) @ half_inv  # P_B⁻¹ # P_A
    hp = (REFLORA["lr"], REFLORA["betas"], REFLORA["eps"], REFLORA["weight_decay"])
    return _adam(a, refactor @ g_a, st, "A", *hp), _adam(b, g_b @ torch.linalg.inv(refactor), st, "B", *hp)


def test_reflora_matches_per_pair_reference() -> None:
    assert _run(lambda pairs: RefLoRA(pairs, **REFLORA), _reflora_reference) < TOL


ADAPRE = {"lr": 1e-2, "beta2": 0.9, "eps": 1e-30, "damping": 1e-6, "weight_decay": 0.1}


def _adaprelora_reference(a, b, g_a, g_b, s, st):
    """Spec §5 with the low-rank statistic, per layer, the m×n ĝ formed explicitly."""
    r = a.shape[0]
    eye = torch.eye(r, dtype=a.dtype)
    d = ADAPRE["damping"]
    inv_b = torch.linalg.pinv(b.T @ b + d * eye, hermitian=True)
    inv_a = torch.linalg.pinv(a @ a.T + d * eye, hermitian=True)
    gt_a = inv_b @ g_a / s**2
    gt_b = (torch.eye(b.shape[0], dtype=a.dtype) - b @ inv_b @ b.T) @ g_b @ inv_a / s**2
    g_hat = s * (b @ gt_a + gt_b @ a)  # [m, n]
    beta2, eps = ADAPRE["beta2"], ADAPRE["eps"]
    t = st.get("t", 0) + 1
    st["row"] = beta2 * st.get("row", torch.zeros(b.shape[0], dtype=a.dtype)) + (1 - beta2) * (g_hat**2).sum(1)
    st["col"] = beta2 * st.get("col", torch.zeros(a.shape[1], dtype=a.dtype)) + (1 - beta2) * (g_hat**2).sum(0)
    st["t"] = t
    r_hat, c_hat = st["row"] / (1 - beta2**t) + eps, st["col"] / (1 - beta2**t) + eps
    ell, rho = r_hat.sqrt(), c_hat.sqrt() / r_hat.sum().sqrt()
    inv_l = torch.linalg.inv(b.T @ torch.diag(ell) @ b + d * ell.mean() * eye)
    inv_r = torch.linalg.inv(a @ torch.diag(rho) @ a.T + d * rho.mean() * eye)
    c = -inv_l @ g_a @ a.T @ inv_r / s
    d_a = (-inv_l @ g_a @ torch.diag(1 / rho) / s - 0.5 * c @ a) / s
    d_b = (-torch.diag(1 / ell) @ g_b @ inv_r / s - 0.5 * b @ c) / s
    lr, wd = ADAPRE["lr"], ADAPRE["weight_decay"]
    return (a + lr * d_a) * (1 - lr * wd), (b + lr * d_b) * (1 - lr * wd)


def test_adaprelora_matches_per_pair_reference() -> None:
    assert _run(lambda pairs: AdaPreLoRA(pairs, **ADAPRE), _adaprelora_reference) < TOL


def test_buckets_really_mix_shapes_and_ranks() -> None:
    from lorafold.training.optim._base import PairOptimizer, rank_batches

    pairs = _pairs()
    for p in pairs:
        p.A.grad, p.B.grad = torch.zeros_like(p.A), torch.zeros_like(p.B)
    by_rank = rank_batches(PairOptimizer.active_pairs(ScaledAdamW(pairs).param_groups[0]))
    assert sorted(len(batch) for batch in by_rank) == [1, 3]  # rank 3: one bucket; rank 4: three buckets
    assert sorted(len(idx) for batch in by_rank for idx, _ in batch) == [1, 1, 1, 3]
