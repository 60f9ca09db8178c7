"""`lorafold train` as a user meets it: every flag documented with its default, evaluation
bounded and announced before it runs, and secrets never written to the run folder or logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lorafold.training.cli_entry import build_parser, parse_config
from lorafold.training.config import TrainConfig
from lorafold.training.trainer import train
from tests.training.helpers import smol_tokenizer, tiny_base, toy_rows, write_jsonl

SECRET = "sk-admin-7f3c9e1d-DO-NOT-LEAK"


def test_every_train_flag_has_help_that_shows_its_default() -> None:
    parser = build_parser()
    config_fields = set(TrainConfig.__dataclass_fields__)
    missing_help, missing_default = [], []
    for action in parser._actions:
        if action.dest == "help":
            continue
        if not action.help:
            missing_help.append(action.option_strings[0])
            continue
        required = action.dest in ("data", "out")
        if action.dest in config_fields and not required and "default" not in action.help:
            missing_default.append(action.option_strings[0])
    assert not missing_help, f"flags without help: {missing_help}"
    assert not missing_default, f"flags whose help does not show the default: {missing_default}"
    text = parser.format_help()
    assert "(default: 100)" in " ".join(text.split())  # --eval-samples, the bounded evaluation


def test_admin_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFOLD_ADMIN_KEY", SECRET)
    cfg, _ = parse_config(["--data", "d.jsonl", "--out", "o"])
    assert cfg.admin_key == SECRET
    cfg, _ = parse_config(["--data", "d.jsonl", "--out", "o", "--admin-key", "flag-wins"])
    assert cfg.admin_key == "flag-wins"


def test_public_dict_redacts_secrets_and_url_credentials() -> None:
    cfg = TrainConfig(data="d", out="o", admin_key=SECRET, register="http://bob:tok3n@127.0.0.1:8000/x")
    public = cfg.public_dict()
    assert public["admin_key"] == "<redacted>" and public["register"] == "http://127.0.0.1:8000/x"
    assert cfg.to_dict()["admin_key"] == SECRET  # the run itself still has the key
    assert TrainConfig(data="d", out="o").public_dict()["admin_key"] is None


def _all_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in folder.rglob("*") if p.is_file()]


def test_secrets_never_reach_report_checkpoints_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = smol_tokenizer()
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows(24))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), rank=2, alpha=4, targets=["q_proj"], lr=5e-3,
                      steps=4, batch_size=4, max_length=32, val_fraction=0.25, accuracy="off", progress=False,
                      save_every=2, admin_key=SECRET)
    with caplog.at_level(logging.DEBUG):
        train(cfg, base=tiny_base(tok))
    files = _all_bytes(tmp_path / "run")
    names = {p.name for p, _ in files}
    assert {"report.json", "state.pt"} <= names  # the places a config is written exist
    leaks = [str(p) for p, raw in files if SECRET.encode() in raw]
    assert not leaks, f"admin key written to {leaks}"
    assert json.loads((tmp_path / "run" / "report.json").read_text())["config"]["admin_key"] == "<redacted>"
    assert not [r for r in caplog.records if SECRET in r.getMessage()]


def test_evaluation_is_bounded_and_announced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = smol_tokenizer()
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows(24))
    val = write_jsonl(tmp_path / "val.jsonl", toy_rows(40))
    cfg = TrainConfig(data=str(data), val=str(val), out=str(tmp_path / "run"), rank=2, alpha=4, targets=["q_proj"],
                      lr=5e-3, steps=4, batch_size=4, max_length=32, accuracy="on", progress=False, eval_every=2,
                      eval_samples=8)
    with caplog.at_level(logging.INFO):
        rep = train(cfg, base=tiny_base(tok)).report
    assert [e["step"] for e in rep["evals"]] == [0, 2, 4]
    assert all(e["val_rows"] == 8 and e["accuracy"] is not None for e in rep["evals"])
    messages = [r.getMessage() for r in caplog.records]
    first_eval = next(i for i, m in enumerate(messages) if m.startswith("evaluating at step 0: loss and accuracy on 8"))
    first_step = next(i for i, m in enumerate(messages) if m.startswith("step "))
    assert first_eval < first_step  # the user sees what runs before the first training step
    assert any(m.startswith("eval at step 0: 8/16") for m in messages)  # its own progress line
