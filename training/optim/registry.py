"""Optimizer registry: ``build_optimizer(name, model, **overrides)``.

``OPTIMIZERS`` is a plain dict ``name → builder``; a builder is called as
``builder(model, **overrides)`` and returns a ``torch.optim.Optimizer``. Pair-based builders
find the LoRA pairs by module (``lora_pairs(model)``), or take explicit pairs through the
``pairs=[LoRAPair, ...]`` override (the factorization test bed); trainable parameters
outside any pair get the method's plain (unpreconditioned) update.

Names: adamw, sgd, loraplus, scaled_gd, scaled_adamw, reflora, reflora_s, lora_pro,
lora_pro_sgd, adaprelora, lora_rite. Defaults are each paper's reference hyper-parameters
(see the optimizer modules); pass overrides (``lr=...``) to tune.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lorafold.training.adapters.lora import LoRAPair, lora_pairs, non_lora_trainable
from lorafold.training.optim._usv_base import usv_builder
from lorafold.training.optim.adaprelora import AdaPreLoRA
from lorafold.training.optim.dlrt import DLRT
from lorafold.training.optim.geolora import GeoLoRA
from lorafold.training.optim.geometric import GeometricAdam, GeometricHeavyBall
from lorafold.training.optim.baselines import build_adamw, build_loraplus, build_sgd
from lorafold.training.optim.lora_pro import LoRAPro
from lorafold.training.optim.reflora import RefLoRA
from lorafold.training.optim.rite import LoRARite
from lorafold.training.optim.scaled import ScaledAdamW, ScaledGD

Builder = Callable[..., torch.optim.Optimizer]


def resolve_pairs(
    model: nn.Module | None, pairs: Sequence[LoRAPair] | None
) -> tuple[list[LoRAPair], list[nn.Parameter]]:
    """``(pairs, other trainable parameters)`` from explicit pairs or from the model's modules."""
    if pairs is None:
        if model is None:
            raise ValueError("pass a model (with LoRA injected) or pairs=[LoRAPair, ...]")
        pairs = lora_pairs(model)
    pairs = list(pairs)
    extra = non_lora_trainable(model, pairs) if model is not None else []
    return pairs, extra


def _pair_builder(cls: type, **preset: Any) -> Builder:
    def build(model: nn.Module | None, pairs: Sequence[LoRAPair] | None = None, **overrides: Any):
        found, extra = resolve_pairs(model, pairs)
        return cls(found, extra_params=extra, **{**preset, **overrides})

    build.__doc__ = f"{cls.__name__}({preset or ''}) over the model's LoRA pairs."
    return build


def _adamw(model: nn.Module | None, pairs: Sequence[LoRAPair] | None = None, **overrides: Any):
    found, extra = resolve_pairs(model, pairs)
    return build_adamw([t for p in found for t in (p.A, p.B)] + extra, **overrides)


def _sgd(model: nn.Module | None, pairs: Sequence[LoRAPair] | None = None, **overrides: Any):
    found, extra = resolve_pairs(model, pairs)
    return build_sgd([t for p in found for t in (p.A, p.B)] + extra, **overrides)


def _loraplus(model: nn.Module | None, pairs: Sequence[LoRAPair] | None = None, **overrides: Any):
    found, extra = resolve_pairs(model, pairs)
    return build_loraplus(found, extra, **overrides)


OPTIMIZERS: dict[str, Builder] = {
    "adamw": _adamw,
    "loraplus": _loraplus,
    "sgd": _sgd,
    "scaled_gd": _pair_builder(ScaledGD),
    "scaled_adamw": _pair_builder(ScaledAdamW),
    "reflora": _pair_builder(RefLoRA),
    "reflora_s": _pair_builder(RefLoRA, scalar=True),
    "lora_pro": _pair_builder(LoRAPro, adam=True),
    "lora_pro_sgd": _pair_builder(LoRAPro, adam=False, lr=2e-2),
    "adaprelora": _pair_builder(AdaPreLoRA),
    "lora_rite": _pair_builder(LoRARite),
    "dlrt": usv_builder(DLRT),
    "geolora": usv_builder(GeoLoRA),
    "geo_heavy_ball": usv_builder(GeometricHeavyBall),
    "geo_adam": usv_builder(GeometricAdam),
}


def build_optimizer(name: str, model: nn.Module | None = None, **overrides: Any) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model`` (or ``pairs=[...]``) with ``overrides``."""
    try:
        builder = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}") from None
    return builder(model, **overrides)
