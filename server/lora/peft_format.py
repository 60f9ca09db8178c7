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
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
# Documented ranges of the numeric config values (docs/api.md, "Adapters"). They keep the
# scale alpha / r finite and far from overflow; weights themselves are checked finite.
MAX_ALPHA = 1e6
MAX_CONFIG_BYTES = 1 << 20
# The weight dtypes a PEFT adapter is saved in; anything else (float8, int) is refused by name.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class AdapterError(ValueError):
    """An adapter folder that cannot be served; the message says why and what to do."""


class AdapterFileOutsideRootError(AdapterError):
    """An adapter file that resolves outside the adapter root (e.g. a symlink)."""


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


def read_adapter_files(folder: Path, root: Path | None = None) -> tuple[bytes, bytes]:
    """The raw bytes of `adapter_config.json` and `adapter_model.safetensors` in `folder`.

    With `root`, every file must resolve (symlinks followed) to a path under `root`: a folder
    inside the root whose files link elsewhere is refused. Each file is then opened by its
    resolved path without following links, so nothing swapped in after the check is read.
    """
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG_NAME}: an adapter folder needs it beside {WEIGHTS_NAME}")
    if not weights_path.is_file():
        others = sorted(p.name for p in folder.glob("adapter_model.*"))
        hint = f" (found {others}: only safetensors is loaded, convert with safetensors.torch.save_file)" if others else ""
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}{hint}")
    return _read_confined(config_path, root), _read_confined(weights_path, root)


def _read_confined(path: Path, root: Path | None) -> bytes:
    real = path.resolve()
    if root is not None:
        top = root.resolve()
        if top not in real.parents:
            raise AdapterFileOutsideRootError(
                f"{path.name} in {path.parent} links to {real}, outside the adapter root {top}; "
                "copy the file itself under the adapter root"
            )
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise AdapterError(f"cannot read {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        return fh.read()



def parse_config(raw: bytes) -> dict:
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes; it should be a small JSON object")
    try:
        config = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterError(f"{CONFIG_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_NAME} must hold a JSON object")
    check_config(config)
    return config


def _refuse_constant(name: str) -> float:
    # Python's json accepts NaN / Infinity, which JSON itself does not: a NaN lora_alpha would
    # slip through every `<= 0` check and poison the outputs.
    raise AdapterError(f"{CONFIG_NAME} contains {name}, which is not valid JSON; use finite numbers")


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG_NAME}: an adapter folder needs it beside {WEIGHTS_NAME}")
    return parse_config(path.read_bytes())


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
    _check_rank("r", config.get("r"))
    _check_alpha("lora_alpha", config.get("lora_alpha"))
    for key, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(f"{CONFIG_NAME}: {key!r} must be an object mapping module names to numbers")
        for module_key, value in pattern.items():
            _check_regex(f"{key} key", module_key)
            check(f"{key}[{module_key!r}]", value)
    _check_targets(config.get("target_modules"))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rank(label: str, value: object) -> None:
    if not (_is_number(value) and value >= 1 and float(value).is_integer()):
        raise AdapterError(f"{CONFIG_NAME}: {label} must be a positive integer rank, got {value!r}")


def _check_alpha(label: str, value: object) -> None:
    if not (_is_number(value) and 0 < value <= MAX_ALPHA):
        raise AdapterError(f"{CONFIG_NAME}: {label} must be a number in (0, {MAX_ALPHA:g}], got {value!r}")


def _check_regex(label: str, pattern: object) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise AdapterError(f"{CONFIG_NAME}: every {label} must be a non-empty string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise AdapterError(f"{CONFIG_NAME}: {label} {pattern!r} is not a valid regular expression: {exc}") from exc


def _check_targets(target_modules: object) -> None:
    if target_modules is None:
        return
    if isinstance(target_modules, str):
        _check_regex("target_modules", target_modules)
        return
    if not isinstance(target_modules, list) or not all(isinstance(t, str) and t for t in target_modules):
        raise AdapterError(
            f"{CONFIG_NAME}: target_modules must be a list of module names, a regex string, or 'all-linear'; "
            f"got {target_modules!r}"
        )


def load_adapter(
    folder: str | Path,
    base_modules: Mapping[str, ModuleSpec],
    *,
    max_rank: int | None = None,
    root: Path | None = None,
) -> LoRAAdapter:
    """Read a PEFT adapter folder and validate it against `base_modules`.

    Args:
        folder: the adapter folder.
        base_modules: module path (e.g. "model.layers.0.self_attn.q_proj") -> shape, for
            every linear of the base model that adapters may target.
        max_rank: refuse adapters of larger rank (None: no limit).
        root: when given, every file read must resolve to a path under it.
    """
    folder = Path(folder)
    config_raw, weights_raw = read_adapter_files(folder, root)
    return parse_adapter(config_raw, weights_raw, base_modules, max_rank=max_rank, source=str(folder))


def parse_adapter(
    config_raw: bytes,
    weights_raw: bytes,
    base_modules: Mapping[str, ModuleSpec],
    *,
    max_rank: int | None = None,
    source: str = "",
) -> LoRAAdapter:
    """Validate an adapter given as the bytes of its two files (folder, upload or store)."""
    config = parse_config(config_raw)
    try:
        tensors = load_safetensors(weights_raw)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{WEIGHTS_NAME} is not a readable safetensors file: {exc}") from exc
    modules = parse_tensors(tensors, config, base_modules, max_rank=max_rank)
    digest = hashlib.sha256(weights_raw)
    digest.update(json.dumps(config, sort_keys=True).encode())
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in modules}))
    return LoRAAdapter(
        modules=modules, config=config, content_hash=digest.hexdigest(), nbytes=len(weights_raw),
        source=source, target_names=targets,
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
        if t.dtype not in WEIGHT_DTYPES:
            raise AdapterError(
                f"module {module!r}: {label} has dtype {t.dtype}; save adapters in float32, float16 or bfloat16"
            )
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
