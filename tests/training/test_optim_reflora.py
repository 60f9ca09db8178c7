"""RefLoRA / RefLoRA-S (spec §2): scalar example, gauge test, S P_B S = P_A, balanced pair."""

from __future__ import annotations

import pytest
import torch

from lorafold.training.optim._common import stack_grams
from lorafold.training.optim.reflora import RefLoRA, balance_pair, refactor_matrices
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


def sgd_reflora(pairs, lr: float, **kw) -> RefLoRA:
    return RefLoRA(pairs, lr=lr, base="sgd", warmup_steps=0, **kw)


def scalar_product(x: float, y: float, lr: float) -> float:
    model = FactorModel(torch.tensor([[x]], dtype=torch.float64), torch.tensor([[y]], dtype=torch.float64))
    one_step(model, sgd_reflora(model.pairs(), lr), ONE)
    return model.product().item()


@pytest.mark.parametrize("start", [(2.0, 2.0), (1.0, 4.0), (4.0, 1.0), (-1.0, -4.0), (0.25, 16.0)])
def test_scalar_example(start) -> None:
    assert scalar_product(*start, lr=1 / 6) == pytest.approx(1.0, abs=1e-12)  # f = 0 in one step
    assert scalar_product(*start, lr=1 / 3) == pytest.approx(0.0, abs=1e-12)
    assert scalar_product(*start, lr=0.05) == pytest.approx((2 - 6 * 0.05) ** 2, abs=1e-12)


def _factors():
    x, y = random_factors()
    return x, y, y.T.contiguous()


def test_geometric_mean_identity() -> None:
    x, _, a = _factors()
    p_b, p_a = stack_grams([x], "cols"), stack_grams([a], "rows")
    s, s_inv = refactor_matrices(p_b, p_a, torch.finfo(torch.float64).eps)
    assert (s[0] @ p_b[0] @ s[0] - p_a[0]).norm() < 1e-10
    assert (s[0] @ s_inv[0] - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-10
    assert (s[0] - s[0].T).abs().max() < 1e-12 and torch.linalg.eigvalsh(s[0]).min() > 0


def test_balanced_pair_identity_and_gd_equivalence() -> None:
    target = make_target()
    x, _, a = _factors()
    a_bal, b_bal = balance_pair(a, x)
    assert (b_bal.T @ b_bal - a_bal @ a_bal.T).norm() < 1e-10
    assert (b_bal @ a_bal - x @ a).abs().max() < 1e-10
    # One RefLoRA step == one plain GD step on the balanced pair (same product).
    lr = 1e-3
    g = b_bal @ a_bal - target
    gd_product = (b_bal - lr * g @ a_bal.T) @ (a_bal - lr * b_bal.T @ g)
    model = FactorModel(x, a.T)
    one_step(model, sgd_reflora(model.pairs(), lr), target)
    assert (model.product().detach() - gd_product).abs().max() < 1e-10


def test_gauge_invariant() -> None:
    target = make_target()
    x, y = random_factors()
    products = []
    for xx, yy in [(x, y), gauge_transform(x, y, random_gauge())]:
        model = FactorModel(xx, yy)
        opt = sgd_reflora(model.pairs(), 2e-3)
        for _ in range(3):
            one_step(model, opt, target)
        products.append(model.product().detach())
    assert (products[0] - products[1]).abs().max() < 1e-10


def test_zero_b_warmup_then_refactor_without_nan() -> None:
    target = make_target()
    x, y = random_factors()
    model = FactorModel(torch.zeros_like(x), y)
    # warmup_steps = 0 with B = 0: the singular pair falls back to S = I (a plain step).
    opt = RefLoRA(model.pairs(), lr=1e-2, warmup_steps=0)
    for _ in range(3):
        one_step(model, opt, target)
    assert torch.isfinite(model.product()).all() and model.lora_B.abs().sum() > 0


@pytest.mark.parametrize("scalar", [False, True])
def test_adamw_base_trains(scalar: bool) -> None:
    target = make_target()
    model = FactorModel(*random_factors(std=0.3))
    opt = RefLoRA(model.pairs(), lr=0.03, warmup_steps=3, scalar=scalar)
    first = one_step(model, opt, target)
    for _ in range(60):
        last = one_step(model, opt, target)
    assert last < 0.1 * first


def test_reflora_s_balances_norms_and_moves_adam_state() -> None:
    target = make_target()
    init = random_factors(std=0.3)
    runs = []
    for warmup in (1, 10**9):  # with rebalancing after the 2nd step / never
        model = FactorModel(*init)
        with torch.no_grad():
            model.lora_B.mul_(5.0)  # unbalanced start
        opt = RefLoRA(model.pairs(), lr=1e-3, warmup_steps=warmup, scalar=True)
        one_step(model, opt, target)
        one_step(model, opt, target)
        runs.append((model, opt))
    (bal, opt_bal), (raw, opt_raw) = runs
    c = (raw.lora_B.norm() / raw.lora_A.norm()).item()
    assert c > 2  # the unrebalanced run really is unbalanced
    torch.testing.assert_close(bal.lora_B.norm(), bal.lora_A.norm(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(bal.lora_A.detach(), raw.lora_A.detach() * c**0.5, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(bal.product().detach(), raw.product().detach(), atol=1e-12, rtol=1e-12)
    sa, ra = opt_bal.state[bal.lora_A], opt_raw.state[raw.lora_A]
    sb, rb = opt_bal.state[bal.lora_B], opt_raw.state[raw.lora_B]
    torch.testing.assert_close(sa["exp_avg"], ra["exp_avg"] / c**0.5, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(sa["exp_avg_sq"], ra["exp_avg_sq"] / c, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(sb["exp_avg"], rb["exp_avg"] * c**0.5, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(sb["exp_avg_sq"], rb["exp_avg_sq"] * c, atol=1e-14, rtol=1e-12)
