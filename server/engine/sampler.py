"""Token sampling for one step, batched on the logits' device: greedy, temperature, top-k,
top-p, per-request seeds, logprobs; rows whose logits are not finite fail alone.

Semantics, per row i of logits [n, vocab] (fp32 math):
    error[i]  = logits[i] has a NaN or +inf, or is all -inf   (the request fails, not the batch)
    logits[i] = the row's processors applied (logits_processors.py: bias, penalties,
                min_tokens, grammar mask); all -inf afterwards is an error too
    greedy    : token[i] = argmax(logits[i])    when temperature < GREEDY_EPS (params.greedy)
    sampled   : z = (logits[i] - max) / T; keep the top-k of z, then the smallest prefix of
                the sorted softmax(z) whose mass reaches top_p (the first token always stays);
                token[i] ~ softmax(z) over what was kept, drawn by inverse CDF with one
                uniform number from the request's own generator (or the engine's for unseeded
                rows), so a seeded request gives the same tokens whatever it is batched with.
Subtracting the row maximum before dividing by T keeps every value <= 0: a tiny temperature
sends the rest to -inf (probability 0), never to NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafold.kernels.transfer import host_to_device
from lorafold.server.engine.logits_processors import SamplingContext, apply_processors
from lorafold.server.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens and their logprobs


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    errors: list[str | None]  # a message where the row's logits were not finite; its token is meaningless


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    context: SamplingContext | None = None,
) -> SamplerOutput:
    """Pick one token per row of `logits` [n, vocab]; `generators[i]` seeds row i (None: the
    default generator of the logits' device). `context` feeds the logits processors
    (penalties, logit_bias, min_tokens, grammar masks); None = no processors."""
    logits = logits.float()
    # amax propagates NaN: one reduction finds NaN, +inf and all -inf rows alike
    bad = ~torch.isfinite(logits.amax(dim=-1))
    safe = logits.masked_fill(bad[:, None], 0.0)  # keeps the batched math finite for the good rows
    code = bad.to(torch.int64)  # 0 fine, 1 non-finite logits, 2 nothing left to sample
    if context is not None:
        safe = apply_processors(safe, params, context)
        blocked = torch.isneginf(safe).all(-1) & ~bad  # e.g. a grammar with no way forward
        code = code + 2 * blocked.to(torch.int64)
        safe = safe.masked_fill(blocked[:, None], 0.0)
    tokens = safe.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        index = host_to_device(torch.tensor(rows), logits.device)
        probs = _filtered_probs(safe.index_select(0, index), [params[i] for i in rows])
        uniform = _uniform([generators[i] for i in rows], logits.device)
        tokens = tokens.index_copy(0, index, _inverse_cdf(probs, uniform))
    # The step's one host sync: the token ids, the error flags and any logprobs go back to the
    # scheduler in one transfer, as float64 (exact for token ids and for float32 logprobs).
    n = len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    k = max((params[i].logprobs for i in wanted), default=0)
    parts = [tokens, code]
    if wanted:
        parts += _logprobs_on_device(safe, tokens, wanted, k)
    packed = torch.cat([t.flatten().double() for t in parts]).tolist()
    token_ids, flags = [int(v) for v in packed[:n]], [int(v) for v in packed[n : 2 * n]]
    errors = [_ERRORS[flag] for flag in flags]
    return SamplerOutput(token_ids, _logprobs(packed[2 * n :], params, token_ids, errors, wanted, k), errors)


_NON_FINITE = (
    "the model produced non-finite logits (NaN or Inf) for this request; if it uses an adapter, its "
    "weights or lora_alpha overflow: check them and re-register it"
)
_BLOCKED = ("no token is allowed at this point: the request's constraints (grammar, logit_bias, min_tokens) "
            "exclude the whole vocabulary")
_ERRORS = (None, _NON_FINITE, _BLOCKED)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """softmax((logits - max) / T) restricted to each row's top-k and top-p set, [m, vocab]."""
    m, vocab = logits.shape
    device = logits.device
    # each a copy from page-locked memory that the host does not wait for (`host_to_device`)
    temps = host_to_device(torch.tensor([p.temperature for p in params]), device)
    z = (logits - logits.max(dim=-1, keepdim=True).values) / temps[:, None]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if any(k < vocab for k in ks) or any(p.top_p < 1.0 for p in params):
        top_k = host_to_device(torch.tensor(ks), device)
        top_p = host_to_device(torch.tensor([p.top_p for p in params]), device)
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        ranks = torch.arange(vocab, device=device).expand(m, vocab)
        sorted_z = sorted_z.masked_fill(ranks >= top_k[:, None], float("-inf"))
        sorted_p = torch.softmax(sorted_z, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p[:, None]
        drop[:, 0].fill_(False)
        sorted_z = sorted_z.masked_fill(drop, float("-inf"))
        z = torch.empty_like(z).scatter_(1, order, sorted_z)
    return torch.softmax(z, dim=-1)


def _uniform(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) draw per row: row i from generators[i]; unseeded rows share one draw of the
    device's default generator. (A seeded request's draws depend on nothing but its seed.)"""
    u = torch.empty(len(generators), device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        u.index_copy_(0, host_to_device(torch.tensor(unseeded), device), torch.rand(len(unseeded), device=device))
    for i, g in enumerate(generators):
        if g is not None:
            u[i : i + 1] = torch.rand(1, device=device, generator=g)
    return u


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Row i's token: the first t with cumsum(probs[i])[t] > u[i] * sum(probs[i]).

    Tokens of probability 0 never qualify (the cumsum does not grow there). The 1 - 1e-6
    keeps the target strictly below the total whatever fp32 rounding does; the bias it adds
    is below one part in a million. One cumsum and a binary search per row: cheaper than
    drawing a random number per vocabulary entry (Gumbel / exponential race) or multinomial.
    """
    cdf = probs.cumsum(dim=-1)
    target = (uniform * (1.0 - 1e-6))[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _logprobs_on_device(logits: torch.Tensor, tokens: torch.Tensor, wanted: list[int], k: int) -> list[torch.Tensor]:
    """For rows `wanted`: the chosen token's logprob [m] and the k best (values [m, k], ids
    [m, k]), left on the device for the step's one transfer."""
    index = host_to_device(torch.tensor(wanted), logits.device)
    lp = torch.log_softmax(logits.index_select(0, index), dim=-1)
    chosen = lp.gather(1, tokens.index_select(0, index)[:, None]).squeeze(1)
    top = torch.topk(lp, k, dim=-1)
    return [chosen, top.values, top.indices]


def _logprobs(
    values: list[float], params: list[SamplingParams], tokens: list[int], errors: list[str | None], wanted: list[int],
    k: int,
) -> list[TokenLogprobs | None]:
    """Each wanted row's TokenLogprobs from `values` (chosen [m], then top values [m, k] and
    ids [m, k], flattened; see `_logprobs_on_device`); None for the others and failed rows."""
    out: list[TokenLogprobs | None] = [None] * len(params)
    m = len(wanted)
    chosen, top_values, top_ids = values[:m], values[m : m + m * k], values[m + m * k :]
    for j, i in enumerate(wanted):
        if errors[i] is not None:
            continue
        n = params[i].logprobs
        top = tuple((int(top_ids[j * k + t]), top_values[j * k + t]) for t in range(n))
        out[i] = TokenLogprobs(token_id=tokens[i], logprob=chosen[j], top=top)
    return out
