"""Dequantize a GGUF file once into a plain Hugging Face folder (safetensors + tokenizer)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def convert_gguf_to_folder(gguf_path: Path, folder: Path) -> Path:
    """Load `gguf_path` with transformers (dequantizing to fp32) and save it to `folder`.

    The write goes to a temporary sibling folder renamed at the end, so an interrupted
    conversion never leaves a half-written cache that a later start would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s (one time: the result is cached)", gguf_path.name)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model until the quantizer is detached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is read by other users in containers
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
