"""Per-request sampling state the engine keeps across steps (seeded generator, grammar
position), and the step's `SamplingContext` built from the sequences that sample."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from lorafold.server.engine.logits_processors import SamplingContext
from lorafold.server.engine.sequence import Sequence
from lorafold.server.engine.structured import GrammarCompiler, GrammarState, allocate_bitmask


@dataclass(slots=True)
class RequestSampling:
    generator: torch.Generator | None = None  # on the model's device; None = the default one
    grammar: GrammarState | None = None

    @classmethod
    def for_request(cls, seq: Sequence, device: torch.device, grammars: GrammarCompiler | None) -> RequestSampling:
        params = seq.sampling_params
        generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        grammar = grammars.state(params.grammar) if params.grammar is not None and grammars is not None else None
        return cls(generator, grammar)


def build_context(
    seqs: Seq[Sequence], states: Seq[RequestSampling], eos_ids: Seq[int], vocab_size: int
) -> SamplingContext | None:
    """The processors' inputs for these sampling rows, or None when no row uses any."""
    suppress = [_suppressed(seq, eos_ids) for seq in seqs]
    grammar_rows = [i for i, st in enumerate(states) if st.grammar is not None]
    history = any(seq.sampling_params.penalized for seq in seqs)
    if not (history or grammar_rows or any(suppress) or any(seq.sampling_params.logit_bias for seq in seqs)):
        return None
    ctx = SamplingContext(suppress=suppress, grammar_rows=grammar_rows)
    if history:  # the token history is only copied for rows that are penalised
        ctx.prompt_ids = [seq.prompt_token_ids if seq.sampling_params.penalized else [] for seq in seqs]
        ctx.output_ids = [seq.output_token_ids if seq.sampling_params.penalized else [] for seq in seqs]
    if grammar_rows:
        ctx.grammar_mask = allocate_bitmask(len(seqs), vocab_size)
        for i in grammar_rows:
            states[i].grammar.fill(ctx.grammar_mask, i)
    return ctx


def _suppressed(seq: Sequence, eos_ids: Seq[int]) -> list[int]:
    params = seq.sampling_params
    if seq.num_output_tokens >= params.min_tokens:
        return []
    return [*eos_ids, *params.stop_token_ids]
