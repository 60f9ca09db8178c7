"""Nyström init (spec §9) and the PEFT default init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear
from lorafold.training.init.default import init_default
from lorafold.training.init.nystrom import init_nystrom, nystrom_factors
from lorafold.training.optim.scaled import ScaledGD
from lorafold.training.optim.testbed import FactorModel, make_target, one_step, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.mark.parametrize("kappa", [None, 1e3])
def test_one_scaled_gd_step_solves_test_bed(kappa) -> None:
    target = make_target(kappa=kappa)
    b, a = nystrom_factors(target, r=4, seed=0)
    model = FactorModel(b, a.T)
    assert model.loss(target) > 1e-3
    one_step(model, ScaledGD(model.pairs(), lr=1.0, damping=0.0, inverse="pinv"), target)
    assert model.loss(target).item() < 1e-18


def test_random_start_is_not_solved_in_one_step() -> None:
    # Discrimination: the same step from a generic (non-Nyström) start does not reach 0.
    target = make_target()
    gen = torch.Generator().manual_seed(123)
    model = FactorModel(torch.randn(30, 4, generator=gen, dtype=torch.float64), torch.zeros(20, 4, dtype=torch.float64))
    one_step(model, ScaledGD(model.pairs(), lr=1.0, damping=0.0, inverse="pinv"), target)
    assert model.loss(target).item() > 1e-2


def test_layer_inits() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(nn.Linear(40, 12), r=4, alpha=8))
    layer = model[0]
    assert init_nystrom(model) == 1
    assert torch.count_nonzero(layer.lora_A) == 0
    # B = W0 Φ / √n spans a subspace of W0's column space and has W0's row scale
    w = layer.base.weight
    proj = w @ torch.linalg.pinv(w)
    torch.testing.assert_close(proj @ layer.lora_B, layer.lora_B, atol=1e-5, rtol=1e-4)
    assert (layer.lora_B.norm() / math.sqrt(4)).item() == pytest.approx((w.norm() / math.sqrt(40)).item(), rel=0.5)
    assert init_default(model) == 1
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.abs().max() <= 1 / math.sqrt(40) + 1e-6
