"""The `lorafold` CLI end to end: `main([...])` against the fake server, output captured."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest

from lorafold.clients.cli import format_adapter_table, main
from lorafold.clients.types import AdapterInfo

from .fake_server import ADMIN_KEY, API_KEY, BASE, TOKENS, adapter_info


@pytest.fixture()
def conn(server) -> list[str]:
    return ["--url", server.url, "--api-key", API_KEY, "--admin-key", ADMIN_KEY]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- help and usage ----------------------------------------------------------------------------

SUBCOMMANDS = [[], ["fetch-model"], ["serve"], ["train"], ["adapters"], ["adapters", "register"],
               ["adapters", "list"], ["adapters", "delete"], ["generate"]]


@pytest.mark.parametrize("sub", SUBCOMMANDS, ids=lambda s: " ".join(s) or "lorafold")
def test_help_of_every_subcommand(capsys, monkeypatch, sub) -> None:
    monkeypatch.setitem(sys.modules, "lorafold.training.cli_entry", None)  # `train --help` without a trainer
    try:
        code = main([*sub, "--help"])  # `train --help` returns (the trainer may own --help)
    except SystemExit as exc:  # argparse exits after printing help
        code = exc.code
    out = capsys.readouterr().out
    assert code in (0, None)
    assert out.startswith(f"usage: lorafold {' '.join(sub)}".rstrip())
    if sub in ([], ["serve"], ["adapters"], ["generate"]):
        assert "examples:" in out


def test_usage_errors_exit_2(capsys) -> None:
    for argv in ([], ["adapters"], ["generate"], ["adapters", "register", "only-name"], ["serve", "--port", "x"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2, argv
    assert "usage: lorafold" in capsys.readouterr().err


# -- adapters ----------------------------------------------------------------------------------


def test_adapters_register_list_delete(capsys, conn, state) -> None:
    code, out, _ = run(capsys, *conn, "adapters", "register", "sql", "sql-lora")
    assert code == 0 and out == "registered sql: rank 16, 2 target modules, 1.0 MiB, tier cpu\n"
    assert state.bodies[-1] == ("/v1/adapters", {"name": "sql", "path": "sql-lora"})
    run(capsys, *conn, "adapters", "register", "chat", "chat-lora")

    code, out, _ = run(capsys, *conn, "adapters", "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    assert lines[0].split() == ["NAME", "RANK", "TIER", "SIZE", "REQUESTS", "LAST", "USED", "TARGETS"]
    assert lines[1].split() == ["sql", "16", "cpu", "1.0", "MiB", "0", "never", "q_proj,v_proj"]
    assert lines[0].index("RANK") == lines[1].index("16") == lines[2].index("16")  # aligned columns

    code, out, _ = run(capsys, *conn, "adapters", "list", "--json")
    assert code == 0 and [a["name"] for a in json.loads(out)] == ["sql", "chat"]

    code, out, _ = run(capsys, *conn, "adapters", "delete", "sql")
    assert (code, out) == (0, "deleted sql\n")
    assert [h for p, h in state.auth if p.startswith("/v1/adapters")] == [f"Bearer {ADMIN_KEY}"] * 5


def test_adapters_list_empty_and_options_after_the_subcommand(capsys, server) -> None:
    code, out, _ = run(capsys, "adapters", "list", "--url", server.url, "--admin-key", ADMIN_KEY)
    assert (code, out) == (0, "no adapters registered\n")


def test_adapter_table_formatting() -> None:
    a = AdapterInfo.model_validate({**adapter_info("x", "x", 3 * 1024**3), "last_used": 1000.0})
    table = format_adapter_table([a], now=1000.0 + 300)
    assert table.splitlines()[1].split() == ["x", "16", "cpu", "3.0", "GiB", "0", "5m", "ago", "q_proj,v_proj"]


def test_adapters_upload(capsys, conn, state, tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"w" * 2048)
    code, out, _ = run(capsys, *conn, "adapters", "register", "up", str(tmp_path), "--upload")
    assert code == 0 and "registered up" in out and "2.0 KiB" in out
    assert state.uploads[0]["weights"] == ("adapter_model.safetensors", b"w" * 2048)
    code, _, err = run(capsys, *conn, "adapters", "register", "up", str(tmp_path / "nope"), "--upload")
    assert code == 2 and "is not a folder" in err


def test_server_errors_exit_1_with_the_message(capsys, conn, server) -> None:
    code, out, err = run(capsys, *conn, "adapters", "delete", "ghost")
    assert (code, out) == (1, "")
    assert err == "lorafold: error: 404 not_found_error: adapter 'ghost' is not registered\n"
    code, _, err = run(capsys, "--url", server.url, "--admin-key", "bad", "adapters", "list")
    assert code == 1 and "401" in err and "invalid admin key" in err


# -- generate ----------------------------------------------------------------------------------


def test_generate_streams_to_stdout(capsys, conn, state) -> None:
    code, out, _ = run(capsys, *conn, "generate", "Hi", "--max-tokens", "5", "--temperature", "0.5", "--seed", "3")
    assert (code, out) == (0, "".join(TOKENS) + "\n")
    path, body = state.bodies[-1]
    assert path == "/v1/completions"
    assert body == {"model": BASE, "prompt": "Hi", "max_tokens": 5, "temperature": 0.5, "stream": True, "seed": 3}


def test_generate_chat_and_no_stream(capsys, conn, state, monkeypatch) -> None:
    code, out, _ = run(capsys, *conn, "generate", "Hi", "--chat", "--model", BASE)
    assert (code, out) == (0, "".join(TOKENS) + "\n")
    assert state.bodies[-1][1]["messages"] == [{"role": "user", "content": "Hi"}]
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    code, out, _ = run(capsys, *conn, "generate", "-", "--no-stream")
    assert (code, out) == (0, "".join(TOKENS) + "\n")
    assert state.bodies[-1][1]["prompt"] == "from stdin" and state.bodies[-1][1]["stream"] is False


def test_generate_unknown_model_exits_1(capsys, conn) -> None:
    code, out, err = run(capsys, *conn, "generate", "Hi", "--model", "nope")
    assert (code, out) == (1, "")
    assert "model 'nope' does not exist" in err


# -- serve / train / fetch-model ---------------------------------------------------------------


def _fake_module(monkeypatch, name: str, **functions) -> None:
    module = types.ModuleType(name)
    for fname, fn in functions.items():
        setattr(module, fname, fn)
    monkeypatch.setitem(sys.modules, name, module)


def test_serve_passes_its_options(monkeypatch) -> None:
    seen = []
    _fake_module(monkeypatch, "lorafold.server.api.cli_entry", serve_main=lambda args: seen.append(args) or 0)
    argv = ["--api-key", "k0", "serve", "--api-key", "k1", "--api-key", "k2", "--admin-key", "adm",
            "--max-loras", "16", "--cpu-cache-mb", "512", "--adapter-root", "/a", "--log-level", "debug"]
    assert main(argv) == 0
    (args,) = seen
    assert (args.host, args.port, args.model, args.max_queue) == ("127.0.0.1", 8000, None, None)
    assert args.api_key == ["k1", "k2", "k0"] and args.admin_key == "adm"
    assert (args.max_loras, args.cpu_cache_mb, args.adapter_root, args.log_level) == (16, 512, "/a", "debug")


def test_serve_without_the_server_module_exits_2(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lorafold.server.api.cli_entry", None)
    code, _, err = run(capsys, "serve")
    assert code == 2 and "lorafold.server.api" in err


def test_train_passes_the_rest_through(monkeypatch) -> None:
    seen = []
    _fake_module(monkeypatch, "lorafold.training.cli_entry", train_main=lambda argv: seen.append(argv) or 3)
    assert main(["train", "--epochs", "3", "--help", "--", "data.jsonl"]) == 3
    assert seen == [["--epochs", "3", "--help", "--", "data.jsonl"]]


def test_train_without_the_trainer_exits_2(capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lorafold.training.cli_entry", None)
    code, _, err = run(capsys, "train", "--epochs", "3")
    assert code == 2 and "lorafold.training.cli_entry is missing" in err


def test_fetch_model_unchanged(capsys, monkeypatch, tmp_path) -> None:
    import lorafold.server.models.assets as assets

    monkeypatch.setattr(assets, "default_model_dir", lambda: tmp_path)
    assert run(capsys, "fetch-model") == (0, f"default model ready at {tmp_path}\n", "")
