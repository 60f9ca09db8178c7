"""GeoLoRA (§7) on the USV test bed and a tiny Llama; Adam-state transport (§8)."""

from __future__ import annotations

import pytest
import torch

from lorafold.training.adapters.usv import inject_usv
from lorafold.training.optim._lowrank import transport_augment, transport_truncate
from lorafold.training.optim.geolora import GeoLoRA
from lorafold.training.optim.testbed import make_target
from lorafold.training.optim.usv_testbed import (
    fixed_batch,
    set_factors,
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


def _start(r: int = 3, seed: int = 0, r_max: int = 10):
    """A layer at a random rank-r point with a dense S, the target, W and G = W − A*."""
    layer, target = usv_start(r=r, seed=seed, r_max=r_max)
    U, _, V, W = usv_point(layer)
    return layer, target, U, V, W, W - target


def test_augmented_step_is_w_minus_lr_tangent_gradient() -> None:
    layer, target, U, V, W, G = _start()
    opt = GeoLoRA([layer], lr=0.3, tau=0.0, coefficient_steps=1, adam=False, weight_decay=0.0)
    usv_step(layer, opt, target)
    want = W - 0.3 * tangent_project(U, V, G)
    assert layer.rank == 6  # 2r, nothing cut
    assert (layer.delta_weight().detach() - want).abs().max() < 1e-10
    # Discriminates: the tangent projection really drops part of G here.
    assert (G - tangent_project(U, V, G)).norm() > 1e-1
    U1, _, V1 = layer.factors()
    assert torch.allclose(U1.T @ U1, torch.eye(6, dtype=F64), atol=1e-12)
    assert torch.allclose(V1.T @ V1, torch.eye(6, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_truncation_equals_rank_adaptive_truncated_svd(tau: float) -> None:
    layer, target, U, V, W, G = _start()
    opt = GeoLoRA([layer], lr=0.3, tau=tau, coefficient_steps=1, adam=False, weight_decay=0.0)
    usv_step(layer, opt, target)
    want, j = truncated_svd(W - 0.3 * tangent_project(U, V, G), tau, r_min=1, r_max=10)
    assert layer.rank == j < 6
    assert (layer.delta_weight().detach() - want).abs().max() < 1e-10
    S = layer.factors()[1]
    assert torch.allclose(S, torch.diag(torch.diagonal(S)))


@pytest.mark.parametrize("r0", [2, 4, 8])
def test_rank_recovery_from_any_start(r0: int) -> None:
    target = make_target(kappa=4.0, seed=0)  # exact rank 4, σ = 1 … 1/4
    layer = usv_layer(r0=r0, r_max=10, seed=r0)
    opt = GeoLoRA([layer], lr=1.0, tau=0.01, coefficient_steps=1, adam=False, weight_decay=0.0)
    ranks = []
    for _ in range(30):
        usv_step(layer, opt, target)
        ranks.append(layer.rank)
    assert ranks[-10:] == [4] * 10, ranks
    assert float(usv_loss(layer, target).detach()) < 1e-20


def test_rank_clamped_to_bounds() -> None:
    target = make_target(kappa=4.0, seed=0)
    layer = usv_layer(r0=3, r_min=3, r_max=3, seed=0)
    opt = GeoLoRA([layer], lr=1.0, tau=0.9, coefficient_steps=1, adam=False, weight_decay=0.0)
    for _ in range(3):
        usv_step(layer, opt, target)
        assert layer.rank == 3


def test_transport_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    m, v = torch.randn(2, 3, 3, generator=gen, dtype=F64), torch.rand(2, 3, 3, generator=gen, dtype=F64)
    M, N = torch.randn(2, 5, 3, generator=gen, dtype=F64), torch.randn(2, 3, 4, generator=gen, dtype=F64)
    m2, v2 = transport_augment(m, v, M, N)
    for b in range(2):
        for i in range(5):
            for j in range(4):
                want_m = sum(M[b, i, k] * m[b, k, l] * N[b, l, j] for k in range(3) for l in range(3))
                want_v = sum(M[b, i, k] * v[b, k, l].sqrt() * N[b, l, j] for k in range(3) for l in range(3)) ** 2
                assert abs(m2[b, i, j] - want_m) < 1e-12 and abs(v2[b, i, j] - want_v) < 1e-12
    P, Q = torch.randn(5, 2, generator=gen, dtype=F64), torch.randn(4, 2, generator=gen, dtype=F64)
    m3, v3 = transport_truncate(m2[0], v2[0], P, Q)
    assert torch.allclose(m3, P.T @ m2[0] @ Q) and torch.allclose(v3, (P.T @ v2[0].sqrt() @ Q) ** 2)


def test_first_moment_is_transported_exactly_through_augment_and_truncate() -> None:
    # Without a cut (tau = 0, r_max ≥ 2r) augmentation and truncation are changes of basis, so
    # the W-space first moment U m Vᵀ must follow m ← β1 m + (1−β1) Ĝ exactly.
    layer, target, *_ = _start(r=3)
    beta1 = 0.8
    # fresh_v="zero": the bare [V] transport. The default "scaled" seeds the new directions'
    # first moment with their gradient on purpose (``_lowrank.seed_fresh``), so there the
    # W-space m differs by design.
    opt = GeoLoRA([layer], lr=1e-2, tau=0.0, coefficient_steps=1, betas=(beta1, 0.99), weight_decay=0.0,
                  fresh_v="zero")
    usv_step(layer, opt, target)  # creates the state (rank 6 now)
    for _ in range(2):
        U, _, V = (t.detach().clone() for t in layer.factors())
        mom = U @ opt.state[layer.S]["exp_avg"][: layer.rank, : layer.rank] @ V.T
        G = U @ layer.factors()[1].detach() @ V.T - target
        set_r = layer.rank
        usv_step(layer, opt, target)
        assert layer.rank == min(2 * set_r, 10)
        U1, _, V1 = layer.factors()
        new = U1 @ opt.state[layer.S]["exp_avg"][: layer.rank, : layer.rank] @ V1.T
        want = beta1 * mom + (1 - beta1) * tangent_project(U, V, G)
        assert (new.detach() - want).abs().max() < 1e-10
        if layer.rank == 10:
            break


def _signed_perm(r: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(r, generator=gen)
    signs = torch.where(torch.rand(r, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    return torch.eye(r, dtype=F64)[:, perm] * signs


def _rotated_copy(r: int, P: torch.Tensor, Q: torch.Tensor, transport_state: bool):
    """Two layers at the same W and the same Adam history, the second in the basis (UP, VQ)."""
    target = make_target(kappa=4.0, seed=0)
    a = usv_layer(r0=r, seed=0)
    opt_a = GeoLoRA([a], lr=1e-2, tau=0.0, coefficient_steps=1000, weight_decay=0.0)
    for _ in range(3):  # build a non-trivial Adam state on S (coefficient steps)
        usv_step(a, opt_a, target)
    b = usv_layer(r0=r, seed=1)
    opt_b = GeoLoRA([b], lr=1e-2, tau=0.0, coefficient_steps=1000, weight_decay=0.0)
    U, S, V = (t.detach() for t in a.factors())
    set_factors(b, U @ P, P.T @ S @ Q, V @ Q)
    sa, sb = opt_a.state[a.S], opt_b.state
    m, v = sa["exp_avg"][:r, :r], sa["exp_avg_sq"][:r, :r]
    if transport_state:
        m, v = transport_truncate(m, v, P, Q)
    from lorafold.training.optim._adam_core import store_moments

    store_moments(sb, b, m, v, sa["step"])
    opt_b.state["geolora"]["step"] = opt_a.state["geolora"]["step"]
    for _ in range(3):
        usv_step(a, opt_a, target)
        usv_step(b, opt_b, target)
    return (a.delta_weight() - b.delta_weight()).abs().max().item()


def test_adam_step_in_rotated_basis_equals_unrotated() -> None:
    r = 4
    P, Q = _signed_perm(r, 1), _signed_perm(r, 2)
    assert _rotated_copy(r, P, Q, transport_state=True) < 1e-12
    # Controls (the test can fail): stale state, or a general rotation (Adam is elementwise).
    assert _rotated_copy(r, P, Q, transport_state=False) > 1e-6
    R = torch.linalg.qr(torch.randn(r, r, generator=torch.Generator().manual_seed(5), dtype=F64)).Q
    assert _rotated_copy(r, R, Q, transport_state=True) > 1e-6


def test_sgd_augmentation_is_basis_independent() -> None:
    layer, target, U, V, W, G = _start(r=3)
    other = usv_layer(r0=3, seed=9)
    R = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=F64)).Q
    S = layer.factors()[1].detach()
    set_factors(other, U @ R, R.T @ S, V)
    for lyr in (layer, other):
        usv_step(lyr, GeoLoRA([lyr], lr=0.5, tau=0.1, coefficient_steps=1, adam=False, weight_decay=0.0), target)
    assert (layer.delta_weight() - other.delta_weight()).abs().max() < 1e-10


def test_trains_tiny_llama() -> None:
    model = tiny_llama()
    inject_usv(model, r0=4, r_max=16)
    opt = GeoLoRA(model, lr=3e-2, coefficient_steps=5, tau=0.15)
    losses = train_llama(model, opt, fixed_batch(), 20)
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(1 <= r <= 16 for r in opt.ranks().values())
    # no weight decay reaches U, V: they stay orthonormal
    for mod in opt.modules:
        U = mod.factors()[0]
        assert torch.allclose(U.T @ U, torch.eye(mod.rank), atol=1e-5)


def test_non_finite_gradient_skips_the_layer() -> None:
    layer, target, *_ = _start()
    before = layer.delta_weight().detach().clone()
    opt = GeoLoRA([layer], lr=0.3, tau=0.0, coefficient_steps=1, adam=False, weight_decay=0.0)
    opt.zero_grad()
    usv_loss(layer, target).backward()
    layer.probe_grads()[0][0, 0] = float("nan")
    opt.step()
    assert torch.equal(layer.delta_weight().detach(), before)
    usv_step(layer, opt, target)  # recovers on the next finite gradient
    assert torch.isfinite(layer.delta_weight()).all() and not torch.equal(layer.delta_weight().detach(), before)
