"""One full-batch decode step of the engine on SmolLM2: base only vs many resident adapters.

    python -m benchmarks.bench_decode_step [--scenarios a,c,d] [--steps 3] [--sequences 64]
        [--rounds 1] [--profile] [--lora-dtypes auto[,bfloat16]]

The step-level view of `bench_engine`: its requests (same prompts, seed 0; 64 unless
`--sequences`) are admitted and prefilled, then decode steps of all sequences (one token
each, contexts of 32-256 prompt tokens plus a few) are timed one by one; the table gives the
median. (a) all on the base, (c) 64 distinct rank-16 adapters, (d) 64 adapters of ranks
8-128 (the scenarios of `bench_engine`), (rN) N distinct rank-16 adapters (request i on
adapter i mod N). With every sequence in the step and no prefill, this isolates the per-step
LoRA cost from scheduling and from the machine's drift over a long run; (a) is the baseline
each adapter scenario is compared with, in the same process (`--rounds` interleaves the
scenarios that many times). `--profile` also profiles as many more steps (torch.profiler):
the LoRA operator's milliseconds per step and every other operator's, the bytes of adapter
rows the step reads (every distinct adapter's rows, once) and the read rate that gives,
against the machine's measured read bandwidth: how far the adapters' cost is the memory
traffic alone. `--lora-dtypes auto,bfloat16` runs every adapter scenario with the adapter
pools in each dtype (`--lora-dtype`), side by side (key suffix `/bf16`).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time

import torch

from benchmarks._common import machine_rates, write_json
from benchmarks.bench_engine import ENGINE_CONFIG, make_requests, random_adapter
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.engine import LLMEngine
from lorafold.server.engine.host_memory import keep_freed_memory
from lorafold.server.engine.sampling_params import SamplingParams
from lorafold.server.models.loader import load_base_model

LABELS = {"a": "all on the base", "c": "64 distinct rank-16 adapters", "d": "64 adapters, ranks 8-128"}
SHORT = {"auto": "", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # key suffix per pool dtype


def label(name: str, lora_dtype: str) -> str:
    text = LABELS.get(name) or f"{name[1:]} distinct rank-16 adapters"
    return f"{text}, {SHORT[lora_dtype]} rows" if SHORT[lora_dtype] else text


def op_seconds(engine: LLMEngine, steps: int) -> tuple[float, float]:
    """Per step, over `steps` profiled steps: the self CPU time of the LoRA operators
    (`lorafold_cpu::lora_apply`, or `lorafold::lora_*`), and of every operator."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    events = prof.key_averages()
    lora_us = sum(e.self_cpu_time_total for e in events if "::lora_" in e.key)
    all_us = sum(e.self_cpu_time_total for e in events)
    return lora_us / 1e6 / steps, all_us / 1e6 / steps


