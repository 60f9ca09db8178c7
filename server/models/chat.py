"""Prompt encoding with the tokenizer's own chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class ChatTemplateError(ValueError):
    """The messages cannot be rendered with this tokenizer's chat template."""


def chat_prompt_ids(tokenizer: object, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template, ready for generation."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError("this model's tokenizer has no chat template; use /v1/completions with a plain prompt")
    try:
        encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # noqa: BLE001 - jinja errors of arbitrary type become a 400
        raise ChatTemplateError(f"the chat template could not render these messages: {exc}") from exc
    # transformers 5 returns a BatchEncoding (a mapping), older versions a plain list
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(t) for t in ids]
