"""Base-model loading: default, HF folder, GGUF file, and refusal of unsupported architectures."""

from __future__ import annotations

import pytest
import torch

from lorafold.server.models.assets import DEFAULT_MODEL, fetch_gguf, sha256_file
from lorafold.server.models.loader import UnsupportedModelError, load_base_model, resolve_model_folder


def test_default_model_is_cached_and_verified():
    gguf = fetch_gguf()  # cached by deploy/setup.sh: no download here
    assert sha256_file(gguf) == DEFAULT_MODEL.sha256
    folder = resolve_model_folder(None)
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()


def test_hf_folder_loads_and_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(llama)
    from lorafold.server.models.assets import default_model_dir

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (llama / name).write_bytes((default_model_dir() / name).read_bytes())
    loaded = load_base_model(llama)
    assert loaded.name == "llama" and not any(p.requires_grad for p in loaded.model.parameters())
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    with pytest.raises(UnsupportedModelError, match="supported: llama, mistral, qwen2"):
        load_base_model(gpt2)
    with pytest.raises(FileNotFoundError, match="never downloaded from a hub"):
        load_base_model("org/some-hub-model")


@pytest.mark.slow
def test_gguf_file_is_converted_once_and_matches_default(tmp_path, monkeypatch, smollm2):
    real_gguf = fetch_gguf()  # from the real cache, before the cache is redirected
    monkeypatch.setenv("LORAFOLD_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "SmolLM2.gguf"
    gguf.symlink_to(real_gguf)
    model = load_base_model(gguf)
    converted = list((tmp_path / "cache" / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").exists()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model.model(ids).logits, smollm2.model(ids).logits)
    assert resolve_model_folder(gguf) == converted[0]  # second start: no conversion
