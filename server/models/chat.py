"""Prompt encoding with the tokenizer's own chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class ChatTemplateError(ValueError):
    """The messages cannot be rendered with this tokenizer's chat template."""


_PROBE_TOOL = {"type": "function", "function": {"name": "lorafold_probe_tool_7f3a", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}


def renders_tools(tokenizer: object) -> bool:
    """Whether the chat template puts `tools` into the prompt (many templates ignore them)."""
    cached = getattr(tokenizer, "_lorafold_renders_tools", None)
    if cached is not None:
        return cached
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL],
                                             add_generation_prompt=True, tokenize=False)
        supported = "lorafold_probe_tool_7f3a" in str(text)
    except Exception:  # noqa: BLE001 - a template that fails on tools does not support them
        supported = False
    tokenizer._lorafold_renders_tools = supported
    return supported


def chat_prompt_ids(tokenizer: object, messages: Sequence[Mapping], tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` (and `tools`, where given) rendered by the tokenizer's chat
    template, ready for generation."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError("this model's tokenizer has no chat template; use /v1/completions with a plain prompt")
    try:
        extra = {"tools": tools} if tools else {}
        encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, **extra)
    except Exception as exc:  # noqa: BLE001 - jinja errors of arbitrary type become a 400
        raise ChatTemplateError(f"the chat template could not render these messages: {exc}") from exc
    # transformers 5 returns a BatchEncoding (a mapping), older versions a plain list
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(t) for t in ids]
