"""Adapter folders that cannot be served are refused with a message naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafold.server.lora.peft_format import AdapterError, AdapterFileOutsideRootError, load_adapter
from lorafold.server.models.loader import module_specs
from tests.conftest import build_tiny_llama, make_peft_adapter


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    base = build_tiny_llama()
    folder = make_peft_adapter(base, tmp_path_factory.mktemp("good") / "a", r=4, seed=1)
    specs = module_specs(build_tiny_llama())
    return folder, specs


def variant(good, tmp_path, *, config=None, tensors=None, drop=None):
    folder, _ = good
    dst = tmp_path / "v"
    shutil.copytree(folder, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(str(dst / "adapter_model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "adapter_model.safetensors"))
    if drop:
        (dst / drop).unlink()
    return dst


def test_good_adapter_loads(good):
    folder, specs = good
    ad = load_adapter(folder, specs)
    assert ad.max_rank == 4 and len(ad.modules) == 2 * 7
    assert ad.target_names == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    assert len(ad.content_hash) == 64


def _first(t, suffix):
    return next(k for k in t if k.endswith(suffix))


def _transpose_first_a(t):
    k = _first(t, "lora_A.weight")
    t[k] = t[k].t().contiguous()


def _nan(t):
    t[_first(t, "lora_B.weight")][0, 0] = float("nan")


def _drop_b(t):
    del t[_first(t, "lora_B.weight")]


def _unknown_module(t):
    k = _first(t, "q_proj.lora_A.weight")
    t[k.replace("layers.0", "layers.7")] = t[k].clone()
    t[k.replace("layers.0", "layers.7").replace("lora_A", "lora_B")] = t[k.replace("lora_A", "lora_B")].clone()


def _int_dtype(t):
    k = _first(t, "lora_A.weight")
    t[k] = t[k].to(torch.int32)


def _float8(t):
    k = _first(t, "lora_A.weight")
    t[k] = t[k].to(torch.float8_e4m3fn)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(config={"use_dora": True}), "DoRA"),
        (dict(config={"modules_to_save": ["lm_head"]}), "modules_to_save"),
        (dict(config={"bias": "all"}), "bias"),
        (dict(config={"r": 8}), "config says r=8"),
        (dict(config={"r": "eight"}), "r must be a positive integer rank"),
        (dict(config={"lora_alpha": float("nan")}), "not valid JSON"),
        (dict(config={"lora_alpha": float("inf")}), "not valid JSON"),
        (dict(config={"lora_alpha": 1e38}), r"lora_alpha must be a number in \(0, 1e\+06\]"),
        (dict(config={"lora_alpha": -1}), "lora_alpha must be a number"),
        (dict(config={"rank_pattern": {"q_proj": "x"}}), "rank_pattern\['q_proj'\] must be a positive integer"),
        (dict(config={"rank_pattern": {"q_proj(": 4}}), "not a valid regular expression"),
        (dict(config={"alpha_pattern": {"q_proj": 0}}), "alpha_pattern\['q_proj'\] must be a number"),
        (dict(config={"rank_pattern": [1, 2]}), "rank_pattern' must be an object"),
        (dict(config={"target_modules": 7}), "target_modules must be a list"),
        (dict(config={"target_modules": [None]}), "target_modules must be a list"),
        (dict(config={"target_modules": "q_proj("}), "not a valid regular expression"),
        (dict(config={"peft_type": "IA3"}), "only LoRA"),
        (dict(tensors=_transpose_first_a), "base layer takes"),
        (dict(tensors=_nan), "NaN"),
        (dict(tensors=_drop_b), "not its partner"),
        (dict(tensors=_unknown_module), "not a target linear"),
        (dict(tensors=_int_dtype), "save adapters in float32"),
        (dict(tensors=_float8), "float8_e4m3fn; save adapters in float32"),
        (dict(drop="adapter_config.json"), "has no adapter_config.json"),
    ],
)
def test_bad_adapters_are_refused(good, tmp_path, kwargs, message):
    with pytest.raises(AdapterError, match=message):
        load_adapter(variant(good, tmp_path, **kwargs), good[1])


def test_pickle_weights_are_refused(good, tmp_path):
    dst = variant(good, tmp_path, drop="adapter_model.safetensors")
    (dst / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="only safetensors"):
        load_adapter(dst, good[1])


def test_corrupt_safetensors_is_refused(good, tmp_path):
    dst = variant(good, tmp_path)
    raw = (dst / "adapter_model.safetensors").read_bytes()
    (dst / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter(dst, good[1])


def test_invalid_json_is_refused(good, tmp_path):
    dst = variant(good, tmp_path)
    (dst / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(dst, good[1])


def test_rank_limit(good):
    with pytest.raises(AdapterError, match="exceeds this server's limit"):
        load_adapter(good[0], good[1], max_rank=2)


def test_adapter_for_other_model_is_refused(good, tmp_path):
    other = build_tiny_llama(hidden_size=48, head_dim=8)
    folder = make_peft_adapter(other, tmp_path / "other", r=4)
    with pytest.raises(AdapterError, match="base layer"):
        load_adapter(folder, good[1])


def test_files_linking_outside_the_root_are_refused(good, tmp_path):
    """A folder inside the root whose files are symlinks to an adapter elsewhere is refused;
    links that stay inside the root are fine."""
    outside = variant(good, tmp_path / "outside")
    root = tmp_path / "root"
    (root / "linked").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "linked" / name).symlink_to(outside / name)
    with pytest.raises(AdapterFileOutsideRootError, match="outside the adapter root"):
        load_adapter(root / "linked", good[1], root=root)
    inside = variant(good, root / "real")
    (root / "alias").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "alias" / name).symlink_to(inside / name)
    assert load_adapter(root / "alias", good[1], root=root).content_hash == load_adapter(inside, good[1]).content_hash
