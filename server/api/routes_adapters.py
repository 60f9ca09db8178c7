"""The adapter registry routes (admin key): register by path or upload, list, delete; plus
vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter aliases; and how adapter-store
failures reach clients (`install_store_error_handler`)."""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Depends, FastAPI, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse

from lorafold.server.api.auth import require_admin
from lorafold.server.api.context import Ctx, ServerContext
from lorafold.server.api.errors import APIError, bad_request, error_body, not_found
from lorafold.server.api.protocol import (
    AdapterInfo,
    RegisterAdapterRequest,
    VLLMLoadRequest,
    VLLMUnloadRequest,
    is_adapter_name,
)
from lorafold.server.api.registry import PathNotAllowedError, Registration
from lorafold.server.engine.async_engine import EngineUnavailableError
from lorafold.server.engine.engine import adapter_key
from lorafold.server.lora.peft_format import AdapterError
from lorafold.server.store import StoreAuthError, StoreConflictError, StoreError, StoreIntegrityError

# Store failures are not the client's fault (except a lost compare-and-swap race, 409): they
# get a 5xx that names the store's problem, never a bare 500 and never wrong weights.
_STORE_STATUS = ((StoreConflictError, 409, "conflict_error"), (StoreIntegrityError, 502, "adapter_store_integrity_error"),
                 (StoreAuthError, 502, "adapter_store_auth_error"), (StoreError, 503, "adapter_store_unavailable"))


def install_store_error_handler(app: FastAPI) -> None:
    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        status, type_ = next((s, t) for cls, s, t in _STORE_STATUS if isinstance(exc, cls))
        headers = {"Retry-After": "5"} if status == 503 else None
        return JSONResponse(error_body(f"adapter store: {exc}", type_, status), status_code=status, headers=headers)

router = APIRouter(dependencies=[Depends(require_admin)])
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]*")  # fullmatch: no trailing newline slips through


async def _resident(ctx: ServerContext) -> set[str]:
    """Adapter keys on the device now (one engine call, whatever the number of adapters)."""
    try:
        return set(await ctx.engine.call(lambda e: e.snapshot()["device_resident_keys"]))
    except EngineUnavailableError:  # answer from the registry alone rather than hang or fail
        return set()


def _info(ctx: ServerContext, entry: Registration, resident: set[str]) -> AdapterInfo:
    on_device = adapter_key(entry.name, entry.content_hash) in resident
    tier = "device" if on_device else ("cpu" if ctx.registry.in_cpu_cache(entry.content_hash) else "disk")
    return AdapterInfo(name=entry.name, rank=entry.rank, ranks=entry.ranks, targets=entry.targets,
                       size_bytes=entry.size_bytes, content_hash=entry.content_hash, tier=tier,
                       last_used=entry.last_used, requests_served=entry.requests_served, source=entry.source,
                       registered_at=entry.registered_at)


def _check_name(ctx: ServerContext, name: str) -> None:
    if not _NAME.fullmatch(name) or len(name) > 128:
        raise bad_request(f"adapter name {name!r} is invalid: use letters, digits, '.', '_', '-', '/' (max 128)")
    if name == ctx.base_name:
        raise bad_request(f"{name!r} is the base model's name; choose another adapter name")


async def _register_path(ctx: ServerContext, name: str, path: str) -> Registration:
    _check_name(ctx, name)
    registry = ctx.registry
    try:
        folder = registry.resolve_path(path)
        entry = await asyncio.to_thread(registry.register_folder, name, folder, path)
    except PathNotAllowedError as exc:
        raise APIError(403, str(exc), "permission_error") from exc
    except AdapterError as exc:
        raise bad_request(f"adapter refused: {exc}") from exc
    except OSError as exc:  # a name too long for the file system, a folder we may not read, ...
        raise bad_request(f"adapter path {path!r} cannot be read: {exc.strerror or exc}") from exc
    ctx.metrics.update_registry(registry)
    return entry


async def _read_capped(upload: UploadFile, cap: int, label: str) -> bytes:
    data = await upload.read(cap + 1)
    if len(data) > cap:
        raise APIError(413, f"{label} is larger than the upload cap of {cap} bytes", code="payload_too_large")
    return data


@router.post("/v1/adapters", status_code=201)
async def register_adapter(request: Request, ctx: Ctx) -> JSONResponse:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=2, max_fields=4, max_part_size=ctx.settings.max_upload_bytes)
        name, config, weights = form.get("name"), form.get("config"), form.get("weights")
        if not isinstance(name, str) or not hasattr(config, "read") or not hasattr(weights, "read"):
            raise bad_request("multipart upload needs a 'name' field and files 'config' (adapter_config.json) "
                              "and 'weights' (adapter_model.safetensors)")
        _check_name(ctx, name)
        cap = ctx.settings.max_upload_bytes
        config_bytes = await _read_capped(config, 1 << 20, "config")
        weights_bytes = await _read_capped(weights, cap, "weights")
        try:
            entry = await asyncio.to_thread(ctx.registry.register_upload, name, config_bytes, weights_bytes)
        except AdapterError as exc:
            raise bad_request(f"adapter refused: {exc}") from exc
        ctx.metrics.update_registry(ctx.registry)
    else:
        try:
            body = RegisterAdapterRequest.model_validate(await request.json())
        except ValueError as exc:
            raise bad_request(f"expected JSON {{'name': ..., 'path': ...}} or a multipart upload: {exc}") from exc
        entry = await _register_path(ctx, body.name, body.path)
    return JSONResponse(_info(ctx, entry, await _resident(ctx)).model_dump(), status_code=201)


@router.get("/v1/adapters")
async def list_adapters(ctx: Ctx) -> dict:
    resident = await _resident(ctx)
    infos = [_info(ctx, e, resident) for e in ctx.registry.entries()]
    return {"object": "list", "data": [i.model_dump() for i in infos]}


@router.get("/v1/adapters/{name:path}")
async def get_adapter(name: str, ctx: Ctx) -> AdapterInfo:
    entry = await asyncio.to_thread(ctx.registry.get, name) if is_adapter_name(name) else None
    if entry is None:
        raise not_found(f"adapter {name!r} is not registered")
    return _info(ctx, entry, await _resident(ctx))


@router.delete("/v1/adapters/{name:path}")
async def delete_adapter(name: str, ctx: Ctx) -> dict:
    # Requests in flight keep their own reference to the weights and finish normally.
    if not is_adapter_name(name) or await asyncio.to_thread(ctx.registry.delete, name) is None:
        raise not_found(f"adapter {name!r} is not registered")
    ctx.metrics.update_registry(ctx.registry)
    return {"deleted": name}


@router.post("/v1/load_lora_adapter")
async def vllm_load(body: VLLMLoadRequest, ctx: Ctx) -> PlainTextResponse:
    await _register_path(ctx, body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def vllm_unload(body: VLLMUnloadRequest, ctx: Ctx) -> PlainTextResponse:
    if not is_adapter_name(body.lora_name) or await asyncio.to_thread(ctx.registry.delete, body.lora_name) is None:
        raise not_found(f"adapter {body.lora_name!r} is not registered")
    ctx.metrics.update_registry(ctx.registry)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
