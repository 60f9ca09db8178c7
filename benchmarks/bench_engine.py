"""Serving throughput and latency of the engine on SmolLM2, mixed adapters vs the base.

    python benchmarks/bench_engine.py [--requests 64] [--out benchmarks/results/engine.json]

64 requests (prompt lengths 32-256, max_tokens 16-256, fixed seed, greedy, all arriving at
t=0) through the engine: (a) all on the base model, (b) 8 rank-16 adapters with zipf
popularity, (c) 64 distinct rank-16 adapters, (d) 64 adapters of mixed ranks 8-128; against
(e) transformers `generate` one request at a time and (f) transformers `generate` in padded
static batches of 16 (base only). (e) and (f) run on a subset (--hf-requests) and report
tokens/s over it: running all 64 one by one would take tens of minutes here.

Next to each engine scenario, two roofline bounds of its average decode step, from the
measured read bandwidth and fp32 matmul rate:

- whole step: max(all bytes read / bandwidth, all FLOPs / matmul rate), bytes = base weights
  + the distinct adapters' weights + the KV cache read. The lowest time any implementation
  could reach, overlapping every byte with every FLOP; with a few dozen sequences the base
  matmuls are compute-bound, so the adapters' bytes vanish under them.
- per phase: the sum of max(bytes / bandwidth, FLOPs / rate) over the step's phases run one
  after another, as kernels are: base linears (compute-bound at these batches), adapter
  shrink/expand (memory-bound: each adapter's weights serve one or a few tokens) and
  attention over the KV cache (memory-bound). This one charges the adapters' bytes.

The "relative" columns compare each scenario's bound-normalised throughput with (a)'s.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from dataclasses import dataclass

import torch

from benchmarks._common import machine_rates, percentile, write_json
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.engine import LLMEngine
from lorafold.server.engine.host_memory import keep_freed_memory
from lorafold.server.engine.sampling_params import SamplingParams
from lorafold.server.lora.peft_format import LoRAAdapter, ModuleLoRA
from lorafold.server.models.loader import load_base_model


# The engine of every scenario (and of `bench_decode_step`), with a fixed adapter budget:
# room for all 64 adapters of every scenario (ranks 8-128: ~4 GB), so the results do not
# depend on how much RAM happens to be free (the default budget is a fraction of it).
ENGINE_CONFIG = EngineConfig(block_size=16, num_kv_blocks=2304, max_num_seqs=64, max_num_batched_tokens=512,
                             max_prefill_chunk=256, max_model_len=1024, max_loras=64, max_queue=1024,
                             adapter_budget_bytes=6 * 2**30)


def random_adapter(specs, r: int, seed: int) -> LoRAAdapter:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    mods = {p: ModuleLoRA(torch.randn(r, s.in_features, generator=g) * 0.01,
                          torch.randn(s.out_features, r, generator=g) * 0.01, 2.0) for p, s in specs.items()}
    return LoRAAdapter(modules=mods, config={"r": r}, content_hash=f"{seed:064d}", nbytes=0)


def adapter_params(ad: LoRAAdapter) -> int:
    return sum(m.lora_a.numel() + m.lora_b.numel() for m in ad.modules.values())


def make_requests(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(32, 256))], rng.randint(16, 256)) for _ in range(n)]


def run_engine(engine: LLMEngine, requests, assign) -> dict:  # noqa: ANN001
    """All requests at t=0; returns throughput and latency numbers."""
    start = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []
    generated = 0
    step_tokens, step_seqs, step_adapters = [], [], []
    for i, (prompt, max_tokens) in enumerate(requests):
        adapter, name = assign(i)
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           adapter, name)
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        st = engine.last_step
        if st.num_seqs and all(o.token_ids for o in outs) and st.num_tokens == st.num_seqs:
            step_seqs.append(st.num_seqs)
            step_adapters.append(st.num_adapters)
        step_tokens.append(st.num_tokens)
        for o in outs:
            if not o.token_ids:
                continue
            generated += len(o.token_ids)
            if o.request_id not in first:
                first[o.request_id] = now - start
            else:
                gaps.append(now - last[o.request_id])
            last[o.request_id] = now
    wall = time.perf_counter() - start
    ttft = list(first.values())
    return {"generated_tokens": generated, "seconds": wall, "tokens_per_s": generated / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
            "mean_decode_batch": sum(step_seqs) / max(1, len(step_seqs)),
            "mean_decode_adapters": sum(step_adapters) / max(1, len(step_adapters))}


@dataclass(frozen=True)
class DecodePhases:
    """Bytes read and FLOPs of one average decode step, by phase (fp32)."""

    base_bytes: float
    base_flops: float
    lora_bytes: float
    lora_flops: float
    kv_bytes: float
    attn_flops: float

    def whole_step_bound(self, rates: dict) -> float:
        """Seconds: every byte overlapped with every FLOP."""
        nbytes = self.base_bytes + self.lora_bytes + self.kv_bytes
        flops = self.base_flops + self.lora_flops + self.attn_flops
        return max(nbytes / rates["read_bandwidth_Bps"], flops / rates["matmul_flops"])

    def per_phase_bound(self, rates: dict) -> float:
        """Seconds: the phases one after another, each at its own roofline."""
        bw, rate = rates["read_bandwidth_Bps"], rates["matmul_flops"]
        return (max(self.base_bytes / bw, self.base_flops / rate) + max(self.lora_bytes / bw, self.lora_flops / rate)
                + max(self.kv_bytes / bw, self.attn_flops / rate))


def decode_phases(base_params: int, batch: float, distinct: float, mean_adapter_params: float, mean_ctx: float,
                  kv_per_token: int, hidden: int) -> DecodePhases:
    """batch sequences of mean context mean_ctx, over `distinct` adapters (0: base only)."""
    return DecodePhases(
        base_bytes=base_params * 4,
        base_flops=2 * batch * base_params,
        lora_bytes=distinct * mean_adapter_params * 4,
        lora_flops=2 * batch * mean_adapter_params if distinct else 0.0,
        kv_bytes=batch * mean_ctx * kv_per_token,
        attn_flops=4 * batch * mean_ctx * hidden,  # q.k and p.v over every query head
    )


def hf_one_by_one(model, requests) -> dict:  # noqa: ANN001
    gen = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for prompt, max_tokens in requests:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
            gen += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t0
    return {"generated_tokens": gen, "seconds": wall, "tokens_per_s": gen / wall}


def hf_static_batches(model, requests, batch: int = 16) -> dict:  # noqa: ANN001
    gen = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(requests), batch):
            group = requests[i : i + batch]
            width = max(len(p) for p, _ in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, (p, _) in enumerate(group):  # left padding, as generate expects for decoder-only models
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            steps = max(m for _, m in group)
            model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                           pad_token_id=0)
            gen += sum(m for _, m in group)  # tokens the requests asked for; the rest is padding work
    wall = time.perf_counter() - t0
    return {"generated_tokens": gen, "seconds": wall, "tokens_per_s": gen / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--hf-requests", type=int, default=16)
    parser.add_argument("--scenarios", default="a,b,c,d,e,f")
    parser.add_argument("--out", default="benchmarks/results/engine.json")
    args = parser.parse_args()
    keep_freed_memory()  # as `lorafold serve` does at start (process-wide malloc settings)
    torch.manual_seed(0)
    rates = machine_rates()
    bm = load_base_model()
    base = bm.model
    vocab = base.config.vocab_size
    requests = make_requests(args.requests, vocab, seed=0)
    engine = LLMEngine(copy.deepcopy(base), bm.tokenizer, ENGINE_CONFIG)
    specs = engine.runner.base_modules()
    base_params = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    kv_per_token = 2 * base.config.num_hidden_layers * base.config.num_key_value_heads * (base.config.hidden_size // base.config.num_attention_heads) * 4
    mean_ctx = sum(len(p) + m / 2 for p, m in requests) / len(requests)
    rng = random.Random(1)
    rank16 = [random_adapter(specs, 16, 100 + i) for i in range(64)]
    mixed_ranks = [rng.choice([8, 16, 32, 64, 128]) for _ in range(64)]
    mixed = [random_adapter(specs, r, 300 + i) for i, r in enumerate(mixed_ranks)]
    zipf_w = [1 / k for k in range(1, 9)]
    zipf_choice = [rng.choices(range(8), weights=zipf_w)[0] for _ in range(args.requests)]
    assigns = {
        "a": ("all on the base", lambda i: (None, None), []),
        "b": ("8 rank-16 adapters, zipf", lambda i: (rank16[zipf_choice[i]], f"z{zipf_choice[i]}"), rank16[:8]),
        "c": ("64 distinct rank-16 adapters", lambda i: (rank16[i % 64], f"d{i % 64}"), rank16),
        "d": ("64 adapters, ranks 8-128", lambda i: (mixed[i % 64], f"m{i % 64}"), mixed),
    }
    rows = []
    wanted = args.scenarios.split(",")
    for key, (label, assign, pool) in assigns.items():
        if key not in wanted:
            continue
        res = run_engine(engine, requests, assign)
        batch = res["mean_decode_batch"]
        distinct = res["mean_decode_adapters"]
        mean_adapter = sum(adapter_params(a) for a in pool) / len(pool) if pool else 0.0
        phases = decode_phases(base_params, batch, distinct, mean_adapter, mean_ctx, kv_per_token,
                               base.config.hidden_size)
        res["bound_step_s"] = phases.whole_step_bound(rates)
        res["bound_tokens_per_s"] = batch / res["bound_step_s"]
        res["phase_bound_step_s"] = phases.per_phase_bound(rates)
        res["phase_bound_tokens_per_s"] = batch / res["phase_bound_step_s"]
        rows.append({"scenario": key, "label": label, **res})
    hf_subset = requests[: args.hf_requests]
    if "e" in wanted:
        rows.append({"scenario": "e", "label": f"HF generate, one at a time ({len(hf_subset)} requests)",
                     **hf_one_by_one(base, hf_subset)})
    if "f" in wanted:
        rows.append({"scenario": "f", "label": f"HF generate, static batches of 16 ({len(hf_subset)} requests)",
                     **hf_static_batches(base, hf_subset)})
    a = next((r for r in rows if r["scenario"] == "a"), None)
    for r in rows:
        if a is not None and "bound_tokens_per_s" in r:
            # fraction of (a)'s throughput this scenario keeps, relative to what its roofline allows
            r["vs_a"] = r["tokens_per_s"] / a["tokens_per_s"]
            r["vs_a_over_bound_ratio"] = r["vs_a"] / (r["bound_tokens_per_s"] / a["bound_tokens_per_s"])
            r["vs_a_over_phase_bound_ratio"] = r["vs_a"] / (r["phase_bound_tokens_per_s"] / a["phase_bound_tokens_per_s"])
        elif a is not None:
            r["a_speedup_over_this"] = a["tokens_per_s"] / r["tokens_per_s"]
    print(f"machine: {rates['read_bandwidth_Bps'] / 1e9:.1f} GB/s read, {rates['matmul_flops'] / 1e9:.0f} GFLOP/s fp32, "
          f"{rates['threads']} threads; {args.requests} requests")
    nan = float("nan")
    print(f"{'':2} {'scenario':<44} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} "
          f"{'vs (a)':>7} | {'whole-step bound':>16} {'rel':>5} | {'per-phase bound':>15} {'rel':>5}")
    for r in rows:
        print(f"{r['scenario']:<2} {r['label']:<44} {r['tokens_per_s']:>7.1f} {r.get('ttft_p50', nan):>9.2f} "
              f"{r.get('ttft_p99', nan):>7.2f} {r.get('itl_p50', nan):>8.3f} {r.get('itl_p99', nan):>7.3f} "
              f"{r.get('vs_a', nan):>7.2f} | {r.get('bound_tokens_per_s', nan):>16.1f} {r.get('vs_a_over_bound_ratio', nan):>5.2f} | "
              f"{r.get('phase_bound_tokens_per_s', nan):>15.1f} {r.get('vs_a_over_phase_bound_ratio', nan):>5.2f}")
    print("bounds in tokens/s of the average decode step; rel = (tok/s / bound) relative to (a)'s")
    for r in rows:
        if "a_speedup_over_this" in r:
            print(f"(a) is {r['a_speedup_over_this']:.1f}x ({r['scenario']}) {r['label']}")
    out = write_json(args.out, {"benchmark": "engine", "machine": rates, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
