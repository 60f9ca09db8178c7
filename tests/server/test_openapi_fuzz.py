"""schemathesis fuzzes the real server against its own OpenAPI document: no server error,
no status code or content type the document does not declare. Fixed seed, bounded examples;
the stateful phase follows the document's links (register -> get -> delete)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lorafold.server.api.settings import ServerSettings
from lorafold.server.engine.config import EngineConfig
from tests.conftest import make_peft_adapter
from tests.server.live import live_server

CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
    "negative_data_rejection", "use_after_free", "ensure_resource_availability",
])


def test_schemathesis_finds_no_server_errors(smollm2, tmp_path):
    cli = shutil.which("schemathesis") or shutil.which("st")
    if cli is None:
        pytest.fail("schemathesis is missing: pip install -e '.[dev]' (deploy/setup.sh does)")
    root = tmp_path / "root"
    # the document's example registration names this folder, so the stateful phase registers it
    make_peft_adapter(smollm2.model, root / "sentiment", r=2, targets=["q_proj"])
    settings = ServerSettings(adapter_root=root, state_dir=tmp_path / "state", max_tokens_cap=16, default_max_tokens=4,
                              engine=EngineConfig(max_model_len=256, num_kv_blocks=64, max_num_seqs=8),
                              measure_kv_blocks=False)
    with live_server(settings, smollm2) as url:
        run = subprocess.run(
            [cli, "run", f"{url}/openapi.json", "--checks", CHECKS, "--seed", "1", "--max-examples", "12",
             "--workers", "1", "--phases", "examples,coverage,fuzzing,stateful", "--generation-database", "none",
             "--request-timeout", "60", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Stateful" in run.stdout and "API Links:" in run.stdout
