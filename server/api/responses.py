"""Turning a request's generations (one per choice) into an OpenAI response: one JSON body,
or a server-sent-event stream whose chunks carry each choice's `index`.

Both routes share this; they differ only in how a choice is rendered (`ChoiceRenderer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lorafold.server.api.context import ServerContext
from lorafold.server.api.errors import APIError, error_body
from lorafold.server.api.generation import Generation, stream_outputs
from lorafold.server.engine.async_engine import EngineStepError, EngineUnavailableError
from lorafold.server.engine.engine import RequestOutput

# (generation, text of this piece, its outputs, finish reason or None, is this the choice's first piece)
ChoiceRenderer = Callable[[Generation, str, list[RequestOutput], str | None, bool], dict]

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


@dataclass(slots=True)
class ResponseShape:
    object_name: str  # "text_completion" | "chat.completion"
    chunk_object: str  # what each streamed chunk is called
    include_usage: bool  # stream_options.include_usage: a last chunk with empty choices and the usage


def usage(gens: list[Generation]) -> dict:
    prompt = gens[0].prompt_tokens  # one prompt, whatever n
    completion = sum(g.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def respond(request: Request, ctx: ServerContext, gens: list[Generation], stream: bool, shape: ResponseShape,
                  render: ChoiceRenderer, stream_render: ChoiceRenderer) -> Response:
    outputs = [stream_outputs(ctx, g) for g in gens]
    if not stream:
        collected = await _collect_unless_disconnected(request, outputs)
        if collected is None:  # the client hung up: its requests were aborted, nobody to answer
            return Response(status_code=499)
        choices = [render(g, "".join(o.text for o in outs), outs, g.finish_reason, True)
                   for g, outs in zip(gens, collected)]
        head = gens[0]
        return JSONResponse({"id": head.response_id, "object": shape.object_name, "created": head.created,
                             "model": head.model.served_name, "choices": choices, "usage": usage(gens)})
    # Wait for every choice's first output before answering, so that a refusal (queue full,
    # bad request) is still an HTTP error status rather than an error inside a 200 stream.
    try:
        firsts = await _all_or_cancel([anext(o) for o in outputs])
    except BaseException:
        for o in outputs:
            await o.aclose()
        raise
    return StreamingResponse(_sse(gens, outputs, firsts, shape, stream_render), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _sse(gens: list[Generation], outputs: list[AsyncIterator[RequestOutput]], firsts: list[RequestOutput],
               shape: ResponseShape, render: ChoiceRenderer) -> AsyncIterator[bytes]:
    head = gens[0]

    def chunk(choices: list[dict], **extra: object) -> bytes:
        payload = {"id": head.response_id, "object": shape.chunk_object, "created": head.created,
                   "model": head.model.served_name, "choices": choices, **extra}
        if shape.include_usage and "usage" not in payload:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n".encode()

    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.ensure_future(_pump(i, first, o, queue)) for i, (first, o) in enumerate(zip(firsts, outputs))]
    started = [False] * len(gens)
    try:
        remaining = len(gens)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, _StreamFailed):  # the status line is sent: the error is the last event
                yield f"data: {json.dumps(item.body)}\n\n".encode()
                break
            g = gens[index]
            yield chunk([render(g, item.text, [item], g.finish_reason if item.finished else None, not started[index])])
            started[index] = True
        else:
            if shape.include_usage:
                yield chunk([], usage=usage(gens))
        yield b"data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for o in outputs:
            await o.aclose()  # a client that disconnects aborts its generations here


async def _pump(index: int, first: RequestOutput, outputs: AsyncIterator[RequestOutput], queue: asyncio.Queue) -> None:
    """Feed one choice's outputs into the shared queue, then None (or the failure)."""
    await queue.put((index, first))
    if not first.finished:
        try:
            async for out in outputs:
                await queue.put((index, out))
        except APIError as exc:
            await queue.put((index, _StreamFailed(error_body(exc.message, exc.type, exc.code or exc.status))))
            return
        except (EngineUnavailableError, EngineStepError) as exc:
            await queue.put((index, _StreamFailed(error_body(str(exc), "server_error", 500))))
            return
    await queue.put((index, None))


class _StreamFailed(Exception):
    def __init__(self, body: dict) -> None:
        super().__init__(body["error"]["message"])
        self.body = body


async def _collect_unless_disconnected(
    request: Request, outputs: list[AsyncIterator[RequestOutput]]
) -> list[list[RequestOutput]] | None:
    """All outputs of every choice, or None once the client has hung up (the generations are
    then cancelled, which aborts them in the engine and frees their KV blocks)."""

    async def drain(o: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
        return [out async for out in o]

    task = asyncio.ensure_future(_all_or_cancel([drain(o) for o in outputs]))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return list(task.result())
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for o in outputs:
            await o.aclose()


async def _all_or_cancel(coros: list) -> list:
    """Await all; on the first failure cancel the rest and wait for them before raising (so no
    generator is still running when its caller closes it)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
