"""Per-request sampling parameters, validated on construction (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_PENALTY = 2.0  # presence / frequency penalties live in [-2, 2], as OpenAI's
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0  # as OpenAI: -100 bans a token, +100 all but forces it
GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# As in vLLM: a temperature below this is greedy (1 / T overflows fp32 long before 1e-38).
GREEDY_EPS = 1e-5


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A structured-output constraint: what the generated text must match.

    kind: "json_object" (any JSON object; value unused), "json_schema" (value: the schema as
        JSON text), "regex" (value: the pattern), "choice" (value: a JSON list of strings),
        "grammar" (value: an EBNF/GBNF grammar whose start rule is `root`).
    """

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar kind must be one of {GRAMMAR_KINDS}, got {self.kind!r}")
        if not isinstance(self.value, str):
            raise ValueError("a grammar's value is text (a schema, pattern, choice list or grammar)")


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
    presence_penalty, frequency_penalty: in [-2, 2]; subtract penalty x (token appeared in the
        output) and penalty x (its count in the output) from a token's logit (OpenAI's).
    repetition_penalty: in (0, 10]; 1 = off; a token seen in the prompt or output has its
        logit divided by it when positive, multiplied when negative (vLLM's, CTRL's).
    logit_bias: token id -> bias in [-100, 100], added to the logit before sampling.
    min_tokens: EOS and stop_token_ids are banned until this many tokens were generated.
    grammar: the generated text must match it (structured outputs); None = free text.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    grammar: GrammarSpec | None = None

    def __post_init__(self) -> None:
        self._check_sampling()
        self._check_processors()

    def _check_sampling(self) -> None:
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

    def _check_processors(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), "
                             f"got {self.repetition_penalty!r}")
        self.logit_bias = dict(self.logit_bias)
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token!r}")
            if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise ValueError("grammar must be a GrammarSpec or None")

    @property
    def penalized(self) -> bool:
        """Whether the sampler needs this request's token history (any penalty is on)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS
