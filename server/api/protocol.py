"""Request and response bodies of the OpenAI-compatible API (and the registry).

Requests accept and ignore unknown fields, as OpenAI SDKs send fields a server may not
know (`stream_options`, `user`, ...); fields we know are validated strictly: numbers are
finite and in the documented ranges (docs/api.md), ints are ints (`true` is not 1), text is
valid Unicode (a lone surrogate cannot be tokenized).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

# The ranges of the numeric request fields, as docs/api.md documents them.
MAX_TOP_K = 1 << 20
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
# Adapter names: matched in full (a trailing newline is not part of a valid name).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$"


_NAME_RE = re.compile(NAME_PATTERN[1:-1])
MAX_NAME_LENGTH = 128


def is_adapter_name(name: str) -> bool:
    """A name an adapter can be registered under (checked before any registry or store lookup,
    so an arbitrary `model` string never becomes a file or object key)."""
    return len(name) <= MAX_NAME_LENGTH and _NAME_RE.fullmatch(name) is not None


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text contains an invalid character at position {exc.start} (a lone surrogate "
                         "such as \\ud800); send valid UTF-8 text") from exc
    return text


def _clean_path(path: str) -> str:
    if any(ord(c) < 32 for c in path):
        raise ValueError("path contains a control character (NUL, newline, ...); send a plain folder path")
    return _valid_unicode(path)


Text = Annotated[str, AfterValidator(_valid_unicode)]
Int = StrictInt  # JSON true/false and 1.0 are refused, not taken as 1
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
AdapterName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)]
AdapterPath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_clean_path)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SamplingFields(_Request):
    model: Text | None = None
    max_tokens: Annotated[Int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None  # newer OpenAI name for chat
    temperature: Annotated[Float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[Int, Field(ge=-1, le=MAX_TOP_K)] = -1
    seed: Annotated[Int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[Annotated[Int, Field(ge=0)]] | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    n: Annotated[Int, Field(ge=1)] = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send several requests for several choices")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else (stop or [])
        if len(items) > 8 or any(not s for s in items):
            raise ValueError("stop takes up to 8 non-empty strings")
        return stop


class CompletionRequest(SamplingFields):
    prompt: (Annotated[Text, Field(min_length=1)] | Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1)]
             | Annotated[list[Text], Field(min_length=1, max_length=1)])
    logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo=true is not supported yet; prepend the prompt to the completion yourself")
        return echo

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt is empty")
        if isinstance(prompt, str) and not prompt:
            raise ValueError("prompt is empty")
        return prompt


class TextPart(_Request):
    """An OpenAI content part; only text parts can be served by a text-only base model."""

    type: str
    text: Text | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, type_: str) -> str:
        if type_ != "text":
            raise ValueError(f"content parts of type {type_!r} are not supported: this server serves a "
                             "text-only model; send text parts")
        return type_

    @field_validator("text")
    @classmethod
    def _has_text(cls, text: str | None) -> str:
        if text is None:
            raise ValueError("a text content part needs a 'text' string")
        return text


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: StrictBool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None


class RegisterAdapterRequest(_Request):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"name": "sentiment", "path": "sentiment"}]})

    name: AdapterName
    path: AdapterPath


class VLLMLoadRequest(_Request):
    lora_name: AdapterName
    lora_path: AdapterPath


class VLLMUnloadRequest(_Request):
    lora_name: Annotated[Text, Field(min_length=1)]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AdapterInfo(BaseModel):
    name: str
    rank: int
    ranks: list[int]
    targets: list[str]
    size_bytes: int
    content_hash: str
    tier: Literal["device", "cpu", "disk"]
    last_used: float | None
    requests_served: int
    source: str
    registered_at: float
