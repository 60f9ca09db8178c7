"""JSONL training data in three shapes, tokenized with loss masks.

Each line is one JSON object, one of:

- ``{"prompt": str, "completion": str}``: loss on the completion tokens (and EOS) only;
- ``{"messages": [{"role", "content"}, ...]}``: rendered with the tokenizer's chat template,
  loss on the assistant turns only;
- ``{"text": str}``: loss on every token.

Other fields (``subject``, ``id``...) are kept in :attr:`Row.meta` and otherwise ignored.
Labels follow the Hugging Face convention: ``labels[i] = -100`` where no loss is taken; the
model shifts labels itself.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataFormatError(ValueError):
    """A JSONL line is not one of the accepted shapes; the message names file, line and field."""


@dataclass(slots=True)
class Row:
    """One parsed line. ``kind`` is "prompt", "messages" or "text"."""

    kind: str
    data: dict[str, Any]
    line: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Example:
    """One tokenized example: ``input_ids`` and ``labels`` are [T] lists of equal length."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens before the first labeled one (the generation prefix for accuracy)
    target: str | None = None  # the completion text, for prompt/completion rows

    @property
    def n_labels(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _fail(path: Path, line: int, msg: str) -> DataFormatError:
    return DataFormatError(f"{path}:{line}: {msg}")


def _check_str(path: Path, line: int, obj: dict, key: str, allow_empty: bool = True) -> None:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _fail(path, line, f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise _fail(path, line, f"field {key!r} is empty")


def _check_messages(path: Path, line: int, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _fail(path, line, "field 'messages' must be a non-empty list of {role, content} objects")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise _fail(path, line, f"field 'messages[{i}]' needs 'role' in {ROLES} and a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise _fail(path, line, "field 'messages' has no assistant turn: nothing to learn from")


def parse_row(path: Path, line: int, obj: Any) -> Row:
    """Validate one decoded line and classify its shape."""
    if not isinstance(obj, dict):
        raise _fail(path, line, f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        _check_messages(path, line, obj["messages"])
        kind, keys = "messages", ("messages",)
    elif "prompt" in obj or "completion" in obj:
        _check_str(path, line, obj, "prompt")
        _check_str(path, line, obj, "completion", allow_empty=False)
        kind, keys = "prompt", ("prompt", "completion")
    elif "text" in obj:
        _check_str(path, line, obj, "text", allow_empty=False)
        kind, keys = "text", ("text",)
    else:
        raise _fail(path, line, f"no known field: need 'prompt'+'completion', 'messages' or 'text'; got {sorted(obj)}")
    return Row(kind, {k: obj[k] for k in keys}, line, {k: v for k, v in obj.items() if k not in keys})


def read_jsonl(path: str | Path) -> list[Row]:
    """Parse every non-blank line of ``path``; raises :class:`DataFormatError` on the first bad one."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _fail(path, line_no, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            rows.append(parse_row(path, line_no, obj))
    if not rows:
        raise DataFormatError(f"{path}: no examples (the file is empty)")
    return rows


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _encode_messages(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    # Tokenize segment by segment at the assistant-turn boundaries: the prompt segment then
    # tokenizes exactly as chat_prompt_ids does at inference (the prefix is rendered whole).
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataFormatError("'messages' rows need a tokenizer with a chat template; use prompt/completion rows")
    full = _render(tokenizer, messages, False)
    cuts: list[tuple[int, int]] = []
    for k, msg in enumerate(messages):
        if msg["role"] == "assistant":
            start = len(_render(tokenizer, messages[:k], True))
            end = len(_render(tokenizer, messages[: k + 1], False))
            cuts.append((start, end))
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in cuts:
        for lo, hi, learn in ((pos, start, False), (start, end, True)):
            piece = _ids(tokenizer, full[lo:hi]) if hi > lo else []
            ids += piece
            labels += piece if learn else [IGNORE] * len(piece)
        pos = end
    tail = _ids(tokenizer, full[pos:]) if pos < len(full) else []
    return ids + tail, labels + [IGNORE] * len(tail)


def encode_row(row: Row, tokenizer: Any, max_length: int, append_eos: bool = True) -> Example:
    """Tokenize ``row``; truncate on the right to ``max_length`` tokens."""
    target = None
    if row.kind == "prompt":
        prompt = _ids(tokenizer, row.data["prompt"], special=True)
        completion = _ids(tokenizer, row.data["completion"])
        eos = getattr(tokenizer, "eos_token_id", None)
        if append_eos and eos is not None:
            completion.append(eos)
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
        target = row.data["completion"]
    elif row.kind == "messages":
        ids, labels = _encode_messages(tokenizer, row.data["messages"])
    else:
        ids = _ids(tokenizer, row.data["text"], special=True)
        labels = list(ids)
    first = next((i for i, t in enumerate(labels) if t != IGNORE), len(labels))
    return Example(ids[:max_length], labels[:max_length], first, target)


def split_rows(rows: list[Row], val_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic split: shuffle indices with ``random.Random(seed)``; the first share is validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(rows) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(rows) > 1:
        n_val = 1
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_idx], [rows[i] for i in sorted(val_idx)]


def encode_rows(rows: list[Row], tokenizer: Any, max_length: int) -> list[Example]:
    """Encode all rows; drop (with a warning) those truncated to no labeled token."""
    out = [encode_row(r, tokenizer, max_length) for r in rows]
    kept = [e for e in out if e.n_labels > 0]
    if len(kept) < len(out):
        logger.warning("%d of %d examples have no target token left within max_length=%d; dropped",
                       len(out) - len(kept), len(out), max_length)
    return kept


def load_splits(
    train_path: str | Path,
    tokenizer: Any,
    max_length: int,
    val_path: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """``(train, val)`` examples: validation from ``val_path`` if given, else a seeded split."""
    rows = read_jsonl(train_path)
    if val_path is not None:
        train_rows, val_rows = rows, read_jsonl(val_path)
    else:
        train_rows, val_rows = split_rows(rows, val_fraction, seed)
    train = encode_rows(train_rows, tokenizer, max_length)
    if not train:
        raise DataFormatError(f"{train_path}: no usable training example (all truncated away?)")
    return train, encode_rows(val_rows, tokenizer, max_length)


class Tokenized(Protocol):
    """What :func:`collate` reads: an :class:`Example` or a per-subject row."""

    input_ids: list[int]
    labels: list[int]


def collate(batch: Sequence[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``labels``, ``attention_mask``: [B, T]."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
