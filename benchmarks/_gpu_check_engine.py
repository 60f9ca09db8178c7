"""The engine sections of `gpu_check`: equality with merged references, and decode throughput
with many adapters on a random-init model of Llama-3-8B's layer shapes."""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from benchmarks._gpu_check_kernels import make_case

# A reference top-1/top-2 logit gap below this is a tie at bfloat16's resolution (the trained
# models' logits reach 15-25, where a bf16 ulp is 1/8 to 1/4)
TIE = 0.15


class IdTokenizer:
    """The engine detokenizes; ids are all these checks need."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:  # noqa: ANN001
        return " ".join(map(str, ids))


def random_llama(device: torch.device, dtype: torch.dtype, seed: int, **dims) -> torch.nn.Module:
    """A random-init Llama built on the device in `dtype` (no float32 copy of big models)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(tie_word_embeddings=False, max_position_embeddings=4096, **dims)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def random_adapter(specs: dict, rank: int, seed: int, std: float = 0.05, name_hash: int | None = None):  # noqa: ANN201
    from lorafold.server.lora.peft_format import LoRAAdapter, ModuleLoRA

    g = torch.Generator().manual_seed(seed)
    mods = {path: ModuleLoRA(lora_a=torch.randn(rank, s.in_features, generator=g) * std,
                             lora_b=torch.randn(s.out_features, rank, generator=g) * std, scale=16.0 / rank)
            for path, s in specs.items()}
    h = seed if name_hash is None else name_hash
    return LoRAAdapter(modules=mods, config={"r": rank}, content_hash=f"{h:064d}", nbytes=0, source="random")


def with_hash(adapter, h: int):  # noqa: ANN001, ANN201
    """The same factors under another identity: a distinct adapter to the engine (the kernels'
    cost does not depend on the values)."""
    return dataclasses.replace(adapter, content_hash=f"{h:064d}")


def merged(model: torch.nn.Module, adapter) -> torch.nn.Module:  # noqa: ANN001
    out = copy.deepcopy(model)
    with torch.no_grad():
        for path, m in adapter.modules.items():
            lin = out.get_submodule(path)
            delta = m.scale * (m.lora_b.double() @ m.lora_a.double())
            lin.weight += delta.to(device=lin.weight.device, dtype=lin.weight.dtype)
    return out


def gpu_path(smoke: bool) -> dict:
    """Engine options of the GPU path: the defaults on CUDA; forced on the CPU (--smoke)."""
    return dict(attention_backend="flex", lora_backend="triton", prepack_weights=False) if smoke else {}


def run_engine(engine, requests: list[tuple]) -> dict[str, list[int]]:  # noqa: ANN001
    from lorafold.server.engine.sampling_params import SamplingParams

    tokens: dict[str, list[int]] = {}
    for rid, prompt, adapter, max_tokens in requests:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        engine.add_request(rid, prompt, params, adapter, None if adapter is None else f"a{adapter.content_hash[-6:]}")
        tokens[rid] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            tokens[out.request_id] += out.token_ids
    return tokens


# ----------------------------------------------------------------------------- equality


def engine_section(device: torch.device, *, smoke: bool) -> dict:
    from lorafold.server.engine.config import EngineConfig
    from lorafold.server.engine.engine import LLMEngine

    dims = (dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, initializer_range=0.1) if smoke else
            dict(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, initializer_range=0.1))
    n_req, max_tokens, ranks = (5, 4, (4, 8)) if smoke else (24, 16, (8, 16, 32, 64))
    small_blocks = smoke and device.type != "cuda"  # the compiled flex kernel tiles KV by >= 16
    cfg = EngineConfig(block_size=4 if small_blocks else 16, num_kv_blocks=128 if smoke else 512, max_num_seqs=8,
                       max_num_batched_tokens=32 if smoke else 256, max_prefill_chunk=8 if smoke else 64,
                       max_model_len=64 if smoke else 256, max_loras=2 if smoke else 4, **gpu_path(smoke))
    gen = torch.Generator().manual_seed(3)
    hf32 = random_llama(device, torch.float32, seed=11, **dims)
    probe = LLMEngine(copy.deepcopy(hf32), IdTokenizer(), cfg)
    specs = probe.runner.base_modules()
    backends = {"attention": probe.runner.attention_backend, "lora": probe.runner.lora_backend}
    del probe
    adapters = [random_adapter(specs, r, seed=50 + i) for i, r in enumerate(ranks)]
    # (request id, prompt, index of its adapter or None, tokens)
    plan = []
    for i in range(n_req):
        length = int(torch.randint(3, 20 if smoke else 60, (1,), generator=gen))
        prompt = torch.randint(1, dims["vocab_size"], (length,), generator=gen).tolist()
        plan.append((f"r{i}", prompt, None if i % 5 == 4 else i % len(ranks), max_tokens))
    requests = [(rid, prompt, None if a is None else adapters[a], n) for rid, prompt, a, n in plan]
    refs = {None: hf32, **{id(a): merged(hf32, a) for a in adapters}}
    got32 = run_engine(LLMEngine(copy.deepcopy(hf32), IdTokenizer(), cfg), requests)
    equal = 0
    for rid, prompt, adapter, _ in requests:
        ref = refs[None if adapter is None else id(adapter)]
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        equal += int(got32[rid] == want)
    result = {"backends": f"{backends['attention']}+{backends['lora']}", "requests": n_req,
              "fp32_equal_requests": f"{equal}/{n_req}", **bf16_agreement(device, dims, cfg, plan, ranks)}
    result["pass"] = equal == n_req and result["bf16_top1"] >= 0.99 and result["bf16_worst_gap"] <= TIE
    return result


