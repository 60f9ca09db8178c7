"""Per-request sampling parameters, validated on construction (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
# As in vLLM: a temperature below this is greedy (1 / T overflows fp32 long before 1e-38).
GREEDY_EPS = 1e-5


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(slots=True, kw_only=True)
class SamplingParams:
    """How to pick each next token, and when to stop.

    temperature: finite, >= 0; below GREEDY_EPS (0 included) means greedy (argmax; top_k /
        top_p / seed are then irrelevant).
    top_k: keep the k most likely tokens; -1 or 0 = off (0 is normalised to -1).
    top_p: nucleus mass in (0, 1]; 1 = off.
    seed: per-request generator seed, so a request is reproducible whatever it is batched
        with; None = the engine's shared generator.
    max_tokens: most tokens to generate (>= 1).
    stop: strings that end the generation; the text is cut before the stop string. They may
        span tokens (handled by the detokenizer, not the scheduler).
    stop_token_ids: token ids that end the generation (the token itself is kept in
        output_token_ids; the detokenizer decides whether it shows in the text).
    ignore_eos: keep generating past the tokenizer's EOS token.
    logprobs: return the log-probabilities of this many most likely tokens per step (0 = only
        the sampled token's), None = none.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= 1, or -1 / 0 to disable it, got {self.top_k!r}")
        if self.top_k == 0:
            self.top_k = -1
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            raise ValueError(f"stop must be a list of strings; wrap the single stop string: stop=[{self.stop!r}]")
        self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"every stop string must be a non-empty str, got {s!r}; drop empty entries")
        self.stop_token_ids = list(self.stop_token_ids)
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must hold token ids (ints >= 0), got {t!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS
