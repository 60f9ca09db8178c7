"""LoRALinear / inject_lora / lora_pairs, and the PEFT export round trip."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lorafold.training.adapters.lora import LoRALinear, inject_lora, lora_pairs, merge_lora
from lorafold.training.peft_export import export_lora_model, peft_key, save_peft_adapter
from tests.training.helpers import one_thread_fixture, tiny_llama_cfg

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


_one_thread = one_thread_fixture(scope="module")


def tiny_llama(seed: int = 0) -> nn.Module:
    return tiny_llama_cfg(hidden_size=64, intermediate_size=128, vocab_size=128, max_position_embeddings=64,
                          seed=seed)


def _randomize_lora(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in lora_pairs(model):
            pair.A.copy_(torch.randn(pair.A.shape, generator=gen) * 0.1)
            pair.B.copy_(torch.randn(pair.B.shape, generator=gen) * 0.1)


def test_lora_linear_math_and_default_init() -> None:
    torch.manual_seed(0)
    base = nn.Linear(20, 30)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.abs().sum() > 0
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 => no change at init
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ (base.weight + 2.0 * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.merged_weight(), base.weight + layer.delta_weight())
    assert not base.weight.requires_grad
    assert LoRALinear(nn.Linear(20, 30), r=4, alpha=8, rslora=True).scaling == pytest.approx(4.0)


def test_inject_and_pairs_by_module() -> None:
    model = tiny_llama()
    injected = inject_lora(model, r=4, alpha=8, rank_pattern={"model.layers.1.mlp.down_proj": 2})
    assert len(injected) == 2 * 7
    pairs = lora_pairs(model)
    assert [p.name for p in pairs] == list(injected)
    for pair in pairs:
        mod = model.get_submodule(pair.name)
        assert pair.A is mod.lora_A and pair.B is mod.lora_B and pair.scale == mod.scaling
    assert model.get_submodule("model.layers.1.mlp.down_proj").r == 2
    assert model.get_submodule("model.layers.1.mlp.down_proj").scaling == 4.0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)


def test_merge_matches_adapter_output() -> None:
    model = tiny_llama()
    inject_lora(model, r=4, alpha=8)
    _randomize_lora(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
        assert merge_lora(model) == 14
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_export_loads_in_peft_with_same_logits(tmp_path, rslora: bool) -> None:
    model = tiny_llama()
    reference = tiny_llama()  # same seed: identical base weights
    inject_lora(
        model,
        r=4,
        alpha=8,
        rslora=rslora,
        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.up_proj": 6},
        alpha_pattern={"model.layers.1.self_attn.v_proj": 3.0},
    )
    _randomize_lora(model)
    folder = export_lora_model(model, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.up_proj": 6}
    loaded = peft.PeftModel.from_pretrained(reference, folder).eval()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
        base = tiny_llama()(ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter does something, so the check can fail
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_save_peft_adapter_rejects_bad_input(tmp_path) -> None:
    a, b = torch.zeros(4, 8), torch.zeros(6, 4)
    with pytest.raises(ValueError, match="does not start with"):
        save_peft_adapter(tmp_path, {"x.lora_A.weight": a, "x.lora_B.weight": b}, {"r": 4, "lora_alpha": 8})
    with pytest.raises(ValueError, match="rank_pattern"):
        save_peft_adapter(tmp_path, {peft_key("m", "A"): a, peft_key("m", "B"): b}, {"r": 8, "lora_alpha": 8})
    out = save_peft_adapter(tmp_path / "ok", {peft_key("m.q_proj", "A"): a, peft_key("m.q_proj", "B"): b}, {"r": 4, "lora_alpha": 8})
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]
