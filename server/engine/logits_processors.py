"""Per-request changes to one step's logits, batched on their device, before sampling.

Semantics, per row i (in this order; rows that ask for none of them are not touched):
    logits[i, t] += logit_bias[t]                                       (OpenAI's logit_bias)
    repetition:  seen = t in prompt_i or output_i
                 logits[i, t] = logits / p if logits > 0 else logits * p      (when seen)
    logits[i, t] -= frequency_penalty * count(t in output_i)
                  + presence_penalty * (count(t in output_i) > 0)
    logits[i, t] = -inf for t in suppress_i           (EOS / stop ids before min_tokens)
    logits[i, t] = -inf where the grammar bitmask bit t of row i is 0 (structured outputs)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorafold.kernels.transfer import host_to_device
from lorafold.server.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingContext:
    """What the processors need besides the parameters, one entry per logits row."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    output_ids: list[list[int]] = field(default_factory=list)
    suppress: list[list[int]] = field(default_factory=list)  # tokens banned this step
    grammar_mask: torch.Tensor | None = None  # int32 [n, ceil(vocab / 32)] on the host, all bits set = free
    grammar_rows: list[int] = field(default_factory=list)  # the rows the mask constrains


def apply_processors(logits: torch.Tensor, params: list[SamplingParams], ctx: SamplingContext) -> torch.Tensor:
    """Return `logits` [n, vocab] (float32) with every row's processors applied (in place)."""
    _logit_bias(logits, params)
    _penalties(logits, params, ctx)
    _suppress(logits, ctx.suppress)
    if ctx.grammar_mask is not None and ctx.grammar_rows:
        _grammar(logits, ctx.grammar_mask, ctx.grammar_rows)
    return logits


def _logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    vocab = logits.shape[1]
    rows, cols, vals = [], [], []
    for i, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            if token < vocab:
                rows.append(i)
                cols.append(token)
                vals.append(bias)
    if rows:
        index = host_to_device(torch.tensor([rows, cols]), logits.device)
        logits.index_put_((index[0], index[1]), host_to_device(torch.tensor(vals, dtype=logits.dtype), logits.device),
                          accumulate=True)


def _counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[m, vocab] float counts of each token per list (ids >= vocab are ignored)."""
    width = max((len(t) for t in token_lists), default=0)
    if width == 0:
        return torch.zeros(len(token_lists), vocab, device=device)
    # `vocab` = a spare column, for padding and for ids past the vocabulary
    padded = torch.tensor([[*tokens, *[vocab] * (width - len(tokens))] for tokens in token_lists]).clamp_(max=vocab)
    padded = host_to_device(padded, device)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def _penalties(logits: torch.Tensor, params: list[SamplingParams], ctx: SamplingContext) -> None:
    rows = [i for i, p in enumerate(params) if p.penalized]
    if not rows:
        return
    vocab, device = logits.shape[1], logits.device
    index = host_to_device(torch.tensor(rows), device)
    sub = logits.index_select(0, index)
    out_counts = _counts([ctx.output_ids[i] for i in rows], vocab, device)
    # [3, m]: repetition, frequency and presence penalty of each row, one copy
    rep, freq, pres = host_to_device(torch.tensor([[params[i].repetition_penalty for i in rows],
                                                   [params[i].frequency_penalty for i in rows],
                                                   [params[i].presence_penalty for i in rows]]), device)[:, :, None]
    if any(params[i].repetition_penalty != 1 for i in rows):  # decided on the host: no read-back
        seen = (out_counts + _counts([ctx.prompt_ids[i] for i in rows], vocab, device)) > 0
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)
    logits.index_copy_(0, index, sub)


def _suppress(logits: torch.Tensor, suppress: list[list[int]]) -> None:
    vocab = logits.shape[1]
    rows = [i for i, tokens in enumerate(suppress) for t in tokens if t < vocab]
    cols = [t for tokens in suppress for t in tokens if t < vocab]
    if rows:
        index = host_to_device(torch.tensor([rows, cols]), logits.device)
        logits.index_put_((index[0], index[1]), logits.new_full((len(rows),), float("-inf")))


def _grammar(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Mask the constrained rows with their grammar bitmask (unpacked on the device)."""
    vocab, device = logits.shape[1], logits.device
    index = host_to_device(torch.tensor(rows), device)
    words = host_to_device(bitmask.index_select(0, torch.tensor(rows)), device)  # [m, W] int32
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).reshape(len(rows), -1)[:, :vocab].bool()
    sub = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, index, sub)
