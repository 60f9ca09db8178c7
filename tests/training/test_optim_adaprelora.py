"""AdaPreLoRA (spec §5, reconstruction): H-projection identity, L = R = I case, gauge, stats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear
from lorafold.training.optim.adaprelora import (
    AdaPreLoRA,
    FullGradCapture,
    balanced_directions,
    lowrank_row_col_sq,
    weighted_inverses,
)
from lorafold.training.optim.testbed import (
    FactorModel,
    gauge_transform,
    make_target,
    one_step,
    random_factors,
    random_gauge,
)
from tests.training.helpers import one_thread_fixture


_one_thread = one_thread_fixture(scope="module")


SCALE = 1.7
M, N, R = 30, 20, 4


def _problem(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    b, a, g = torch.randn(M, R, **kw), torch.randn(R, N, **kw), torch.randn(M, N, **kw)
    ell, rho = torch.rand(M, **kw) + 0.2, torch.rand(N, **kw) + 0.2
    return Layer(a, b, SCALE * b.T @ g, SCALE * g @ a.T), g, ell, rho


class Layer:
    """One layer's factors and autograd gradients ``g_A = s BᵀG``, ``g_B = s G Aᵀ``."""

    def __init__(self, a, b, g_a, g_b) -> None:
        self.A, self.B, self.gA, self.gB = a, b, g_a, g_b

    def batched(self):
        s = torch.full((1, 1, 1), SCALE, dtype=torch.float64)
        return self.A[None], self.B[None], self.gA[None], self.gB[None], s


def _product_update(p: Layer, ell, rho) -> torch.Tensor:
    a, b, g_a, g_b, s = p.batched()
    inv_l, inv_r = weighted_inverses(a, b, ell[None], rho[None], damping=0.0)
    d_a, d_b = balanced_directions(a, b, g_a, g_b, s, ell[None], rho[None], inv_l, inv_r)
    return SCALE * (p.B @ d_a[0] + d_b[0] @ p.A)


def h_projection(b, a, delta, ell, rho) -> torch.Tensor:
    """Independent reference: weighted least squares over (X [r, n], Y [m, r]) in ⟨·,·⟩_H."""
    w = (ell[:, None] * rho[None, :]).sqrt().reshape(-1)  # H-norm² = Σ ℓ_i ρ_j (·)_ij²
    cols = []
    for k in range(R * N):  # B X
        x = torch.zeros(R * N, dtype=torch.float64)
        x[k] = 1
        cols.append((b @ x.reshape(R, N)).reshape(-1))
    for k in range(M * R):  # Y A
        y = torch.zeros(M * R, dtype=torch.float64)
        y[k] = 1
        cols.append((y.reshape(M, R) @ a).reshape(-1))
    basis = torch.stack(cols, dim=1)
    coef = torch.linalg.lstsq(w[:, None] * basis, w * delta.reshape(-1), driver="gelsd").solution
    return (basis @ coef).reshape(M, N)


def test_product_update_is_h_orthogonal_projection() -> None:
    p, g, ell, rho = _problem()
    delta = -g / ell[:, None] / rho[None, :]
    update = _product_update(p, ell, rho)
    assert (update - h_projection(p.B, p.A, delta, ell, rho)).abs().max() < 1e-10
    assert (update - delta).abs().max() > 1e-1  # a real projection


def test_identity_weights_give_minus_tangent_projection() -> None:
    p, g, _, _ = _problem()
    ones_m, ones_n = torch.ones(M, dtype=torch.float64), torch.ones(N, dtype=torch.float64)
    b, a = p.B, p.A
    p_b = b @ torch.linalg.solve(b.T @ b, b.T)
    p_a = a.T @ torch.linalg.solve(a @ a.T, a)
    tangent = p_b @ g + g @ p_a - p_b @ g @ p_a
    assert (_product_update(p, ones_m, ones_n) + tangent).abs().max() < 1e-10


def test_lowrank_statistic_matches_dense_projection() -> None:
    p, g, _, _ = _problem()
    row, col = (t[0] for t in lowrank_row_col_sq(*p.batched(), pinv_damping=0.0))
    b, a = p.B, p.A
    p_b = b @ torch.linalg.solve(b.T @ b, b.T)
    p_a = a.T @ torch.linalg.solve(a @ a.T, a)
    g_hat = p_b @ g + g @ p_a - p_b @ g @ p_a
    torch.testing.assert_close(row, (g_hat**2).sum(1), atol=1e-9, rtol=1e-10)
    torch.testing.assert_close(col, (g_hat**2).sum(0), atol=1e-9, rtol=1e-10)


