"""Request and response bodies of the OpenAI-compatible API (and the registry).

Requests accept and ignore unknown fields, as OpenAI SDKs send fields a server may not
know (`stream_options`, `user`, ...); fields we know are validated strictly: numbers are
finite and in the documented ranges (docs/api.md), ints are ints (`true` is not 1), text is
valid Unicode (a lone surrogate cannot be tokenized).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from lorafold.server.api.openai_fields import (
    NamedToolChoice,
    ResponseFormat,
    StreamOptions,
    Tool,
    ToolChoice,
    grammar_spec,
    refuse_unsupported,
)
from lorafold.server.engine.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    GrammarSpec,
)

# The ranges of the numeric request fields, as docs/api.md documents them.
MAX_TOP_K = 1 << 20
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
MAX_N = 16  # choices per request
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
    stream_options: StreamOptions | None = None
    n: Annotated[Int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Annotated[Float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    frequency_penalty: Annotated[Float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    repetition_penalty: Annotated[Float, Field(gt=0, le=MAX_REPETITION_PENALTY)] = 1.0
    logit_bias: dict[str, Annotated[Float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = None
    min_tokens: Annotated[Int, Field(ge=0)] = 0
    # structured outputs: OpenAI's response_format, or one of vLLM's guided_* extras
    response_format: ResponseFormat | None = None
    guided_json: dict | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1)] | None = None
    guided_grammar: Text | None = None
    # metadata with nothing to honour in a self-hosted server (docs/api.md): accepted
    user: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    prompt_cache_options: dict | None = None
    prompt_cache_retention: Text | None = None
    service_tier: Literal["auto", "default"] | None = None
    metadata: dict[str, Text] | None = None
    _grammar: GrammarSpec | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: object) -> object:
        return refuse_unsupported(data)

    @model_validator(mode="after")
    def _structured(self) -> SamplingFields:
        self._grammar = grammar_spec(self.response_format, self.guided_json, self.guided_regex, self.guided_choice,
                                     self.guided_grammar)
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def grammar(self) -> GrammarSpec | None:
        return self._grammar

    def token_bias(self, vocab_size: int) -> dict[int, float]:
        """logit_bias with its keys checked as token ids of this model (a ValueError names a bad one)."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab_size:
                raise ValueError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}")
            bias[int(key)] = value
        return bias

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
    best_of: Annotated[Int, Field(ge=1, le=MAX_N)] | None = None

    @model_validator(mode="after")
    def _completion_options(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n, which is plain n): ask for n choices")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (prompt logprobs) is not supported; drop one of them")
        return self

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


class ToolCallFunction(_Request):
    name: Text
    arguments: Text


class ToolCall(_Request):
    id: Text
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: Text | None = None  # a tool turn: which call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""

    def as_template_message(self) -> dict:
        """The message as chat templates take it (arguments parsed, as HF templates expect)."""
        message: dict = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                              "arguments": _parse_arguments(c.function.arguments)}}
                for c in self.tool_calls
            ]
        return message


def _parse_arguments(arguments: str) -> object:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: StrictBool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> ChatCompletionRequest:
        forced = isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required"
        if forced and self.grammar is not None:
            raise ValueError("a forced tool call is already constrained; drop response_format / guided_*")
        return self


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
