"""Server configuration: one slotted dataclass, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lorafold.server.models.assets import cache_root

LOCALHOST = "127.0.0.1"


@dataclass(slots=True)
class ServerSettings:
    """Everything the service needs to start.

    model: base model (None = packaged SmolLM2; a local HF folder; a .gguf file).
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
    host: str = LOCALHOST
    port: int = 8000
    adapter_root: Path = field(default_factory=lambda: Path(os.environ.get("LORAFOLD_ADAPTER_ROOT", "adapters")))
    state_dir: Path = field(default_factory=lambda: cache_root() / "state")
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    max_loras: int | None = None  # optional cap on resident adapters; see EngineConfig
    adapter_budget_bytes: int | None = None  # None: adapter_memory_fraction of free memory
    adapter_memory_fraction: float = 0.1
    max_num_seqs: int = 32
    max_model_len: int = 2048
    kv_blocks: int | None = None  # None: measured from free memory (gpu_memory_utilization)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (server.models.loader.resolve_device)
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (auto: bf16 on a GPU, fp32 on the CPU)
    gpu_memory_utilization: float = 0.9  # see EngineConfig
    block_size: int = 16
    max_num_batched_tokens: int = 512
    max_prefill_chunk: int = 256
    cpu_cache_bytes: int = 1 << 30
    max_tokens_cap: int = 1024
    default_max_tokens: int = 16
    max_queue: int = 256
    max_request_bytes: int = 1 << 20
    max_upload_bytes: int = 512 << 20
    max_adapter_rank: int = 512
    metrics_top_adapters: int = 20
    served_model_name: str | None = None
    prepack_weights: bool = True  # see EngineConfig.prepack_weights
    adapter_store: str | None = None
    store_refresh_seconds: float = 5.0

    def __post_init__(self) -> None:
        self.adapter_root = Path(self.adapter_root).expanduser()
        self.state_dir = Path(self.state_dir).expanduser()
        self.api_keys = tuple(k for k in self.api_keys if k)
        if self.max_loras is not None and (not isinstance(self.max_loras, int) or self.max_loras < 1):
            raise ValueError(f"max_loras must be a positive integer or unset, got {self.max_loras!r}")
        if self.adapter_budget_bytes is not None and (not isinstance(self.adapter_budget_bytes, int)
                                                      or self.adapter_budget_bytes < 1):
            raise ValueError(f"adapter_budget_bytes must be a positive integer or unset, got {self.adapter_budget_bytes!r}")
        if not 0 < self.adapter_memory_fraction <= 1:
            raise ValueError(f"adapter_memory_fraction must be in (0, 1], got {self.adapter_memory_fraction!r}")
        if self.kv_blocks is not None and (not isinstance(self.kv_blocks, int) or self.kv_blocks < 1):
            raise ValueError(f"kv_blocks must be a positive integer or unset (measured), got {self.kv_blocks!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        for name in ("port", "max_num_seqs", "max_model_len", "block_size",
                     "max_num_batched_tokens", "max_prefill_chunk", "max_tokens_cap", "max_queue",
                     "max_request_bytes", "max_upload_bytes", "max_adapter_rank", "metrics_top_adapters"):
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