@pytest.mark.parametrize("statistic", ["lowrank", "full"])
def test_gauge_invariant(statistic: str) -> None:
    target = make_target()
    x, y = random_factors()
    products = []
    for xx, yy in [(x, y), gauge_transform(x, y, random_gauge())]:
        model = FactorModel(xx, yy)
        opt = AdaPreLoRA(
            model.pairs(), lr=1e-2, damping=0.0, statistic=statistic, full_grad_fn=lambda _: model.full_grad(target)
        )
        for _ in range(3):
            one_step(model, opt, target)
        products.append(model.product().detach())
    assert (products[0] - products[1]).abs().max() < 1e-10


@pytest.mark.parametrize("statistic", ["lowrank", "full"])
def test_zero_b_no_nan_and_trains(statistic: str) -> None:
    target = make_target()
    x, y = random_factors(std=0.3)
    model = FactorModel(torch.zeros_like(x), y)
    opt = AdaPreLoRA(model.pairs(), lr=0.05, statistic=statistic, full_grad_fn=lambda _: model.full_grad(target))
    first = one_step(model, opt, target)
    for _ in range(80):
        last = one_step(model, opt, target)
    assert torch.isfinite(model.product()).all()
    assert last < 0.1 * first


def test_full_grad_capture_matches_autograd() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 7), r=3, alpha=6)
    wrapper = nn.Sequential(layer)
    capture = FullGradCapture(wrapper)
    layer.base.weight.requires_grad_(True)  # only to get the reference dL/dW from autograd
    x = torch.randn(2, 5, 12)
    wrapper(x).pow(2).sum().backward()
    torch.testing.assert_close(capture("0"), layer.base.weight.grad, atol=1e-5, rtol=1e-5)
    capture.remove()


def test_stat_interval_refreshes_on_schedule_with_the_constant_input_ema() -> None:
    """``stat_interval = 3``: the statistic is measured at steps 1, 4, 7 only, and a refresh
    ``j`` steps after the previous one is ``r ← β2^j r + (1 − β2^j) rowsum(G²)``; in between
    the stored statistic is reused. Checked against that recurrence run by hand (exact G)."""
    target = make_target()
    x, y = random_factors()
    model = FactorModel(x, y)
    beta2 = 0.9  # small, so a wrong exponent j would show at 1e-12
    opt = AdaPreLoRA(model.pairs(), lr=1e-2, beta2=beta2, statistic="full", stat_interval=3,
                     full_grad_fn=lambda _: model.full_grad(target))
    state = lambda: opt.state[model.pairs()[0].A]  # noqa: E731
    row_ref = torch.zeros(target.shape[0], dtype=torch.float64)
    col_ref = torch.zeros(target.shape[1], dtype=torch.float64)
    last = 0
    for step in range(1, 9):
        g = model.full_grad(target)
        one_step(model, opt, target)
        if step in (1, 4, 7):
            w = 1.0 - beta2 ** (step - last)
            row_ref = beta2 ** (step - last) * row_ref + w * (g**2).sum(1)
            col_ref = beta2 ** (step - last) * col_ref + w * (g**2).sum(0)
            last = step
        assert state()["step"] == step and state()["stat_at"] == last
        torch.testing.assert_close(state()["row_sq"], row_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(state()["col_sq"], col_ref, atol=1e-12, rtol=1e-12)


def test_stat_interval_keeps_gauge_invariance_and_is_validated() -> None:
    target = make_target()
    x, y = random_factors()
    products = []
    for xx, yy in [(x, y), gauge_transform(x, y, random_gauge())]:
        model = FactorModel(xx, yy)
        opt = AdaPreLoRA(model.pairs(), lr=1e-2, damping=0.0, stat_interval=2)
        for _ in range(5):
            one_step(model, opt, target)
        products.append(model.product().detach())
    assert (products[0] - products[1]).abs().max() < 1e-10
    with pytest.raises(ValueError, match="stat_interval"):
        AdaPreLoRA(FactorModel(x, y).pairs(), stat_interval=0)
