"""One request's path from the API to the engine and back: resolve the model, check limits,
load a cold adapter off the event loop, stream the engine's outputs, record metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lorafold.server.api.context import ServerContext
from lorafold.server.api.errors import APIError, bad_request, not_found
from lorafold.server.api.protocol import SamplingFields, is_adapter_name
from lorafold.server.engine.engine import RequestOutput
from lorafold.server.engine.sampling_params import GrammarSpec, SamplingParams
from lorafold.server.engine.structured import GrammarError
from lorafold.server.engine.scheduler import QueueFullError
from lorafold.server.lora.peft_format import AdapterError, LoRAAdapter


@dataclass(slots=True)
class ResolvedModel:
    served_name: str  # what responses report in `model`
    adapter_name: str | None
    adapter: LoRAAdapter | None


async def resolve_model(ctx: ServerContext, model: str | None) -> ResolvedModel:
    base_name = ctx.base_name
    if model in (None, "", base_name):
        return ResolvedModel(base_name, None, None)
    registry = ctx.registry
    if not is_adapter_name(model) or await asyncio.to_thread(registry.get, model) is None:
        known = ", ".join([base_name, *registry.names()][:20])
        raise not_found(f"model {model!r} not found; available: {known}. Register adapters with POST /v1/adapters")
    try:
        # A cold adapter is read from disk in a worker thread: other requests keep streaming.
        entry, adapter = await asyncio.to_thread(registry.load, model)
    except KeyError as exc:  # deleted while we looked it up
        raise not_found(f"model {model!r} was just deleted") from exc
    except AdapterError as exc:
        raise APIError(409, f"adapter {model!r} cannot be loaded: {exc}") from exc
    ctx.metrics.update_registry(registry)
    return ResolvedModel(model, model, adapter)


def sampling_params(ctx: ServerContext, req: SamplingFields, *, logprobs: int | None, seed: int | None = None,
                    grammar: GrammarSpec | None = None) -> SamplingParams:
    settings = ctx.settings
    max_tokens = req.max_tokens or req.max_completion_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_cap:
        raise bad_request(f"max_tokens={max_tokens} exceeds this server's cap of {settings.max_tokens_cap}; ask for fewer")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=seed, max_tokens=max_tokens,
            stop=stop, stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, logit_bias=req.token_bias(ctx.vocab_size),
            min_tokens=req.min_tokens, grammar=grammar,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from exc


async def check_grammar(ctx: ServerContext, grammar: GrammarSpec | None) -> None:
    """Compile the request's grammar now, off the event loop: a bad one is a 400 before the
    request is queued (the engine then finds it compiled, in its cache)."""
    if grammar is None:
        return
    try:
        await asyncio.to_thread(ctx.engine.engine.grammars.compile, grammar)
    except GrammarError as exc:
        raise bad_request(str(exc)) from exc


@dataclass(slots=True)
class Generation:
    """A running request: iterate `outputs()`; timing and usage are filled as it goes."""

    request_id: str
    model: ResolvedModel
    prompt_ids: list[int]
    params: SamplingParams
    created: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    response_id: str = ""  # the id the response reports (one per request, whatever n)
    index: int = 0  # the choice this generation fills


async def start_generations(ctx: ServerContext, req: SamplingFields, prompt_ids: list[int], *, logprobs: int | None,
                            prefix: str, grammar: GrammarSpec | None = None) -> list[Generation]:
    """One Generation per requested choice (`n`), sharing the model; choice i's seed is seed + i,
    so n seeded choices differ from each other and each is reproducible."""
    model = await resolve_model(ctx, req.model)
    grammar = grammar if grammar is not None else req.grammar
    params = [sampling_params(ctx, req, logprobs=logprobs, grammar=grammar,
                              seed=None if req.seed is None else _wrap_seed(req.seed + i)) for i in range(req.n)]
    if len(prompt_ids) >= ctx.settings.engine.max_model_len:
        raise bad_request(f"the prompt has {len(prompt_ids)} tokens but the context limit is "
                          f"{ctx.settings.engine.max_model_len}; shorten the prompt")
    await check_grammar(ctx, grammar)
    base_id, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
    return [Generation(base_id if req.n == 1 else f"{base_id}-{i}", model, prompt_ids, p, created,
                       prompt_tokens=len(prompt_ids), response_id=base_id, index=i) for i, p in enumerate(params)]


def _wrap_seed(seed: int) -> int:
    return seed if seed < 1 << 64 else seed - (1 << 64)


async def stream_outputs(ctx: ServerContext, gen: Generation) -> AsyncIterator[RequestOutput]:
    """Engine outputs of `gen`, with metrics; raises APIError before the first output on refusal."""
    metrics = ctx.metrics
    label = metrics.adapter_label(gen.model.adapter_name)
    t0 = last = time.monotonic()
    status = "error"
    stream = ctx.engine.generate(gen.request_id, gen.prompt_ids, gen.params, gen.model.adapter, gen.model.adapter_name)
    try:
        first = True
        async for out in _refusals_as_api_errors(stream):
            now = time.monotonic()
            if first:
                metrics.ttft.observe(now - t0)
                if out.queue_seconds is not None:
                    metrics.queue.observe(out.queue_seconds)
                first = False
            elif out.token_ids:
                metrics.itl.observe(now - last)
            last = now
            gen.completion_tokens = out.num_output_tokens or gen.completion_tokens
            if out.finished:
                gen.finish_reason = "length" if out.finish_reason == "length" else "stop"
                status = out.finish_reason or "stop"
                if out.error:
                    type_ = "server_error" if out.error_status >= 500 else "invalid_request_error"
                    raise APIError(out.error_status, out.error, type_)
            yield out
    except (asyncio.CancelledError, GeneratorExit):
        status = "aborted"
        raise
    finally:
        await stream.aclose()
        metrics.requests.labels(label, status).inc()
        metrics.e2e.observe(time.monotonic() - t0)
        metrics.prompt_tokens.labels(label).inc(gen.prompt_tokens)
        metrics.generation_tokens.labels(label).inc(gen.completion_tokens)
        if gen.model.adapter_name is not None:
            ctx.registry.record_use(gen.model.adapter_name)


async def _refusals_as_api_errors(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        async for out in stream:
            yield out
    except QueueFullError as exc:
        raise APIError(429, f"{exc}", "rate_limit_error", headers={"Retry-After": "1"}) from exc
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
