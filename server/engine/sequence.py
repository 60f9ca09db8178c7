"""One request's state as the scheduler sees it: tokens, progress, KV blocks (torch-free)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from lorafold.server.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Life cycle: WAITING -> RUNNING -> FINISHED_*; RUNNING -> PREEMPTED (back in the waiting
    queue, KV freed, to be recomputed) -> RUNNING; any unfinished state -> FINISHED_ABORTED."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style finish reason of a finished status ("stop", "length", "abort")."""
        return _FINISH_REASON.get(self)


_FINISHED = frozenset(
    {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED}
)
_FINISH_REASON = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True, eq=False)
class Sequence:
    """A request in the engine. Identity (not value) equality: two requests are never equal.

    Token layout: all_token_ids = prompt_token_ids + output_token_ids. The KV of the first
    `num_computed_tokens` of them is in the cache, in the blocks of `block_table` (position p
    lives in block block_table[p // block_size] at offset p % block_size).

    adapter: adapter name (or content hash) from the request, None = base model.
    lora_slot: device adapter slot assigned by the scheduler while RUNNING; -1 = base / none.
    finish_reason: "stop" | "length" | "abort" | "error" once finished.
    stop_reason: the stop token id or stop string that ended it, if any.
    error: a readable message when finish_reason == "error".
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    lora_slot: int = -1
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    num_preemptions: int = 0
    num_overtaken: int = 0  # times a later request was admitted while this one was held back

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty str, got {self.request_id!r}")
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: the prompt is empty; send at least one token")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.prompt_token_ids):
            raise ValueError(f"request {self.request_id}: prompt_token_ids must be ints >= 0")
        if not isinstance(self.sampling_params, SamplingParams):
            raise ValueError(f"request {self.request_id}: sampling_params must be a SamplingParams")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise ValueError(f"request {self.request_id}: adapter must be a non-empty str or None (base)")
        if self.lora_slot < -1:
            raise ValueError(f"request {self.request_id}: lora_slot must be >= -1 (-1 = base)")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """A new list (prompt + outputs); prefer `token_ids(start, end)` on hot paths."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def num_uncomputed(self) -> int:
        """Known tokens whose KV is not in the cache yet (1 for a decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) of prompt + outputs, without building the whole list."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, status={self.status.name}, adapter={self.adapter!r}, "
            f"prompt={self.num_prompt_tokens}, out={self.num_output_tokens}, computed={self.num_computed_tokens}, "
            f"blocks={len(self.block_table)})"
        )
