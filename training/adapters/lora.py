"""LoRA linear layers (PEFT convention), injection into a model, and pair discovery.

``y = x W0ᵀ + s · (x Aᵀ) Bᵀ`` with the frozen base ``W0: [m, n]`` (``m`` = out, ``n`` = in),
``A = lora_A: [r, n]`` (input side), ``B = lora_B: [m, r]`` (output side) and
``s = alpha / r`` (or ``alpha / √r`` with rsLoRA), i.e. ``W = W0 + s · B A``.

Optimizers need to know which ``(A, B)`` belong to the same layer: :func:`lora_pairs`
collects them *by module* (any module exposing ``lora_A``, ``lora_B`` parameters and a
``scaling`` attribute), never from the order of ``model.parameters()``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True, eq=False)
class LoRAPair:
    """One layer's factor pair: ``ΔW = scale · B @ A``; ``A: [r, n]``, ``B: [m, r]``."""

    name: str
    A: nn.Parameter
    B: nn.Parameter
    scale: float

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"pair {self.name!r}: need A [r, n] and B [m, r], got {tuple(self.A.shape)} and {tuple(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    """``alpha / r``, or ``alpha / √r`` with rsLoRA (rank-stabilized)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``s · B A``.

    Semantics: ``y[..., m] = base(x)[..., m] + s · ((x[..., n] @ Aᵀ) @ Bᵀ)``.
    Init ``"default"`` is PEFT's: ``A ~ kaiming_uniform(a=√5)``, ``B = 0`` (so ΔW = 0);
    ``"none"`` leaves both for an initializer in :mod:`lorafold.training.init` to set.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, rslora: bool = False, init: str = "default") -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"rank r must be positive, got {r}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scaling = lora_scale(r, alpha, rslora)
        # fp32 master weights over a 16-bit base (bf16 on a GPU): the update would vanish in
        # bf16's 8 bits; float64 bases keep float64
        kw = {"dtype": torch.promote_types(base.weight.dtype, torch.float32), "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))
        if init == "default":
            self.reset_default()
        elif init != "none":
            raise ValueError(f"unknown init {init!r}: use 'default' or 'none' (then an initializer from training.init)")

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def reset_default(self) -> None:
        """PEFT default: kaiming_uniform(a=√5) on A, zeros on B."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return self.base(x) + (lora * self.scaling).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``s · B A``: [m, n]."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        """``W0 + s · B A``: [m, n] (a new tensor; the module is unchanged)."""
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, rslora={self.rslora}, scaling={self.scaling:.4g}"


def _lookup(pattern: Mapping[str, float] | None, name: str, default: float) -> float:
    # Same rule as PEFT's rank_pattern: the key matches the whole name or a dotted suffix.
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default


def inject_lora(
    model: nn.Module,
    targets: Iterable[str] = DEFAULT_TARGETS,
    r: int = 16,
    alpha: float = 32,
    rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    init: str = "default",
) -> dict[str, LoRALinear]:
    """Replace every ``nn.Linear`` whose last name component is in ``targets`` by a LoRALinear.

    The base model's parameters are all frozen; only the new ``lora_A`` / ``lora_B`` train.
    ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``alpha`` per module (PEFT rule:
    key = full name or a dotted suffix of it). Returns ``{module name: LoRALinear}``.
    """
    targets = set(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not found:
        raise ValueError(f"no nn.Linear named one of {sorted(targets)} in the model; check the module names")
    injected: dict[str, LoRALinear] = {}
    for name, linear in found:
        rank = int(_lookup(rank_pattern, name, r))
        layer = LoRALinear(linear, rank, _lookup(alpha_pattern, name, alpha), rslora, init)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        injected[name] = layer
    logger.info("injected LoRA into %d modules (r=%d, alpha=%s)", len(injected), r, alpha)
    return injected


def lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """Every ``(A, B, scale)`` of the model, found by module (``lora_A``, ``lora_B``, ``scaling``)."""
    pairs = []
    for name, mod in model.named_modules():
        a, b = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter):
            pairs.append(LoRAPair(name, a, b, float(mod.scaling)))
    return pairs


def non_lora_trainable(model: nn.Module, pairs: Iterable[LoRAPair]) -> list[nn.Parameter]:
    """Trainable parameters that belong to no pair (they get the optimizer's plain update)."""
    paired = {id(p) for pair in pairs for p in (pair.A, pair.B)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in paired]


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold ``s · B A`` into each base weight and put the LoRALinear's base back in its place.

    Returns the number of merged modules. The model afterwards is a plain model.
    """
    names = [name for name, mod in model.named_modules() if isinstance(mod, LoRALinear)]
    for name in names:
        mod = model.get_submodule(name)
        mod.base.weight.copy_(mod.merged_weight())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, mod.base)
    return len(names)
