"""DLRT rank-adaptive augmented BUG (§6) on the USV test bed and a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from lorafold.training.adapters.usv import inject_usv
from lorafold.training.optim.dlrt import DLRT
from lorafold.training.optim.testbed import make_target
from lorafold.training.optim.usv_testbed import (
    fixed_batch,
    tangent_project,
    tiny_llama,
    train_llama,
    truncated_svd,
    usv_layer,
    usv_loss,
    usv_step,
)
from tests.training.helpers import one_thread_fixture, usv_point, usv_start

F64 = torch.float64


_one_thread = one_thread_fixture()


def _start(r: int = 3, seed: int = 0):
    layer, target = usv_start(r=r, seed=seed)
    U, S, V, W = usv_point(layer)
    return layer, target, U, S, V, W, W - target


def _bug_reference(U, S, V, G, lr):
    """Dense ``W − λ P_Û G P_V̂`` with Û = orth[U, US − λGV], V̂ = orth[V, VSᵀ − λGᵀU]."""
    Uh = torch.linalg.qr(torch.cat([U, U @ S - lr * G @ V], 1)).Q
    Vh = torch.linalg.qr(torch.cat([V, V @ S.T - lr * G.T @ U], 1)).Q
    return U @ S @ V.T - lr * Uh @ Uh.T @ G @ Vh @ Vh.T


def test_step_is_w_minus_lr_projected_gradient_on_augmented_bases() -> None:
    layer, target, U, S, V, W, G = _start()
    usv_step(layer, DLRT([layer], lr=0.4, tau=0.0), target)
    want = _bug_reference(U, S, V, G, 0.4)
    assert layer.rank == 6
    assert (layer.delta_weight().detach() - want).abs().max() < 1e-10
    # DLRT keeps the block ŨᵀGṼ that GeoLoRA's tangent step drops: the two must differ here.
    assert (want - (W - 0.4 * tangent_project(U, V, G))).abs().max() > 1e-3


@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_truncation_equals_rank_adaptive_truncated_svd(tau: float) -> None:
    layer, target, U, S, V, W, G = _start()
    usv_step(layer, DLRT([layer], lr=0.4, tau=tau), target)
    want, j = truncated_svd(_bug_reference(U, S, V, G, 0.4), tau, r_min=1, r_max=10)
    assert layer.rank == j < 6
    assert (layer.delta_weight().detach() - want).abs().max() < 1e-10


@pytest.mark.parametrize("r0", [2, 4, 8])
def test_rank_recovery_from_any_start(r0: int) -> None:
    target = make_target(kappa=4.0, seed=0)
    layer = usv_layer(r0=r0, r_max=10, seed=r0)
    opt = DLRT([layer], lr=1.0, tau=0.01)
    ranks = []
    for _ in range(20):
        usv_step(layer, opt, target)
        ranks.append(layer.rank)
    assert ranks[-10:] == [4] * 10, ranks
    assert float(usv_loss(layer, target).detach()) < 1e-20


def test_reuses_existing_gradients_and_needs_closure() -> None:
    layer, target, U, S, V, W, G = _start()
    opt = DLRT([layer], lr=0.4, tau=0.0)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = usv_loss(layer, target)
        loss.backward()
        return loss

    closure()  # the caller already ran backward: step must only run the second pass
    opt.step(closure)
    assert len(calls) == 2
    assert (layer.delta_weight().detach() - _bug_reference(U, S, V, G, 0.4)).abs().max() < 1e-10
    assert layer.probe_grads() is None and layer.S.grad is None


def test_trains_tiny_llama() -> None:
    model = tiny_llama()
    inject_usv(model, r0=4, r_max=16)
    opt = DLRT(model, lr=1.0, tau=0.15)
    losses = train_llama(model, opt, fixed_batch(), 15)
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(1 <= r <= 16 for r in opt.ranks().values())
