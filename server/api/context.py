"""The server's long-lived objects, typed, handed to route handlers as one dependency
(instead of untyped look-ups on `app.state`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from lorafold.server.api.errors import APIError
from lorafold.server.api.metrics import Metrics
from lorafold.server.api.registry import AdapterRegistry
from lorafold.server.api.settings import ServerSettings
from lorafold.server.engine.async_engine import AsyncEngine


@dataclass(slots=True)
class ServerContext:
    settings: ServerSettings
    base_name: str  # what clients call the base model
    tokenizer: object
    vocab_size: int
    metrics: Metrics
    registry: AdapterRegistry
    engine: AsyncEngine
    started: int  # unix time the server started (the base model's `created`)


def server_context(request: Request) -> ServerContext:
    ctx = getattr(request.app.state, "ctx", None)
    if ctx is None:  # only before the lifespan has built it: uvicorn is not serving yet then
        raise APIError(503, "the server is still starting; retry in a moment", "service_unavailable")
    return ctx


Ctx = Annotated[ServerContext, Depends(server_context)]
