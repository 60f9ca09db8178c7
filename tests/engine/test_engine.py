"""The engine end to end: continuous batching of heterogeneous-adapter requests."""

from __future__ import annotations

import asyncio
import gc
import os

import pytest
import torch

from lorafold.server.engine.async_engine import AsyncEngine
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.engine import LLMEngine
from lorafold.server.engine.sampling_params import SamplingParams
from lorafold.server.models.chat import chat_prompt_ids
from tests.conftest import build_tiny_llama, merged_model, random_adapter


class ByteTokenizer:
    """Enough of a tokenizer for the tiny model: token i <-> chr(97 + i % 26)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(97 + i % 26) for i in ids)


def run_to_completion(engine: LLMEngine, arrivals: dict[int, list[tuple]]) -> dict[str, list[int]]:
    """arrivals: step -> [(request_id, prompt, params, adapter, name)]; returns tokens per request.
    Sets engine.total_preempted."""
    tokens: dict[str, list[int]] = {}
    step = 0
    engine.total_preempted = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for rid, prompt, params, adapter, name in arrivals.get(step, []):
            engine.add_request(rid, prompt, params, adapter, name)
            tokens[rid] = []
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        engine.total_preempted += engine.last_step.num_preempted
        step += 1
        assert step < 5000
    return tokens


def hf_greedy(model, prompt: list[int], max_tokens: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos or 0)
    return out[0, len(prompt):].tolist()


def assert_all_free(engine: LLMEngine) -> None:
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.adapter_table.num_pinned == 0
    assert not engine._adapters and not engine.scheduler._detok and not engine._sampling


@pytest.mark.slow
def test_16_requests_8_adapters_match_transformers_generate(smollm2, cpu_path):
    """16 staggered requests over 8 adapters (ranks 4-64) and the base, 4 adapter slots (so
    adapters are evicted and reloaded): token-for-token equal to HF generate on the merged model."""
    import copy

    base, tok = smollm2.model, smollm2.tokenizer
    cfg = EngineConfig(block_size=16, num_kv_blocks=256, max_num_seqs=16, max_num_batched_tokens=96,
                       max_prefill_chunk=32, max_model_len=512, max_loras=4)
    engine = LLMEngine(copy.deepcopy(base), tok, cfg)
    specs = engine.runner.base_modules()
    ranks = [4, 8, 16, 32, 64, 4, 8, 16]
    adapters = [random_adapter(specs, r, seed=10 + i, std=0.03) for i, r in enumerate(ranks)]
    questions = ["What is the capital of France?", "Name a color.", "Write a haiku about rain.", "What is 2+2?",
                 "Tell me a fact about cats.", "Say hello in Spanish.", "What is Python?", "Give me a fruit."]
    arrivals: dict[int, list[tuple]] = {}
    expected_setup = []
    for i in range(16):
        msgs = [{"role": "user", "content": questions[i % 8]}]
        prompt = chat_prompt_ids(tok, msgs)
        a = None if i % 9 == 8 else i % 8  # requests 8 (and the base share) use the base model
        params = SamplingParams(temperature=0, max_tokens=10)
        arrivals.setdefault(i // 2 * 3, []).append(
            (f"r{i}", prompt, params, adapters[a] if a is not None else None, f"ad{a}" if a is not None else None))
        expected_setup.append((f"r{i}", prompt, a))
    got = run_to_completion(engine, arrivals)
    assert engine.adapter_table.stats.evictions > 0, "the test must exercise eviction"
    assert_all_free(engine)
    merged = {}
    for rid, prompt, a in expected_setup:
        if a not in merged:
            merged[a] = base if a is None else merged_model(base, adapters[a])
        want = hf_greedy(merged[a], prompt, 10, tok.eos_token_id)
        assert got[rid] == want, f"{rid} (adapter {a}): {got[rid]} != {want}"
    assert len({tuple(got[f'r{i}']) for i in range(8)}) > 4, "adapters must change outputs"


def tiny_engine(**cfg_overrides) -> tuple[LLMEngine, torch.nn.Module]:
    hf = build_tiny_llama(seed=7)
    cfg = dict(block_size=4, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=32, max_prefill_chunk=8,
               max_model_len=64, max_loras=2)
    cfg.update(cfg_overrides)
    import copy

    return LLMEngine(copy.deepcopy(hf), ByteTokenizer(), EngineConfig(**cfg)), hf


def test_preemption_recomputes_and_matches_unconstrained():
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in (9, 14, 5, 11, 7, 12)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    def run(blocks: int):
        engine, hf = tiny_engine(num_kv_blocks=blocks, max_num_batched_tokens=64)
        specs = engine.runner.base_modules()
        ads = [random_adapter(specs, 8, 1, std=0.1), random_adapter(specs, 16, 2, std=0.1)]
        arrivals = {0: [(f"p{i}", p, params, ads[i % 2] if i % 3 else None, f"a{i % 2}") for i, p in enumerate(prompts)]}
        tokens = run_to_completion(engine, arrivals)
        return tokens, engine

    free_run, _ = run(256)
    tight, engine = run(14)  # 56 token slots for 6 sequences of up to 34 tokens: must preempt
    assert engine.total_preempted > 0, "the tight cache must force preemption"
    assert tight == free_run
    assert_all_free(engine)


def test_abort_mid_generation_frees_everything():
    engine, _ = tiny_engine()
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                       random_adapter(engine.runner.base_modules(), 4, 3), "x")
    engine.add_request("b", [6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.abort("a")
    while engine.has_unfinished():
        engine.step()
    assert_all_free(engine)
    assert not engine.abort("a")


def test_max_tokens_one_and_too_long_prompt():
    engine, hf = tiny_engine()
    got = run_to_completion(engine, {0: [("one", [3, 1, 4], SamplingParams(temperature=0, max_tokens=1), None, None)]})
    assert got["one"] == hf_greedy(hf, [3, 1, 4], 1, None)
    with pytest.raises(ValueError, match="context limit"):
        engine.add_request("long", list(range(64)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="vocab"):
        engine.add_request("bad", [10_000], SamplingParams(max_tokens=1))


def test_stop_string_spanning_tokens():
    engine, _ = tiny_engine()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = [5, 9, 2, 7]
    engine.add_request("free", prompt, params)
    text = ""
    while engine.has_unfinished():
        text += "".join(o.text for o in engine.step())
    assert len(text) == 12
    stop = text[4:7]  # three characters = three tokens of the byte tokenizer
    engine.add_request("stopped", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert "".join(o.text for o in outs) == text[: text.index(stop)]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert_all_free(engine)


def test_seeded_sampling_is_reproducible_across_batches():
    def run(extra: int) -> list[int]:
        engine, _ = tiny_engine()
        arr = {0: [("s", [1, 2, 3], SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=123, max_tokens=15, ignore_eos=True), None, None)]}
        arr[0] += [(f"o{i}", [i + 4, 5], SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True), None, None) for i in range(extra)]
        return run_to_completion(engine, arr)["s"]

    assert run(0) == run(3)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:  # resident pages is the second field
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_many_sequential_requests_leak_nothing():
    """1,000 requests one after another (3 adapters rotating through 2 slots, and the base):
    KV blocks, slots and engine state return to empty, and neither the process's resident
    memory nor the live Python objects grow over the last 800 (after a 200-request warm-up
    that fills allocator pools and caches)."""
    engine, _ = tiny_engine(max_loras=2)
    specs = engine.runner.base_modules()
    ads = [random_adapter(specs, 4, s) for s in range(3)]
    free0 = engine.block_manager.num_free_blocks
    for i in range(1000):
        if i == 200:
            gc.collect()
            rss0, objects0 = _rss_bytes(), len(gc.get_objects())
        a = i % 4
        engine.add_request(f"q{i}", [i % 200 + 1, 2, 3], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                           ads[a] if a < 3 else None, f"a{a}")
        while engine.has_unfinished():
            engine.step()
    assert engine.block_manager.num_free_blocks == free0
    assert_all_free(engine)
    gc.collect()
    # a leak of one small object per request would add >= 800 objects; 8 MiB is ~10 KiB per request
    assert len(gc.get_objects()) - objects0 < 400
    assert _rss_bytes() - rss0 < 8 << 20


def test_a_dropped_engine_is_freed_at_once():
    """An engine that served adapter requests holds no reference cycle: its last reference
    gone, it (with its KV cache and adapter pools) is freed at once, not whenever the
    cyclic GC next runs — engines built one after another must not pile up."""
    import weakref

    engine, _ = tiny_engine()
    ad = random_adapter(engine.runner.base_modules(), 4, 3)
    run_to_completion(engine, {0: [("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4), ad, "x"),
                                   ("b", [4, 5], SamplingParams(temperature=0, max_tokens=4), None, None)]})
    refs = [weakref.ref(engine), weakref.ref(engine.runner), weakref.ref(engine.scheduler)]
    gc.disable()
    try:
        del engine
        assert [r() is None for r in refs] == [True, True, True]
    finally:
        gc.enable()


def test_async_stream_and_cancel_frees_blocks():
    engine, _ = tiny_engine()
    front = AsyncEngine(engine)
    front.start()

    async def main():
        texts = []
        async for out in front.generate("x", [1, 2, 3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)):
            texts.append(out)
        assert texts[-1].finished and sum(len(o.token_ids) for o in texts) == 5
        agen = front.generate("y", [4, 5], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        await agen.__anext__()
        await agen.aclose()  # the client went away
        for _ in range(100):
            free = await front.call(lambda e: e.block_manager.num_free_blocks)
            if free == engine.block_manager.num_blocks:
                break
            await asyncio.sleep(0.01)
        assert free == engine.block_manager.num_blocks
        with pytest.raises(ValueError, match="context limit"):
            async for _ in front.generate("z", list(range(70)), SamplingParams(max_tokens=1)):
                pass

    try:
        asyncio.run(main())
    finally:
        front.shutdown()


def test_queue_time_reported_once_on_the_first_output():
    engine, _ = tiny_engine()
    engine.add_request("q", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[0].queue_seconds is not None and outs[0].queue_seconds >= 0
    assert all(o.queue_seconds is None for o in outs[1:])
    assert_all_free(engine)
    assert not engine._queue_seconds
