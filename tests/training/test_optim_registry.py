"""Registry: every optimizer builds from a model's LoRA pairs and trains a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafold.training.adapters.lora import inject_lora, lora_pairs
from lorafold.training.optim.registry import OPTIMIZERS, build_optimizer
from lorafold.training.optim.testbed import FactorModel, make_target, one_step, random_factors
from tests.training.helpers import fixed_batch_losses, one_thread_fixture, tiny_llama_cfg

transformers = pytest.importorskip("transformers")


_one_thread = one_thread_fixture(scope="module")


# Step sizes from a small sweep on this exact problem (30 steps, r = 4).
TRAIN_SETTINGS: dict[str, dict] = {
    "adamw": {"lr": 1e-2},
    "loraplus": {"lr": 3e-3},
    "scaled_gd": {"lr": 3.0},
    "scaled_adamw": {"lr": 1e-2},
    "reflora": {"lr": 1e-2, "warmup_steps": 5},
    "reflora_s": {"lr": 1e-2, "warmup_steps": 5},
    "lora_pro": {"lr": 3e-3},
    "lora_pro_sgd": {"lr": 0.3},
    "adaprelora": {"lr": 3e-3},
    "lora_rite": {"lr": 1e-2},
}
MINE = sorted(TRAIN_SETTINGS)


def tiny_llama() -> torch.nn.Module:
    return tiny_llama_cfg(hidden_size=32, intermediate_size=64, vocab_size=64, max_position_embeddings=32,
                          eval_mode=False)


def test_all_names_registered() -> None:
    assert set(MINE) <= set(OPTIMIZERS)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("nope", tiny_llama())


@pytest.mark.parametrize("name", MINE)
def test_trains_tiny_llama(name: str) -> None:
    model = tiny_llama()
    inject_lora(model, r=4, alpha=8)
    opt = build_optimizer(name, model, **TRAIN_SETTINGS[name])
    assert isinstance(opt, torch.optim.Optimizer)
    losses = fixed_batch_losses(model, opt, steps=30, vocab=64)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(torch.isfinite(p.A).all() and torch.isfinite(p.B).all() for p in lora_pairs(model))


@pytest.mark.parametrize("name", [n for n in MINE if n not in ("adamw", "loraplus")])
def test_builds_from_explicit_pairs_and_state_dict_round_trips(name: str) -> None:
    target = make_target()
    model = FactorModel(*random_factors(std=0.3))
    opt = build_optimizer(name, pairs=model.pairs(), lr=1e-3)
    for _ in range(2):
        one_step(model, opt, target)
    clone = FactorModel(*random_factors(std=0.3))
    with torch.no_grad():
        clone.lora_A.copy_(model.lora_A)
        clone.lora_B.copy_(model.lora_B)
    opt2 = build_optimizer(name, pairs=clone.pairs(), lr=1e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares tensors otherwise
    one_step(model, opt, target)
    one_step(clone, opt2, target)
    torch.testing.assert_close(clone.product(), model.product(), atol=1e-12, rtol=0)
