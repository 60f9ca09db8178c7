"""Training configuration: one slotted dataclass, validated on construction, loadable from TOML."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEDULES = ("cosine", "linear", "constant")
INITS = ("default", "pissa", "nystrom", "lora_ga", "etf")
# Optimizers that train U S Vᵀ adapters (training.adapters.usv) instead of B A pairs.
USV_OPTIMIZERS = frozenset({"dlrt", "geolora", "geo_heavy_ball", "geo_adam"})
# Fields that hold credentials: never written to report.json, checkpoints or logs.
SECRET_FIELDS = ("admin_key",)
REDACTED = "<redacted>"


@dataclass(slots=True)
class TrainConfig:
    data: str = ""
    out: str = ""
    val: str | None = None
    val_fraction: float = 0.1
    model: str | None = None  # None: the packaged SmolLM2-135M-Instruct
    optimizer: str = "adamw"
    # optimizer-specific keywords beyond lr / weight_decay, e.g. {"stat_interval": 10}
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    init: str = "default"
    rank: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
    lr: float | None = None  # None: the optimizer's own default (they differ by method)
    weight_decay: float | None = None
    warmup_steps: int = 0
    schedule: str = "cosine"
    steps: int | None = None  # optimizer steps; when None, `epochs` decides
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    bf16: bool = False
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only before and after training
    # validation rows each evaluation uses (loss and accuracy); 0: all. Bounded by default so a
    # first run shows progress and ends in minutes on a CPU; raise it for a final number.
    eval_samples: int = 100
    accuracy: str = "auto"  # auto | on | off
    save_every: int = 0  # 0: checkpoint only at the end
    resume: str | None = None
    register: str | None = None
    name: str | None = None
    admin_key: str | None = None
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.optimizer in USV_OPTIMIZERS and self.init != "default":
            raise ValueError(f"optimizer {self.optimizer!r} trains USV adapters; it supports only --init default")
        if isinstance(self.optimizer_args, list):  # (key, value) pairs from repeated CLI flags
            self.optimizer_args = dict(self.optimizer_args)
        if not isinstance(self.optimizer_args, dict) or not all(
            isinstance(k, str) and k.isidentifier() for k in self.optimizer_args
        ):
            raise ValueError(f"optimizer_args must map keyword names to values, got {self.optimizer_args!r}")
        for key in ("lr", "weight_decay"):
            if key in self.optimizer_args:
                raise ValueError(f"set {key} with --{key.replace('_', '-')} (the `{key}` key), not in optimizer_args")
        if self.eval_every < 0 or self.eval_samples < 0:
            raise ValueError(f"eval_every and eval_samples must be >= 0, got {self.eval_every}, {self.eval_samples}")
        if self.accuracy not in ("auto", "on", "off"):
            raise ValueError(f"accuracy must be auto, on or off, got {self.accuracy!r}")
        for name in ("rank", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not self.targets:
            raise ValueError("targets is empty: name at least one module, e.g. q_proj,v_proj")

    @property
    def uses_usv(self) -> bool:
        return self.optimizer in USV_OPTIMIZERS

    def to_dict(self) -> dict[str, Any]:
        """Every field, secrets included (in memory only; see :meth:`public_dict`)."""
        return asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with secrets replaced by ``"<redacted>"`` (when set) and credentials
        stripped from the ``register`` URL — what report.json and checkpoints store."""
        values = asdict(self)
        for key in SECRET_FIELDS:
            if values[key] is not None:
                values[key] = REDACTED
        if values["register"]:
            values["register"] = strip_userinfo(values["register"])
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**values)


def strip_userinfo(url: str) -> str:
    """``http://user:pass@host/x`` -> ``http://host/x`` (a URL may carry a token)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def load_toml(path: str | Path) -> dict[str, Any]:
    """Keys of a TOML file (top level or a ``[train]`` table), with ``-`` normalized to ``_``."""
    with Path(path).open("rb") as f:
        raw = tomllib.load(f)
    table = raw.get("train", raw)
    return {k.replace("-", "_"): v for k, v in table.items()}
