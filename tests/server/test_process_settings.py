"""Process-wide settings belong to the server process, not to the engine: `lorafold serve`
applies glibc's malloc settings once at start (`server.engine.host_memory`), and building an
engine (a library user's process, a test, a benchmark) leaves them alone."""

from __future__ import annotations

import pytest

from lorafold.clients.cli import build_parser
from lorafold.server.api import cli_entry
from lorafold.server.engine import host_memory
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.model_runner import ModelRunner
from tests.conftest import build_tiny_llama


@pytest.fixture()
def malloc_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(cli_entry, "keep_freed_memory", host_memory.keep_freed_memory)
    return calls


def test_building_an_engine_does_not_change_process_settings(malloc_calls: list[str]) -> None:
    ModelRunner(build_tiny_llama(), EngineConfig(num_kv_blocks=8, max_model_len=64, max_loras=2))
    assert malloc_calls == []


def test_serve_applies_them_once_before_the_server_runs(malloc_calls: list[str], monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path) -> None:  # noqa: ANN001
    import uvicorn

    order: list[str] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: order.append(f"run after {list(malloc_calls)}"))
    import lorafold.server.api.app as app_module

    monkeypatch.setattr(app_module, "create_app", lambda settings: object())
    args = build_parser().parse_args(["serve", "--adapter-root", str(tmp_path / "adapters"),
                                      "--state-dir", str(tmp_path / "state"), "--kv-blocks", "8"])
    assert cli_entry.serve_main(args) == 0
    assert order == ["run after ['malloc']"]
