"""The per-forward LoRA batch metadata, handed to every LoRA layer through a context manager.

A transformers model's forward cannot carry extra arguments down to its linear layers, so
the metadata travels in a context variable that `lora_batch` sets for exactly one forward
and resets even when the forward raises (never a bare module global).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from lorafold.kernels.meta import LoRABatchMeta

_CURRENT: contextvars.ContextVar[LoRABatchMeta | None] = contextvars.ContextVar("lorafold_lora_meta", default=None)


@contextlib.contextmanager
def lora_batch(meta: LoRABatchMeta | None) -> Iterator[LoRABatchMeta | None]:
    token = _CURRENT.set(meta)
    try:
        yield meta
    finally:
        _CURRENT.reset(token)


def current_meta() -> LoRABatchMeta | None:
    return _CURRENT.get()
