"""The HTTP service end to end, through a real uvicorn server on loopback with SmolLM2."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.utils import floatToGoString

from lorafold.server.api.settings import ServerSettings
from lorafold.server.engine.config import EngineConfig
from lorafold.server.lora.peft_format import load_adapter
from tests.conftest import make_peft_adapter, merged_model
from tests.server.live import live_server

ADMIN = {"Authorization": "Bearer admin-secret"}
USER = {"Authorization": "Bearer user-key"}


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_root")
    make_peft_adapter(smollm2.model, root / "alpha", r=8, seed=21, strength=1.0)
    make_peft_adapter(smollm2.model, root / "beta", r=32, alpha=64, seed=22, targets=["q_proj", "v_proj", "down_proj"], strength=1.0)
    make_peft_adapter(smollm2.model, root / "gamma", r=16, seed=23, strength=1.0)
    return root


def settings_for(root: Path, state: Path, **kw) -> ServerSettings:
    """Test settings; keywords named like EngineConfig's fields go to `engine`."""
    engine = dict(max_loras=4, max_num_seqs=16, max_model_len=512, num_kv_blocks=256)
    engine.update({k: kw.pop(k) for k in list(kw) if k in EngineConfig.__dataclass_fields__})
    base = dict(adapter_root=root, state_dir=state, api_keys=("user-key",), admin_key="admin-secret",
                max_tokens_cap=256, measure_kv_blocks=False)
    base.update(kw)
    return ServerSettings(engine=EngineConfig(**engine), **base)


def greedy_text(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


async def stream_text(client: httpx.AsyncClient, model: str, prompt: str, n: int) -> str:
    text = ""
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body, headers=USER) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_register_stream_restart_swap_delete(smollm2, adapters, tmp_path):
    base, tok = smollm2.model, smollm2.tokenizer
    prompt = "The best way to learn a language is"
    state = tmp_path / "state"
    with live_server(settings_for(adapters, state), smollm2) as url:
        for name in ("alpha", "beta"):
            r = httpx.post(f"{url}/v1/adapters", json={"name": name, "path": name}, headers=ADMIN)
            assert r.status_code == 201, r.text
            assert r.json()["rank"] == {"alpha": 8, "beta": 32}[name]

        async def both():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                return await asyncio.gather(*(stream_text(client, m, prompt, 12) for m in ("alpha", "beta", base_name)))

        base_name = httpx.get(f"{url}/v1/models", headers=USER).json()["data"][0]["id"]
        got = asyncio.run(both())
    from lorafold.server.models.loader import module_specs

    specs = module_specs(base)
    ref = {m: load_adapter(adapters / m, specs) for m in ("alpha", "beta", "gamma")}
    want = [greedy_text(merged_model(base, ref["alpha"]), tok, prompt, 12),
            greedy_text(merged_model(base, ref["beta"]), tok, prompt, 12),
            greedy_text(base, tok, prompt, 12)]
    assert got == want
    assert len(set(got)) == 3

    # restart on the same state directory: both still registered and served
    with live_server(settings_for(adapters, state), smollm2) as url:
        listed = httpx.get(f"{url}/v1/adapters", headers=ADMIN).json()["data"]
        assert sorted(a["name"] for a in listed) == ["alpha", "beta"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "beta", "prompt": prompt, "max_tokens": 12,
                                                      "temperature": 0}, headers=USER, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[1]
        assert r.json()["usage"]["completion_tokens"] == 12

        # swap "alpha" to gamma's weights while an alpha stream runs: it finishes on the old weights
        long_old = greedy_text(merged_model(base, ref["alpha"]), tok, prompt, 40)

        async def swap_during_stream():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                body = {"model": "alpha", "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True}
                text = ""
                async with client.stream("POST", "/v1/completions", json=body, headers=USER) as resp:
                    swapped = False
                    async for line in resp.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            text += json.loads(line[6:])["choices"][0]["text"]
                            if not swapped:
                                shutil.copytree(adapters / "gamma", adapters / "gamma2", dirs_exist_ok=True)
                                rr = await client.post("/v1/adapters", json={"name": "alpha", "path": "gamma2"}, headers=ADMIN)
                                assert rr.status_code == 201, rr.text
                                swapped = True
                new = await client.post("/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": 12,
                                                                 "temperature": 0}, headers=USER)
                return text, new.json()["choices"][0]["text"]

        old_text, new_text = asyncio.run(swap_during_stream())
        assert old_text == long_old
        assert new_text == greedy_text(merged_model(base, ref["gamma"]), tok, prompt, 12)

        # delete an adapter in use: the request finishes, then the adapter is gone
        async def delete_during_stream():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                body = {"model": "beta", "prompt": prompt, "max_tokens": 20, "temperature": 0, "stream": True}
                text, deleted = "", False
                async with client.stream("POST", "/v1/completions", json=body, headers=USER) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            text += json.loads(line[6:])["choices"][0]["text"]
                            if not deleted:
                                assert (await client.delete("/v1/adapters/beta", headers=ADMIN)).status_code == 200
                                deleted = True
                after = await client.post("/v1/completions", json={"model": "beta", "prompt": "x"}, headers=USER)
                return text, after

        text, after = asyncio.run(delete_during_stream())
        assert text == greedy_text(merged_model(base, ref["beta"]), tok, prompt, 20)
        assert after.status_code == 404 and "beta" in after.json()["error"]["message"]
        metrics = httpx.get(f"{url}/metrics").text
        assert "lorafold_kv_blocks_used 0.0" in metrics


