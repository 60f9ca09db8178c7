"""More adapters than the adapter memory budget holds: outputs equal the merged references.

A tiny random Llama whose adapter budget holds 24 rank rows (three rank-8 adapters, six
rank-4 ones), serving 8 adapters of ranks 4 and 8 (some only on q/v) with staggered
arrivals: adapters are evicted and reloaded (staged ahead by the prefetcher or inline), the
pools stay the budget's rows in place, and every request's greedy tokens equal transformers'
`generate` on the model with its adapter merged into the weights. With bfloat16 pools
(`lora_dtype`) the reference merges the factors as the pools hold them (A and the scaled B,
each rounded to bfloat16 once): the serving arithmetic stays float32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.engine import LLMEngine
from lorafold.server.engine.model_runner import adapter_row_bytes
from lorafold.server.engine.sampling_params import SamplingParams
from tests.conftest import build_tiny_llama, merged_model, random_adapter
from tests.engine.test_engine import ByteTokenizer, hf_greedy, run_to_completion

BUDGET_ROWS = 24


def assert_released(engine: LLMEngine) -> None:
    """Everything the finished requests held is back: KV blocks, adapter pins, weights, staged copies."""
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.adapter_table.num_pinned == 0
    assert not engine._adapters and engine.prefetcher.num_staged == 0


# both load paths: staged ahead on the prefetcher's worker then copied, and laid out inline
@pytest.mark.parametrize(("lora_dtype", "prefetch"), [("auto", "on"), ("bfloat16", "off")])
def test_more_adapters_than_fit_match_merged_references(cpu_path: str, lora_dtype: str, prefetch: str) -> None:
    hf = build_tiny_llama(seed=3)
    budget = adapter_row_bytes(hf, lora_dtype) * BUDGET_ROWS
    cfg = EngineConfig(block_size=4, num_kv_blocks=128, max_num_seqs=4, max_num_batched_tokens=32,
                       max_prefill_chunk=8, max_model_len=64, adapter_budget_bytes=budget, lora_dtype=lora_dtype,
                       adapter_prefetch=prefetch)
    engine = LLMEngine(copy.deepcopy(hf), ByteTokenizer(), cfg)
    assert engine.runner.adapter_budget_rows == BUDGET_ROWS and cfg.max_loras is None
    # the budget is sized from the model before the pools exist: it must price a row as they hold it
    assert engine.runner.model.slots.row_bytes == adapter_row_bytes(hf, lora_dtype)
    pool_dtype = torch.float32 if lora_dtype == "auto" else torch.bfloat16
    assert engine.runner.model.layers[0].qkv.a_pool.dtype == pool_dtype
    assert engine.runner.lora_backend == ("cpp" if cpu_path == "compiled" else "torch")
    specs = engine.runner.base_modules()
    ranks = [4, 8, 4, 8, 8, 4, 8, 4]
    adapters = [random_adapter(specs, r, seed=40 + i, std=0.15, targets=("q_proj", "v_proj") if i % 3 == 2 else None)
                for i, r in enumerate(ranks)]
    gen = torch.Generator().manual_seed(5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    arrivals: dict[int, list[tuple]] = {}
    expected = []
    for i in range(24):
        a = None if i % 9 == 4 else (i * 5) % 8  # scattered over the adapters, a few on the base
        prompt = torch.randint(0, 256, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist()
        arrivals.setdefault(2 * i, []).append(
            (f"r{i}", prompt, params, adapters[a] if a is not None else None, f"ad{a}" if a is not None else None))
        expected.append((f"r{i}", prompt, a))
    def pool_addresses() -> set[tuple[int, ...]]:
        return {(layer.a_pool.data_ptr(), layer.b_pool.data_ptr(), layer.a_pool.shape[1])
                for layer in engine.runner.model.slots.layers}

    pools = [pool_addresses()]
    steps = [0]

    def watch_pools(original=engine.step):  # where the pools are after every step
        outs = original()
        pools.append(pool_addresses())
        steps[0] += 1
        return outs

    engine.step = watch_pools
    got = run_to_completion(engine, arrivals)
    stats = engine.adapter_table.stats
    assert stats.evictions > 0 and stats.misses > len(adapters), "the test must reload evicted adapters"
    # the pools are the budget's rows from the start and never move (captured decode graphs
    # hold their addresses): loads, evictions and packing all happen inside them
    assert all(p == pools[0] for p in pools), "the adapter pools were reallocated"
    assert {rows for *_, rows in pools[0]} == {BUDGET_ROWS}
    if prefetch == "on":
        assert engine.prefetcher.stats.staged_ahead > 0, "no load found its adapter staged ahead"
    else:
        assert engine.prefetcher.stats.staged_ahead == 0 and engine.prefetcher.stats.unstaged == stats.misses
    assert engine.snapshot()["adapter_resident_bytes"] <= budget
    assert_released(engine)
    merged = {}
    for rid, prompt, a in expected:
        if a not in merged:
            merged[a] = hf if a is None else merged_model(hf, adapters[a], None if lora_dtype == "auto" else pool_dtype)
        assert got[rid] == hf_greedy(merged[a], prompt, 8, None), f"{rid} (adapter {a})"
    assert len({tuple(got[rid]) for rid, _, a in expected if a is not None}) > 4, "adapters must change outputs"


def test_an_adapter_larger_than_the_budget_is_refused_with_an_error() -> None:
    hf = build_tiny_llama(seed=3)
    cfg = EngineConfig(block_size=4, num_kv_blocks=32, max_num_seqs=4, max_num_batched_tokens=16,
                       max_prefill_chunk=8, max_model_len=64, adapter_budget_bytes=adapter_row_bytes(hf) * 8)
    engine = LLMEngine(copy.deepcopy(hf), ByteTokenizer(), cfg)
    big = random_adapter(engine.runner.base_modules(), 16, seed=1)
    engine.add_request("big", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4), big, "big")
    engine.add_request("base", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    failed = [o for o in outs if o.request_id == "big"]
    assert len(failed) == 1 and failed[0].finish_reason == "error" and "adapter-budget" in failed[0].error
    assert sum(len(o.token_ids) for o in outs if o.request_id == "base") == 4
    assert_released(engine)