def bf16_agreement(device: torch.device, dims: dict, cfg, plan: list[tuple], ranks: tuple) -> dict:  # noqa: ANN001
    """The bf16 engine teacher-forced against an fp32 reference, on a model and adapters (one
    per rank; ranks powers of two) trained to confident predictions (`_confident_llama`: a
    random-init model's near-ties would make the agreement a coin toss). The reference is the
    same bf16 weights and bf16-exact adapters computed in fp32; it scores the engine's own
    continuations of prompts like the plan's (its lengths and adapters, cut to the trained
    length), in a 256-token vocabulary: trained as briefly, a 2,048-entry map kept near-ties,
    and the vocabulary is not what the bf16 arithmetic is checked on. `bf16_top1`: share of tokens that are the reference's
    top-1; `bf16_worst_gap`: the largest reference logit gap between its top-1 and the chosen
    token; `bf16_moved`: share of tokens where the adapter moved the reference's top-1 off the
    base model's (dropped adapters would show); `bf16_margin_q01`: how confident the trained
    model is (1st percentile of the reference's top-1 minus top-2 logit)."""
    from benchmarks import _confident_llama as confident
    from lorafold.server.engine.engine import LLMEngine

    vocab = 256
    base32 = confident.train_base(random_llama(device, torch.float32, seed=12, **{**dims, "vocab_size": vocab}))
    # lr 3e-3 (the tests' tiny model takes 1e-2): at 1e-2 this model's rank-8 adapter did not
    # learn its task; at 3e-3 for 300 steps every adapter did
    adapters = confident.train_adapters(base32, ranks, steps=300, lr=3e-3)
    base16 = copy.deepcopy(base32).to(torch.bfloat16)
    ref_base = copy.deepcopy(base16).float()  # the bf16 weights, computed in fp32
    refs = [merged(ref_base, a) for a in adapters]
    gen = torch.Generator().manual_seed(4)
    requests = [(rid, torch.randint(1, vocab, (min(len(prompt), confident.SEQ_LEN - n),), generator=gen).tolist(),
                 None if a is None else adapters[a], n) for rid, prompt, a, n in plan]
    got = run_engine(LLMEngine(base16, IdTokenizer(), cfg), requests)
    scores = confident.teacher_forced_scores(
        [(ref_base if a is None else refs[a], prompt, got[rid]) for (rid, prompt, _, _), (_, _, a, _)
         in zip(requests, plan)], ref_base)
    return {"bf16_top1": round(scores["top1"], 4), "bf16_worst_gap": round(scores["worst_gap"], 4),
            "bf16_moved": round(scores["moved"], 4), "bf16_margin_q01": round(scores["margin_q01"], 3),
            "tokens_scored": scores["tokens"]}


# ----------------------------------------------------------------------------- throughput


def triton_compiles() -> int | None:
    """Compiled variants held by the Triton LoRA kernels' caches (None where not readable:
    the interpreter, or another Triton layout)."""
    from lorafold.kernels import triton_lora as t

    try:
        return sum(len(entry[0]) for k in (t._shrink_kernel, t._expand_kernel) for entry in k.device_caches.values())
    except (AttributeError, TypeError, IndexError, KeyError):
        return None


