"""Shared bits of the training tests: the SmolLM2 tokenizer and a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

SMOL_DIR = Path.home() / ".cache" / "lorafold" / "models" / "SmolLM2-135M-Instruct"


def smol_tokenizer():
    from transformers import AutoTokenizer

    if not (SMOL_DIR / "tokenizer.json").exists():
        pytest.skip("SmolLM2 is not cached: run deploy/setup.sh")
    return AutoTokenizer.from_pretrained(SMOL_DIR)


def tiny_base(tokenizer, seed: int = 0) -> SimpleNamespace:
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama(seed=seed, vocab_size=49152, hidden_size=32, intermediate_size=64,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return SimpleNamespace(model=model, tokenizer=tokenizer, folder=None, name="tiny")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def toy_rows(n: int = 24) -> list[dict]:
    words = ["red", "blue", "green", "gold"]
    return [{"prompt": f"Color {i}: {words[i % 4]} is", "completion": f" {words[(i + 1) % 4]}"} for i in range(n)]
