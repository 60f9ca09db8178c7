"""One scheduler step's plan, as the engine and the model runner read it (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafold.server.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledChunk:
    """Compute KV for positions [start, start + num_tokens) of `seq` in this step.

    is_prefill: False only for a plain decode (the single last token, an output token).
    sample: the chunk reaches the end of the known tokens, so the model samples the next one.
    """

    seq: Sequence
    start: int
    num_tokens: int
    is_prefill: bool
    sample: bool

    def __post_init__(self) -> None:
        end = self.start + self.num_tokens
        if self.num_tokens < 1 or self.start != self.seq.num_computed_tokens or end > self.seq.num_tokens:
            raise ValueError(
                f"bad chunk for {self.seq!r}: start={self.start} num_tokens={self.num_tokens}; "
                "start must equal num_computed_tokens and the chunk must lie within the known tokens"
            )
        if self.sample != (end == self.seq.num_tokens):
            raise ValueError(
                f"chunk of {self.seq.request_id}: sample must be True exactly when it reaches the last token"
            )

    @classmethod
    def next_of(cls, seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        end = start + num_tokens
        decode = num_tokens == 1 and end == seq.num_tokens and start >= seq.num_prompt_tokens
        return cls(seq, start, num_tokens, is_prefill=not decode, sample=end == seq.num_tokens)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids(self.start, self.start + self.num_tokens)

    @property
    def positions(self) -> range:
        return range(self.start, self.start + self.num_tokens)


@dataclass(slots=True)
class AdapterLoad:
    """The engine must load adapter `name` into device slot `slot` before running the step."""

    name: str
    slot: int


@dataclass(slots=True)
class SampledToken:
    """A token `postprocess` appended to `seq`, and the text it adds to the stream: stop
    strings cut, held-back text flushed when the sequence finished (`seq.is_finished`)."""

    seq: Sequence
    token: int
    text: str = ""


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan. chunks: what the model computes (each sequence at most once).
    preempted: sent back to the waiting queue this step (KV freed; for metrics).
    finished: ended by the scheduler itself (finish_reason "error": can never fit the cache).
    adapter_frees: slots whose adapter left (evicted, released): drop their weights first.
    adapter_loads: adapters to load into their slots before running the chunks."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended by the scheduler (errors)
    adapter_frees: list[int] = field(default_factory=list)
    adapter_loads: list[AdapterLoad] = field(default_factory=list)

    def __post_init__(self) -> None:
        ids = [c.seq.request_id for c in self.chunks]
        if len(ids) != len(set(ids)):
            raise ValueError("a sequence appears twice in one step")

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)
