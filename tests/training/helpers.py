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


def one_thread_fixture(scope: str = "function"):
    """An autouse fixture running each test (or module, with scope="module") on one intra-op thread.

    Tiny matmuls on a loaded machine run far faster on one thread. Assign it in the test module
    that wants it (``_one_thread = one_thread_fixture(...)``); it is never autouse for the directory.
    """
    from lorafold.training.optim.testbed import single_thread

    @pytest.fixture(autouse=True, scope=scope)
    def _one_thread():
        with single_thread():
            yield

    return _one_thread


def tiny_llama_cfg(hidden_size: int, intermediate_size: int, vocab_size: int, max_position_embeddings: int,
                   seed: int = 0, eval_mode: bool = True):
    """A 2-layer, 4-head (2 KV heads) random LlamaForCausalLM built after ``torch.manual_seed(seed)``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
    )
    model = transformers.LlamaForCausalLM(cfg)
    return model.eval() if eval_mode else model


def usv_start(r: int = 3, seed: int = 0, r_max: int = 10):
    """A USV test-bed layer at a random rank-r point with a dense S, and its κ = 4 target."""
    import torch

    from lorafold.training.optim.testbed import make_target
    from lorafold.training.optim.usv_testbed import usv_layer

    layer = usv_layer(r0=r, r_max=r_max, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        layer.S[:r, :r] = torch.randn(r, r, generator=gen, dtype=torch.float64)
    return layer, make_target(kappa=4.0, seed=seed)


def usv_point(layer):
    """Detached copies of the layer's U, S, V and its dense W = U S Vᵀ."""
    U, S, V = (t.detach().clone() for t in layer.factors())
    return U, S, V, U @ S @ V.T


def fixed_batch_losses(model, opt, steps: int, vocab: int, seed: int = 0) -> list[float]:
    """Train ``model`` with ``opt`` for ``steps`` steps on one fixed batch of 2 x 8 random
    token ids below ``vocab``; the loss before each step."""
    import torch

    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(seed))
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
