"""OpenAI-compatible inference routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lorafold.server.api.auth import require_api_key
from lorafold.server.api.errors import APIError, bad_request, error_body
from lorafold.server.api.generation import Generation, start_generation, stream_outputs
from lorafold.server.api.protocol import ChatCompletionRequest, CompletionRequest
from lorafold.server.engine.async_engine import EngineStepError, EngineUnavailableError
from lorafold.server.engine.engine import RequestOutput
from lorafold.server.engine.sampler import TokenLogprobs
from lorafold.server.models.chat import ChatTemplateError, chat_prompt_ids

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = request.app.state
    base = state.base_name
    data = [{"id": base, "object": "model", "created": state.started, "owned_by": "lorafold", "root": base, "parent": None}]
    for e in state.registry.entries():
        data.append({"id": e.name, "object": "model", "created": int(e.registered_at), "owned_by": "lorafold",
                     "root": e.name, "parent": base})
    return {"object": "list", "data": data}


def _completion_prompt(state, req: CompletionRequest) -> list[int]:  # noqa: ANN001
    prompt = req.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(state.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    vocab = state.vocab_size
    if any(t < 0 or t >= vocab for t in prompt):
        raise bad_request(f"prompt token ids must be in [0, {vocab})")
    return list(prompt)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):  # noqa: ANN201
    state = request.app.state
    # tokenizing a long prompt takes a while: off the event loop, which keeps every stream going
    prompt_ids = await asyncio.to_thread(_completion_prompt, state, req)
    gen = await start_generation(state, req, prompt_ids, logprobs=req.logprobs, prefix="cmpl")
    tok = state.tokenizer

    def choice(text: str, outs: list[RequestOutput], finish: str | None) -> dict:
        return {"index": 0, "text": text, "finish_reason": finish,
                "logprobs": _completion_logprobs(tok, outs) if req.logprobs is not None else None}

    return await _respond(request, gen, req.stream, "text_completion", choice)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):  # noqa: ANN201
    state = request.app.state
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:  # templating and tokenizing off the event loop, as for completions
        prompt_ids = await asyncio.to_thread(chat_prompt_ids, state.tokenizer, messages)
    except ChatTemplateError as exc:
        raise bad_request(str(exc)) from exc
    want_lp = req.top_logprobs if req.logprobs else None
    if req.logprobs and want_lp is None:
        want_lp = 0
    gen = await start_generation(state, req, prompt_ids, logprobs=want_lp, prefix="chatcmpl")
    tok = state.tokenizer

    def choice(text: str, outs: list[RequestOutput], finish: str | None, *, delta: bool = False) -> dict:
        body = {"index": 0, "finish_reason": finish,
                "logprobs": {"content": _chat_logprobs(tok, outs)} if req.logprobs else None}
        if delta:
            body["delta"] = {"role": "assistant", "content": text} if text is not None else {}
        else:
            body["message"] = {"role": "assistant", "content": text}
        return body

    return await _respond(request, gen, req.stream, "chat.completion", choice)


async def _respond(request: Request, gen: Generation, stream: bool, object_name: str, choice: Callable):  # noqa: ANN202
    state = request.app.state
    outputs = stream_outputs(state, gen)
    if not stream:
        collected = await _collect_unless_disconnected(request, outputs)
        if collected is None:  # the client hung up: its request was aborted, nobody to answer
            return Response(status_code=499)
        text = "".join(o.text for o in collected)
        body = {"id": gen.request_id, "object": object_name, "created": gen.created, "model": gen.model.served_name,
                "choices": [choice(text, collected, gen.finish_reason)], "usage": _usage(gen)}
        return JSONResponse(body)
    # Wait for the first output before answering, so that a refusal (queue full, bad request)
    # is still an HTTP error status rather than an error inside a 200 stream.
    first = await outputs.__anext__()
    chunk_object = "chat.completion.chunk" if object_name == "chat.completion" else "text_completion"
    is_chat = object_name == "chat.completion"

    async def sse() -> AsyncIterator[bytes]:
        try:
            out: RequestOutput | None = first
            while out is not None:
                finish = gen.finish_reason if out.finished else None
                ch = choice(out.text, [out], finish, delta=True) if is_chat else choice(out.text, [out], finish)
                payload = {"id": gen.request_id, "object": chunk_object, "created": gen.created,
                           "model": gen.model.served_name, "choices": [ch]}
                if out.finished:
                    payload["usage"] = _usage(gen)
                yield f"data: {json.dumps(payload)}\n\n".encode()
                out = await _next_or_error(outputs)
            yield b"data: [DONE]\n\n"
        except _StreamFailed as failed:  # the status line is sent: the error is the stream's last event
            yield f"data: {json.dumps(failed.body)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            await outputs.aclose()  # a client that disconnects aborts its generation here

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _StreamFailed(Exception):
    def __init__(self, body: dict) -> None:
        super().__init__(body["error"]["message"])
        self.body = body


async def _next_or_error(outputs: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    """The next output, None at the end; a failure mid-stream becomes an OpenAI error body."""
    try:
        return await anext(outputs, None)
    except APIError as exc:
        raise _StreamFailed(error_body(exc.message, exc.type, exc.code or exc.status)) from exc
    except (EngineUnavailableError, EngineStepError) as exc:
        raise _StreamFailed(error_body(str(exc), "server_error", 500)) from exc


# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


async def _collect_unless_disconnected(
    request: Request, outputs: AsyncIterator[RequestOutput]
) -> list[RequestOutput] | None:
    """All outputs of a non-streaming request, or None once its client has hung up (the
    generation is then cancelled, which aborts it in the engine and frees its KV blocks)."""

    async def drain() -> list[RequestOutput]:
        return [out async for out in outputs]

    task = asyncio.ensure_future(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await outputs.aclose()


def _usage(gen: Generation) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _token_text(tok, token_id: int) -> str:  # noqa: ANN001
    return tok.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(tok, outs: list[RequestOutput]) -> dict:  # noqa: ANN001
    lps: list[TokenLogprobs] = [lp for o in outs for lp in o.logprobs]
    return {
        "tokens": [_token_text(tok, lp.token_id) for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{_token_text(tok, t): v for t, v in lp.top} for lp in lps],
        "text_offset": [],
    }


def _chat_logprobs(tok, outs: list[RequestOutput]) -> list[dict]:  # noqa: ANN001
    return [
        {"token": _token_text(tok, lp.token_id), "logprob": lp.logprob, "bytes": None,
         "top_logprobs": [{"token": _token_text(tok, t), "logprob": v, "bytes": None} for t, v in lp.top]}
        for o in outs for lp in o.logprobs
    ]

