"""`lorafold serve`: build settings from the command line and run uvicorn."""

from __future__ import annotations

import argparse
import logging
import os

from lorafold.server.api.settings import ServerSettings
from lorafold.server.engine import flashinfer_paged
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.host_memory import keep_freed_memory
from lorafold.server.models.loader import resolve_device, resolve_dtype
from lorafold.server.store import StoreError, open_store
from lorafold.server.store.base import wait_until_reachable

logger = logging.getLogger(__name__)


# Below Kubernetes' default terminationGracePeriodSeconds (30), so the process ends by itself.
GRACEFUL_SHUTDOWN_S = 20


# `lorafold serve` flag (argparse dest) -> ServerSettings field / EngineConfig field
SERVER_FLAGS = ("model", "host", "port", "adapter_root", "state_dir", "admin_key", "max_tokens_cap", "adapter_store",
                "store_refresh_seconds", "device", "dtype")
ENGINE_FLAGS = {
    "max_loras": "max_loras", "max_num_seqs": "max_num_seqs", "max_model_len": "max_model_len",
    "kv_blocks": "num_kv_blocks", "max_queue": "max_queue", "prepack_weights": "prepack_weights",
    "adapter_memory_fraction": "adapter_memory_fraction", "gpu_memory_utilization": "gpu_memory_utilization",
    "attention_backend": "attention_backend", "lora_dtype": "lora_dtype",
}


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Raises ValueError on a bad value (the engine's are checked by EngineConfig)."""
    kwargs = {name: value for name in SERVER_FLAGS if (value := getattr(args, name, None)) is not None}
    engine = {field: value for flag, field in ENGINE_FLAGS.items() if (value := getattr(args, flag, None)) is not None}
    budget_mb = getattr(args, "adapter_budget_mb", None)
    if budget_mb is not None:
        engine["adapter_budget_bytes"] = int(budget_mb) << 20
    kwargs["engine"] = EngineConfig(**engine)
    kwargs["measure_kv_blocks"] = "num_kv_blocks" not in engine
    keys = list(getattr(args, "api_key", None) or [])
    if os.environ.get("LORAFOLD_API_KEYS"):
        keys += [k.strip() for k in os.environ["LORAFOLD_API_KEYS"].split(",") if k.strip()]
    kwargs["api_keys"] = tuple(keys)
    if kwargs.get("admin_key") is None and os.environ.get("LORAFOLD_ADMIN_KEY"):
        kwargs["admin_key"] = os.environ["LORAFOLD_ADMIN_KEY"]
    cpu_mb = getattr(args, "cpu_cache_mb", None)
    if cpu_mb is not None:
        kwargs["cpu_cache_bytes"] = int(cpu_mb) << 20
    cap = kwargs.get("max_tokens_cap")
    default = ServerSettings.__dataclass_fields__["default_max_tokens"].default
    if isinstance(cap, int) and 1 <= cap < default:
        kwargs["default_max_tokens"] = cap  # a cap below the default lowers the default with it
    return ServerSettings(**kwargs)


def serve_main(args: argparse.Namespace) -> int:
    import uvicorn

    from lorafold.kernels.ops import choose_backend
    from lorafold.server.api.app import create_app
    from lorafold.server.engine.model_runner import resolve_lora_dtype

    try:  # before the model loads: settings that cannot run on this device fail now
        settings = settings_from_args(args)
        engine = settings.engine
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device.type)
        if engine.attention_backend == "flashinfer":
            flashinfer_paged.check_usable(device, dtype)
        if engine.lora_dtype != "auto":  # adapter pools the LoRA kernels cannot read
            choose_backend(engine.lora_backend, device, dtype, resolve_lora_dtype(engine.lora_dtype, dtype))
    except ValueError as exc:  # a bad flag value: say which, not a traceback
        logger.error("invalid server settings: %s", exc)
        return 2
    try:
        # Before the model loads (minutes for a large one): a wrong store URL, endpoint or key
        # fails in seconds, with the store's own message.
        wait_until_reachable(open_store(settings.store_url))
    except (StoreError, ValueError) as exc:
        logger.error("adapter store: %s", exc)
        return 2
    host = settings.bind_host()
    if settings.open_access:
        if settings.host != host:
            logger.warning("no API key or admin key configured: binding to %s only, not %s "
                           "(pass --api-key/--admin-key to serve other hosts)", host, settings.host)
        else:
            logger.warning("no API key or admin key configured: serving on %s only", host)
    settings.adapter_root.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()  # process-wide, once: the step's temporaries stay mapped (host_memory)
    # A bounded drain on SIGTERM: open requests get GRACEFUL_SHUTDOWN_S to finish, then the
    # process exits whatever they do (a stuck client or engine must not keep a pod alive).
    uvicorn.run(create_app(settings), host=host, port=settings.port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                log_level=str(getattr(args, "log_level", None) or "info").lower())
    return 0
