"""Server configuration: one slotted dataclass, validated on construction; the engine's
sizes and limits are its `engine` field (an `EngineConfig`, which validates them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lorafold.server.engine.config import EngineConfig
from lorafold.server.models.assets import cache_root

LOCALHOST = "127.0.0.1"


@dataclass(slots=True)
class ServerSettings:
    """Everything the service needs to start.

    model: base model (None = packaged SmolLM2; a local HF folder; a .gguf file).
    engine: the engine's sizes and limits (sequences, context, KV cache, adapter budget and
        cap, queue); `lorafold serve`'s engine flags set its fields (`cli_entry`).
    measure_kv_blocks: size the KV cache from free memory at start (`gpu_memory_utilization`)
        and ignore engine.num_kv_blocks; False: use engine.num_kv_blocks (`--kv-blocks`).
    adapter_root: folder under which adapters may be registered by path; nothing outside it.
    state_dir: where registrations and their weights persist across restarts (the default
        `file://` adapter store when `adapter_store` is unset).
    adapter_store: `file:///PATH` or `s3://BUCKET/PREFIX` (AWS environment for endpoint and
        credentials): the catalogue and weights every replica shares (lorafold.server.store).
    store_refresh_seconds: how often the store is polled; a registration, re-registration or
        deletion made through another replica is served here within this bound (plus one listing).
    api_keys: bearer keys accepted on inference routes (none: inference is open).
    admin_key: bearer key of the adapter registry routes.
    When neither kind of key is set the server binds to localhost only.
    """

    model: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    measure_kv_blocks: bool = True
    host: str = LOCALHOST
    port: int = 8000
    adapter_root: Path = field(default_factory=lambda: Path(os.environ.get("LORAFOLD_ADAPTER_ROOT", "adapters")))
    state_dir: Path = field(default_factory=lambda: cache_root() / "state")
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N (server.models.loader.resolve_device)
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (auto: bf16 on a GPU, fp32 on the CPU)
    cpu_cache_bytes: int = 1 << 30
    max_tokens_cap: int = 1024
    default_max_tokens: int = 16
    max_request_bytes: int = 1 << 20
    max_upload_bytes: int = 512 << 20
    max_adapter_rank: int = 512
    metrics_top_adapters: int = 20
    served_model_name: str | None = None
    adapter_store: str | None = None
    store_refresh_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineConfig):
            raise ValueError(f"engine must be an EngineConfig, got {type(self.engine).__name__}")
        if not isinstance(self.measure_kv_blocks, bool):
            raise ValueError(f"measure_kv_blocks must be true or false, got {self.measure_kv_blocks!r}")
        self.adapter_root = Path(self.adapter_root).expanduser()
        self.state_dir = Path(self.state_dir).expanduser()
        self.api_keys = tuple(k for k in self.api_keys if k)
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        for name in ("port", "max_tokens_cap", "max_request_bytes", "max_upload_bytes", "max_adapter_rank",
                     "metrics_top_adapters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "port" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.05 <= float(self.store_refresh_seconds) <= 3600:
            raise ValueError(f"store_refresh_seconds must be in [0.05, 3600], got {self.store_refresh_seconds!r}")
        if self.cpu_cache_bytes < 0:
            raise ValueError("cpu_cache_bytes must be >= 0")
        if not 1 <= self.default_max_tokens <= self.max_tokens_cap:
            raise ValueError("default_max_tokens must be between 1 and max_tokens_cap")

    @property
    def store_url(self) -> str:
        return self.adapter_store or f"file://{self.state_dir.resolve()}"

    @property
    def open_access(self) -> bool:
        """No key configured: the service must stay on localhost."""
        return not self.api_keys and self.admin_key is None

    def bind_host(self) -> str:
        return LOCALHOST if self.open_access else self.host
