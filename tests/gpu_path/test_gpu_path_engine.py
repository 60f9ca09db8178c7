"""The engine's GPU code path, run on the CPU: paged FlexAttention (`attention_backend="flex"`)
and the Triton LoRA kernels under TRITON_INTERPRET=1 (`lora_backend="triton"`), no compiled
C++ kernel, no oneDNN packing; and bfloat16 on both paths. On a tiny random Llama, against
transformers' generate on merged-weight models: float32 token for token, bfloat16 by
teacher-forced top-1 agreement with the fp32 reference (which scores the engine's own
prefixes). The bf16 test runs a trained tiny model with trained adapters (confident logits,
as real ones are) and its reference is the same bf16 weights and bf16-exact adapters computed
in fp32, so it measures the engine's bf16 arithmetic, not the rounding of the weights.

Requests are staggered so steps mix prefill chunks (several per prompt) with decodes, adapters
of ranks 4-32 (some q/v only) share batches with the base, and two slots force evictions."""

from __future__ import annotations

import copy
import functools
import itertools
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

from benchmarks import _confident_llama as confident
from lorafold.kernels import triton_lora
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.engine import LLMEngine
from lorafold.server.engine.sampling_params import SamplingParams
from tests.conftest import build_tiny_llama, merged_model, random_adapter
from tests.engine.test_engine import ByteTokenizer, hf_greedy, run_to_completion
from tests.gpu_path.host_sync import HostSyncLog
from tests.gpu_path.triton_variants import TritonVariantLog

GPU_PATH = dict(attention_backend="flex", lora_backend="triton", prepack_weights=False)
CPU_PATH = dict(attention_backend="sdpa", lora_backend="auto")
RANKS = (4, 8, 16, 32)
MAX_TOKENS = 12
BF16_TOKENS = 24  # 9 requests x 24 = 216 tokens scored


def _model(dtype: torch.dtype) -> torch.nn.Module:
    # initializer_range 0.1: peaked logits, so bfloat16 rounding rarely flips a near-tie
    return build_tiny_llama(seed=11, initializer_range=0.1).to(dtype)


def _engine(hf: torch.nn.Module, path: dict, **over) -> LLMEngine:
    cfg = dict(block_size=4, num_kv_blocks=96, max_num_seqs=6, max_num_batched_tokens=24, max_prefill_chunk=8,
               max_model_len=64, max_loras=2, **path)
    cfg.update(over)
    return LLMEngine(copy.deepcopy(hf), ByteTokenizer(), EngineConfig(**cfg))


@functools.lru_cache(maxsize=1)
def _confident_model() -> torch.nn.Module:
    """The tiny Llama trained (fp32) to continue x -> 5x + 3 mod 256 after any prefix
    (`benchmarks/_confident_llama.py`: why a trained model, and the task)."""
    return confident.train_base(_model(torch.float32))


@functools.lru_cache(maxsize=1)
def _trained_adapters() -> tuple:
    """One LoRA per rank in RANKS on every projection, each trained on the confident model to
    its own shift; factors rounded to bf16 values (`confident.bf16_exact`)."""
    return confident.train_adapters(_confident_model(), RANKS)


def _workload(engine: LLMEngine, adapters: tuple | None = None, max_tokens: int = MAX_TOKENS
              ) -> tuple[dict[int, list[tuple]], list[tuple[str, list[int], int | None]], list]:
    """Nine staggered greedy requests over `adapters` (default: random ones of RANKS, every
    other one q/v only) and the base model."""
    if adapters is None:
        specs = engine.runner.base_modules()
        adapters = tuple(random_adapter(specs, r, seed=40 + i, std=0.08,
                                        targets=None if i % 2 == 0 else ["q_proj", "v_proj"])
                         for i, r in enumerate(RANKS))
    gen = torch.Generator().manual_seed(5)
    arrivals: dict[int, list[tuple]] = {}
    setup = []
    for i in range(9):
        prompt = torch.randint(1, 256, (int(torch.randint(3, 20, (1,), generator=gen)),), generator=gen).tolist()
        a = None if i % 5 == 4 else i % len(RANKS)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        arrivals.setdefault(i // 2 * 2, []).append(
            (f"r{i}", prompt, params, adapters[a] if a is not None else None, f"ad{a}" if a is not None else None))
        setup.append((f"r{i}", prompt, a))
    return arrivals, setup, adapters