def test_bad_inputs_get_4xx(smollm2, adapters, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(adapters, root)
    bad = root / "corrupt"
    shutil.copytree(root / "alpha", bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    other = root / "wrong_shape"
    shutil.copytree(root / "alpha", other)
    from safetensors.torch import load_file, save_file

    t = load_file(str(other / "adapter_model.safetensors"))
    k = next(k for k in t if k.endswith("q_proj.lora_A.weight"))
    t[k] = torch.zeros(8, 100)
    save_file(t, str(other / "adapter_model.safetensors"))
    outside = tmp_path / "outside"
    shutil.copytree(root / "alpha", outside)
    with live_server(settings_for(root, tmp_path / "state", max_tokens_cap=64), smollm2) as url:
        def post(path, body, headers=USER):
            return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)

        cases = [
            (post("/v1/completions", {"model": "nope", "prompt": "hi"}), 404, "not found"),
            (post("/v1/adapters", {"name": "x", "path": str(outside)}, ADMIN), 403, "outside the adapter root"),
            (post("/v1/adapters", {"name": "x", "path": "../outside"}, ADMIN), 403, "outside the adapter root"),
            (post("/v1/adapters", {"name": "x", "path": "corrupt"}, ADMIN), 400, "safetensors"),
            (post("/v1/adapters", {"name": "x", "path": "wrong_shape"}, ADMIN), 400, "base layer takes"),
            (post("/v1/adapters", {"name": "x", "path": "missing"}, ADMIN), 400, "does not exist"),
            (post("/v1/adapters", {"name": "x"}, ADMIN), 400, "path"),
            (post("/v1/completions", {"prompt": "hi", "max_tokens": 100000}), 400, "cap"),
            (post("/v1/completions", {"max_tokens": 3}), 400, "prompt"),
            (post("/v1/completions", {"prompt": "hi", "n": 17}), 400, "n"),
            (post("/v1/completions", {"prompt": "hi", "temperature": -1}), 400, "temperature"),
            (post("/v1/chat/completions", {"messages": []}), 400, "messages"),
            (post("/v1/completions", {"prompt": [999999]}), 400, "token ids"),
            (httpx.post(f"{url}/v1/completions", content=b"{not json", headers={**USER, "content-type": "application/json"}), 400, "invalid"),
            (post("/v1/completions", {"prompt": "hi"}, {}), 401, "API key"),
            (post("/v1/adapters", {"name": "x", "path": "alpha"}, USER), 401, "admin key"),
            (httpx.delete(f"{url}/v1/adapters/ghost", headers=ADMIN), 404, "not registered"),
            (post("/v1/completions", {"prompt": "word " * 600}), 400, "context limit"),
        ]
        for resp, status, fragment in cases:
            assert resp.status_code == status, (status, resp.text)
            assert fragment.lower() in resp.json()["error"]["message"].lower(), resp.text
        assert httpx.get(f"{url}/v1/adapters", headers=ADMIN).json()["data"] == []  # nothing half-registered
        r = httpx.post(f"{url}/v1/adapters", files={"config": ("c", (root / "alpha/adapter_config.json").read_bytes()),
                                                    "weights": ("w", (root / "alpha/adapter_model.safetensors").read_bytes())},
                       data={"name": "uploaded"}, headers=ADMIN)
        assert r.status_code == 201 and r.json()["source"] == "upload", r.text
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_openai_sdk_and_metrics(smollm2, adapters, tmp_path):
    from openai import OpenAI

    with live_server(settings_for(adapters, tmp_path / "state"), smollm2) as url:
        assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": "alpha"},
                          headers=ADMIN).status_code == 200
        client = OpenAI(base_url=f"{url}/v1", api_key="user-key")
        models = [m.id for m in client.models.list().data]
        assert "alpha" in models and len(models) == 2
        done = client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=8, temperature=0)
        assert done.usage.completion_tokens == 8 and done.choices[0].text
        chunks = list(client.completions.create(model="alpha", prompt="Once upon a time", max_tokens=8,
                                                temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
        chat = client.chat.completions.create(model=models[0], max_tokens=12, temperature=0,
                                              messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in chat.choices[0].message.content
        streamed = client.chat.completions.create(model=models[0], max_tokens=12, temperature=0, stream=True,
                                                  messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
        text = httpx.get(f"{url}/metrics").text
        for series in ('lorafold_requests_total{adapter="alpha",status="length"} 2.0',
                       "lorafold_time_to_first_token_seconds_count", "lorafold_generation_tokens_total",
                       "lorafold_kv_blocks_used", "vllm:lora_requests_info{", "lorafold_adapter_loads_total",
                       "lorafold_batch_size_tokens_bucket", "lorafold_step_distinct_adapters_count",
                       'lorafold_adapters_resident{tier="device"} 1.0', "lorafold_adapter_memory_budget_bytes"):
            assert series in text, series
        # one resident adapter: rank 8 = 8 rows of 30 layers x (q, k, v, o, gate, up, down in + out) x 4 bytes
        assert "lorafold_adapter_memory_resident_bytes 9.76896e+06" in text


def test_bfloat16_adapter_pools_over_http(smollm2, adapters, tmp_path):
    """`--lora-dtype bfloat16` on the float32 CPU model: each adapter takes half the budget
    bytes, and the served greedy text equals the model with the adapter merged as the pools
    hold it (its factors rounded to bfloat16 once)."""
    from lorafold.server.models.loader import module_specs

    settings = settings_for(adapters, tmp_path / "state", lora_dtype="bfloat16")
    prompt = "Once upon a time"
    with live_server(settings, smollm2) as url:
        for name in ("alpha", "gamma"):
            assert httpx.post(f"{url}/v1/adapters", json={"name": name, "path": name},
                              headers=ADMIN).status_code == 201
        for name in ("alpha", "gamma"):
            r = httpx.post(f"{url}/v1/completions", headers=USER, timeout=60,
                           json={"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            adapter = load_adapter(adapters / name, module_specs(smollm2.model))
            expected = greedy_text(merged_model(smollm2.model, adapter, torch.bfloat16), smollm2.tokenizer, prompt, 8)
            assert r.json()["choices"][0]["text"] == expected, name
        text = httpx.get(f"{url}/metrics").text
        # ranks 8 + 16 = 24 rows of 30 layers x (q, k, v, o, gate, up, down in + out) x 2 bytes
        assert f"lorafold_adapter_memory_resident_bytes {floatToGoString(24 * 30 * 10176 * 2)}\n" in text


def test_queue_full_429_and_disconnect_frees_kv(smollm2, adapters, tmp_path):
    settings = settings_for(adapters, tmp_path / "state", max_queue=1, max_num_seqs=1)
    with live_server(settings, smollm2) as url:
        async def flood():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                body = {"prompt": "Count to ten:", "max_tokens": 24, "temperature": 0}
                return await asyncio.gather(*(client.post("/v1/completions", json=body, headers=USER) for _ in range(6)))

        codes = [r.status_code for r in asyncio.run(flood())]
        assert 429 in codes and 200 in codes, codes
        limited = next(r for r in asyncio.run(flood()) if r.status_code == 429)
        assert limited.headers["retry-after"] == "1"

        async def disconnect():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                body = {"prompt": "Tell me a long story", "max_tokens": 200, "temperature": 0, "stream": True}
                async with client.stream("POST", "/v1/completions", json=body, headers=USER) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: "):
                            break  # hang up mid-stream
                for _ in range(200):
                    m = (await client.get("/metrics")).text
                    if "lorafold_kv_blocks_used 0.0" in m and "lorafold_num_requests_running 0.0" in m:
                        return True
                    await asyncio.sleep(0.05)
                return False

        assert asyncio.run(disconnect())
