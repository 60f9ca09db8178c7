"""Incremental detokenization for streaming (torch-free).

Byte-level BPE tokenizers (SmolLM2, Llama 3, GPT-2) split one multi-byte character (emoji,
CJK) over several tokens; decoding a prefix of them yields U+FFFD. We decode a small window
of tokens: `decode(ids[prefix:])` minus `decode(ids[prefix:read])` is the new text, emitted
only when it does not end in U+FFFD; otherwise it is held until the character completes (or
`flush()` at the end). Decoding a window rather than single tokens keeps the tokenizer's
context-dependent spacing (SentencePiece leading spaces) right. The window starts a few
tokens back in the prompt for the same reason.

Stop strings (which may span tokens) are applied on top by a `StopChecker`.

The tokenizer only needs `decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=...)`
(any Hugging Face tokenizer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

from lorafold.server.engine.stop import StopChecker

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
# Prompt tokens decoded as left context of the first output token.
PROMPT_CONTEXT_TOKENS = 5


class Tokenizer(Protocol):
    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = ..., clean_up_tokenization_spaces: bool = ...
    ) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of output token ids into a stream of safe text.

    `add(token_id)` returns new text that is safe to emit (no split character, no possible
    start of a stop string). Once a stop string matches, `stop_string` is set, the text is
    cut before it, and further `add` calls return "". `flush()` returns whatever is held at
    the end of the stream. `text` is everything emitted so far.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0  # window start: left context already emitted
        self._read = len(self._ids)  # tokens before this are emitted
        self._stop = StopChecker(stop)
        self._parts: list[str] = []
        self.num_tokens = 0

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def stop_string(self) -> str | None:
        return self._stop.matched

    @property
    def finished(self) -> bool:
        return self._stop.finished

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the new safe text (possibly "")."""
        if self._stop.finished:
            return ""
        self._ids.append(token_id)
        self.num_tokens += 1
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""  # nothing printable yet (a split character, or a skipped special token)
        if not full_text.startswith(prefix_text):
            # The tokenizer re-spelled earlier text given more context; never retract what was
            # streamed, emit only the part past the old length.
            logger.debug("detokenizer: context changed earlier text %r -> %r", prefix_text, full_text)
        new_text = full_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._emit(self._stop.feed(new_text).text)

    def flush(self) -> str:
        """End of stream: emit held text (an incomplete character shows as U+FFFD)."""
        if self._stop.finished:
            return ""
        tail = ""
        if self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            full_text = self._decode(self._ids[self._prefix :])
            tail = full_text[len(prefix_text) :]
            self._prefix = self._read = len(self._ids)
        text = self._stop.feed(tail).text
        if not self._stop.finished:
            text += self._stop.flush().text
        return self._emit(text)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _emit(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text
