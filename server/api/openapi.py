"""The OpenAPI document, made to say what the server really answers.

FastAPI documents a 422 for every validated body; this server answers 400 with an
OpenAI-style error body instead (errors.py), and routes answer other 4xx/5xx codes FastAPI
cannot see (auth, the body cap, queue full, the engine or the adapter store unavailable).
Each operation's documented codes below are the ones its code paths can send; the fuzzing
test (tests/server/test_openapi_fuzz.py) holds the server to them.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lorafold.server.api.protocol import RegisterAdapterRequest

_DESCRIPTIONS = {
    400: "Invalid request: the message names the field and the fix",
    401: "Missing or invalid bearer key",
    403: "Forbidden: the adapter registry is disabled, or the path lies outside the adapter root",
    404: "Model or adapter not found",
    409: "The adapter cannot be loaded, or a concurrent registration won",
    413: "Request body over the cap",
    422: "The model produced non-finite logits for this request (its adapter overflows)",
    429: "Queue full: retry after the Retry-After seconds",
    502: "The adapter store answered wrongly (integrity or credentials)",
    503: "Engine or adapter store unavailable: retry, or restart a dead engine",
}

_INFERENCE = (400, 401, 404, 409, 413, 422, 429, 502, 503)
_ADMIN = (400, 401, 403, 404, 409, 413, 502, 503)
_ADMIN_READ = (401, 403, 404, 502, 503)
# (method, path) -> the error codes the operation can answer; unlisted operations: none
ERROR_CODES: dict[tuple[str, str], tuple[int, ...]] = {
    ("get", "/health"): (503,),
    ("get", "/ready"): (503,),
    ("get", "/v1/models"): (401, 502, 503),
    ("get", "/v1/models/{model_id}"): (401, 404, 502, 503),
    ("post", "/v1/completions"): _INFERENCE,
    ("post", "/v1/chat/completions"): _INFERENCE,
    ("get", "/v1/adapters"): (401, 403, 502, 503),
    ("post", "/v1/adapters"): _ADMIN,
    ("get", "/v1/adapters/{name}"): _ADMIN_READ,
    ("delete", "/v1/adapters/{name}"): _ADMIN_READ,
    ("post", "/v1/load_lora_adapter"): _ADMIN,
    ("post", "/v1/unload_lora_adapter"): (400, 401, 403, 404, 413, 502, 503),
}

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]},
            },
        }
    },
}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _document(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document(schema: dict) -> None:
    schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = _ERROR_SCHEMA
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's validation error: this server answers 400
            for code in ERROR_CODES.get((method, path), ()):
                responses[str(code)] = {"description": _DESCRIPTIONS[code], "content": error_ref}
    paths = schema.get("paths", {})
    for path in ("/v1/completions", "/v1/chat/completions"):
        if path in paths:  # stream=true answers server-sent events
            paths[path]["post"]["responses"]["200"].setdefault("content", {})["text/event-stream"] = {}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        if path in paths:  # vLLM's routes answer a plain-text sentence
            paths[path]["post"]["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    _link_registrations(paths)
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"]["200"] = {
            "description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}
    if "/v1/adapters" in paths and "post" in paths["/v1/adapters"]:
        paths["/v1/adapters"]["post"]["requestBody"] = _register_body()


def _link_registrations(paths: dict) -> None:
    """OpenAPI links: the name a registration returns is what the by-name routes take, so a
    stateful client (and schemathesis' stateful phase) can follow register -> get -> delete."""
    item = paths.get("/v1/adapters/{name}", {})
    register = paths.get("/v1/adapters", {}).get("post")
    if register is None:
        return
    links = {f"{method.capitalize()}Adapter": {"operationId": op["operationId"],
                                               "parameters": {"name": "$response.body#/name"}}
             for method, op in item.items() if "operationId" in op}
    register["responses"].setdefault("201", {"description": "Registered"})["links"] = links


def _register_body() -> dict:
    """POST /v1/adapters reads its body by hand (JSON or multipart), so FastAPI cannot see it."""
    return {
        "required": True,
        "content": {
            "application/json": {"schema": RegisterAdapterRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "config", "weights"],
                    "properties": {
                        "name": {"type": "string"},
                        "config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
                        "weights": {"type": "string", "format": "binary",
                                    "description": "adapter_model.safetensors"},
                    },
                }
            },
        },
    }
