"""Load a base causal LM: the packaged default, a local Hugging Face folder, or a GGUF file.

Only Llama-family architectures are served (their layers are what the multi-LoRA layers and
the model runner know); anything else is refused before its weights are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafold.server.lora.peft_format import ModuleSpec
from lorafold.server.models.assets import DEFAULT_MODEL, cache_root, default_model_dir, sha256_file

logger = logging.getLogger(__name__)

#: model_type values (config.json) we serve. SmolLM2 is a `llama`.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2")

#: The seven linear layers of a Llama-family decoder layer, the usual LoRA targets.
LLAMA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_specs(hf_model: torch.nn.Module) -> dict[str, ModuleSpec]:
    """What the model offers adapters: every target linear by its transformers path
    (`model.layers.3.self_attn.k_proj`), with its shape; what `load_adapter` validates against."""
    return {name: ModuleSpec(in_features=m.in_features, out_features=m.out_features)
            for name, m in hf_model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_TARGETS}


class UnsupportedModelError(ValueError):
    """The base model's architecture is not one we can serve."""


DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto`: the first CUDA device where one is present, else the CPU. `cuda` (or `cuda:N`)
    without a visible GPU is an error naming the fix, not a silent CPU run."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device {name!r} is not supported; use one of {', '.join(DEVICES)} (or cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
                         "use --device cpu, or a CUDA build of torch with the NVIDIA driver visible")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """`auto`: bfloat16 on a GPU that has it (float16 on older ones), float32 on the CPU
    (the compiled CPU kernels and oneDNN packing are float32; CPU half matmuls are slow)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not supported; use one of auto, {', '.join(DTYPES)}")
        return name
    if name == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(slots=True)
class BaseModel:
    model: torch.nn.Module  # a transformers *ForCausalLM
    tokenizer: object
    name: str  # what clients call the base model (OpenAI `model` field)
    folder: Path

    @property
    def config(self):  # noqa: ANN201 - transformers PretrainedConfig
        return self.model.config


def resolve_model_folder(source: str | Path | None) -> Path:
    """Map a model argument to a local Hugging Face folder (converting a GGUF once)."""
    if source is None or str(source) == "" or str(source) == "default":
        return default_model_dir()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from lorafold.server.models.gguf import convert_gguf_to_folder

        folder = cache_root() / "models" / f"{path.stem}-{sha256_file(path)[:12]}"
        if not (folder / "config.json").exists():
            convert_gguf_to_folder(path, folder)
        return folder
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face model folder or a .gguf file")
        return path
    raise FileNotFoundError(
        f"model {str(source)!r} not found: pass a local Hugging Face folder, a .gguf file, or nothing for the "
        f"packaged default ({DEFAULT_MODEL.name}); models are never downloaded from a hub"
    )


def check_architecture(config: object) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Llama family, e.g. SmolLM2, Llama, Mistral, Qwen2)"
        )
    return model_type


def load_base_model(
    source: str | Path | None = None,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    name: str | None = None,
) -> BaseModel:
    """Load the base model and its tokenizer, frozen and in eval mode, in `dtype` on `device`
    ("auto" for either: see `resolve_device` / `resolve_dtype`).

    The weights are read straight into `dtype` on `device` (transformers' `device_map`): no
    float32 copy on the way, no host copy of a GPU model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    folder = resolve_model_folder(source)
    check_architecture(AutoConfig.from_pretrained(folder))
    if device.type == "cpu":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": device})
    model.eval().requires_grad_(False)
    logger.info("base model %s loaded: %s on %s", folder.name, str(dtype).removeprefix("torch."), device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return BaseModel(model=model, tokenizer=tokenizer, name=name or _default_name(source, folder), folder=folder)


def _default_name(source: str | Path | None, folder: Path) -> str:
    if source is None or str(source) in ("", "default"):
        return DEFAULT_MODEL.name
    return Path(source).stem if str(source).endswith(".gguf") else folder.name
