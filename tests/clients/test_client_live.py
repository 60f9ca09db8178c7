"""The sync and async Python clients against the real server on loopback (SmolLM2).

What a real server can produce is tested here; tests/clients/test_client.py keeps the fake
server only for what it cannot (malformed bodies, scripted 429/503 sequences, timeouts).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from lorafold.clients import AsyncLorafoldClient, LorafoldClient
from lorafold.clients.errors import AuthenticationError, BadRequestError, NotFoundError, RateLimitError
from lorafold.clients.types import AdapterInfo, ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk
from tests.conftest import make_peft_adapter
from tests.server.live import live_server
from tests.server.test_http_api import settings_for

API_KEY, ADMIN_KEY = "user-key", "admin-secret"


@pytest.fixture(scope="module")
def live(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("client_root")
    make_peft_adapter(smollm2.model, root / "sql-lora", r=8, seed=1, targets=["q_proj", "v_proj"])
    make_peft_adapter(smollm2.model, root / "sql-lora-v2", r=4, seed=2, targets=["q_proj", "v_proj"])
    settings = settings_for(root, tmp_path_factory.mktemp("client_state"), max_tokens_cap=64)
    with live_server(settings, smollm2) as url:
        yield url, smollm2.name, root


@pytest.fixture()
def client(live):
    url, _, _ = live
    with LorafoldClient(url, api_key=API_KEY, admin_key=ADMIN_KEY, timeout=120, backoff_base=0.01) as c:
        yield c
        for a in c.list_adapters():
            c.delete_adapter(a.name)


def _idle(url: str, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics").text
        if "lorafold_num_requests_running 0.0" in text and "lorafold_kv_blocks_used 0.0" in text:
            return True
        time.sleep(0.05)
    return False


def test_health_models_and_typed_generation(client, live) -> None:
    _, base, _ = live
    assert client.health() == "ok" and client.ready() is True
    assert [m.id for m in client.models()] == [base]
    out = client.complete("The capital of France is", max_tokens=3, top_k=4, seed=7, stop=["\n"])
    assert isinstance(out, Completion) and out.model == base and out.usage.completion_tokens <= 3
    chat = client.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
    assert isinstance(chat, ChatCompletion) and "Paris" in chat.text
    assert chat.choices[0].message.role == "assistant"


def test_registry_round_trip_path_upload_replace_and_vllm_aliases(client, live) -> None:
    _, base, root = live
    info = client.register_adapter("sql", "sql-lora")
    assert isinstance(info, AdapterInfo) and (info.name, info.rank) == ("sql", 8)
    assert client.register_adapter("sql", "sql-lora-v2").rank == 4  # replace
    assert client.get_adapter("sql").source == "sql-lora-v2"
    up = client.register_adapter("up", upload_dir=root / "sql-lora")
    assert up.source == "upload" and up.content_hash != client.get_adapter("sql").content_hash
    assert sorted(a.name for a in client.list_adapters()) == ["sql", "up"]
    assert client.complete("SELECT", model="up", max_tokens=2).model == "up"
    assert {m.id for m in client.models()} == {base, "sql", "up"}
    client.load_lora_adapter("v", "sql-lora")
    assert client.get_adapter("v").source == "sql-lora"
    client.unload_lora_adapter("v")
    assert client.delete_adapter("up") == "up"
    with pytest.raises(NotFoundError, match="not registered"):
        client.get_adapter("up")


def test_errors_map_to_their_exceptions(client, live) -> None:
    url, base, _ = live
    with pytest.raises(NotFoundError, match="not found"):
        client.complete("hi", model="nope")
    with pytest.raises(BadRequestError, match="max_tokens"):
        client.complete("hi", model=base, max_tokens=10_000)
    with pytest.raises(BadRequestError, match="does not exist"):
        client.register_adapter("x", "missing-folder")
    with LorafoldClient(url, api_key=API_KEY, admin_key="wrong", max_retries=0) as wrong:
        with pytest.raises(AuthenticationError) as info:
            wrong.list_adapters()
    assert info.value.status_code == 401 and "admin key" in info.value.message


def test_streams_and_hanging_up(client, live) -> None:
    url, base, _ = live
    with client.complete("Once upon a time", max_tokens=8, stream=True) as stream:
        chunks = list(stream)
    assert all(isinstance(c, CompletionChunk) for c in chunks) and chunks[-1].finish_reason == "length"
    assert "".join(c.text for c in chunks) == client.complete("Once upon a time", max_tokens=8).text
    chat = list(client.chat([{"role": "user", "content": "Hi"}], max_tokens=6, stream=True))
    assert all(isinstance(c, ChatCompletionChunk) for c in chat) and chat[0].choices[0].delta.role == "assistant"
    with client.complete("Tell me a long story", max_tokens=64, stream=True, ignore_eos=True) as stream:
        next(stream)
    assert _idle(url), "the server kept generating after the client closed the stream"
    for _ in client.complete("Tell me a long story", max_tokens=64, stream=True, ignore_eos=True):
        break  # dropped without close(): the connection must still be released
    assert _idle(url)


def test_queue_full_is_a_rate_limit_error(smollm2, tmp_path) -> None:
    (tmp_path / "root").mkdir()
    settings = settings_for(tmp_path / "root", tmp_path / "state", max_queue=1, max_num_seqs=1, max_tokens_cap=64)
    with live_server(settings, smollm2) as url:
        async def flood() -> list:
            async with AsyncLorafoldClient(url, api_key=API_KEY, max_retries=0) as c:
                calls = [c.complete("Count to ten:", max_tokens=32, ignore_eos=True) for _ in range(5)]
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(flood())
    assert any(isinstance(r, RateLimitError) for r in results), results
    assert any(isinstance(r, Completion) for r in results), results


def test_async_client_end_to_end(live) -> None:
    url, base, root = live

    async def scenario() -> None:
        async with AsyncLorafoldClient(url, api_key=API_KEY, admin_key=ADMIN_KEY, backoff_base=0.01) as c:
            assert await c.health() == "ok" and await c.ready()
            info = await c.register_adapter("a", upload_dir=root / "sql-lora")
            assert info.rank == 8 and [a.name for a in await c.list_adapters()] == ["a"]
            out = await c.complete("SELECT", model="a", max_tokens=3)
            assert isinstance(out, Completion) and out.model == "a"
            async with await c.chat([{"role": "user", "content": "Hi"}], max_tokens=4, stream=True) as stream:
                texts = [chunk.text async for chunk in stream]
            assert len(texts) >= 1
            async with await c.complete("Tell me a story", model="a", max_tokens=64, ignore_eos=True,
                                        stream=True) as stream:
                await stream.__anext__()
            assert await asyncio.to_thread(_idle, url)
            with pytest.raises(NotFoundError):
                await c.get_adapter("missing")
            assert await c.delete_adapter("a") == "a"

    asyncio.run(scenario())
