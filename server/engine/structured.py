"""Structured outputs through xgrammar: compile a request's grammar once, then per step a
bitmask of the tokens that keep its output valid.

xgrammar was chosen over llguidance by measurement on this tokenizer
(benchmarks/bench_grammar_mask.py): a smaller per-token mask cost and a faster schema
compile; it is also vLLM's default structured-output engine.

Compiled grammars are cached by their spec (a server sees the same schema many times); a
request holds one `GrammarState` (xgrammar's matcher) for its whole life.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch
import xgrammar as xgr

from lorafold.server.engine.sampling_params import GrammarSpec

CACHE_SIZE = 256


class GrammarError(ValueError):
    """A grammar that cannot be compiled; the message says why (the request gets a 400)."""


class GrammarCompiler:
    """Thread-safe: the API compiles on worker threads (to refuse bad grammars with a 400
    before queueing), the engine thread looks the same specs up again (cache hits)."""

    def __init__(self, tokenizer: object, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(self._info)
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = self._compile(spec)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        try:
            if spec.kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "json_schema":
                # no free whitespace: a small model can otherwise pad a document forever
                return self._compiler.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return self._compiler.compile_grammar(_choice_grammar(spec.value))
            return self._compiler.compile_grammar(spec.value)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports bad input as these
            raise GrammarError(f"the {spec.kind} constraint cannot be compiled: {exc}") from exc

    def state(self, spec: GrammarSpec) -> GrammarState:
        return GrammarState(xgr.GrammarMatcher(self.compile(spec)))


def _choice_grammar(choices_json: str) -> str:
    choices = json.loads(choices_json)
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("a choice constraint needs a non-empty list of non-empty strings")
    # EBNF string literals take JSON-style escapes, so json.dumps gives a valid literal
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self._matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed tokens of the next step into row `row` of an int32 host bitmask
        (bit t of word t // 32 set = token t allowed)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar refuses it (it was masked out,
        so this means a bug, and the request ends with an error)."""
        return bool(self._matcher.accept_token(token))

    @property
    def finished(self) -> bool:
        """The grammar accepted a stop token: the output is complete."""
        return bool(self._matcher.is_terminated())


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 host bitmask for `rows` rows, every token allowed."""
    return xgr.allocate_token_bitmask(rows, vocab_size)
