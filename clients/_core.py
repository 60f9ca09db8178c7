"""What the sync and async clients share: settings, request specs, retry policy, SSE decoding.

Nothing here performs I/O on the network; `client.py` owns the httpx clients and the loops.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import httpx

from .errors import LorafoldError, parse_retry_after

DEFAULT_URL = "http://127.0.0.1:8000"

# Sampling fields the server accepts besides model/prompt/messages/max_tokens/temperature/stream.
# A typo (`max_token=`) is a TypeError here rather than a field the server silently ignores.
SAMPLING_FIELDS = frozenset({
    "top_p", "top_k", "seed", "stop", "logprobs", "n", "stop_token_ids", "ignore_eos", "extra_body",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "echo",
    "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
})

# Local PEFT folder → multipart file fields of `POST /v1/adapters`.
UPLOAD_FILES = {"config": "adapter_config.json", "weights": "adapter_model.safetensors"}


@dataclass(frozen=True, slots=True)
class Settings:
    """Resolved client settings (arguments first, then LORAFOLD_* environment variables)."""

    base_url: str
    api_key: str | None
    admin_key: str | None
    timeout: float

    @classmethod
    def resolve(cls, base_url: str | None, api_key: str | None, admin_key: str | None, timeout: float) -> Settings:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        url = base_url or os.environ.get("LORAFOLD_URL") or DEFAULT_URL
        return cls(
            base_url=url.rstrip("/"),
            api_key=api_key if api_key is not None else os.environ.get("LORAFOLD_API_KEY"),
            admin_key=admin_key if admin_key is not None else os.environ.get("LORAFOLD_ADMIN_KEY"),
            timeout=timeout,
        )

    def headers(self, admin: bool) -> dict[str, str]:
        key = self.admin_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


RETRY_STATUSES = frozenset({429, 503})
RETRYABLE_TRANSPORT = (
    httpx.ConnectError,  # refused: nothing reached the server
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,  # e.g. a keep-alive connection the server had just closed
    httpx.ReadError,
    httpx.WriteError,
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter for 429 / 503 / connection failures.

    delay(attempt) = min(backoff_max, backoff_base · 2**attempt) · U(0.5, 1); a Retry-After
    header replaces it (a hint above `max_retry_after` is not waited for: the error is raised).
    """

    max_retries: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")

    def backoff(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)

    def delay_after_status(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying this error response, or None to raise now."""
        if attempt >= self.max_retries or response.status_code not in RETRY_STATUSES:
            return None
        hint = parse_retry_after(response.headers.get("retry-after"))
        if hint is None:
            return self.backoff(attempt)
        return hint if hint <= self.max_retry_after else None

    def delay_after_exception(self, exc: httpx.TransportError, attempt: int) -> float | None:
        """Seconds to wait before retrying after a transport failure, or None to raise now.

        Read/write/pool timeouts are not retried: a generation that ran out of time once will
        likely do so again, and retrying would multiply the caller's wait by max_retries + 1.
        """
        if attempt >= self.max_retries or not isinstance(exc, RETRYABLE_TRANSPORT):
            return None
        return self.backoff(attempt)


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One API call, independent of sync/async: rebuilt into an httpx.Request on every attempt."""

    method: str
    path: str
    admin: bool = False
    json: Mapping[str, Any] | None = None
    data: Mapping[str, str] | None = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None
    retry: bool = True  # False for probes (`ready`), whose caller wants the answer now

    def build(self, http: httpx.Client | httpx.AsyncClient, settings: Settings) -> httpx.Request:
        return http.build_request(
            self.method,
            self.path,
            json=self.json,
            data=self.data,
            files=self.files,
            headers=settings.headers(self.admin),
        )


def adapter_path(name: str) -> str:
    if not name:
        raise ValueError("adapter name must be a non-empty string")
    return f"/v1/adapters/{quote(name, safe='')}"


def generation_body(
    model: str, max_tokens: int, temperature: float, stream: bool, kw: dict[str, Any]
) -> dict[str, Any]:
    """The shared part of completion and chat request bodies; `kw` holds optional sampling fields."""
    unknown = set(kw) - SAMPLING_FIELDS
    if unknown:
        raise TypeError(
            f"unknown sampling argument(s) {sorted(unknown)}; accepted: {sorted(SAMPLING_FIELDS)} "
            "(pass anything else through extra_body={...})"
        )
    extra = kw.pop("extra_body", None) or {}
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": stream}
    body.update({k: v for k, v in kw.items() if v is not None})
    body.update(extra)
    return body


def completion_spec(
    model: str, prompt: str, max_tokens: int, temperature: float, stream: bool, kw: dict[str, Any]
) -> RequestSpec:
    """`POST /v1/completions` for `model` (already resolved); see `generation_body`."""
    body = generation_body(model, max_tokens, temperature, stream, kw)
    return RequestSpec("POST", "/v1/completions", json={**body, "prompt": prompt})


def chat_spec(
    model: str,
    messages: Sequence[Mapping[str, Any] | Any],
    max_tokens: int,
    temperature: float,
    stream: bool,
    kw: dict[str, Any],
) -> RequestSpec:
    """`POST /v1/chat/completions` for `model` (already resolved); see `generation_body`."""
    body = generation_body(model, max_tokens, temperature, stream, kw)
    return RequestSpec("POST", "/v1/chat/completions", json={**body, "messages": chat_messages(messages)})


def load_lora_spec(lora_name: str, lora_path: str) -> RequestSpec:
    """vLLM-compatible `POST /v1/load_lora_adapter`."""
    return RequestSpec(
        "POST", "/v1/load_lora_adapter", admin=True, json={"lora_name": lora_name, "lora_path": lora_path}
    )


def unload_lora_spec(lora_name: str) -> RequestSpec:
    """vLLM-compatible `POST /v1/unload_lora_adapter`."""
    return RequestSpec("POST", "/v1/unload_lora_adapter", admin=True, json={"lora_name": lora_name})


def chat_messages(messages: Sequence[Mapping[str, Any] | Any]) -> list[dict[str, Any]]:
    """Messages as plain dicts (accepts dicts or `ChatMessage` models)."""
    out = []
    for m in messages:
        out.append(m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else dict(m))
    if not out:
        raise ValueError("messages must not be empty")
    return out


def register_spec(
    name: str, path: str | os.PathLike[str] | None, upload_dir: str | os.PathLike[str] | None
) -> RequestSpec:
    """`POST /v1/adapters` as JSON (a server-side path) or multipart (a local PEFT folder)."""
    if not name:
        raise ValueError("adapter name must be a non-empty string")
    if (path is None) == (upload_dir is None):
        raise ValueError(
            "give exactly one of `path` (a folder on the server) or `upload_dir` (a local folder to upload)"
        )
    if path is not None:
        return RequestSpec("POST", "/v1/adapters", admin=True, json={"name": name, "path": os.fspath(path)})
    return RequestSpec("POST", "/v1/adapters", admin=True, data={"name": name}, files=read_upload(Path(upload_dir)))


def read_upload(folder: Path) -> dict[str, tuple[str, bytes, str]]:
    """The two files of a PEFT adapter folder, read into memory so a retry can resend them."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the folder PEFT's save_pretrained wrote")
    files = {}
    for field_name, filename in UPLOAD_FILES.items():
        file = folder / filename
        if not file.is_file():
            hint = ""
            if filename.endswith(".safetensors") and (folder / "adapter_model.bin").is_file():
                hint = " (found adapter_model.bin: re-save with save_pretrained(..., safe_serialization=True))"
            raise FileNotFoundError(f"{file} is missing{hint}")
        mime = "application/json" if filename.endswith(".json") else "application/octet-stream"
        files[field_name] = (filename, file.read_bytes(), mime)
    return files


@dataclass(slots=True)
class SSEDecoder:
    """Incremental Server-Sent Events decoder over text lines (the line splitting is httpx's).

    Per the SSE spec: `data:` lines accumulate (joined by "\\n") until a blank line dispatches
    the event; lines starting with ":" are comments; other fields (event, id, retry) are ignored.
    """

    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> str | None:
        """Consume one line (without its newline); return an event's data when one completes."""
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


DONE = "[DONE]"


def decode_event(data: str) -> dict[str, Any]:
    """JSON of one SSE event's data; a non-object or bad JSON is a server bug, reported as such."""
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise LorafoldError(f"malformed stream event from the server: {data[:200]!r}") from exc
    if not isinstance(payload, dict):
        raise LorafoldError(f"malformed stream event from the server: {data[:200]!r}")
    return payload
