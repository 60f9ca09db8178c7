"""Load a base causal LM: the packaged default, a local Hugging Face folder, or a GGUF file.

Only Llama-family architectures are served (their layers are what the multi-LoRA layers and
the model runner know); anything else is refused before its weights are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafold.server.models.assets import DEFAULT_MODEL, cache_root, default_model_dir, sha256_file

logger = logging.getLogger(__name__)

#: model_type values (config.json) we serve. SmolLM2 is a `llama`.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2")

#: The seven linear layers of a Llama-family decoder layer, the usual LoRA targets.
LLAMA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnsupportedModelError(ValueError):
    """The base model's architecture is not one we can serve."""


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
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    name: str | None = None,
) -> BaseModel:
    """Load the base model and its tokenizer, frozen and in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_folder(source)
    check_architecture(AutoConfig.from_pretrained(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return BaseModel(model=model, tokenizer=tokenizer, name=name or _default_name(source, folder), folder=folder)


def _default_name(source: str | Path | None, folder: Path) -> str:
    if source is None or str(source) in ("", "default"):
        return DEFAULT_MODEL.name
    return Path(source).stem if str(source).endswith(".gguf") else folder.name
