"""Defaults that act (issue #21): every registered optimizer, at its own defaults with only the
learning rate taken from one small fixed grid, cuts f on the factorization test bed at least
10× within 100 steps. RefLoRA's refactoring is on at its defaults (not a warm-up of plain
AdamW), and the trainer sizes run-dependent defaults to the run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafold.training.optim.registry import OPTIMIZERS, build_optimizer
from lorafold.training.optim.testbed import FactorModel, make_target, one_step, random_factors
from lorafold.training.optim.usv_testbed import usv_layer, usv_loss, usv_step
from tests.training.helpers import one_thread_fixture

_one_thread = one_thread_fixture()

GRID = (1e-2, 1e-1, 1e-3, 1.0)  # tried in this order; the first that acts ends the search
STEPS = 100
USV = {"dlrt", "geolora", "geo_heavy_ball", "geo_adam"}


def _reduction(name: str, lr: float) -> float:
    """f(start) / f(after STEPS steps) for optimizer ``name`` at its defaults and ``lr``."""
    target = make_target(seed=0)
    if name in USV:
        layer = usv_layer(r0=4, r_max=10, seed=0)
        opt = build_optimizer(name, nn.ModuleList([layer]), lr=lr)
        f0 = float(usv_loss(layer, target).detach())
        for _ in range(STEPS):
            usv_step(layer, opt, target)
        f = float(usv_loss(layer, target).detach())
    else:
        model = FactorModel(*random_factors(std=0.3))
        opt = build_optimizer(name, pairs=model.pairs(), lr=lr)
        f0 = float(model.loss(target).detach())
        for _ in range(STEPS):
            one_step(model, opt, target)
        f = float(model.loss(target).detach())
    return f0 / f if f == f and f > 0 else 0.0


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_defaults_reduce_f_tenfold_in_100_steps(name: str) -> None:
    seen = {}
    for lr in GRID:
        seen[lr] = _reduction(name, lr)
        if seen[lr] >= 10:
            return
    pytest.fail(f"{name}: no lr in {GRID} cuts f 10x in {STEPS} steps at the defaults: {seen}")


def test_reflora_refactors_at_its_defaults() -> None:
    # The published warm-up of 100 steps made every run of <= 100 steps plain AdamW; the
    # default run must differ from AdamW's from the first step.
    target = make_target(seed=0)
    products = []
    for name in ("adamw", "reflora"):
        model = FactorModel(*random_factors(std=0.3))
        opt = build_optimizer(name, pairs=model.pairs(), lr=1e-2)
        for _ in range(3):
            one_step(model, opt, target)
        products.append(model.product().detach())
    assert (products[0] - products[1]).abs().max() > 1e-6


def test_trainer_sizes_reflora_warmup_to_the_run() -> None:
    from lorafold.training.adapters.lora import inject_lora
    from lorafold.training.config import TrainConfig
    from lorafold.training.trainer.adapters import build_optimizer_for

    model = nn.Sequential(nn.Linear(8, 8))
    inject_lora(model, targets=["0"], r=2, alpha=2.0)
    cfg = TrainConfig(data="x", out="y", optimizer="reflora", rank=2, targets=["0"])
    assert build_optimizer_for(model, cfg, 100).param_groups[0]["warmup_steps"] == 10
    assert build_optimizer_for(model, cfg, 5).param_groups[0]["warmup_steps"] == 1
    cfg.optimizer_args = {"warmup_steps": 0}  # the user's value wins
    assert build_optimizer_for(model, cfg, 100).param_groups[0]["warmup_steps"] == 0
    assert "warmup_steps" not in build_optimizer_for(model, TrainConfig(data="x", out="y"), 100).param_groups[0]
