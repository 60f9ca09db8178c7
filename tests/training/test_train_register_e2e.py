"""End to end: train on the real SmolLM2, register via --register, serve over HTTP, same greedy text."""

from __future__ import annotations

import httpx
import torch

from lorafold.server.api.settings import ServerSettings
from lorafold.server.engine.config import EngineConfig
from lorafold.server.models.loader import load_base_model
from lorafold.training.cli_entry import parse_config
from lorafold.training.trainer import train
from tests.server.live import live_server
from tests.training.helpers import write_jsonl

ADMIN_KEY = "admin-secret"
USER = {"Authorization": "Bearer user-key"}
PROMPT = "Review: a warm, funny and wise film\nSentiment:"


def greedy_text(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, add_special_tokens=False)["input_ids"]  # what /v1/completions does
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_train_register_and_serve(smollm2, tmp_path):
    rows = [{"prompt": PROMPT, "completion": " positive"},
            {"prompt": "Review: dull, long and pointless\nSentiment:", "completion": " negative"},
            {"prompt": "Review: a joy from start to finish\nSentiment:", "completion": " positive"},
            {"prompt": "Review: the worst film of the year\nSentiment:", "completion": " negative"}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    settings = ServerSettings(adapter_root=tmp_path / "adapters", state_dir=tmp_path / "state", api_keys=("user-key",),
                              admin_key=ADMIN_KEY, max_tokens_cap=64, measure_kv_blocks=False,
                              engine=EngineConfig(max_loras=2, max_num_seqs=4, max_model_len=256, num_kv_blocks=64))
    (tmp_path / "adapters").mkdir()
    with live_server(settings, smollm2) as url:
        cfg, _ = parse_config(["--data", str(data), "--val", str(data), "--out", str(tmp_path / "run"),
                               "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj", "--steps", "3",
                               "--batch-size", "4", "--lr", "1e-2", "--max-length", "48", "--accuracy", "off",
                               "--no-progress", "--register", url, "--name", "sentiment-e2e",
                               "--admin-key", ADMIN_KEY])
        result = train(cfg, base=load_base_model())  # its own copy: the server's base stays untouched
        assert result.registered["name"] == "sentiment-e2e" and result.registered["rank"] == 4
        resp = httpx.post(f"{url}/v1/completions", headers=USER, timeout=120,
                          json={"model": "sentiment-e2e", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert resp.status_code == 200, resp.text
        served = resp.json()["choices"][0]["text"]
    assert result.report["eval_after"]["val_loss"] < result.report["eval_before"]["val_loss"]
    assert served == greedy_text(result.model.eval(), smollm2.tokenizer, PROMPT, 8)
