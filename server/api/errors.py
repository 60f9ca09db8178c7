"""OpenAI-style JSON errors. Every refusal is a 4xx naming the problem; nothing leaks a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafold.server.engine.async_engine import EngineStepError, EngineUnavailableError

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *,
                 headers: dict[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.headers, self.code = status, message, type_, headers, code


def error_body(message: str, type_: str, code: int | str | None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}


def bad_request(message: str) -> APIError:
    return APIError(400, message)


def not_found(message: str) -> APIError:
    return APIError(404, message, "not_found_error")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.code or exc.status), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(_validation_message(exc), "invalid_request_error", 400), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_, exc.status_code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineUnavailableError)
    async def _engine_unavailable(request: Request, exc: EngineUnavailableError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "service_unavailable", 503), status_code=503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(EngineStepError)
    async def _engine_step(request: Request, exc: EngineStepError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "server_error", 500), status_code=500)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: log it with its traceback, tell the client plainly.
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", 500), status_code=500)