def decode_step_seconds(base, tokenizer, adapters, steps: int, sequences: int = 64,  # noqa: ANN001
                        profile: bool = False, lora_dtype: str = "auto") -> dict:
    """Fresh engine (adapter pools in `lora_dtype`), `sequences` requests (request i on
    adapters[i % len], or the base), prefill, then `steps` timed full-batch decode steps (and
    with `profile`, as many profiled ones)."""
    engine = LLMEngine(base, tokenizer, dataclasses.replace(ENGINE_CONFIG, lora_dtype=lora_dtype))
    requests = make_requests(sequences, base.config.vocab_size, seed=0)
    for i, (prompt, _) in enumerate(requests):
        adapter = adapters[i % len(adapters)] if adapters else None
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True),
                           adapter, f"x{i % len(adapters)}" if adapter is not None else None)
    while True:  # until a step is a pure decode of every sequence
        engine.step()
        st = engine.last_step
        if st.num_tokens == st.num_seqs == len(requests):
            break
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    out = {"step_seconds": times, "distinct_adapters": engine.last_step.num_adapters}
    if profile:
        out["lora_op_s"], out["all_ops_s"] = op_seconds(engine, steps)
        # every distinct adapter's rows, once: its rank rows x the bytes of a rank row
        distinct = {id(a): a for a in adapters}.values()
        out["adapter_bytes"] = sum(a.max_rank for a in distinct) * engine.runner.model.slots.row_bytes
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default="a,c,d", help="a, c, d, or rN (N distinct rank-16 adapters)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=64, help="sequences in every step (at most 64)")
    parser.add_argument("--rounds", type=int, default=1, help="run the scenarios this many times, interleaved")
    parser.add_argument("--profile", action="store_true", help="also time the LoRA operator (torch.profiler)")
    parser.add_argument("--lora-dtypes", default="auto",
                        help="adapter pool dtypes every adapter scenario runs with (e.g. auto,bfloat16)")
    parser.add_argument("--out", default="benchmarks/results/decode_step.json")
    args = parser.parse_args()
    keep_freed_memory()  # as `lorafold serve` does at start (process-wide malloc settings)
    torch.manual_seed(0)
    rates = machine_rates()
    bm = load_base_model()
    # the adapters are built for the serving modules, read off a small engine
    specs = LLMEngine(bm.model, bm.tokenizer, EngineConfig(max_loras=1)).runner.base_modules()
    rng = random.Random(1)  # the same draws as bench_engine
    rank16 = [random_adapter(specs, 16, 100 + i) for i in range(64)]
    mixed_ranks = [rng.choice([8, 16, 32, 64, 128]) for _ in range(64)]
    pools = {"a": [], "c": rank16, "d": [random_adapter(specs, r, 300 + i) for i, r in enumerate(mixed_ranks)]}
    plan: dict[str, tuple[str, str]] = {}  # scenario key -> (adapter scenario, pool dtype)
    for name in args.scenarios.split(","):
        if name not in pools:
            pools[name] = rank16[: int(name[1:])]
        for dtype in ["auto"] if name == "a" else args.lora_dtypes.split(","):
            plan["/".join(filter(None, (name, SHORT[dtype])))] = (name, dtype)
    runs: dict[str, list[dict]] = {key: [] for key in plan}
    for _ in range(args.rounds):
        for key, (name, dtype) in plan.items():
            runs[key].append(decode_step_seconds(bm.model, bm.tokenizer, pools[name], args.steps, args.sequences,
                                                 args.profile, dtype))
    rows = []
    for key, (name, dtype) in plan.items():
        times = [t for r in runs[key] for t in r["step_seconds"]]
        row = {"scenario": key, "label": label(name, dtype), "lora_dtype": dtype, "step_seconds": times,
               "median_s": statistics.median(times),
               "round_medians_s": [statistics.median(r["step_seconds"]) for r in runs[key]],
               "distinct_adapters": runs[key][-1]["distinct_adapters"]}
        if args.profile:
            row["lora_op_s"] = statistics.median(r["lora_op_s"] for r in runs[key])
            row["other_ops_s"] = statistics.median(r["all_ops_s"] - r["lora_op_s"] for r in runs[key])
            row["adapter_bytes"] = runs[key][-1]["adapter_bytes"]
            row["lora_read_Bps"] = row["adapter_bytes"] / row["lora_op_s"] if row["lora_op_s"] else None
        rows.append(row)
    base = next((r["median_s"] for r in rows if r["scenario"] == "a"), None)
    print(f"machine: {rates['read_bandwidth_Bps'] / 1e9:.1f} GB/s read, {rates['matmul_flops'] / 1e9:.0f} GFLOP/s fp32, "
          f"{rates['threads']} threads; {args.sequences}-sequence decode step, median of {args.steps} x "
          f"{args.rounds} round(s)")
    print(f"{'':8} {'scenario':<42} {'step s':>8} {'x (a)':>7} {'per round':>20}"
          + (f" {'LoRA op ms':>10} {'other ops ms':>12} {'adapter MiB':>11} {'GB/s':>6}" if args.profile else ""))
    for r in rows:
        if base is not None:
            r["vs_a"] = r["median_s"] / base
        line = (f"{r['scenario']:<8} {r['label']:<42} {r['median_s']:>8.3f} {r.get('vs_a', float('nan')):>7.2f} "
                f"{' / '.join(f'{t:.3f}' for t in r['round_medians_s']):>20}")
        if args.profile:
            gbs = f"{r['lora_read_Bps'] / 1e9:>6.1f}" if r["lora_read_Bps"] else f"{'-':>6}"
            line += (f" {r['lora_op_s'] * 1e3:>10.1f} {r['other_ops_s'] * 1e3:>12.1f} "
                     f"{r['adapter_bytes'] / 2**20:>11.0f} {gbs}")
        print(line)
    out = write_json(args.out, {"benchmark": "decode_step", "args": vars(args), "machine": rates, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