def dynamo_graphs() -> int:
    """Graphs torch.compile has built in this process (the GPU path compiles FlexAttention
    only): one more after the warm-up is a compile on the serving thread."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def gpu_busy_seconds(fn, steps: int) -> float | None:  # noqa: ANN001
    """Summed CUDA kernel time of `steps` calls of fn (torch.profiler), per call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for evt in prof.key_averages():
        total += getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
    return total / 1e6 / steps


def host_syncs(fn) -> int | None:  # noqa: ANN001
    """Synchronising CUDA calls (a read-back, a blocking copy) that one call of fn makes, as
    torch.cuda.set_sync_debug_mode reports them; None off CUDA. An engine step should make
    one: the sampled tokens."""
    if not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, reps: int) -> float:  # noqa: ANN001
    """Median seconds per call (synchronised)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def throughput_section(device: torch.device, *, smoke: bool) -> dict:
    from lorafold.server.engine.config import EngineConfig
    from lorafold.server.engine.engine import LLMEngine
    from lorafold.server.engine.sampling_params import SamplingParams

    layers = 1 if smoke else 4
    dims = (dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8) if smoke else
            dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128))
    batch, prompt_len, steps = (4, 5, 3) if smoke else (512, 32, 16)
    counts = (2, 4) if smoke else (8, 64, 512)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_llama(device, dtype, seed=5, num_hidden_layers=layers, **dims)
    block = 4 if smoke and device.type != "cuda" else 16
    ctx = prompt_len + steps + 8
    cfg = EngineConfig(block_size=block, num_kv_blocks=batch * math.ceil(ctx / block) + 8, max_num_seqs=batch,
                       max_num_batched_tokens=max(batch, 64 if smoke else 4096), max_prefill_chunk=32 if smoke else 512,
                       max_model_len=max(ctx, 64), max_queue=4 * batch, **gpu_path(smoke))
    rows_needed = 16 * (max(counts) + 1)
    from lorafold.server.engine.model_runner import adapter_row_bytes

    cfg.adapter_budget_bytes = int(adapter_row_bytes(model) * rows_needed * 1.1)
    engine = LLMEngine(model, IdTokenizer(), cfg)
    template = random_adapter(engine.runner.base_modules(), 16, seed=7, std=0.02)
    gen = torch.Generator().manual_seed(1)
    scenarios, next_hash = [], 1000

    def admit(n_adapters: int) -> None:
        nonlocal next_hash
        adapters = [with_hash(template, next_hash + i) for i in range(n_adapters)]
        next_hash += n_adapters
        for i in range(batch):
            prompt = torch.randint(1, dims["vocab_size"], (prompt_len,), generator=gen).tolist()
            adapter = adapters[i % n_adapters] if n_adapters else None
            engine.add_request(f"s{next_hash}-{i}", prompt, SamplingParams(temperature=0, max_tokens=steps + 6,
                                                                            ignore_eos=True),
                               adapter, None if adapter is None else f"a{adapter.content_hash[-6:]}")

    graphs = engine.runner.decode_graphs
    # every count with the decode graphs (where captured), then the middle one without them
    runs = [(n, True) for n in (0, *counts)] + ([(counts[1], False)] if graphs is not None else [])
    for n, with_graphs in runs:
        engine.runner.decode_graphs = graphs if with_graphs else None
        admit(n)
        compiles0, graphs0 = triton_compiles(), dynamo_graphs()
        engine.step()
        while engine.last_step.num_seqs != batch or engine.last_step.num_tokens != batch:  # prefill + loads
            engine.step()
        engine.step()  # warm: every shape of this scenario's decode step seen
        compiles1 = triton_compiles()
        wall = timed(engine.step, device, steps - 2)
        compiles2, graphs2 = triton_compiles(), dynamo_graphs()
        busy = gpu_busy_seconds(engine.step, 1) if device.type == "cuda" else None
        syncs = host_syncs(engine.step)
        while engine.has_unfinished():
            engine.step()
        row = {"adapters": n, "graphs": with_graphs and graphs is not None and bool(graphs.graphs), "batch": batch, "step_ms": round(wall * 1e3, 3), "tokens_per_s": round(batch / wall, 1),
               "gpu_busy_ms": None if busy is None else round(busy * 1e3, 3), "host_syncs": syncs,
               "compiles_in_warmup": None if compiles0 is None else compiles1 - compiles0,
               "compiles_after_warmup": None if compiles1 is None else compiles2 - compiles1,
               "torch_compiles": graphs2 - graphs0}
        scenarios.append(row)
    engine.runner.decode_graphs = graphs
    base = scenarios[0]["tokens_per_s"]
    for row in scenarios:
        row["vs_base"] = round(row["tokens_per_s"] / base, 4)
    # a cold adapter: admitted to an idle engine, time to its first token (load + prefill + sample)
    cold = with_hash(template, 10**9)
    t0 = time.perf_counter()
    engine.add_request("cold", list(range(1, prompt_len + 1)), SamplingParams(temperature=0, max_tokens=1), cold, "cold")
    while True:
        outs = [o for o in engine.step() if o.request_id == "cold"]
        if any(o.error for o in outs):
            raise RuntimeError(f"the cold-adapter request failed: {outs[0].error}")
        if any(o.token_ids for o in outs):
            break
    _sync(device)
    cold_s = time.perf_counter() - t0
    return {"model": f"random-init, Llama-3-8B layer shapes x {layers} layers" if not smoke else "tiny random Llama",
            "dtype": str(dtype).removeprefix("torch."), "scenarios": scenarios,
            "lora_vs_gemm": lora_vs_gemm(device, dtype, smoke),
            "checks": {"adapters_for_loss": scenarios[2]["adapters"], "loss_vs_base": round(1 - scenarios[2]["vs_base"], 4),
                       "cold_adapter_first_token_ms": round(cold_s * 1e3, 1), "target_loss": 0.05,
                       "target_cold_ms": 50,
                       "host_syncs_per_step_max": max((r["host_syncs"] for r in scenarios
                                                       if r["host_syncs"] is not None), default=None),
                       "target_host_syncs": 1}}


def lora_vs_gemm(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[dict]:
    """Triton shrink+expand (64 distinct rank-16 adapters) vs the layer's base GEMM at decode,
    and the shrink alone at the default launch (unsplit, 4 warps) vs at the (SPLIT_K,
    num_warps) the engine's start-up measured (the engine is built first: its warm-up fills
    the table for these layer shapes)."""
    from lorafold.kernels import triton_lora
    from lorafold.kernels.meta import build_lora_meta
    from lorafold.kernels.ops import expand, shrink

    groups = ([("qkv", [48, 16, 16], 48), ("down", [48], 64)] if smoke else
              [("qkv", [4096, 1024, 1024], 4096), ("o", [4096], 4096), ("gate_up", [14336, 14336], 4096),
               ("down", [4096], 14336)])
    rows = []
    for tokens in ((4,) if smoke else (64, 512)):
        for name, widths, d_in in groups:
            n_adapters = 4 if smoke else 64
            case = make_case(widths, d_in, dtype, device, num_adapters=n_adapters, tokens=tokens, ranks=(16,),
                             mix="blocks", seed=2, base_fraction=0.0)
            weight = torch.randn(sum(widths), d_in, device=device, dtype=dtype) * 0.02
            meta = build_lora_meta(case.slots, case.row_start, case.alloc, backend="triton")
            out = case.out0.clone()

            def lora() -> None:
                y = shrink(case.x, case.a_pool, case.row_start, case.ranks, meta)
                expand(y, case.b_pool, case.row_start, case.ranks, case.slice_offsets, meta, out)

            def shrink_only(config: tuple[int, int]) -> None:
                triton_lora.shrink(case.x, case.a_pool, case.row_start, case.ranks, meta.sorted_tokens, meta.seg_slots,
                                   meta.seg_starts, meta.max_seg_len, meta.max_rank, check_values=False,
                                   split_k=config[0], num_warps=config[1])

            block_m, block_r = triton_lora.variant(meta.max_seg_len, meta.max_rank)
            chosen = triton_lora.chosen_shrink_config(d_in, len(widths), block_m, block_r, meta.seg_slots.numel())
            default = triton_lora.DEFAULT_CONFIG
            reps = 1 if smoke else 50
            gemm_s = timed(lambda: F.linear(case.x, weight), device, reps)
            lora_s = timed(lora, device, reps)
            rows.append({"tokens": tokens, "layer": name, "adapters": n_adapters, "gemm_us": round(gemm_s * 1e6, 1),
                         "lora_us": round(lora_s * 1e6, 1), "fraction": round(lora_s / gemm_s, 3), "target": 0.10,
                         "split_k": chosen[0], "num_warps": chosen[1],
                         "shrink_us_default": round(timed(lambda: shrink_only(default), device, reps) * 1e6, 1),
                         "shrink_us_chosen": round(timed(lambda: shrink_only(chosen), device, reps) * 1e6, 1)})
    return rows