# A reference top-1/top-2 logit gap below this is a tie at bfloat16's resolution: the trained
# models' logits reach 15-25, where a bf16 ulp is 1/8 to 1/4 (and the engine's logits carry a
# few of them), so where the reference's top two are that close, either is a right answer.
TIE = 0.15


def _teacher_forced_scores(engine: LLMEngine, hf32: torch.nn.Module) -> dict[str, float]:
    """The workload on the trained adapters, every generated token scored by the fp32
    reference after the engine's own prefix (`confident.teacher_forced_scores`)."""
    arrivals, setup, adapters = _workload(engine, _trained_adapters(), max_tokens=BF16_TOKENS)
    got = run_to_completion(engine, arrivals)
    merged = {a: hf32 if a is None else merged_model(hf32, adapters[a]) for a in {a for _, _, a in setup}}
    assert all(len(got[rid]) == BF16_TOKENS for rid, _, _ in setup)
    return confident.teacher_forced_scores([(merged[a], prompt, got[rid]) for rid, prompt, a in setup], hf32)


@pytest.mark.parametrize("path", ["gpu", "cpu"])
def test_bfloat16_teacher_forced_top1_agreement(path: str) -> None:
    """The issue's bar: >= 99 % of generated tokens are the fp32 reference's top-1, and none
    is off it by more than a bf16 tie (TIE). Measured (216 tokens; `pytest -s` prints the
    scores): 100 % on both paths, worst gap 0; the adapters move 89 % of the tokens away from
    the base model's. The reference's top-1/top-2 margin is >= 0.6 on 99 % of the tokens, so a
    flip takes an engine error several bf16 ulps wide, not a rounding coin toss."""
    hf16 = copy.deepcopy(_confident_model()).bfloat16()
    engine = _engine(hf16, GPU_PATH if path == "gpu" else CPU_PATH)
    assert engine.runner.dtype == torch.bfloat16 and engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    scores = _teacher_forced_scores(engine, copy.deepcopy(hf16).float())
    print(f"bf16 {path} path: {scores}")  # the figures the docstring quotes
    assert scores["moved"] >= 0.5, f"the adapters must matter: {scores}"
    assert scores["worst_gap"] <= TIE, f"bf16 {path} path: a token off the reference's top-1 by > {TIE}: {scores}"
    assert scores["top1"] >= 0.99, f"bf16 {path} path: {scores}"


