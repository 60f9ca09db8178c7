"""Streamed generations: SSE events from an open response, parsed into typed chunks.

`Stream` / `AsyncStream` own the HTTP response: exhausting them, leaving their `with` block or
calling `close()` closes it, and a closed connection is how the server learns to stop generating.
"""

from __future__ import annotations

from typing import AsyncIterator, Generic, Iterator, TypeVar

import httpx

from ._core import DONE, SSEDecoder, decode_event
from .errors import LorafoldError, error_from_stream_event, error_from_transport
from .types import ChatCompletionChunk, CompletionChunk, parse

C = TypeVar("C", CompletionChunk, ChatCompletionChunk)


def _chunk(chunk_type: type[C], data: str) -> C:
    payload = decode_event(data)
    if "error" in payload:
        raise error_from_stream_event(payload)
    return parse(chunk_type, payload)


_TRUNCATED = "the stream ended without [DONE]; the response is truncated (did the server stop?)"


# Module functions rather than methods: a generator bound to its Stream would form a reference
# cycle, and then dropping a half-read Stream would leave the connection open until the next GC.
def _iter_chunks(response: httpx.Response, chunk_type: type[C]) -> Iterator[C]:
    decoder = SSEDecoder()
    try:
        for line in response.iter_lines():
            data = decoder.feed(line)
            if data == DONE:
                return
            if data is not None:
                yield _chunk(chunk_type, data)
        raise LorafoldError(_TRUNCATED)
    except httpx.TransportError as exc:
        raise error_from_transport(exc) from exc
    finally:
        response.close()


async def _aiter_chunks(response: httpx.Response, chunk_type: type[C]) -> AsyncIterator[C]:
    decoder = SSEDecoder()
    try:
        async for line in response.aiter_lines():
            data = decoder.feed(line)
            if data == DONE:
                return
            if data is not None:
                yield _chunk(chunk_type, data)
        raise LorafoldError(_TRUNCATED)
    except httpx.TransportError as exc:
        raise error_from_transport(exc) from exc
    finally:
        await response.aclose()


class Stream(Generic[C]):
    """Chunks of one streamed generation; iterate once. `close()` / `with` releases the connection."""

    def __init__(self, response: httpx.Response, chunk_type: type[C]) -> None:
        self.response = response
        self._chunks = _iter_chunks(response, chunk_type)

    def __iter__(self) -> Iterator[C]:
        return self._chunks

    def __next__(self) -> C:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()  # runs the generator's `finally` if it had started
        self.response.close()

    def __enter__(self) -> Stream[C]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(Generic[C]):
    """Async twin of `Stream`: `async for`, `await aclose()` / `async with`."""

    def __init__(self, response: httpx.Response, chunk_type: type[C]) -> None:
        self.response = response
        self._chunks = _aiter_chunks(response, chunk_type)

    def __aiter__(self) -> AsyncIterator[C]:
        return self._chunks

    async def __anext__(self) -> C:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[C]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
