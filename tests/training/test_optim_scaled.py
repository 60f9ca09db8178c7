"""ScaledGD / ScaledAdamW (spec §1): scalar example, gauge invariance, fallbacks."""

from __future__ import annotations

import pytest
import torch

from lorafold.training.optim.scaled import ScaledAdamW, ScaledGD
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


ONE = torch.ones(1, 1, dtype=torch.float64)


def scalar_step(opt_cls, x: float, y: float, lr: float, **kw) -> float:
    model = FactorModel(torch.tensor([[x]], dtype=torch.float64), torch.tensor([[y]], dtype=torch.float64))
    one_step(model, opt_cls(model.pairs(), lr=lr, damping=0.0, **kw), ONE)
    return model.product().item()


@pytest.mark.parametrize("start", [(2.0, 2.0), (1.0, 4.0), (4.0, 1.0), (-2.0, -2.0), (0.5, 8.0)])
def test_scaled_gd_scalar_example(start) -> None:
    assert scalar_step(ScaledGD, *start, lr=1 / 3) == pytest.approx(2.25, abs=1e-12)
    eta = 0.1
    assert scalar_step(ScaledGD, *start, lr=eta) == pytest.approx(4 - 6 * eta + 9 * eta**2 / 4, abs=1e-12)


def test_plain_gd_scalar_depends_on_start() -> None:
    # The same optimizer with the identity preconditioner is plain GD: start-dependent.
    def gd(x: float, y: float) -> float:
        return (x - (x * y - 1) * y / 3) * (y - (x * y - 1) * x / 3)

    assert abs(gd(2, 2) - gd(1, 4)) > 1.0


def _gauge_error(opt_factory, steps: int = 1) -> float:
    target = make_target()
    x, y = random_factors()
    products = []
    for xx, yy in [(x, y), gauge_transform(x, y, random_gauge())]:
        model = FactorModel(xx, yy)
        opt = opt_factory(model.pairs())
        for _ in range(steps):
            one_step(model, opt, target)
        products.append(model.product().detach())
    return (products[0] - products[1]).abs().max().item()


def test_scaled_gd_gauge_invariant() -> None:
    assert _gauge_error(lambda p: ScaledGD(p, lr=0.05, damping=0.0), steps=3) < 1e-10


def test_plain_gd_is_not_gauge_invariant() -> None:
    # Discrimination check: the gauge test must fail for plain GD.
    assert _gauge_error(lambda p: torch.optim.SGD([t for q in p for t in (q.A, q.B)], lr=0.01)) > 1e-2


def test_scaled_gd_matches_formula_in_fp32_and_fp64() -> None:
    target = make_target()
    x, y = random_factors()
    model = FactorModel(x, y)
    b, a = x.clone(), y.T.clone()
    g = b @ a - target
    ga, gb = b.T @ g, g @ a.T
    delta = 1e-3
    eye = torch.eye(4, dtype=torch.float64)
    a_new = a - 0.01 * torch.linalg.solve(b.T @ b + delta * eye, ga)
    b_new = b - 0.01 * gb @ torch.linalg.inv(a @ a.T + delta * eye)
    one_step(model, ScaledGD(model.pairs(), lr=0.01, damping=delta), target)
    torch.testing.assert_close(model.lora_A.detach(), a_new, atol=1e-12, rtol=0)
    torch.testing.assert_close(model.lora_B.detach(), b_new, atol=1e-12, rtol=0)


def test_zero_b_gives_no_nan_with_and_without_damping() -> None:
    target = make_target()
    x, y = random_factors()
    for cls in (ScaledGD, ScaledAdamW):
        for damping in (0.0, 1e-6):
            model = FactorModel(torch.zeros_like(x), y)
            opt = cls(model.pairs(), lr=0.01, damping=damping)
            for _ in range(3):
                one_step(model, opt, target)
            assert torch.isfinite(model.lora_A).all() and torch.isfinite(model.lora_B).all()
            assert model.lora_B.abs().sum() > 0  # B moved away from 0


def test_scaled_adamw_decreases_loss_and_skips_pairs_without_grad() -> None:
    target = make_target()
    model = FactorModel(*random_factors(std=0.3))
    opt = ScaledAdamW(model.pairs(), lr=0.05, betas=(0.9, 0.99))
    first = one_step(model, opt, target)
    for _ in range(50):
        last = one_step(model, opt, target)
    assert last < 0.1 * first
    # No gradient => no update, no state change (no momentum drift, no weight decay).
    before = model.lora_A.detach().clone()
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert torch.equal(model.lora_A.detach(), before)
    assert opt.state[model.lora_A]["step"] == 51
