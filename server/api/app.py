"""The FastAPI application: one base model, the engine on its own thread, the registry."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lorafold.server.api import routes_adapters, routes_openai
from lorafold.server.api.body_limit import BodyLimitMiddleware
from lorafold.server.api.context import Ctx, ServerContext
from lorafold.server.api.errors import install_error_handlers
from lorafold.server.api.metrics import Metrics
from lorafold.server.api.openapi import install_openapi
from lorafold.server.api.registry import AdapterRegistry
from lorafold.server.api.settings import ServerSettings
from lorafold.server.engine.async_engine import AsyncEngine, EngineUnavailableError
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.engine import LLMEngine
from lorafold.server.engine.kv_sizing import with_measured_kv_blocks
from lorafold.server.models.loader import BaseModel, load_base_model
from lorafold.server.store import open_store

logger = logging.getLogger(__name__)


def engine_config(s: ServerSettings, model: torch.nn.Module) -> EngineConfig:
    """`s.engine`, with the KV cache measured on `model`'s device when `s.measure_kv_blocks`."""
    return with_measured_kv_blocks(model, s.engine) if s.measure_kv_blocks else s.engine


def create_app(settings: ServerSettings, *, base: BaseModel | None = None) -> FastAPI:
    """Build the app. `base` lets a caller hand over an already loaded model (tests, embedding)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = base or load_base_model(settings.model, dtype=settings.dtype, device=settings.device)
        config = engine_config(settings, model.model)
        engine = LLMEngine(model.model, model.tokenizer, config)
        base_name = settings.served_model_name or model.name
        metrics = Metrics(top_n=settings.metrics_top_adapters, model_name=base_name)
        metrics.kv_total.set(config.num_kv_blocks)
        registry = AdapterRegistry(
            open_store(settings.store_url), settings.adapter_root, engine.runner.base_modules(),
            max_rank=settings.max_adapter_rank, cpu_cache_bytes=settings.cpu_cache_bytes,
            refresh_seconds=settings.store_refresh_seconds,
        )
        restored = registry.restore()  # the store's whole catalogue; StoreError stops the start
        registry.start()
        if restored:
            logger.info("restored %d registered adapters: %s", len(restored), ", ".join(restored[:10]))
        metrics.update_registry(registry)

        def on_step(stats) -> None:  # noqa: ANN001 - engine thread
            metrics.on_step(stats, engine.snapshot())

        async_engine = AsyncEngine(engine, on_step=on_step)
        async_engine.start()
        app.state.ctx = ServerContext(
            settings=settings, base_name=base_name, tokenizer=model.tokenizer,
            vocab_size=model.model.config.vocab_size, metrics=metrics, registry=registry, engine=async_engine,
            started=int(time.time()),
        )
        try:
            yield
        finally:
            async_engine.shutdown()
            registry.flush()

    app = FastAPI(title="lorafold", version="0.1.0", lifespan=lifespan,
                  description="One base model, many LoRA adapters, OpenAI-compatible API.")
    install_error_handlers(app)
    routes_adapters.install_store_error_handler(app)

    def body_cap(path: str) -> int:
        return settings.max_upload_bytes + (1 << 20) if path == "/v1/adapters" else settings.max_request_bytes

    app.add_middleware(BodyLimitMiddleware, limit_for=body_cap)

    @app.get("/health")
    async def health(ctx: Ctx) -> JSONResponse:
        # The liveness probe: a dead engine thread fails it, so the orchestrator restarts the pod.
        if not ctx.engine.running:
            return JSONResponse({"status": "engine dead", "error": repr(ctx.engine.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready(ctx: Ctx) -> JSONResponse:
        if not ctx.engine.running:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics(ctx: Ctx) -> Response:
        try:
            ctx.metrics.update_engine(await ctx.engine.call(lambda e: e.snapshot()))
        except EngineUnavailableError:
            pass  # the gauges keep the last step's values; lorafold_engine_alive tells why
        ctx.metrics.engine_alive.set(1 if ctx.engine.running else 0)
        ctx.metrics.update_registry(ctx.registry)
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(routes_openai.router)
    app.include_router(routes_adapters.router)
    install_openapi(app)
    return app