def test_flex_and_sdpa_backends_agree_step_for_step() -> None:
    """The same requests through both attention backends (torch LoRA path on both): equal
    logits within float32 rounding, checked at every step through the runner."""
    hf = _model(torch.float32)
    outs = {}
    for backend in ("flex", "sdpa"):
        engine = _engine(hf, dict(attention_backend=backend, lora_backend="torch", prepack_weights=False))
        engine.runner.warm_up()  # what a CUDA runner does at start: must leave no trace in the cache
        arrivals, _, _ = _workload(engine)
        logits: list[torch.Tensor] = []
        execute = engine.runner.execute
        engine.runner.execute = lambda chunks, _e=execute: logits.append(_e(chunks)) or logits[-1]
        outs[backend] = (run_to_completion(engine, arrivals), logits)
    assert outs["flex"][0] == outs["sdpa"][0]
    assert len(outs["flex"][1]) == len(outs["sdpa"][1])
    for a, b in zip(outs["flex"][1], outs["sdpa"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sdpa_decode_mask_is_built_in_the_query_dtype(dtype: torch.dtype) -> None:
    """SDPA's memory-efficient CUDA kernel refuses an additive mask of another dtype."""
    from lorafold.server.engine.attention import build_attention_metadata

    seqs = [(0, 1, 5, [3, 1]), (1, 1, 2, [0])]
    meta = build_attention_metadata([13, 1], seqs, 4, torch.device("cpu"), dtype=dtype)
    assert meta.decode_mask.dtype == dtype
    assert meta.decode_mask[1, 0, 0].tolist() == [0, 0, float("-inf"), float("-inf"), float("-inf"),
                                                   float("-inf"), float("-inf"), float("-inf")]
    with pytest.raises(ValueError, match="num_blocks"):
        build_attention_metadata([13, 1], seqs, 4, torch.device("cpu"), backend="flex")


def test_gpu_path_float32_matches_merged_reference_token_for_token(monkeypatch) -> None:
    """The GPU path in fp32, with decode_graphs="eager": prefill and mixed steps through paged
    FlexAttention, pure decode steps on the preallocated, bucket-padded buffers the CUDA graphs
    read (scratch block, empty LoRA segments, fixed max rank), without capture; adapters
    evicted and reloaded. (The bf16 GPU-path test covers flex decode off the buffers.)

    Started as on a GPU: the shrink's launch choices measured (made-up timings, so the decode
    shrinks serve split over d_in, on 2 warps) and the kernels warmed up. Then no Triton compile after
    warm-up: every launch while serving has a variant key (Triton's own, for an H100:
    `triton_variants`) that the start launched already."""
    monkeypatch.setattr(triton_lora, "_SHRINK_TABLE", {})  # this engine's measurements only
    hf = _model(torch.float32)
    engine = _engine(hf, dict(GPU_PATH, decode_graphs="eager"))
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.buckets == [2, 4, 6] and not graphs.graphs
    assert engine.runner.attention_backend == "flex"
    # made-up times, in tune_shrink's order (SPLIT_K_CHOICES x NUM_WARPS_CHOICES): (2, 2) wins
    times = itertools.cycle([5, 6, 1, 7, 8, 8, 9, 9])

    def timer(fn) -> float:  # noqa: ANN001 - launches each choice, as a GPU timing would
        fn()
        return next(times)

    with TritonVariantLog() as log:
        engine.runner.warm_up(shrink_timer=timer)
        assert set(triton_lora.shrink_table().values()) == {(2, 2)}
        at_start, started = set(log.keys), len(log.keys)
        arrivals, setup, adapters = _workload(engine)
        got = run_to_completion(engine, arrivals)
    serving = log.keys[started:]
    assert engine.adapter_table.stats.evictions > 0, "the test must exercise eviction"
    assert graphs.steps >= 10, "most decode steps must take the buffer path"
    assert len(serving) > 100 and {k[0] for k in serving} == {"shrink", "expand"}
    new = set(serving) - at_start
    assert not new, f"{len(new)} variants would compile while serving, e.g. {sorted(new)[0]}"
    split_k = triton_lora._shrink_kernel.arg_names.index("SPLIT_K")
    used = {(k[1][split_k][1], dict(k[2])["num_warps"]) for k in serving if k[0] == "shrink"}
    assert (2, 2) in used, f"the measured choice must serve decode steps: {used}"
    merged: dict = {}
    for rid, prompt, a in setup:
        if a not in merged:
            merged[a] = hf if a is None else merged_model(hf, adapters[a])
        assert got[rid] == hf_greedy(merged[a], prompt, MAX_TOKENS, None), f"{rid} (adapter {a})"
    assert len({tuple(got[f"r{i}"]) for i in range(4)}) == 4, "adapters must change outputs"
    with pytest.raises(ValueError, match="needs attention_backend='flex'"):
        _engine(hf, dict(CPU_PATH, decode_graphs="eager"))


@pytest.fixture()
def flex_outside_log(monkeypatch) -> list[int]:
    """FlexAttention runs outside a HostSyncLog: on CUDA it is one compiled kernel; on the CPU
    an eager one that compiles its own pieces (which a dispatch mode may not watch). Yields
    the list its calls append to."""
    from lorafold.server.engine import flex_paged

    flex, calls = flex_paged._kernel("cpu"), []

    def unlogged(*args, **kwargs):
        calls.append(1)
        with _disable_current_modes():
            return flex(*args, **kwargs)

    monkeypatch.setattr(flex_paged, "_kernel", lambda _device_type: unlogged)
    return calls


def test_gpu_path_host_waits_only_for_the_sampled_tokens(monkeypatch, flex_outside_log) -> None:
    """The host side of the GPU path, run on the CPU under a HostSyncLog, with greedy, seeded
    and unseeded top-k/top-p requests, logprobs, penalties, logit_bias and min_tokens:

    - the decode forward a CUDA graph captures (block mask, LoRA segments, every layer) reads
      nothing back, makes no data-dependent shape and no tensor from Python data: on CUDA any
      of these makes capture fail (the server then decodes eagerly, host-bound);
    - a whole engine step (scheduling, metadata, forward, sampling) reads back one value, the
      sampled tokens (with any logprobs, in the same transfer), and moves its inputs in one
      copy on a decode-graph step, at most three otherwise (tokens and positions, attention
      metadata, LoRA metadata), plus the sampling parameters', each asynchronous from
      page-locked memory (`kernels.transfer.host_to_device`).

    On CUDA each read-back, and each `torch.tensor(..., device=...)` (a blocking copy), stalls
    the host until the GPU drains; the LoRA metadata used to take six read-backs per step (max,
    min, nonzero, unique, ...) and a graph step one blocking copy per buffer."""
    log = HostSyncLog()
    with log:  # the log itself must see each kind of read-back
        int(torch.ones(1).sum()), torch.ones(2).tolist()
    assert [s.split()[0] for s in log.syncs] == ["aten._local_scalar_dense.default", "Tensor.tolist"], log.syncs
    from lorafold.kernels import meta, transfer
    from lorafold.server.engine import decode_graphs, flex_paged, logits_processors, model_runner, sampler

    copies: list[str] = []

    def counting(module: str):
        def copy(host: torch.Tensor, device: torch.device) -> torch.Tensor:
            copies.append(module)
            return transfer.host_to_device(host, device)
        return copy

    for module in (meta, decode_graphs, flex_paged, model_runner, sampler, logits_processors):
        monkeypatch.setattr(module, "host_to_device", counting(module.__name__.rsplit(".", 1)[-1]))
    engine = _engine(_model(torch.float32), dict(GPU_PATH, decode_graphs="eager"))
    graphs, steps = engine.runner.decode_graphs, []
    step, forward, forward_log = engine.step, graphs._forward, HostSyncLog()

    def logged_forward(bucket: int) -> torch.Tensor:
        with forward_log:
            return forward(bucket)

    monkeypatch.setattr(graphs, "_forward", logged_forward)

    sampling_rows: list[int] = []  # rows the step's forward samples (none: chunked prefill only)
    execute = engine.runner.execute

    def logged_execute(chunks: list) -> torch.Tensor:
        sampling_rows.append(sum(1 for c in chunks if c.sample))
        return execute(chunks)

    def logged_step() -> list:
        log, graph_steps, loads = HostSyncLog(), graphs.steps, engine.adapter_table.stats.misses
        copies.clear()
        sampling_rows.clear()
        with log:
            outputs = step()
        made = [s for s in log.syncs if s.startswith("aten.lift_fresh")]
        reads = [s.split(" at ")[0] + " in " + Path(s.split(" at ")[1]).name for s in log.syncs if s not in made]
        steps.append((graphs.steps > graph_steps, reads, list(copies),
                      None if engine.adapter_table.stats.misses > loads else made, sum(sampling_rows)))
        return outputs

    monkeypatch.setattr(engine.runner, "execute", logged_execute)
    monkeypatch.setattr(engine, "step", logged_step)
    arrivals, _, _ = _workload(engine)
    sampled = {"r1": dict(seed=1, top_k=20, logprobs=3), "r3": dict(top_p=0.9), "r6": dict(seed=6, top_p=0.8, top_k=50),
               "r5": dict(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3, logit_bias={65: 2.0},
                          min_tokens=4, stop_token_ids=[10])}  # every logits processor but the grammar's
    for reqs in arrivals.values():
        for j, (rid, prompt, params, adapter, name) in enumerate(reqs):
            if rid in sampled:
                reqs[j] = (rid, prompt, SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                       **sampled[rid]), adapter, name)
    run_to_completion(engine, arrivals)
    on_graph = [s for s in steps if s[0]]
    assert len(on_graph) >= 10 and len(steps) - len(on_graph) >= 5 and flex_outside_log, "both kinds of step must run"
    assert {"lorafold.lora_shrink.default", "lorafold.lora_expand.default"} <= forward_log.ops, sorted(forward_log.ops)
    assert not forward_log.syncs, f"host synchronisation in the captured decode forward: {sorted(set(forward_log.syncs))}"
    # a step samples nothing when it holds only prompt chunks that end mid-prompt (a request
    # that starts alone, e.g. once its adapter gets a slot: how often depends on how early the
    # unseeded request with a stop token stops)
    assert sum(1 for *_, rows in steps if rows) >= 0.8 * len(steps), "most steps sample"
    for i, (graph_step, reads, all_copies, made, rows) in enumerate(steps):
        expected = ["Tensor.tolist in sampler.py"] if rows else []  # a step that samples nothing reads nothing
        assert [r.split(":")[0] for r in reads] == expected, (i, rows, reads)
        step_copies = [c for c in all_copies if c not in ("sampler", "logits_processors")]
        if graph_step:
            assert step_copies == ["decode_graphs"], step_copies
        else:
            assert 1 <= len(step_copies) <= 3 and "decode_graphs" not in step_copies, step_copies
        # on a graph step that loads no adapter, every tensor made from Python data travels
        # by host_to_device (the LoRA metadata inside the staged inputs: one copy for two); a
        # torch.tensor(..., device=...) would be one more than the copies
        assert not graph_step or made is None or len(made) <= len(all_copies) + 1, (all_copies, made)
    moved = {m for _, _, c, _, _ in steps for m in c}
    assert {"sampler", "logits_processors"} <= moved, "the sampled requests must move their parameters"


@pytest.fixture()
def compiled_flex(monkeypatch):
    """The GPU path's FlexAttention under torch.compile, compiled by Dynamo with
    backend="eager" (the same front end and guards as on CUDA, no code generation), from
    Dynamo's default recompile limit of 8 and told to fail rather than fall back to eager
    should a limit be hit. Yields Dynamo's counters; resets Dynamo before and after."""
    from torch._dynamo.utils import counters

    from lorafold.server.engine import flex_paged

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    compiled = flex_paged.compiled_flex_attention(backend="eager")
    assert torch._dynamo.config.recompile_limit >= flex_paged.RECOMPILE_LIMIT
    monkeypatch.setattr(flex_paged, "_kernel", lambda _device_type: compiled)
    try:
        yield counters
    finally:
        torch._dynamo.reset()


def test_compiled_flex_attention_compiles_nothing_after_warm_up(compiled_flex) -> None:
    """On CUDA FlexAttention runs under torch.compile with dynamic shapes, which still
    specialises any size of 1: a step of one sequence, one cache block or one query tile would
    compile on the serving thread (seconds), and past Dynamo's limit of 8 variants fall back to
    eager FlexAttention over the whole cache. Warmed up as a CUDA runner is at start, then
    serving the staggered workload (decode batches of 1-6 sequences, on the decode graphs'
    buffers and off them; prefill chunks of 1-8 tokens alone and side by side; contexts of one
    and two 16-token blocks): no new graph after the warm-up, and the output still the merged
    references'."""
    hf = _model(torch.float32)
    engine = _engine(hf, dict(GPU_PATH, decode_graphs="eager"), block_size=16, num_kv_blocks=40)
    engine.runner.warm_up()
    warmed = compiled_flex["stats"]["unique_graphs"]
    assert warmed >= 2, "the warm-up must compile decode and prefill"
    arrivals, setup, adapters = _workload(engine)
    got = run_to_completion(engine, arrivals)
    assert compiled_flex["stats"]["unique_graphs"] == warmed, "FlexAttention compiled again after the warm-up"
    assert engine.runner.decode_graphs.steps >= 5
    merged: dict = {}
    for rid, prompt, a in setup:
        if a not in merged:
            merged[a] = hf if a is None else merged_model(hf, adapters[a])
        assert got[rid] == hf_greedy(merged[a], prompt, MAX_TOKENS, None), f"{rid} (adapter {a})"


def test_compiled_flex_attention_serves_many_engines_in_one_process(compiled_flex) -> None:
    """Every engine compiles its own FlexAttention variants (dtype, heads, head_dim are
    static). Past Dynamo's default limit of 8 per function a new one would run eagerly (scores
    over the whole cache): gpu_check alone builds four engines. Here six, of three shapes in
    two dtypes (two variants each): every warm-up compiles, and none hits the limit."""
    for heads, kv_heads in ((6, 2), (4, 4), (12, 3)):
        for dtype in (torch.float32, torch.bfloat16):
            hf = build_tiny_llama(seed=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  head_dim=72 // heads).to(dtype)
            engine = _engine(hf, dict(attention_backend="flex", lora_backend="torch", prepack_weights=False),
                             block_size=16, num_kv_blocks=8)
            before = compiled_flex["stats"]["unique_graphs"]
            engine.runner.warm_up()
            assert compiled_flex["stats"]["unique_graphs"] > before, f"no compile for {heads}/{kv_heads} heads, {dtype}"
