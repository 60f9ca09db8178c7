"""Geometric heavy ball [R] and geometric Adam (§8) on the USV test bed and a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from lorafold.training.adapters.usv import inject_usv
from lorafold.training.optim.geolora import GeoLoRA
from lorafold.training.optim.geometric import GeometricAdam, GeometricHeavyBall
from lorafold.training.optim.testbed import FactorModel, make_target, one_step, random_factors
from lorafold.training.optim.usv_testbed import (
    fixed_batch,
    tangent_project,
    tiny_llama,
    train_llama,
    usv_layer,
    usv_loss,
    usv_step,
)
from tests.training.helpers import one_thread_fixture, usv_start

F64 = torch.float64


_one_thread = one_thread_fixture()


def _start(r: int = 3, seed: int = 0):
    return usv_start(r=r, seed=seed)


def test_heavy_ball_matches_dense_recursion() -> None:
    # ξ = P_W(G), 𝒱 = β P_W(𝒱_prev) + ξ, W ← W − λ𝒱; tau = 0 and r_max = 10 ≥ every rank here.
    layer, target = _start(r=2)
    lr, beta = 0.3, 0.7
    opt = GeometricHeavyBall([layer], lr=lr, momentum=beta, tau=0.0)
    vel = torch.zeros(30, 20, dtype=F64)
    for _ in range(3):
        U, S, V = (t.detach().clone() for t in layer.factors())
        W = U @ S @ V.T
        vel = beta * tangent_project(U, V, vel) + tangent_project(U, V, W - target)
        usv_step(layer, opt, target)
        assert (layer.delta_weight().detach() - (W - lr * vel)).abs().max() < 1e-10
    # The momentum term matters (so the check can fail): β = 0 lands elsewhere.
    assert beta * tangent_project(U, V, vel).norm() > 1e-2


def test_heavy_ball_without_momentum_is_geolora_sgd() -> None:
    a, target = _start()
    b, _ = _start()
    usv_step(a, GeometricHeavyBall([a], lr=0.4, momentum=0.0, tau=0.1), target)
    usv_step(b, GeoLoRA([b], lr=0.4, tau=0.1, coefficient_steps=1, adam=False, weight_decay=0.0), target)
    assert a.rank == b.rank
    assert (a.delta_weight() - b.delta_weight()).abs().max() < 1e-12


@pytest.mark.parametrize("r0", [2, 4, 8])
def test_heavy_ball_rank_recovery(r0: int) -> None:
    target = make_target(kappa=4.0, seed=0)
    layer = usv_layer(r0=r0, r_max=10, seed=r0)
    opt = GeometricHeavyBall([layer], lr=0.5, momentum=0.5, tau=0.01)
    for _ in range(60):
        usv_step(layer, opt, target)
    assert layer.rank == 4
    assert float(usv_loss(layer, target).detach()) < 1e-15


def _plain_adam_best(target: torch.Tensor, steps: int, seed: int) -> float:
    """Adam on the factors X, Y (rank 4), best final f over a small lr / betas grid."""
    best = float("inf")
    for lr in (3e-3, 1e-2, 3e-2, 1e-1):
        for betas in ((0.9, 0.999), (0.9, 0.99)):
            x, y = random_factors(r=4, seed=seed, std=0.1)
            model = FactorModel(x, y)
            opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas)
            for _ in range(steps):
                one_step(model, opt, target)
            loss = float(model.loss(target).detach())
            best = min(best, loss if loss == loss else float("inf"))
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_geometric_adam_beats_plain_adam_on_ill_conditioned_target(seed: int) -> None:
    target = make_target(kappa=100.0, seed=0)  # σ = 1 … 1/100
    steps = 200
    layer = usv_layer(r0=4, r_min=4, r_max=4, seed=seed)  # same rank budget as the factors
    opt = GeometricAdam([layer], lr=0.1, tau=0.0, betas=(0.9, 0.999))
    for _ in range(steps):
        usv_step(layer, opt, target)
    geo = float(usv_loss(layer, target).detach())
    plain = _plain_adam_best(target, steps, seed)
    assert geo < 0.1 * plain, (geo, plain)


def test_geometric_adam_first_step_is_bounded_sign_step() -> None:
    # First Adam step (v_floor 0): D = g / (|g| + ε) on the 2r×2r augmented core, so with
    # tau = 0 the W-space step is lr · ‖D‖_F = lr · √(#nonzero entries of g) ∈ [lr, lr · 2r].
    layer, target = _start(r=2)
    U0, S0, V0 = (t.detach().clone() for t in layer.factors())
    opt = GeometricAdam([layer], lr=1e-3, tau=0.0, betas=(0.9, 0.999), v_floor=0.0)
    usv_step(layer, opt, target)
    assert layer.rank == 4
    step = layer.delta_weight().detach() - U0 @ S0 @ V0.T
    # The Ũ ⊗ Ṽ block of the tangent gradient is zero, so at most 12 of 16 entries count.
    nonzero = (step.norm() / 1e-3) ** 2
    assert abs(nonzero - round(float(nonzero))) < 1e-4 and 1 <= round(float(nonzero)) <= 12


def test_trains_tiny_llama() -> None:
    for make in (
        lambda m: GeometricHeavyBall(m, lr=0.5, momentum=0.5, tau=0.15),
        lambda m: GeometricAdam(m, lr=1e-2, tau=0.15),
    ):
        model = tiny_llama()
        inject_usv(model, r0=4, r_max=16)
        opt = make(model)
        losses = train_llama(model, opt, fixed_batch(), 15)
        assert losses[-1] < losses[0] - 0.3, (type(opt).__name__, losses)


def test_registry_builds_every_usv_optimizer() -> None:
    from lorafold.training.optim.registry import build_optimizer

    model = tiny_llama()
    inject_usv(model, r0=4, r_max=16)
    ids = fixed_batch(batch=2, seq=8)
    names = {"dlrt": "DLRT", "geolora": "GeoLoRA", "geo_heavy_ball": "GeometricHeavyBall", "geo_adam": "GeometricAdam"}
    for name, cls in names.items():
        opt = build_optimizer(name, model)
        assert type(opt).__name__ == cls
        losses = train_llama(model, opt, ids, 2)
        assert all(loss == loss for loss in losses)
    with pytest.raises(ValueError, match="USV"):
        build_optimizer("geolora", None, pairs=[])
