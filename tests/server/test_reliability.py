"""Hostile input through the real server on loopback: no request or adapter kills the engine,
every bad input gets a clear 4xx, hung-up clients are aborted, the body cap counts bytes."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import make_peft_adapter
from tests.server.live import live_app, live_server
from tests.server.test_http_api import ADMIN, USER, settings_for


@pytest.fixture(scope="module")
def root(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_root")
    make_peft_adapter(smollm2.model, root / "good", r=4, seed=3, targets=["q_proj", "v_proj"])
    # finite weights whose products overflow float32: the adapter passes validation, its outputs are Inf/NaN
    make_peft_adapter(smollm2.model, root / "overflow", r=4, seed=4, targets=["q_proj", "v_proj"], strength=1e30)
    return root


def _post(url: str, path: str, body: dict, headers: dict = USER, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120, **kw)


async def _gather(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=b, headers=USER) for b in bodies))


def _kv_and_running_back_to_zero(url: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        m = httpx.get(f"{url}/metrics", timeout=10).text
        if "lorafold_kv_blocks_used 0.0" in m and "lorafold_num_requests_running 0.0" in m:
            return True
        time.sleep(0.05)
    return False


def test_hostile_sampling_and_overflowing_adapters_fail_alone(smollm2, root, tmp_path):
    with live_server(settings_for(root, tmp_path / "state", max_tokens_cap=64), smollm2) as url:
        for name in ("good", "overflow"):
            assert _post(url, "/v1/adapters", {"name": name, "path": name}, ADMIN).status_code == 201
        greedy = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
        alone = _post(url, "/v1/completions", greedy).json()["choices"][0]["text"]
        # each of these used to raise inside torch.multinomial on the engine thread
        for extreme in ({"temperature": 1e-38}, {"temperature": 1e-45}, {"temperature": 5e-324},
                        {"temperature": 1.0, "top_p": 1e-45}, {"temperature": 2.0, "top_k": 1, "seed": 3}):
            r = _post(url, "/v1/completions", {**greedy, **extreme})
            assert r.status_code == 200, (extreme, r.text)
            assert r.json()["choices"][0]["text"] == alone, extreme  # all of these are greedy in effect
        # a sampled and a greedy request on the overflowing adapter, batched with healthy ones
        bodies = [{**greedy, "model": "overflow", "temperature": 0.8, "seed": 1}, {**greedy, "model": "overflow"},
                  greedy, {**greedy, "model": "good"}, {**greedy, "temperature": 0.7, "seed": 5}]
        got = asyncio.run(_gather(url, bodies))
        assert [r.status_code for r in got] == [422, 422, 200, 200, 200], [r.text for r in got]
        assert "non-finite logits" in got[0].json()["error"]["message"]
        assert got[2].json()["choices"][0]["text"] == alone  # the neighbour in the batch is untouched
        # streamed: the error is the stream's last event
        body = {**greedy, "model": "overflow", "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=USER, timeout=60) as resp:
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        if resp.status_code == 200:  # the first event may already be the error
            assert events[-1] == "[DONE]" and "non-finite logits" in json.loads(events[-2])["error"]["message"]
        else:
            assert resp.status_code == 422
        assert httpx.get(f"{url}/health").status_code == 200
        assert _post(url, "/v1/completions", greedy).json()["choices"][0]["text"] == alone
        assert _kv_and_running_back_to_zero(url, 5)


def test_dead_engine_is_visible_and_routes_answer(smollm2, root, tmp_path):
    with live_app(settings_for(root, tmp_path / "state"), smollm2) as (url, app):
        engine = app.state.ctx.engine.engine

        def broken(*args, **kwargs):
            raise RuntimeError("simulated corruption")

        # a step that fails is contained: its requests get an error, the engine goes on
        real_step = engine.step
        engine.step = broken
        r = _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 500 and "aborted and the server goes on" in r.json()["error"]["message"]
        engine.step = real_step
        assert _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3}).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
        # when even the recovery fails the loop stops: that must be visible, and nothing may hang
        engine.step, engine.abort = broken, broken
        r = _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
        assert r.status_code in (500, 503), r.text
        t0 = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and "dead" in health.json()["status"]
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 503
        metrics = httpx.get(f"{url}/metrics", timeout=10)
        assert metrics.status_code == 200 and "lorafold_engine_alive 0.0" in metrics.text
        assert httpx.get(f"{url}/v1/adapters", headers=ADMIN, timeout=10).status_code == 200
        r = _post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 503 and "restart" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 10


def test_hung_up_non_streaming_client_is_aborted(smollm2, root, tmp_path):
    with live_server(settings_for(root, tmp_path / "state", max_tokens_cap=256), smollm2) as url:
        body = {"prompt": "Tell me a very long story about a dragon.", "max_tokens": 256, "ignore_eos": True,
                "temperature": 0}

        async def hang_up() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                tasks = [asyncio.ensure_future(client.post("/v1/completions", json=body, headers=USER)) for _ in range(4)]
                await asyncio.sleep(1.5)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        t0 = time.monotonic()
        asyncio.run(hang_up())
        assert _kv_and_running_back_to_zero(url, 2.0)
        # 4 x 256 tokens would take far longer than this on the CPU
        assert time.monotonic() - t0 < 6
        text = httpx.get(f"{url}/metrics").text
        assert 'status="aborted"' in text


def test_body_cap_counts_received_bytes(smollm2, root, tmp_path):
    settings = settings_for(root, tmp_path / "state", max_upload_bytes=1 << 20)
    with live_server(settings, smollm2) as url:
        def chunked(total: int):
            yield b'{"prompt": "'
            for _ in range(total // 65536):
                yield b"a" * 65536
            yield b'"}'

        headers = {**USER, "content-type": "application/json"}
        r = httpx.post(f"{url}/v1/completions", content=chunked(5 << 20), headers=headers, timeout=60)
        assert "content-length" not in r.request.headers  # really sent chunked
        assert r.status_code == 413 and "exceeds the cap" in r.json()["error"]["message"]
        # a chunked multipart upload past the upload cap (1 MiB + 1 MiB for the form)
        boundary = "lorafoldboundary"

        def upload(total: int):
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
                   f"--{boundary}\r\nContent-Disposition: form-data; name=\"weights\"; filename=\"w\"\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n").encode()
            for _ in range(total // 65536):
                yield b"\0" * 65536
            yield f"\r\n--{boundary}--\r\n".encode()

        r = httpx.post(f"{url}/v1/adapters", content=upload(4 << 20), timeout=60,
                       headers={**ADMIN, "content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413, r.text
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/adapters", headers=ADMIN).json()["data"] == []


def test_tokenizing_a_huge_prompt_does_not_stall_the_event_loop(smollm2, root, tmp_path):
    settings = settings_for(root, tmp_path / "state", max_request_bytes=4 << 20)
    with live_server(settings, smollm2) as url:
        prompt = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 50_000  # ~2.9 MB

        async def probe() -> tuple[httpx.Response, float]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                big = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": prompt}, headers=USER))
                await asyncio.sleep(0.3)  # the server is reading / tokenizing now
                worst = 0.0
                while not big.done():
                    t0 = time.monotonic()
                    assert (await client.get("/health")).status_code == 200
                    worst = max(worst, time.monotonic() - t0)
                    await asyncio.sleep(0.05)
                return await big, worst

        resp, worst = asyncio.run(probe())
        assert resp.status_code == 400 and "context limit" in resp.json()["error"]["message"]
        assert worst < 0.5, f"/health took {worst:.2f} s while a prompt was tokenized"


def test_malformed_inputs_get_400_not_500(smollm2, root, tmp_path):
    bad_root = root.parent / "bad_root"
    shutil.copytree(root, bad_root, dirs_exist_ok=True)
    # a folder inside the root whose files link to an adapter outside it
    outside = tmp_path / "outside"
    shutil.copytree(root / "good", outside)
    (bad_root / "linked").mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        link = bad_root / "linked" / name
        link.unlink(missing_ok=True)
        link.symlink_to(outside / name)
    config = json.loads((root / "good" / "adapter_config.json").read_text())
    weights = load_file(str(root / "good" / "adapter_model.safetensors"))
    f8 = tmp_path / "f8.safetensors"
    save_file({k: v.to(__import__("torch").float8_e4m3fn) for k, v in weights.items()}, str(f8))
    good_weights = (root / "good" / "adapter_model.safetensors").read_bytes()

    with live_server(settings_for(bad_root, tmp_path / "state", api_keys=("user-key",)), smollm2) as url:
        def raw(path: str, text: str, headers: dict = USER) -> httpx.Response:
            return httpx.post(f"{url}{path}", content=text.encode(), timeout=60,
                              headers={**headers, "content-type": "application/json"})

        def upload(name: str, cfg: dict, w: bytes) -> httpx.Response:
            return httpx.post(f"{url}/v1/adapters", data={"name": name}, headers=ADMIN, timeout=60,
                              files={"config": ("c", json.dumps(cfg).encode()), "weights": ("w", w)})

        cases = [
            (raw("/v1/completions", '{"prompt": "a\\ud800b"}'), 400, "lone surrogate"),
            (raw("/v1/completions", '{"prompt": "hi", "temperature": NaN}'), 400, "temperature"),
            (raw("/v1/completions", '{"prompt": "hi", "top_p": Infinity}'), 400, "top_p"),
            (_post(url, "/v1/completions", {"prompt": "hi", "max_tokens": True}), 400, "max_tokens"),
            (_post(url, "/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1}), 400, "echo"),
            (_post(url, "/v1/completions", {"prompt": "hi", "seed": 2**70}), 400, "seed"),
            (_post(url, "/v1/completions", {"prompt": "hi", "top_k": 10**12}), 400, "top_k"),
            (raw("/v1/completions", '{"prompt": "hi", "stop": ["a\\udc00"]}'), 400, "lone surrogate"),
            (_post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
             400, "text"),
            (_post(url, "/v1/chat/completions",
                   {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
             400, "image_url"),
            (httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=30,
                        headers={"Authorization": "Bearer caf\u00e9".encode("latin-1")}), 401, "API key"),
            (_post(url, "/v1/adapters", {"name": "x", "path": "good\u0000evil"}, ADMIN), 400, "control character"),
            (_post(url, "/v1/adapters", {"name": "x", "path": "linked"}, ADMIN), 403, "outside the adapter root"),
            (upload("x", {**config, "rank_pattern": {"q_proj(": 4}}, good_weights), 400, "regular expression"),
            (upload("x", {**config, "rank_pattern": {"q_proj": "four"}}, good_weights), 400, "rank_pattern"),
            (upload("x", {**config, "alpha_pattern": {"q_proj": -1}}, good_weights), 400, "alpha_pattern"),
            (upload("x", {**config, "target_modules": [3]}, good_weights), 400, "target_modules"),
            (upload("x", {**config, "lora_alpha": 1e300}, good_weights), 400, "lora_alpha"),
            (upload("x", config, f8.read_bytes()), 400, "float8"),
            (upload("trailing\n", config, good_weights), 400, "invalid"),
        ]
        for resp, status, fragment in cases:
            assert resp.status_code == status, (fragment, resp.status_code, resp.text)
            assert fragment.lower() in resp.json()["error"]["message"].lower(), (fragment, resp.text)
        nan_alpha = httpx.post(f"{url}/v1/adapters", data={"name": "x"}, headers=ADMIN, timeout=60,
                               files={"config": ("c", json.dumps({**config, "lora_alpha": float("nan")}).encode()),
                                      "weights": ("w", good_weights)})
        assert nan_alpha.status_code == 400 and "NaN" in nan_alpha.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/adapters", headers=ADMIN).json()["data"] == []  # nothing half-registered
        assert httpx.get(f"{url}/health").status_code == 200


def test_sigterm_ends_the_process_despite_a_stalled_request(tmp_path):
    """A client that never finishes its body holds a request open forever; SIGTERM must still
    end `lorafold serve` within the bounded drain (20 s), so an orchestrator can replace it."""
    import socket
    from urllib.parse import urlparse

    from lorafold.server.api.cli_entry import GRACEFUL_SHUTDOWN_S
    from tests.store.replicas import save_tiny_model, start_replica, wait_ready

    model = save_tiny_model(tmp_path / "model")
    (tmp_path / "root").mkdir()
    replica = wait_ready(start_replica(model, tmp_path / "root", tmp_path / "replica", f"file://{tmp_path}/store", {}))
    target = urlparse(replica.url)
    with socket.create_connection((target.hostname, target.port), timeout=10) as stalled:
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer user-key\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
        time.sleep(0.5)
        t0 = time.monotonic()
        replica.proc.terminate()
        try:
            replica.proc.wait(GRACEFUL_SHUTDOWN_S + 15)
        finally:
            replica.stop()
        assert time.monotonic() - t0 < GRACEFUL_SHUTDOWN_S + 10


def test_bad_serve_flags_are_a_message_not_a_traceback(caplog):
    import argparse

    from lorafold.server.api.cli_entry import serve_main, settings_from_args

    assert settings_from_args(argparse.Namespace(max_tokens_cap=4)).default_max_tokens == 4
    assert serve_main(argparse.Namespace(max_num_seqs=0)) == 2
    assert "max_num_seqs must be >= 1" in caplog.text
