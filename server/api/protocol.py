"""Request and response bodies of the OpenAI-compatible API (and the registry).

Requests accept and ignore unknown fields, as OpenAI SDKs send fields a server may not
know (`stream_options`, `user`, ...); fields we know are validated strictly.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SamplingFields(_Request):
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # newer OpenAI name for chat
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    n: Annotated[int, Field(ge=1)] = 1

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
    prompt: str | list[int] | list[str]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False

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


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class RegisterAdapterRequest(_Request):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")]
    path: Annotated[str, Field(min_length=1)]


class VLLMLoadRequest(_Request):
    lora_name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")]
    lora_path: Annotated[str, Field(min_length=1)]


class VLLMUnloadRequest(_Request):
    lora_name: Annotated[str, Field(min_length=1)]


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
