"""The real ``torchrun`` (2 CPU processes, gloo) trains the same adapter as one process.

Both runs go through ``lorafold train``'s entry point (``lorafold.training.cli_entry``) on a
tiny random Llama saved to disk. The global batch (3) does not divide by the world size, so
the two ranks get shards of 2 and 1 rows; with ``--grad-accum 2`` each step also accumulates.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.helpers import smol_tokenizer, tiny_base, toy_rows, write_jsonl

pytestmark = pytest.mark.slow  # three Python processes that each import torch + transformers

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    tok = smol_tokenizer()
    base = tiny_base(tok)
    base.model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    rows = toy_rows(30)
    write_jsonl(tmp / "train.jsonl", rows[:24])
    write_jsonl(tmp / "val.jsonl", rows[24:])
    return tmp


def _args(tmp: Path, out: str, optimizer: str) -> list[str]:
    lr = ["--lr", "5e-3"] if optimizer == "adamw" else []  # geolora: its own default
    return ["--model", str(tmp / "model"), "--data", str(tmp / "train.jsonl"), "--val", str(tmp / "val.jsonl"),
            "--out", str(tmp / out), "--optimizer", optimizer, "--rank", "4", "--alpha", "8", *lr,
            "--targets", "q_proj,v_proj,down_proj", "--steps", "5", "--batch-size", "3",
            "--grad-accum", "2", "--max-length", "32", "--accuracy", "off", "--schedule", "constant",
            "--device", "cpu", "--no-progress"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


# geolora: USV adapters, whose optimizer reads the gradients of the probe leaves too
@pytest.mark.timeout(300)
@pytest.mark.parametrize("optimizer", ["adamw", "geolora"])
def test_torchrun_two_gloo_ranks_match_one_process(setup, optimizer):
    tmp = setup
    entry = ["-m", "lorafold.training.cli_entry"]
    one_out, two_out = tmp / f"{optimizer}-one", tmp / f"{optimizer}-two"
    _run([sys.executable, *entry, *_args(tmp, one_out.name, optimizer)])
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *entry,
                *_args(tmp, two_out.name, optimizer)])

    # rank 0 alone prints the summary and writes the run folder
    assert two.stdout.count('"out"') == 1, two.stdout
    assert json.loads(two.stdout)["out"] == str(two_out)
    rep_one = json.loads((one_out / "report.json").read_text())
    rep_two = json.loads((two_out / "report.json").read_text())
    assert rep_one["world_size"] == 1 and rep_two["world_size"] == 2
    assert rep_two["train_tokens"] == rep_one["train_tokens"]  # every row of every global batch, once
    assert rep_two["losses"] == pytest.approx(rep_one["losses"], abs=1e-5)
    assert rep_two["eval_after"]["val_loss"] == pytest.approx(rep_one["eval_after"]["val_loss"], abs=1e-5)
    assert rep_one["eval_after"]["val_loss"] < rep_one["eval_before"]["val_loss"]

    a = load_file(one_out / "adapter_model.safetensors")
    b = load_file(two_out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == torch.float32
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    assert any("lora_B" in k and a[k].abs().sum() > 0 for k in a)  # training moved B off zero
