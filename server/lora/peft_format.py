"""Read and validate PEFT LoRA adapter folders against a base model.

The folder is the contract between training and serving:
`adapter_config.json` + `adapter_model.safetensors`, tensor keys such as
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]) and
`...lora_B.weight` ([out, r]). Everything is checked before an adapter is accepted, and
every refusal names the problem and, where there is one, the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter folder that cannot be served; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class ModuleSpec:
    """What the base model offers an adapter: one target linear."""

    in_features: int
    out_features: int


@dataclass(frozen=True, slots=True)
class ModuleLoRA:
    """One adapted module: `W = W0 + scale · B A`."""

    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


@dataclass(frozen=True, slots=True)
class LoRAAdapter:
    """A validated adapter: per-module factors keyed by the base model's module path."""

    modules: dict[str, ModuleLoRA]
    config: dict
    content_hash: str
    nbytes: int
    source: str = ""
    target_names: tuple[str, ...] = field(default=())

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}


def _pattern_value(pattern: Mapping[str, int | float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup (`peft.utils.other.get_pattern_key`): the first
    key that matches the module name, as a regex anchored at a dot boundary, wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targets_match(target_modules: object, module: str) -> bool:
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return True
        return re.fullmatch(target_modules, module) is not None
    names = list(target_modules)
    return any(module == t or module.endswith("." + t) for t in names)


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG_NAME}: an adapter folder needs it beside {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{CONFIG_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_NAME} must hold a JSON object")
    check_config(config)
    return config


def check_config(config: dict) -> None:
    """Refuse options we do not serve (yet), naming each."""
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"peft_type {peft_type!r} is not supported: only LoRA adapters can be served")
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora=true) are not supported yet: merge the magnitude vector or train plain LoRA")
    if config.get("modules_to_save"):
        raise AdapterError(f"modules_to_save={config['modules_to_save']} is not supported: only LoRA factors on linear layers can be served")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"bias={config['bias']!r} is not supported: retrain with bias='none'")
    if config.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out=true is for Conv1D models (GPT-2); Llama-family adapters must set it false")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{CONFIG_NAME}: {key!r} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterError(f"{CONFIG_NAME}: {key!r} must be an object mapping module names to numbers")


def load_adapter(folder: str | Path, base_modules: Mapping[str, ModuleSpec], *, max_rank: int | None = None) -> LoRAAdapter:
    """Read a PEFT adapter folder and validate it against `base_modules`.

    Args:
        folder: the adapter folder.
        base_modules: module path (e.g. "model.layers.0.self_attn.q_proj") -> shape, for
            every linear of the base model that adapters may target.
        max_rank: refuse adapters of larger rank (None: no limit).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    config = read_config(folder)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        others = sorted(p.name for p in folder.glob("adapter_model.*"))
        hint = f" (found {others}: only safetensors is loaded, convert with safetensors.torch.save_file)" if others else ""
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}{hint}")
    raw = weights_path.read_bytes()
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{WEIGHTS_NAME} is not a readable safetensors file: {exc}") from exc
    modules = parse_tensors(tensors, config, base_modules, max_rank=max_rank)
    digest = hashlib.sha256(raw)
    digest.update(json.dumps(config, sort_keys=True).encode())
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in modules}))
    return LoRAAdapter(
        modules=modules, config=config, content_hash=digest.hexdigest(), nbytes=len(raw),
        source=str(folder), target_names=targets,
    )


def parse_tensors(
    tensors: Mapping[str, torch.Tensor],
    config: dict,
    base_modules: Mapping[str, ModuleSpec],
    *,
    max_rank: int | None = None,
) -> dict[str, ModuleLoRA]:
    """Pair lora_A / lora_B tensors by module and check them against the base model."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"unexpected tensor {key!r}: only lora_A / lora_B weights can be served")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    if not pairs:
        raise AdapterError(f"{WEIGHTS_NAME} holds no LoRA weights")
    r_default, alpha_default = config["r"], config["lora_alpha"]
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules: dict[str, ModuleLoRA] = {}
    for module, ab in sorted(pairs.items()):
        if module not in base_modules:
            raise AdapterError(
                f"module {module!r} is not a target linear of the base model "
                f"(targets are e.g. {next(iter(base_modules))!r}); was the adapter trained on another model?"
            )
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"module {module!r} has lora_{''.join(ab)} but not its partner")
        a, b = ab["A"], ab["B"]
        spec = base_modules[module]
        _check_pair(module, a, b, spec)
        rank = int(_pattern_value(rank_pattern, module, r_default))
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
        if a.shape[0] != rank:
            raise AdapterError(f"module {module!r}: lora_A has rank {a.shape[0]} but the config says r={rank}")
        if max_rank is not None and rank > max_rank:
            raise AdapterError(f"module {module!r}: rank {rank} exceeds this server's limit of {max_rank}")
        if not _targets_match(config.get("target_modules"), module):
            raise AdapterError(f"module {module!r} has weights but is not in target_modules={config.get('target_modules')!r}")
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[module] = ModuleLoRA(lora_a=a.float().contiguous(), lora_b=b.float().contiguous(), scale=scale)
    return modules


def _check_pair(module: str, a: torch.Tensor, b: torch.Tensor, spec: ModuleSpec) -> None:
    for label, t in (("lora_A", a), ("lora_B", b)):
        if t.dim() != 2:
            raise AdapterError(f"module {module!r}: {label} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise AdapterError(f"module {module!r}: {label} has dtype {t.dtype}; expected a floating type")
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"module {module!r}: {label} contains NaN or Inf")
    if a.shape[1] != spec.in_features:
        raise AdapterError(
            f"module {module!r}: lora_A is {tuple(a.shape)} but the base layer takes {spec.in_features} inputs "
            f"(expected [r, {spec.in_features}])"
        )
    if b.shape[0] != spec.out_features:
        raise AdapterError(
            f"module {module!r}: lora_B is {tuple(b.shape)} but the base layer has {spec.out_features} outputs "
            f"(expected [{spec.out_features}, r])"
        )
    if a.shape[0] != b.shape[1]:
        raise AdapterError(f"module {module!r}: lora_A rank {a.shape[0]} != lora_B rank {b.shape[1]}")
    if a.shape[0] == 0:
        raise AdapterError(f"module {module!r}: rank 0")
