"""OpenAI-compatible inference routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from lorafold.server.api.auth import require_api_key
from lorafold.server.api.context import Ctx, ServerContext
from lorafold.server.api.errors import bad_request, not_found
from lorafold.server.api.generation import Generation, start_generations
from lorafold.server.api.protocol import ChatCompletionRequest, CompletionRequest, is_adapter_name
from lorafold.server.api.responses import ResponseShape, respond
from lorafold.server.api.tool_calls import ToolPlan, plan_tools, tool_call_delta, tool_calls_of
from lorafold.server.engine.engine import RequestOutput
from lorafold.server.engine.sampler import TokenLogprobs
from lorafold.server.models.chat import ChatTemplateError, chat_prompt_ids

router = APIRouter(dependencies=[Depends(require_api_key)])


def _model_card(name: str, created: int, parent: str | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "lorafold", "root": name, "parent": parent}


@router.get("/v1/models")
async def list_models(ctx: Ctx) -> dict:
    base = ctx.base_name
    data = [_model_card(base, ctx.started, None)]
    data += [_model_card(e.name, int(e.registered_at), base) for e in ctx.registry.entries()]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, ctx: Ctx) -> dict:
    if model_id == ctx.base_name:
        return _model_card(model_id, ctx.started, None)
    entry = await asyncio.to_thread(ctx.registry.get, model_id) if is_adapter_name(model_id) else None
    if entry is None:
        raise not_found(f"model {model_id!r} not found; GET /v1/models lists the available ones")
    return _model_card(entry.name, int(entry.registered_at), ctx.base_name)


def _completion_prompt(ctx: ServerContext, req: CompletionRequest) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(ctx.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    vocab = ctx.vocab_size
    if any(t < 0 or t >= vocab for t in prompt):
        raise bad_request(f"prompt token ids must be in [0, {vocab})")
    return list(prompt)


def _prompt_text(ctx: ServerContext, req: CompletionRequest, prompt_ids: list[int]) -> str:
    prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
    return prompt if isinstance(prompt, str) else ctx.tokenizer.decode(prompt_ids)


def _shape(req: CompletionRequest | ChatCompletionRequest, chat: bool) -> ResponseShape:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if chat:
        return ResponseShape("chat.completion", "chat.completion.chunk", include_usage)
    return ResponseShape("text_completion", "text_completion", include_usage)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, ctx: Ctx) -> Response:
    # tokenizing a long prompt takes a while: off the event loop, which keeps every stream going
    prompt_ids = await asyncio.to_thread(_completion_prompt, ctx, req)
    gens = await start_generations(ctx, req, prompt_ids, logprobs=req.logprobs, prefix="cmpl")
    tok = ctx.tokenizer
    echo = await asyncio.to_thread(_prompt_text, ctx, req, prompt_ids) if req.echo else ""

    def choice(g: Generation, text: str, outs: list[RequestOutput], finish: str | None, first: bool) -> dict:
        return {"index": g.index, "text": (echo if first else "") + text, "finish_reason": finish,
                "logprobs": _completion_logprobs(tok, outs) if req.logprobs is not None else None}

    return await respond(request, ctx, gens, req.stream, _shape(req, chat=False), choice, choice)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, ctx: Ctx) -> Response:
    messages = [m.as_template_message() for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:  # templating and tokenizing off the event loop, as for completions
        plan: ToolPlan = await asyncio.to_thread(plan_tools, ctx.tokenizer, messages, req.tools, req.tool_choice)
        prompt_ids = await asyncio.to_thread(chat_prompt_ids, ctx.tokenizer, messages, tools if plan.render else None)
    except ChatTemplateError as exc:
        raise bad_request(str(exc)) from exc
    want_lp = req.top_logprobs if req.logprobs else None
    if req.logprobs and want_lp is None:
        want_lp = 0
    gens = await start_generations(ctx, req, prompt_ids, logprobs=want_lp, prefix="chatcmpl", grammar=plan.grammar)
    tok = ctx.tokenizer

    def logprobs(outs: list[RequestOutput]) -> dict | None:
        return {"content": _chat_logprobs(tok, outs)} if req.logprobs else None

    def message(g: Generation, text: str, outs: list[RequestOutput], finish: str | None, first: bool) -> dict:
        calls = tool_calls_of(plan, text, g.index)
        if calls:
            return {"index": g.index, "finish_reason": "tool_calls", "logprobs": logprobs(outs),
                    "message": {"role": "assistant", "content": None, "tool_calls": calls}}
        return {"index": g.index, "finish_reason": finish, "logprobs": logprobs(outs),
                "message": {"role": "assistant", "content": text}}

    pieces: dict[int, str] = {}

    def delta(g: Generation, text: str, outs: list[RequestOutput], finish: str | None, first: bool) -> dict:
        if plan.forced:  # a forced call streams as tool-call deltas
            pieces[g.index] = pieces.get(g.index, "") + text
            body = {"role": "assistant"} if first else {}
            call = tool_call_delta(plan, g.index, pieces[g.index], text, first, finish is not None)
            if call is not None:
                body["tool_calls"] = [call]
            done = "tool_calls" if finish is not None and tool_calls_of(plan, pieces[g.index], g.index) else finish
            return {"index": g.index, "finish_reason": done, "logprobs": logprobs(outs), "delta": body}
        body = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": g.index, "finish_reason": finish, "logprobs": logprobs(outs), "delta": body}

    return await respond(request, ctx, gens, req.stream, _shape(req, chat=True), message, delta)


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
