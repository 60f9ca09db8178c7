"""Write adapters as standard PEFT LoRA folders — the contract between training and serving.

A PEFT LoRA folder holds two files:

- ``adapter_config.json``: ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``,
  ``rank_pattern`` / ``alpha_pattern`` (per-module overrides, keyed by module name), ...
- ``adapter_model.safetensors``: for every adapted module ``<name>`` (a path inside the
  *base* model, e.g. ``model.layers.0.self_attn.q_proj``) two tensors

  ``base_model.model.<name>.lora_A.weight``: [r, in_features]   (input side)
  ``base_model.model.<name>.lora_B.weight``: [out_features, r]  (output side)

  with ``ΔW = scale · lora_B @ lora_A`` and ``scale = alpha / r`` (``alpha / √r`` with rsLoRA),
  ``r`` and ``alpha`` taken from the patterns when the module has an entry there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"

# Fields PEFT's LoraConfig reads; everything the caller does not set gets PEFT's default.
_CONFIG_DEFAULTS: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": None,
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "use_rslora": False,
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_modules": None,
}


def peft_key(module_name: str, which: str) -> str:
    """PEFT tensor key of ``lora_A`` / ``lora_B`` for a module path inside the base model."""
    if which not in ("A", "B"):
        raise ValueError(f"which must be 'A' or 'B', got {which!r}")
    return f"{PEFT_PREFIX}{module_name}.lora_{which}.weight"


def _pattern_value(pattern: Mapping[str, Any], module_name: str, default: Any) -> Any:
    # Exact or dotted-suffix match: what PEFT's regex match does for the plain names we write.
    for key, value in pattern.items():
        if module_name == key or module_name.endswith("." + key):
            return value
    return default


def _module_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    names: list[str] = []
    for key in tensors:
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(
                f"tensor key {key!r} does not start with {PEFT_PREFIX!r}; build keys with peft_key(module_name, 'A'|'B')"
            )
        if key.endswith(_A_SUFFIX):
            names.append(key[len(PEFT_PREFIX) : -len(_A_SUFFIX)])
        elif not key.endswith(_B_SUFFIX):
            raise ValueError(f"tensor key {key!r} is neither a lora_A nor a lora_B weight")
    return names


def _validate(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[str]:
    names = _module_names(tensors)
    if not names:
        raise ValueError("no lora_A tensors given: nothing to export")
    if len(tensors) != 2 * len(names):
        raise ValueError("every lora_A.weight needs exactly one lora_B.weight of the same module")
    for name in names:
        a, b = tensors.get(peft_key(name, "A")), tensors.get(peft_key(name, "B"))
        if b is None or a is None:
            raise ValueError(f"module {name!r} lacks its lora_B.weight")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"module {name!r}: lora_A must be [r, in] and lora_B [out, r]; got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        expected = _pattern_value(config["rank_pattern"], name, config["r"])
        if a.shape[0] != expected:
            raise ValueError(
                f"module {name!r} has rank {a.shape[0]} but the config says {expected}; "
                "put the module in rank_pattern (and alpha_pattern)"
            )
    return names


def save_peft_adapter(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``tensors`` (PEFT keys, see module docstring) and ``config`` as a PEFT folder.

    ``config`` needs at least ``r`` and ``lora_alpha``; missing fields get PEFT defaults,
    ``target_modules`` defaults to the set of last name components of the adapted modules.
    Tensors are written contiguous, in their own dtype, detached and on CPU.
    Returns the folder path.
    """
    folder = Path(folder)
    full = {**_CONFIG_DEFAULTS, **config}
    full["rank_pattern"] = dict(full["rank_pattern"] or {})
    full["alpha_pattern"] = dict(full["alpha_pattern"] or {})
    names = _validate(tensors, full)
    if full["target_modules"] is None:
        full["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in names})
    elif not isinstance(full["target_modules"], str):
        full["target_modules"] = sorted(full["target_modules"])
    folder.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    logger.info("wrote PEFT adapter with %d modules to %s", len(names), folder)
    return folder


def export_lora_model(
    model: nn.Module,
    folder: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Export every :class:`~lorafold.training.adapters.lora.LoRALinear` of ``model``.

    The most common (r, alpha) becomes the config's ``r`` / ``lora_alpha``; every module
    that differs is written to ``rank_pattern`` / ``alpha_pattern`` under its full name, so
    each module's PEFT scale equals the scale it was trained with.
    """
    from lorafold.training.adapters.lora import LoRALinear

    modules = {name: mod for name, mod in model.named_modules() if isinstance(mod, LoRALinear)}
    if not modules:
        raise ValueError("model has no LoRALinear modules; call inject_lora(model, ...) first")
    rslora = {mod.rslora for mod in modules.values()}
    if len(rslora) != 1:
        raise ValueError("modules mix rsLoRA and plain scaling; PEFT stores one use_rslora flag")
    counts: dict[tuple[int, float], int] = {}
    for mod in modules.values():
        counts[(mod.r, mod.alpha)] = counts.get((mod.r, mod.alpha), 0) + 1
    r0, alpha0 = max(counts, key=counts.__getitem__)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, mod in modules.items():
        tensors[peft_key(name, "A")] = mod.lora_A
        tensors[peft_key(name, "B")] = mod.lora_B
        if mod.r != r0:
            rank_pattern[name] = mod.r
        if mod.alpha != alpha0 or mod.r != r0:
            alpha_pattern[name] = mod.alpha
    config = {
        "r": r0,
        "lora_alpha": alpha0,
        "use_rslora": rslora.pop(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type,
    }
    return save_peft_adapter(folder, tensors, config)
