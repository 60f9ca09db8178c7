"""The Python clients against the fake server over real loopback HTTP (see fake_server.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
from pydantic import ValidationError

from lorafold.clients import (
    APIConnectionError,
    APITimeoutError,
    AsyncLorafoldClient,
    AuthenticationError,
    BadRequestError,
    Completion,
    LorafoldClient,
    LorafoldError,
    NotFoundError,
    RateLimitError,
    ServerUnavailableError,
    Usage,
)
from lorafold.clients._core import SSEDecoder

from .fake_server import ADMIN_KEY, API_KEY, BASE, TOKENS, closed_port_url, sse_pieces

# -- typed responses ---------------------------------------------------------------------------


def test_complete_is_typed_and_sends_sampling_fields(client, state) -> None:
    out = client.complete("Hi", model=BASE, max_tokens=5, top_k=4, seed=7, stop=["\n"], ignore_eos=True)
    assert isinstance(out, Completion) and out.model == BASE and out.object == "text_completion"
    assert out.text == "".join(TOKENS) and out.finish_reason == "length"
    assert out.usage == Usage(prompt_tokens=3, completion_tokens=5, total_tokens=8)
    sent = state.bodies[-1][1]
    assert sent == {"model": BASE, "prompt": "Hi", "max_tokens": 5, "temperature": 0.0, "stream": False,
                    "top_k": 4, "seed": 7, "stop": ["\n"], "ignore_eos": True}
    with pytest.raises(ValidationError):  # frozen
        out.model = "other"  # type: ignore[misc]


def test_model_defaults_to_the_base_model(client, state) -> None:
    state.adapters["sql"] = {}
    client.complete("Hi")
    client.complete("Hi")
    assert state.bodies[-1][1]["model"] == BASE
    assert state.calls["/v1/models"] == 1  # resolved once, then cached


def test_unknown_sampling_argument_is_a_type_error(client) -> None:
    with pytest.raises(TypeError, match="max_token"):
        client.complete("Hi", model=BASE, max_token=3)


def test_malformed_response_is_a_lorafold_error(client, state) -> None:
    state.script["/v1/models"] = [(200, {"object": "list", "data": [{"object": "model"}]}, {})]
    with pytest.raises(LorafoldError, match="unexpected _ModelList"):
        client.models()


# -- adapter registry --------------------------------------------------------------------------


def test_inference_routes_send_the_api_key(client, state) -> None:
    client.models()
    client.complete("Hi", model=BASE)
    assert {h for p, h in state.auth if p.startswith("/v1/")} == {f"Bearer {API_KEY}"}


def test_settings_come_from_the_environment(server, state, monkeypatch) -> None:
    monkeypatch.setenv("LORAFOLD_URL", server.url + "/")
    monkeypatch.setenv("LORAFOLD_API_KEY", API_KEY)
    monkeypatch.setenv("LORAFOLD_ADMIN_KEY", ADMIN_KEY)
    with LorafoldClient() as c:
        assert c.base_url == server.url
        c.list_adapters()
        c.models()
    assert [h for _, h in state.auth] == [f"Bearer {ADMIN_KEY}", f"Bearer {API_KEY}"]


def test_multipart_upload_sends_both_files(client, state, tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    weights = bytes(range(256)) * 40
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    info = client.register_adapter("up", upload_dir=tmp_path)
    assert info.source == "upload" and info.size_bytes == len(weights)
    (parts,) = state.uploads
    assert parts["name"] == (None, b"up")
    assert parts["config"] == ("adapter_config.json", b'{"r": 8}')
    assert parts["weights"] == ("adapter_model.safetensors", weights)


def test_upload_of_an_incomplete_folder_names_the_fix(client, state, tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
        client.register_adapter("up", upload_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        client.register_adapter("up", "p", upload_dir=tmp_path)
    assert state.calls["/v1/adapters"] == 0


# -- streaming ---------------------------------------------------------------------------------


def test_sse_decoder_follows_the_spec() -> None:
    d = SSEDecoder()
    lines = [": comment", "event: x", "data: a", "data:b", "", "", "data: [DONE]", ""]
    assert [e for e in map(d.feed, lines) if e is not None] == ["a\nb", "[DONE]"]


def test_fake_stream_really_arrives_in_split_pieces(server) -> None:
    # The premise of the next test: network reads cut lines in the middle.
    body = {"model": BASE, "prompt": "Hi", "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as r:
        pieces = list(r.iter_raw())
    assert len(pieces) >= len(sse_pieces([{}] * len(TOKENS))) // 2
    assert any(not p.endswith(b"\n") for p in pieces)


def test_stream_errors(client) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):  # raised when the stream opens
        client.complete("Hi", model="nope", stream=True)
    stream = client.complete("__error_event__", model=BASE, stream=True)
    assert next(stream).text == TOKENS[0]
    with pytest.raises(LorafoldError, match="engine crashed") as info:
        list(stream)
    assert info.value.type == "server_error"
    with pytest.raises(LorafoldError, match="without \\[DONE\\]"):
        list(client.complete("__truncate__", model=BASE, stream=True))


# -- errors and retries ------------------------------------------------------------------------

STATUS_CASES = [
    (400, BadRequestError), (401, AuthenticationError), (403, AuthenticationError), (404, NotFoundError),
    (409, BadRequestError), (413, BadRequestError), (422, BadRequestError), (429, RateLimitError),
    (500, LorafoldError), (503, ServerUnavailableError),
]


@pytest.mark.parametrize(("status", "cls"), STATUS_CASES)
def test_error_mapping_keeps_message_and_type(server, state, status, cls) -> None:
    body = {"error": {"message": f"boom {status}", "type": "some_type", "code": "c1"}}
    state.script["/v1/completions"] = [(status, body, {"Retry-After": "7"})]
    with LorafoldClient(server.url, api_key=API_KEY, max_retries=0) as c:
        with pytest.raises(cls) as info:
            c.complete("Hi", model=BASE)
    err = info.value
    assert type(err) is cls
    assert (err.status_code, err.message, err.type, err.code) == (status, f"boom {status}", "some_type", "c1")
    assert str(err) == f"{status} some_type: boom {status}"
    if cls in (RateLimitError, ServerUnavailableError):
        assert err.retry_after == 7.0


def test_non_json_error_body_is_kept(client, state) -> None:
    state.script["/health"] = [(502, "Bad Gateway from the proxy", {})]
    with pytest.raises(LorafoldError, match="Bad Gateway from the proxy") as info:
        client.health()
    assert info.value.status_code == 502


def _rate_limited(retry_after: str) -> tuple[int, dict, dict]:
    body = {"error": {"message": "queue full", "type": "rate_limit_error", "code": 429}}
    return 429, body, {"Retry-After": retry_after}


def test_429_retries_honour_retry_after(client, state) -> None:
    state.script["/v1/completions"] = [_rate_limited("0.3"), _rate_limited("0.3")]
    start = time.monotonic()
    assert client.complete("Hi", model=BASE).text == "".join(TOKENS)
    assert state.calls["/v1/completions"] == 3
    assert time.monotonic() - start >= 0.6


def test_429_integer_retry_after(client, state) -> None:
    state.script["/v1/completions"] = [_rate_limited("1")]
    start = time.monotonic()
    client.complete("Hi", model=BASE)
    assert state.calls["/v1/completions"] == 2 and time.monotonic() - start >= 1.0


def test_429_gives_up_after_max_retries(server, state) -> None:
    state.script["/v1/completions"] = [_rate_limited("0.01")] * 5
    with LorafoldClient(server.url, api_key=API_KEY, max_retries=2) as c:
        with pytest.raises(RateLimitError) as info:
            c.complete("Hi", model=BASE)
    assert state.calls["/v1/completions"] == 3 and info.value.retry_after == pytest.approx(0.01)


def test_retry_after_beyond_the_cap_is_not_waited_for(client, state) -> None:
    state.script["/v1/completions"] = [_rate_limited("120")]
    start = time.monotonic()
    with pytest.raises(RateLimitError) as info:
        client.complete("Hi", model=BASE)
    assert info.value.retry_after == 120 and state.calls["/v1/completions"] == 1
    assert time.monotonic() - start < 1


def test_503_is_retried_with_backoff(client, state) -> None:
    state.script["/v1/chat/completions"] = [(503, {"error": {"message": "draining", "type": "x", "code": 503}}, {})] * 2
    assert client.chat([{"role": "user", "content": "Hi"}], model=BASE).text
    assert state.calls["/v1/chat/completions"] == 3


def test_400_is_not_retried(client, state) -> None:
    with pytest.raises(BadRequestError, match="n must be 1"):
        client.complete("Hi", model=BASE, n=2)
    assert state.calls["/v1/completions"] == 1


def test_ready_false_on_503_without_retry(client, state) -> None:
    state.ready = False
    assert client.ready() is False
    assert state.calls["/ready"] == 1


def test_read_timeout_raises_without_retry(server) -> None:
    with LorafoldClient(server.url, api_key=API_KEY, timeout=0.3, max_retries=3) as c:
        start = time.monotonic()
        with pytest.raises(APITimeoutError, match="timed out"):
            c.complete("__slow__", model=BASE)
    assert time.monotonic() - start < 1.0


def test_connection_refused_is_retried_then_raised(caplog) -> None:
    with LorafoldClient(closed_port_url(), max_retries=2, backoff_base=0.01) as c:
        with caplog.at_level(logging.WARNING, logger="lorafold.clients.client"):
            with pytest.raises(APIConnectionError) as info:
                c.health()
    assert not isinstance(info.value, APITimeoutError)
    with LorafoldClient(closed_port_url(), max_retries=3, backoff_base=10) as c:
        assert c.ready() is False  # a probe answers at once: no retries, no backoff
    assert [r.getMessage().split(";")[1].split(" in ")[0] for r in caplog.records] == [" retry 1/2", " retry 2/2"]


# -- async client ------------------------------------------------------------------------------


def test_async_client_end_to_end(server, state, tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"w" * 10)
    state.script["/v1/completions"] = [_rate_limited("0.05")]

    async def scenario() -> None:
        async with AsyncLorafoldClient(server.url, api_key=API_KEY, admin_key=ADMIN_KEY, backoff_base=0.01) as c:
            assert await c.health() == "ok" and await c.ready()
            info = await c.register_adapter("a", upload_dir=tmp_path)
            assert info.size_bytes == 10 and [a.name for a in await c.list_adapters()] == ["a"]
            out = await c.complete("Hi", model="a")
            assert isinstance(out, Completion) and out.text == "".join(TOKENS)
            async with await c.chat([{"role": "user", "content": "Hi"}], stream=True) as stream:
                texts = [chunk.text async for chunk in stream]
            assert texts == TOKENS
            async with await c.complete("__forever__", model="a", stream=True) as stream:
                assert (await stream.__anext__()).text == TOKENS[0]
            # Hung up by leaving the stream's block, while the client itself is still open.
            assert await asyncio.to_thread(state.disconnected.wait, 3)
            with pytest.raises(NotFoundError):
                await c.get_adapter("missing")
            assert await c.delete_adapter("a") == "a"

    asyncio.run(scenario())
    assert state.calls["/v1/completions"] == 3  # one 429 + success, then the stream
