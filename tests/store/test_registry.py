"""The registry on the store, without a server: an earlier version's registry.json is migrated
into the file store once, and weights fetched from the store are checked before use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lorafold.server.api.registry import AdapterRegistry
from lorafold.server.lora.peft_format import load_adapter
from lorafold.server.models.loader import module_specs
from lorafold.server.store import StoreIntegrityError, open_store
from tests.conftest import build_tiny_llama, make_peft_adapter


@pytest.fixture()
def setup(tmp_path):
    model = build_tiny_llama()
    specs = module_specs(model)
    folder = make_peft_adapter(model, tmp_path / "root" / "old", r=4, seed=3, targets=["q_proj", "v_proj"])
    return specs, folder, tmp_path


def test_legacy_registry_json_is_migrated_once(setup):
    specs, folder, tmp = setup
    want = load_adapter(folder, specs)
    state = tmp / "state"
    stored = state / "adapters" / want.content_hash
    stored.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(folder / name, stored / name)
    (state / "registry.json").write_text(json.dumps({"version": 1, "adapters": [
        {"name": "old", "content_hash": want.content_hash, "folder": str(stored), "source": "old",
         "registered_at": 1.0, "rank": 4, "ranks": [4], "targets": ["q_proj", "v_proj"], "size_bytes": want.nbytes},
        {"name": "gone", "content_hash": "0" * 64, "folder": str(state / "adapters" / "missing"), "source": "x",
         "registered_at": 1.0, "rank": 4, "ranks": [4], "targets": [], "size_bytes": 1}]}))
    registry = AdapterRegistry(open_store(f"file://{state}"), tmp / "root", specs)
    assert registry.restore() == ["old"]  # the broken entry is logged and skipped
    assert not (state / "registry.json").exists() and (state / "registry.json.migrated").exists()
    entry, got = AdapterRegistry(open_store(f"file://{state}"), tmp / "root", specs).load("old")  # a fresh replica
    assert entry.content_hash == want.content_hash
    for path, m in want.modules.items():
        assert torch.equal(got.modules[path].lora_a, m.lora_a) and torch.equal(got.modules[path].lora_b, m.lora_b)


def test_fetched_weights_are_verified(setup):
    specs, _, tmp = setup
    store = open_store(f"file://{tmp / 'store'}")
    writer = AdapterRegistry(store, tmp / "root", specs)
    entry = writer.register_folder("a", writer.resolve_path("old"))
    weights = store.root / "blobs" / entry.content_hash / "adapter_model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[:-4] + bytes(b ^ 1 for b in raw[-4:]))
    reader = AdapterRegistry(store, tmp / "root", specs)
    with pytest.raises(StoreIntegrityError, match="altered"):
        reader.load("a")
    assert reader.names() == ["a"] and reader.cpu_resident == 0  # listed, nothing cached
    writer.register_folder("a", writer.resolve_path("old"))  # what the error says to do repairs it
    assert weights.read_bytes() == raw
    assert reader.load("a")[1].content_hash == entry.content_hash
