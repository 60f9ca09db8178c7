"""`LorafoldClient` (sync) and `AsyncLorafoldClient`: the OpenAI-compatible API plus the adapter registry.

    with LorafoldClient("http://127.0.0.1:8000", api_key="k", admin_key="a") as c:
        c.register_adapter("sql", upload_dir="out/sql-lora")
        print(c.complete("SELECT", model="sql", max_tokens=32).text)
        for chunk in c.complete("Once upon", stream=True):
            print(chunk.text, end="")

Both clients expose the same methods; the async ones are coroutines and stream with
`async for`. Streams are also context managers: leaving the `with` block (or calling
`close()`) closes the HTTP response, which tells the server to stop generating.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Literal, Mapping, Sequence, overload

import httpx

from ._core import RequestSpec, RetryPolicy, Settings, adapter_path, chat_spec, completion_spec
from ._core import load_lora_spec, register_spec, unload_lora_spec
from .errors import APIConnectionError, LorafoldError, ServerUnavailableError, error_from_response, error_from_transport
from .streaming import AsyncStream, Stream
from .types import AdapterInfo, ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, ModelInfo
from .types import parse, parse_adapters, parse_models

logger = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, Any]]


def _base_model(models: list[ModelInfo]) -> str:
    """The id to use when the caller names no model: the base (the entry without a parent)."""
    for m in models:
        if m.parent is None:
            return m.id
    if models:
        return models[0].id
    raise LorafoldError("the server lists no models; pass model=... explicitly")


class _ClientBase:
    _http_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        *,
        backoff_base: float = 0.5,
    ) -> None:
        self.settings = Settings.resolve(base_url, api_key, admin_key, timeout)
        self.retry = RetryPolicy(max_retries=max_retries, backoff_base=backoff_base)
        self._base_model: str | None = None
        self._http = self._http_class(base_url=self.settings.base_url, timeout=timeout)

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    def _log_retry(self, spec: RequestSpec, attempt: int, delay: float, why: object) -> None:
        logger.warning("%s %s failed (%s); retry %d/%d in %.2fs", spec.method, spec.path, why, attempt + 1,
                       self.retry.max_retries, delay)

    # The decisions of `_send`'s retry loop; the sync/async subclasses keep only the I/O.

    def _delay_after_exception(self, spec: RequestSpec, exc: httpx.TransportError, attempt: int) -> float:
        """Seconds to wait before retrying after a transport failure; raises when not retrying."""
        delay = self.retry.delay_after_exception(exc, attempt) if spec.retry else None
        if delay is None:
            raise error_from_transport(exc) from exc
        self._log_retry(spec, attempt, delay, type(exc).__name__)
        return delay

    def _delay_after_status(self, spec: RequestSpec, response: httpx.Response, attempt: int) -> float:
        """Seconds to wait before retrying a (read, closed) error response; raises when not retrying."""
        delay = self.retry.delay_after_status(response, attempt) if spec.retry else None
        if delay is None:
            raise error_from_response(response)
        self._log_retry(spec, attempt, delay, response.status_code)
        return delay


class LorafoldClient(_ClientBase):
    """Synchronous client (one pooled httpx.Client; use as a context manager or call close()).

    base_url / api_key / admin_key default to LORAFOLD_URL (else http://127.0.0.1:8000),
    LORAFOLD_API_KEY and LORAFOLD_ADMIN_KEY. `timeout` is per request (and, when streaming,
    per gap between chunks). 429, 503 and connection failures are retried up to
    `max_retries` times with exponential backoff from `backoff_base` seconds, honouring
    Retry-After; other errors raise at once.
    """

    _http_class = httpx.Client
    _http: httpx.Client

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LorafoldClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, spec: RequestSpec, *, stream: bool = False) -> httpx.Response:
        """One call with retries; returns a 2xx response (unread when `stream`), else raises."""
        attempt = 0
        while True:
            try:
                response = self._http.send(spec.build(self._http, self.settings), stream=stream)
            except httpx.TransportError as exc:
                delay = self._delay_after_exception(spec, exc, attempt)
            else:
                if response.is_success:
                    return response
                response.read()
                response.close()
                delay = self._delay_after_status(spec, response, attempt)
            time.sleep(delay)
            attempt += 1

    def _json(self, spec: RequestSpec) -> Any:
        return self._send(spec).json()

    # -- probes and models ------------------------------------------------------------------

    def health(self) -> str:
        """`GET /health`: the status string ("ok"); raises if the server is unreachable."""
        return str(self._json(RequestSpec("GET", "/health")).get("status"))

    def ready(self) -> bool:
        """`GET /ready`: True when the server accepts work, False on 503 (not retried)."""
        try:
            self._send(RequestSpec("GET", "/ready", retry=False))
        except (ServerUnavailableError, APIConnectionError):
            return False
        return True

    def models(self) -> list[ModelInfo]:
        """`GET /v1/models`: the base model (parent None) and one entry per adapter."""
        return parse_models(self._json(RequestSpec("GET", "/v1/models")))

    def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._base_model is None:
            self._base_model = _base_model(self.models())
        return self._base_model

    # -- generation ---------------------------------------------------------------------------

    @overload
    def complete(self, prompt: str, model: str | None = ..., max_tokens: int = ..., temperature: float = ...,
                 stream: Literal[False] = ..., **kw: Any) -> Completion: ...
    @overload
    def complete(self, prompt: str, model: str | None = ..., max_tokens: int = ..., temperature: float = ...,
                 *, stream: Literal[True], **kw: Any) -> Stream[CompletionChunk]: ...

    def complete(self, prompt: str, model: str | None = None, max_tokens: int = 16, temperature: float = 0.0,
                 stream: bool = False, **kw: Any) -> Completion | Stream[CompletionChunk]:
        """`POST /v1/completions`. `model` is an adapter name or the base id (default: the base).

        kw: top_p, top_k, seed, stop, logprobs, n, stop_token_ids, ignore_eos, extra_body.
        With stream=True the request is sent now (HTTP errors raise here) and a `Stream` of
        `CompletionChunk` is returned.
        """
        spec = completion_spec(self._model(model), prompt, max_tokens, temperature, stream, kw)
        if stream:
            return Stream(self._send(spec, stream=True), CompletionChunk)
        return parse(Completion, self._json(spec))

    @overload
    def chat(self, messages: Messages, model: str | None = ..., max_tokens: int = ..., temperature: float = ...,
             stream: Literal[False] = ..., **kw: Any) -> ChatCompletion: ...
    @overload
    def chat(self, messages: Messages, model: str | None = ..., max_tokens: int = ..., temperature: float = ...,
             *, stream: Literal[True], **kw: Any) -> Stream[ChatCompletionChunk]: ...

    def chat(self, messages: Messages, model: str | None = None, max_tokens: int = 16, temperature: float = 0.0,
             stream: bool = False, **kw: Any) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """`POST /v1/chat/completions` with `messages` = [{"role", "content"}, ...]; see `complete`."""
        spec = chat_spec(self._model(model), messages, max_tokens, temperature, stream, kw)
        if stream:
            return Stream(self._send(spec, stream=True), ChatCompletionChunk)
        return parse(ChatCompletion, self._json(spec))

    # -- adapter registry (admin key) ----------------------------------------------------------

    def register_adapter(self, name: str, path: str | os.PathLike[str] | None = None, *,
                         upload_dir: str | os.PathLike[str] | None = None) -> AdapterInfo:
        """Register (or replace) adapter `name` from `path`, a folder under the server's adapter
        root, or from `upload_dir`, a local PEFT folder whose two files are uploaded."""
        return parse(AdapterInfo, self._json(register_spec(name, path, upload_dir)))

    def list_adapters(self) -> list[AdapterInfo]:
        return parse_adapters(self._json(RequestSpec("GET", "/v1/adapters", admin=True)))

    def get_adapter(self, name: str) -> AdapterInfo:
        return parse(AdapterInfo, self._json(RequestSpec("GET", adapter_path(name), admin=True)))

    def delete_adapter(self, name: str) -> str:
        """Unregister `name`; returns the deleted name."""
        return str(self._json(RequestSpec("DELETE", adapter_path(name), admin=True)).get("deleted", name))

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> None:
        """vLLM-compatible alias of `register_adapter(lora_name, lora_path)`."""
        self._send(load_lora_spec(lora_name, lora_path))

    def unload_lora_adapter(self, lora_name: str) -> None:
        """vLLM-compatible alias of `delete_adapter(lora_name)`."""
        self._send(unload_lora_spec(lora_name))


class AsyncLorafoldClient(_ClientBase):
    """Asynchronous twin of `LorafoldClient` (httpx.AsyncClient); every method is a coroutine.

    Streams: `async with await client.complete(..., stream=True) as s: async for c in s: ...`
    """

    _http_class = httpx.AsyncClient
    _http: httpx.AsyncClient

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncLorafoldClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, spec: RequestSpec, *, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.send(spec.build(self._http, self.settings), stream=stream)
            except httpx.TransportError as exc:
                delay = self._delay_after_exception(spec, exc, attempt)
            else:
                if response.is_success:
                    return response
                await response.aread()
                await response.aclose()
                delay = self._delay_after_status(spec, response, attempt)
            await asyncio.sleep(delay)
            attempt += 1

    async def _json(self, spec: RequestSpec) -> Any:
        return (await self._send(spec)).json()

    async def health(self) -> str:
        return str((await self._json(RequestSpec("GET", "/health"))).get("status"))

    async def ready(self) -> bool:
        try:
            await self._send(RequestSpec("GET", "/ready", retry=False))
        except (ServerUnavailableError, APIConnectionError):
            return False
        return True

    async def models(self) -> list[ModelInfo]:
        return parse_models(await self._json(RequestSpec("GET", "/v1/models")))

    async def _model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self._base_model is None:
            self._base_model = _base_model(await self.models())
        return self._base_model

    async def complete(self, prompt: str, model: str | None = None, max_tokens: int = 16, temperature: float = 0.0,
                       stream: bool = False, **kw: Any) -> Completion | AsyncStream[CompletionChunk]:
        spec = completion_spec(await self._model(model), prompt, max_tokens, temperature, stream, kw)
        if stream:
            return AsyncStream(await self._send(spec, stream=True), CompletionChunk)
        return parse(Completion, await self._json(spec))

    async def chat(self, messages: Messages, model: str | None = None, max_tokens: int = 16, temperature: float = 0.0,
                   stream: bool = False, **kw: Any) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        spec = chat_spec(await self._model(model), messages, max_tokens, temperature, stream, kw)
        if stream:
            return AsyncStream(await self._send(spec, stream=True), ChatCompletionChunk)
        return parse(ChatCompletion, await self._json(spec))

    async def register_adapter(self, name: str, path: str | os.PathLike[str] | None = None, *,
                               upload_dir: str | os.PathLike[str] | None = None) -> AdapterInfo:
        return parse(AdapterInfo, await self._json(register_spec(name, path, upload_dir)))

    async def list_adapters(self) -> list[AdapterInfo]:
        return parse_adapters(await self._json(RequestSpec("GET", "/v1/adapters", admin=True)))

    async def get_adapter(self, name: str) -> AdapterInfo:
        return parse(AdapterInfo, await self._json(RequestSpec("GET", adapter_path(name), admin=True)))

    async def delete_adapter(self, name: str) -> str:
        return str((await self._json(RequestSpec("DELETE", adapter_path(name), admin=True))).get("deleted", name))

    async def load_lora_adapter(self, lora_name: str, lora_path: str) -> None:
        await self._send(load_lora_spec(lora_name, lora_path))

    async def unload_lora_adapter(self, lora_name: str) -> None:
        await self._send(unload_lora_spec(lora_name))
