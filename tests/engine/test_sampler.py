"""The batched sampler against a plain per-row reference: distributions, safety, containment."""

from __future__ import annotations

import math

import pytest
import torch

from lorafold.server.engine.sampler import sample
from lorafold.server.engine.sampling_params import SamplingParams


def _reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The textbook definition, one row, float64: temperature, then top-k, then top-p."""
    z = logits.double() / p.temperature
    if 0 < p.top_k < z.numel():
        kth = torch.topk(z, p.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_p, 0) - sorted_p) < p.top_p
        keep[0] = True
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, 0.0)
        probs = probs / probs.sum()
    return probs


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.5, top_k=8, top_p=0.6),
    ],
    ids=["plain", "top_k", "top_p", "both"],
)
def test_sampled_frequencies_match_the_reference_distribution(params):
    vocab, draws = 12, 6000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 2
    ref = _reference_probs(logits, params)
    gen = torch.Generator().manual_seed(11)
    # many rows at once, all of one request's distribution: the batched path under test
    out = sample(logits.expand(draws, vocab).clone(), [params] * draws, [gen] * draws)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=vocab).double()
    assert counts[ref == 0].sum() == 0, "a token outside the top-k / top-p set was drawn"
    freq = counts / draws
    # 5 standard deviations of a binomial proportion per token
    tol = 5 * torch.sqrt(ref * (1 - ref) / draws) + 1e-3
    assert bool(((freq - ref).abs() <= tol).all()), (freq, ref)


def test_greedy_rows_take_the_argmax_and_tiny_temperatures_are_greedy():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=t) for t in (0.0, 1e-38, 1e-45, 5e-324, 9e-6)]
    out = sample(logits, params, [None] * 5)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.errors == [None] * 5


@pytest.mark.parametrize("top_p", [1e-45, 1e-30, 1e-8])
def test_vanishing_top_p_keeps_the_most_likely_token(top_p):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    out = sample(logits, [SamplingParams(temperature=1.0, top_p=top_p)] * 3, [None] * 3)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_small_temperatures_with_huge_logits_stay_finite():
    logits = torch.full((2, 30), -3e38)
    logits[0, 7] = 3e38
    logits[1, 4] = 1e30
    out = sample(logits, [SamplingParams(temperature=1e-4)] * 2, [None] * 2)
    assert out.token_ids == [7, 4] and out.errors == [None, None]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_non_finite_row_fails_alone(poison):
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    logits[1, 5] = poison
    logits[3] = float("-inf")  # nothing left to sample
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, logprobs=2),
              SamplingParams(temperature=0.8, logprobs=3), SamplingParams(temperature=0.0)]
    out = sample(logits, params, [None] * 4)
    assert out.errors[0] is None and out.errors[2] is None
    assert "non-finite logits" in out.errors[1] and "non-finite logits" in out.errors[3]
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.logprobs[1] is None and out.logprobs[2] is not None


def test_seeded_rows_do_not_depend_on_their_batch():
    vocab = 64
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(4))
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=7)

    def run(rows: list[int], seeded_row: int) -> int:
        gens = [None] * len(rows)
        gens[seeded_row] = torch.Generator().manual_seed(7)
        return sample(logits[rows], [p] * len(rows), gens).token_ids[seeded_row]

    alone = [run([2], 0) for _ in range(3)]
    batched = [run([0, 1, 2, 5], 2), run([2, 4], 0), run([3, 2], 1)]
    assert len(set(alone + batched)) == 1


def test_logprobs_match_log_softmax():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0.0, logprobs=0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=4)]
    out = sample(logits, params, [None] * 3)
    lp = torch.log_softmax(logits.double(), -1)
    assert out.logprobs[1] is None
    for i in (0, 2):
        entry = out.logprobs[i]
        assert entry.token_id == out.token_ids[i]
        assert math.isclose(entry.logprob, float(lp[i, entry.token_id]), abs_tol=1e-5)
    assert out.logprobs[0].top == ()
    top = out.logprobs[2].top
    assert [t for t, _ in top] == torch.topk(lp[2], 4).indices.tolist()
