"""Typed, immutable views of the server's JSON responses.

Models ignore unknown fields so a newer server never breaks an older client; a response
missing a required field raises `LorafoldError` (see `parse`), not a bare pydantic error.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import LorafoldError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Usage(_Frozen):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Frozen):
    index: int = 0
    text: str
    finish_reason: str | None = None  # "stop" | "length"; None in stream chunks until the last
    logprobs: dict[str, Any] | None = None


class Completion(_Frozen):
    """A `POST /v1/completions` result (object == "text_completion")."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: tuple[CompletionChoice, ...]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first (only: n=1) choice's text."""
        return self.choices[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason


class CompletionChunk(_Frozen):
    """One SSE event of a streamed completion: `text` is the delta since the previous chunk."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: tuple[CompletionChoice, ...]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


class ChatMessage(_Frozen):
    role: str
    content: str | None = None


class ChatChoice(_Frozen):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(_Frozen):
    """A `POST /v1/chat/completions` result (object == "chat.completion")."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: tuple[ChatChoice, ...]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """The first choice's message content ("" if the server sent null)."""
        return self.choices[0].message.content or ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason


class ChatDelta(_Frozen):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Frozen):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None


class ChatCompletionChunk(_Frozen):
    """One SSE event of a streamed chat completion (object == "chat.completion.chunk")."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: tuple[ChatChunkChoice, ...]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return (self.choices[0].delta.content or "") if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


class ModelInfo(_Frozen):
    """One entry of `GET /v1/models`: the base model (parent None) or an adapter on it."""

    id: str
    object: str = "model"
    owned_by: str = "lorafold"
    parent: str | None = None
    root: str | None = None


class AdapterInfo(_Frozen):
    """A registered adapter as the server reports it."""

    name: str
    rank: int  # the largest rank across modules
    ranks: tuple[int, ...]
    targets: tuple[str, ...]
    size_bytes: int
    content_hash: str
    tier: str  # "device" | "cpu" | "disk"; a plain str so a new tier never breaks old clients
    last_used: float | None = None  # unix time
    requests_served: int = 0
    source: str
    registered_at: float  # unix time


class _ModelList(_Frozen):
    data: tuple[ModelInfo, ...]


class _AdapterList(_Frozen):
    data: tuple[AdapterInfo, ...]


T = TypeVar("T", bound=BaseModel)


def parse(model: type[T], payload: object) -> T:
    """Validate a decoded JSON payload as `model`; a mismatch is the server's fault, so say so."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise LorafoldError(f"unexpected {model.__name__} from the server: {exc}") from exc


def parse_models(payload: object) -> list[ModelInfo]:
    return list(parse(_ModelList, payload).data)


def parse_adapters(payload: object) -> list[AdapterInfo]:
    return list(parse(_AdapterList, payload).data)
