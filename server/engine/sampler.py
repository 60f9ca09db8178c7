"""Token sampling for one step: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafold.server.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens and their logprobs


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and the top-p nucleus of a 1-D logits row."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Pick one token per row of `logits` [n, vocab] (fp32 math).

    Greedy rows are resolved together with one argmax; sampled rows each draw from their own
    generator (per-request seed: the same request gives the same tokens whatever its batch).
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()  # host sync: token ids go back to the scheduler
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    logprobs: list[TokenLogprobs | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        lp = torch.log_softmax(logits[wanted], dim=-1)
        for j, i in enumerate(wanted):
            k = params[i].logprobs
            top = torch.topk(lp[j], k) if k else None
            logprobs[i] = TokenLogprobs(
                token_id=tokens[i],
                logprob=float(lp[j, tokens[i]]),
                top=tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else (),
            )
    return tokens, logprobs
