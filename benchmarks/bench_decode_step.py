"""One full-batch decode step of the engine on SmolLM2: base only vs many resident adapters.

    python -m benchmarks.bench_decode_step [--scenarios a,c,d] [--steps 3]

The step-level view of `bench_engine`: its 64 requests (same prompts, seed 0) are admitted
and prefilled, then decode steps of all 64 sequences (one token each, contexts of 32-256
prompt tokens plus a few) are timed one by one; the table gives the median. (a) all on the
base, (c) 64 distinct rank-16 adapters, (d) 64 adapters of ranks 8-128 (the scenarios of
`bench_engine`). With every sequence in the step and no prefill, this isolates the
per-step LoRA cost (the engine's adapter layout, views vs copies) from scheduling and from
the machine's drift over a long run; (a) is the baseline each adapter scenario is compared
with, in the same process.
"""

from __future__ import annotations

import argparse
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


def decode_step_seconds(base, tokenizer, adapters, steps: int) -> list[float]:  # noqa: ANN001
    """Fresh engine, the 64 requests (request i on adapters[i % 64], or the base), prefill,
    then `steps` timed full-batch decode steps."""
    engine = LLMEngine(base, tokenizer, ENGINE_CONFIG)
    requests = make_requests(64, base.config.vocab_size, seed=0)
    for i, (prompt, _) in enumerate(requests):
        adapter = adapters[i % len(adapters)] if adapters else None
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True),
                           adapter, f"x{i % 64}" if adapter is not None else None)
    while True:  # until a step is a pure decode of all 64 sequences
        engine.step()
        st = engine.last_step
        if st.num_tokens == st.num_seqs == len(requests):
            break
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default="a,c,d")
    parser.add_argument("--steps", type=int, default=3)
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
    rows = []
    for key in args.scenarios.split(","):
        times = decode_step_seconds(bm.model, bm.tokenizer, pools[key], args.steps)
        rows.append({"scenario": key, "label": LABELS[key], "step_seconds": times, "median_s": statistics.median(times)})
    base = next((r["median_s"] for r in rows if r["scenario"] == "a"), None)
    print(f"machine: {rates['read_bandwidth_Bps'] / 1e9:.1f} GB/s read, {rates['matmul_flops'] / 1e9:.0f} GFLOP/s fp32, "
          f"{rates['threads']} threads; 64-sequence decode step, median of {args.steps}")
    print(f"{'':2} {'scenario':<32} {'step s':>8} {'x (a)':>7}")
    for r in rows:
        if base is not None:
            r["vs_a"] = r["median_s"] / base
        print(f"{r['scenario']:<2} {r['label']:<32} {r['median_s']:>8.3f} {r.get('vs_a', float('nan')):>7.2f}")
    out = write_json(args.out, {"benchmark": "decode_step", "machine": rates, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
