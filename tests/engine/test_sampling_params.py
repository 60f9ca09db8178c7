"""SamplingParams and EngineConfig validation: bad values are refused with a message naming the fix."""

from __future__ import annotations

import pytest

from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.sampling_params import SamplingParams


def test_defaults_and_normalisation() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.seed, p.max_tokens) == (1.0, -1, 1.0, None, 16)
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos and p.logprobs is None
    assert not p.greedy and SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=0).top_k == -1  # 0 and -1 both mean off
    q = SamplingParams(stop=("a", "b"), stop_token_ids=(3,), logprobs=20, seed=7, top_p=0.5, top_k=40)
    assert q.stop == ["a", "b"] and q.stop_token_ids == [3] and q.logprobs == 20


def test_defaults_are_not_shared() -> None:
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(seed=1.0), "seed"),
        (dict(seed=True), "seed"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(stop="###"), r"stop=\['###'\]"),
        (dict(stop=[""]), "non-empty"),
        (dict(stop=[3]), "non-empty str"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(ignore_eos=1), "ignore_eos"),
        (dict(logprobs=21), "logprobs"),
        (dict(logprobs=-1), "logprobs"),
    ],
)
def test_invalid_sampling_params(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_engine_config_defaults_are_valid() -> None:
    c = EngineConfig()
    assert c.block_size == 16 and c.max_num_seqs == 32 and c.max_queue == 256 and c.kv_capacity_tokens == 16 * c.num_kv_blocks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), "block_size"),
        (dict(num_kv_blocks=0), "num_kv_blocks"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_batched_tokens=32, max_num_seqs=64, max_prefill_chunk=16), "every running decode"),
        (dict(max_prefill_chunk=1024), "lower max_prefill_chunk"),
        (dict(max_model_len=1), "max_model_len"),
        (dict(max_loras=0), "max_loras"),
        (dict(max_queue=0), "max_queue"),
        (dict(max_overtakes=-1), "max_overtakes"),
        (dict(block_size=16.0), "must be an int"),
        (dict(max_loras=True), "must be an int"),
        (dict(prepack_weights="yes"), "prepack_weights"),
    ],
)
def test_invalid_engine_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)
