"""`lorafold serve` replicas as real processes (so one can be killed with SIGKILL), sharing one
adapter store, on a tiny random Llama saved with the SmolLM2 tokenizer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.server.live import free_port

ADMIN = {"Authorization": "Bearer admin-secret"}
USER = {"Authorization": "Bearer user-key"}


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 32) with SmolLM2's tokenizer: seconds to load, MBs of memory."""
    from transformers import AutoTokenizer

    from tests.conftest import build_tiny_llama
    from tests.training.helpers import SMOL_DIR

    model = build_tiny_llama(seed=seed, vocab_size=49152, hidden_size=32, intermediate_size=64,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(SMOL_DIR).save_pretrained(folder)
    return folder


@dataclass(slots=True)
class Replica:
    url: str
    proc: subprocess.Popen
    log: Path

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()


def start_replica(model: Path, adapter_root: Path, workdir: Path, store_url: str, env: dict[str, str],
                  refresh_seconds: float = 0.5) -> Replica:
    """Start one replica (not waiting for it: see `wait_ready`). Its state dir is fresh and empty."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lorafold.clients.cli", "serve", "--model", str(model), "--port", str(port),
           "--adapter-root", str(adapter_root), "--state-dir", str(workdir / "state"), "--adapter-store", store_url,
           "--store-refresh-seconds", str(refresh_seconds), "--api-key", "user-key", "--admin-key", "admin-secret",
           "--max-loras", "4", "--max-num-seqs", "4", "--max-model-len", "256", "--kv-blocks", "96",
           "--log-level", "warning"]
    log = workdir / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return Replica(f"http://127.0.0.1:{port}", proc, log)


def wait_ready(replica: Replica, timeout: float = 120.0) -> Replica:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{replica.url}/ready", timeout=1).status_code == 200:
                return replica
        except httpx.HTTPError:
            pass
        if replica.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"replica did not become ready; log:\n{replica.log.read_text()[-8000:]}")
        time.sleep(0.1)


def wait_exit(replica: Replica, timeout: float = 120.0) -> str:
    """For a replica expected to refuse to start: its exit status is non-zero; its log."""
    rc = replica.proc.wait(timeout)
    assert rc != 0
    return replica.log.read_text()
