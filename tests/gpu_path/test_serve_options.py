"""`lorafold serve --device/--dtype/--lora-dtype/--gpu-memory-utilization/--kv-blocks`: parsed by the real
command line, the model loaded straight into the dtype, the KV cache measured from free
memory unless given, and a bfloat16 server answering through HTTP on loopback."""

from __future__ import annotations

import argparse

import httpx
import pytest
import torch

from lorafold.clients.cli import build_parser
from lorafold.server.api.cli_entry import settings_from_args
from lorafold.server.api.settings import ServerSettings
from lorafold.server.engine import kv_sizing
from lorafold.server.engine.config import EngineConfig
from lorafold.server.models.loader import load_base_model, resolve_device, resolve_dtype
from tests.server.live import live_app
from tests.store.replicas import save_tiny_model


def _serve_settings(*argv: str) -> ServerSettings:
    args = build_parser().parse_args(["serve", *argv])
    return settings_from_args(args)


def test_flags_reach_the_settings() -> None:
    s = _serve_settings("--device", "cpu", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.5")
    assert (s.device, s.dtype, s.engine.gpu_memory_utilization, s.measure_kv_blocks) == ("cpu", "bfloat16", 0.5, True)
    fixed = _serve_settings("--kv-blocks", "96")
    assert fixed.engine.num_kv_blocks == 96 and not fixed.measure_kv_blocks
    d = _serve_settings()
    assert (d.device, d.dtype, d.measure_kv_blocks, d.engine) == ("auto", "auto", True, EngineConfig())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dtype", "float8"])
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        _serve_settings("--gpu-memory-utilization", "1.5")
    assert _serve_settings("--lora-dtype", "bfloat16").engine.lora_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora-dtype", "int8"])
    with pytest.raises(ValueError, match="lora_dtype must be one of"):
        EngineConfig(lora_dtype="int8")
    from lorafold.server.engine.config import LORA_DTYPES
    from lorafold.server.models.loader import DTYPES

    assert set(LORA_DTYPES) == {"auto", *DTYPES}, "the engine config's copy of the dtype names drifted"


def test_adapter_pools_the_gpu_kernels_cannot_read_are_refused_before_the_model_loads(monkeypatch, caplog) -> None:
    """`--lora-dtype float32` on a bf16 GPU model: the Triton kernels read pools of the model's
    dtype, so `lorafold serve` exits 2 naming the fix (the device stands in for a GPU's: the
    check is made on the resolved device and dtype, before anything is loaded)."""
    import logging

    from lorafold.server.api import cli_entry

    monkeypatch.setattr(cli_entry, "resolve_device", lambda name: torch.device("cuda"))
    args = build_parser().parse_args(["serve", "--dtype", "bfloat16", "--lora-dtype", "float32"])
    with caplog.at_level(logging.ERROR):
        assert cli_entry.serve_main(args) == 2
    assert "lora_dtype='auto'" in caplog.text


def test_auto_resolves_to_the_cpu_in_float32_without_a_gpu() -> None:
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        assert resolve_dtype("auto", "cuda") in (torch.bfloat16, torch.float16)
        return
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not supported"):
        resolve_dtype("float8")


def test_model_loads_straight_into_the_dtype(tmp_path) -> None:
    folder = save_tiny_model(tmp_path / "tiny")
    base = load_base_model(folder, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in base.model.buffers() if b.is_floating_point()} <= {torch.bfloat16, torch.float32}


def test_kv_blocks_measured_capped_and_refused_with_the_flags_named(tmp_path, monkeypatch) -> None:
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama()
    cfg = EngineConfig(block_size=4, max_num_seqs=3, max_num_batched_tokens=32, max_prefill_chunk=8, max_model_len=64)
    # plenty of memory: never more than max_num_seqs full contexts
    assert kv_sizing.with_measured_kv_blocks(model, cfg).num_kv_blocks == 3 * 16
    per_block = kv_sizing.kv_block_bytes(model.config, cfg, torch.float32)
    assert per_block == 2 * 2 * 4 * 2 * 12 * 4  # K+V, layers, block, kv heads, head_dim, fp32
    monkeypatch.setattr(kv_sizing, "CPU_KV_BYTES", 20 * per_block)
    assert kv_sizing.with_measured_kv_blocks(model, cfg).num_kv_blocks == 20
    monkeypatch.setattr(kv_sizing, "CPU_KV_BYTES", 10 * per_block)  # less than one 64-token context
    with pytest.raises(ValueError, match="--kv-blocks"):
        kv_sizing.with_measured_kv_blocks(model, cfg)


def test_bfloat16_server_on_loopback_with_a_measured_kv_cache(tmp_path) -> None:
    folder = save_tiny_model(tmp_path / "tiny")
    settings = ServerSettings(model=str(folder), device="cpu", dtype="bfloat16", adapter_root=tmp_path / "adapters",
                              state_dir=tmp_path / "state", engine=EngineConfig(max_model_len=128, max_num_seqs=4))
    with live_app(settings, None) as (url, app):
        runner = app.state.ctx.engine.engine.runner
        assert runner.dtype == torch.bfloat16 and runner.device.type == "cpu"
        assert runner.kv_caches[0][0].dtype == torch.bfloat16
        assert runner.config.num_kv_blocks == 4 * 128 // 16  # measured: full contexts of 4 sequences
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"prompt": [1, 2, 3, 4, 5], "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 6
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "lorafold_kv_blocks_total 32.0" in metrics
