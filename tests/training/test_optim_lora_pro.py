"""LoRA-Pro (spec §3): ĝ = P_T(G), product update independent of X, gauge tests, no NaN."""

from __future__ import annotations

import pytest
import torch

from lorafold.training.optim._base import ActivePair
from lorafold.training.optim.lora_pro import LoRAPro, equivalent_gradient, lora_pro_deltas, pro_factors
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


SCALE = 2.5


def tangent_projection(b: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p_b = b @ torch.linalg.solve(b.T @ b, b.T)
    p_a = a.T @ torch.linalg.solve(a @ a.T, a)
    return p_b @ g + g @ p_a - p_b @ g @ p_a


def active_pair(b: torch.Tensor, a: torch.Tensor, g: torch.Tensor, scale: float = SCALE) -> ActivePair:
    # Autograd's factor gradients of a layer W0 + s B A with dL/dW = G.
    return ActivePair("layer", a, b, scale, scale * b.T @ g, scale * g @ a.T)


def _setup(seed: int = 3):
    x, y = random_factors(seed=seed)
    g = torch.randn(30, 20, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    return x, y.T.contiguous(), g


def test_equivalent_gradient_is_tangent_projection() -> None:
    b, a, g = _setup()
    p = active_pair(b, a, g)
    g_hat = equivalent_gradient(p, pro_factors([p], damping=0.0)[0])
    assert (g_hat - tangent_projection(b, a, g)).abs().max() < 1e-10
    assert (g_hat - g).abs().max() > 1e-1  # a real projection, so the check can fail


def _product_update(b, a, g, min_norm: bool) -> torch.Tensor:
    p = active_pair(b, a, g)
    f = pro_factors([p], damping=0.0)
    d = tangent_projection(b, a, g)  # any D; the SGD variant's D = ĝ
    da, db = lora_pro_deltas([p], f, [SCALE * b.T @ d], [SCALE * d @ a.T], min_norm)
    return SCALE * (b @ da[0] + db[0] @ a), da[0], db[0]


def test_product_update_independent_of_x_and_x_is_min_norm() -> None:
    b, a, g = _setup()
    with_x, da, db = _product_update(b, a, g, min_norm=True)
    without_x, da0, db0 = _product_update(b, a, g, min_norm=False)
    assert (with_x - without_x).abs().max() < 1e-10
    assert (with_x - tangent_projection(b, a, g)).abs().max() < 1e-10  # s(BΔA + ΔB A) = P_T(D)
    assert da.norm() ** 2 + db.norm() ** 2 < da0.norm() ** 2 + db0.norm() ** 2 - 1e-6


def test_first_order_product_update_is_gauge_invariant() -> None:
    b, a, g = _setup()
    q = random_gauge()
    bq, aq = b @ q, torch.linalg.inv(q) @ a
    for min_norm in (True, False):
        u1 = _product_update(b, a, g, min_norm)[0]
        u2 = _product_update(bq, aq, g, min_norm)[0]
        assert (u1 - u2).abs().max() < 1e-10


def _gauge_error(q: torch.Tensor, adam: bool, min_norm: bool) -> float:
    target = make_target()
    x, y = random_factors()
    products = []
    for xx, yy in [(x, y), gauge_transform(x, y, q)]:
        model = FactorModel(xx, yy)
        opt = LoRAPro(model.pairs(), lr=1e-3, adam=adam, damping=0.0, min_norm=min_norm)
        for _ in range(3):
            one_step(model, opt, target)
        products.append(model.product().detach())
    return (products[0] - products[1]).abs().max().item()


@pytest.mark.parametrize("adam", [False, True])
def test_full_step_gauge_invariance(adam: bool) -> None:
    q_orth, _ = torch.linalg.qr(random_gauge())
    assert _gauge_error(q_orth, adam, min_norm=True) < 1e-10  # orthogonal gauge, min-norm X
    assert _gauge_error(random_gauge(), adam, min_norm=False) < 1e-10  # any gauge, X = 0


def test_zero_b_no_nan_and_trains() -> None:
    target = make_target()
    x, y = random_factors(std=0.3)
    for adam, lr in ((False, 0.2), (True, 0.1)):
        model = FactorModel(torch.zeros_like(x), y)
        opt = LoRAPro(model.pairs(), lr=lr, adam=adam)
        first = one_step(model, opt, target)
        for _ in range(80):
            last = one_step(model, opt, target)
        assert torch.isfinite(model.product()).all()
        assert last < 0.2 * first, (adam, first, last)


def test_adam_variant_keeps_full_size_moments() -> None:
    model = FactorModel(*random_factors())
    opt = LoRAPro(model.pairs(), lr=1e-3)
    one_step(model, opt, make_target())
    assert opt.state[model.lora_A]["full_exp_avg"].shape == (30, 20)
