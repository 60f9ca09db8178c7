"""Many distinct adapters at once: throughput, TTFT, loads and evictions against the base.

    nice -n 10 python -m benchmarks.bench_many_adapters [--adapters 1,8,32,128,512]
        [--popularity uniform,zipf] [--streams 32,64] [--requests-per-stream 2]
        [--prompt-tokens 32] [--max-tokens 64] [--adapter-budget-mb 2600]
        [--lora-dtypes auto[,bfloat16]] [--paired-turn 8] [--out benchmarks/results/many_adapters.json]

The engine is driven in-process (no HTTP). Each scenario is a closed loop: `streams` clients,
each sending its next request (fixed-length random prompt, greedy, exactly `max-tokens`
tokens) when its last one finished, `streams x requests-per-stream` requests in all. A
request's adapter is drawn from N distinct rank-16 adapters on all seven projections,
uniformly or zipf (weight 1/k); N = 0 is the base model. Each scenario starts with no
adapter resident (the previous scenario's are invalidated), or with `--warm` with all of
them loaded (as many as fit). TTFT is measured from the
client's send to its first token. Per scenario also: distinct adapters per step, and the
bytes a step reads (base weights + those adapters' rows) against the 8-adapter run's: the
throughput ratio a step bound by memory traffic alone would give (steps that are partly
compute-bound lose less). Besides wall-clock tokens/s, tokens per CPU-second of the
process (engine thread and prefetch worker): on a machine shared with other jobs the wall
clock measures their load as much as ours, CPU time much less.

Adapters' weights come from a bank of 16 random weight sets (adapter i uses set i mod 16)
under distinct names and content hashes: the engine treats each as its own adapter (its
own rows, loads and evictions; the serving work does not depend on the values), and 512
adapters do not need 10 GB of host memory to set up. On a memory budget smaller than all N
adapters (512 rank-16 adapters of SmolLM2 need 10 GB of pools), adapters are evicted.

`--paired-turn STEPS` compares every scenario with an 8-adapter loop that it takes turns with,
STEPS engine steps each, on a twin engine (same popularity and rows): both then meet the
machine's drift (this VM's speed moves by up to 30 % within minutes) within a second or two,
and "vs N=8" is the median of the per-pair ratios. Without it, each scenario runs on its own
and is compared with the 8-adapter scenario's run, minutes away.

`--lora-dtypes auto,bfloat16` runs every scenario on two engines, interleaved: adapter pools
in the model's dtype and in bfloat16 (`--lora-dtype`: half the bytes per adapter, so the
same budget holds twice the adapters); each is compared with its own 8-adapter run.

Also measured: the cost of one adapter load per rank, before (a copy per module, the path
this engine had, `fill_per_module` here) and now: laid out straight into the slot when
nothing was staged, or staged host-side ahead by the prefetcher, then one copy per pool.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time

import torch

from benchmarks._common import percentile, write_json
from lorafold.server.engine.config import EngineConfig
from lorafold.server.engine.engine import LLMEngine
from lorafold.server.engine.host_memory import keep_freed_memory
from lorafold.server.engine.sampling_params import SamplingParams
from lorafold.server.lora.peft_format import LoRAAdapter, ModuleLoRA
from lorafold.server.lora.slots import AdapterSlots
from lorafold.server.models.loader import load_base_model

BANK = 16


def weight_bank(specs, rank: int) -> list[dict[str, ModuleLoRA]]:  # noqa: ANN001
    bank = []
    for seed in range(BANK):
        g = torch.Generator().manual_seed(1000 + seed)
        bank.append({p: ModuleLoRA(torch.randn(rank, s.in_features, generator=g) * 0.01,
                                   torch.randn(s.out_features, rank, generator=g) * 0.01, 2.0) for p, s in specs.items()})
    return bank


def make_adapters(bank: list[dict[str, ModuleLoRA]], n: int, tag: str) -> list[LoRAAdapter]:
    return [LoRAAdapter(modules=bank[i % BANK], config={"r": 16}, content_hash=f"{tag}{i}".ljust(64, "0"), nbytes=0)
            for i in range(n)]


class ClosedLoop:
    """One scenario's closed loop of `streams` clients, advanced a step at a time so that two
    loops can take turns on the machine (`run_paired`). Its clock is its own: the wall and
    CPU time of its own iterations (admissions, the engine step, the bookkeeping), so a loop
    that takes turns with another is timed as if alone, TTFT included. Cold: no adapter
    resident at the start. Warm: every adapter that fits the budget loaded first (a one-token
    request each, untimed), the steady state of a server whose adapters are in use: what
    remains is the per-step cost of the distinct adapters."""

    def __init__(self, engine: LLMEngine, adapters: list[LoRAAdapter], popularity: str, streams: int,
                 per_stream: int, prompt_tokens: int, max_tokens: int, seed: int, warm: bool = False) -> None:
        for name in list(engine.adapter_table.resident()):  # start cold
            engine.adapter_table.invalidate(name)
        if warm:
            one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
            for i, adapter in enumerate(adapters):
                engine.add_request(f"warm{i}", [100], one, adapter, f"a{i}")
                while engine.has_unfinished():
                    engine.step()
        self.engine, self.adapters, self.streams, self.prompt_tokens = engine, adapters, streams, prompt_tokens
        self.vocab = engine.runner.model.config.vocab_size
        self.rng = random.Random(seed)
        self.weights = [1 / k for k in range(1, len(adapters) + 1)] if popularity == "zipf" else None
        self.params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        table, pre = engine.adapter_table.stats, engine.prefetcher.stats
        self.before = (table.misses, table.evictions, pre.staged_ahead)
        self.total = streams * per_stream
        self.sent = self.generated = self.steps = self.seqs = self.distinct = 0
        self.busy: set[str] = set()
        self.sent_at: dict[str, float] = {}
        self.ttft: list[float] = []
        self.load_seconds = self.clock = self.cpu = 0.0

    @property
    def done(self) -> bool:
        return self.sent >= self.total and not self.engine.has_unfinished()

    def step(self) -> None:
        engine = self.engine
        t0, c0 = time.perf_counter(), time.process_time()
        while len(self.busy) < self.streams and self.sent < self.total:
            rid = f"q{self.sent}"
            prompt = [self.rng.randrange(100, self.vocab) for _ in range(self.prompt_tokens)]
            i = self.rng.choices(range(len(self.adapters)), weights=self.weights)[0] if self.adapters else None
            engine.add_request(rid, prompt, self.params, self.adapters[i] if i is not None else None, f"a{i}")
            self.sent_at[rid] = self.clock + time.perf_counter() - t0
            self.busy.add(rid)
            self.sent += 1
        outs = engine.step()
        self.load_seconds += engine.last_step.adapter_load_seconds
        self.steps += 1
        self.seqs += engine.last_step.num_seqs
        self.distinct += engine.last_step.num_adapters
        now = self.clock + time.perf_counter() - t0
        for o in outs:
            if o.token_ids and o.num_output_tokens == len(o.token_ids):  # its first token
                self.ttft.append(now - self.sent_at[o.request_id])
            self.generated += len(o.token_ids)
            if o.finished:
                self.busy.discard(o.request_id)
        self.clock += time.perf_counter() - t0
        self.cpu += time.process_time() - c0

    def run(self) -> dict:
        """Every step to the end, alone; the result."""
        while not self.done:
            self.step()
        return self.result()

    def result(self) -> dict:
        """Throughput, TTFT and adapter-cache counts of the finished loop."""
        table, pre = self.engine.adapter_table.stats, self.engine.prefetcher.stats
        loads, evictions, ahead = (table.misses - self.before[0], table.evictions - self.before[1],
                                   pre.staged_ahead - self.before[2])
        total, steps = self.total, max(self.steps, 1)
        return {"requests": total, "generated_tokens": self.generated, "seconds": self.clock,
                "tokens_per_s": self.generated / self.clock, "cpu_seconds": self.cpu,
                "tokens_per_cpu_s": self.generated / self.cpu,
                "ttft_p50": percentile(self.ttft, 50), "ttft_p99": percentile(self.ttft, 99),
                "loads_per_request": loads / total, "evictions_per_request": evictions / total,
                "loads_staged_ahead": ahead, "load_seconds": self.load_seconds,
                "steps": self.steps, "seqs_per_step": self.seqs / steps, "adapters_per_step": self.distinct / steps,
                "resident_at_end": len(self.engine.adapter_table.resident())}


def run_scenario(engine: LLMEngine, adapters: list[LoRAAdapter], popularity: str, streams: int, per_stream: int,
                 prompt_tokens: int, max_tokens: int, seed: int, warm: bool = False) -> dict:
    """One closed loop on its own (see `ClosedLoop`)."""
    return ClosedLoop(engine, adapters, popularity, streams, per_stream, prompt_tokens, max_tokens, seed, warm).run()


def run_paired(first: ClosedLoop, second: ClosedLoop, turn_steps: int) -> tuple[dict, dict]:
    """The two loops take turns of `turn_steps` engine steps each until both finish: the
    machine's drift (this VM's speed moves by up to 30 % within minutes) then reaches both
    within a second or two, and their ratio keeps only what differs between them."""
    while not (first.done and second.done):
        for loop in (first, second):
            for _ in range(turn_steps):
                if loop.done:
                    break
                loop.step()
    return first.result(), second.result()


def fill_per_module(slots: AdapterSlots, slot: int, adapter: LoRAAdapter) -> None:
    """The previous load path (before staging): every module written on its own, its slice's
    rows past its rank zeroed."""
    slots.clear(slot)
    alloc = adapter.max_rank
    start = slots._reserve(slot, alloc)
    slots.row_start[slot] = start
    for path, target in slots.targets.items():
        module, layer, i = adapter.modules.get(path), target.layer, target.slice_idx
        lo, hi = layer.slice_offsets[i], layer.slice_offsets[i + 1]
        r = 0 if module is None else module.rank
        if r:
            layer.a_pool[i, start : start + r].copy_(module.lora_a)
            layer.b_pool[start : start + r, lo:hi].copy_((module.lora_b * module.scale).t())
        layer.a_pool[i, start + r : start + alloc].zero_()
        layer.b_pool[start + r : start + alloc, lo:hi].zero_()
        layer.ranks[i, slot] = r
    slots.occupant[slot] = adapter


@torch.no_grad()
def load_costs(engine: LLMEngine, ranks: list[int], reps: int) -> list[dict]:
    """Median seconds of one load per rank: per-module copies vs staging + one copy per pool."""
    slots, specs, rows = engine.runner.model.slots, engine.runner.base_modules(), []
    for rank in ranks:
        ad = make_adapters(weight_bank(specs, rank)[:1], 1, f"load{rank}")[0]
        staged = slots.stage(ad)
        t_module, t_direct, t_stage, t_copy = [], [], [], []
        for _ in range(reps):
            for times, fn in ((t_module, lambda: fill_per_module(slots, 0, ad)), (t_direct, lambda: slots.fill(0, ad)),
                              (t_stage, lambda: slots.stage(ad)), (t_copy, lambda: slots.fill(0, staged))):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        slots.clear(0)
        rows.append({"rank": rank, "adapter_mb": staged.nbytes / 2**20, "per_module_s": statistics.median(t_module),
                     "direct_fill_s": statistics.median(t_direct),
                     "stage_s": statistics.median(t_stage), "copy_per_pool_s": statistics.median(t_copy)})
    return rows


def baseline_row(rows: list[dict], row: dict) -> dict | None:
    """The 8-adapter, uncapped run of `row`'s streams, popularity and pool dtype (None: not run)."""
    return next((b for b in rows if b["streams"] == row["streams"] and b["adapters"] == 8 and b["max_loras"] is None
                 and b["popularity"] == row["popularity"]
                 and b.get("lora_dtype", "auto") == row.get("lora_dtype", "auto")), None)


def round_ratios(rows: list[dict], row: dict) -> list[float]:
    """tokens/s of `row` over its 8-adapter baseline's, round by round: of the 8-adapter loop
    it took turns with (`--paired-turn`), else of the baseline's run in the same round (runs of
    one round are minutes apart, not the whole run: the machine's drift between rounds cancels)."""
    if "paired_ratios" in row:
        return row["paired_ratios"]
    eight = baseline_row(rows, row)
    return [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(row["rounds"], eight["rounds"])]


def markdown_table(paths: list[str]) -> str:
    """The docs' table from result JSONs of this benchmark (several: their rows in order)."""
    lines = ["| streams | rows | N | popularity | tokens/s | vs base | vs N=8 | per-round vs N=8 | TTFT p50 / p99 s "
             "| TTFT p99 vs N=8 | loads / request | adapters / step | memory-bound ratio vs N=8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        with open(path) as f:
            rows = json.load(f)["rows"]
        for r in rows:
            n = r["adapters"]
            adapted = n not in (0, 8)
            vs8 = "" if n == 0 else f"**{r['vs_8_adapters']:.2f}**" if n > 8 else f"{r['vs_8_adapters']:.2f}"
            per_round = " / ".join(f"{v:.2f}" for v in round_ratios(rows, r)) if adapted else ""
            p99 = "" if n == 0 else f"{r['ttft_p99_vs_8_adapters']:.2f}"
            bound = "" if n == 0 else f"{r['bytes_vs_8_adapters']:.2f}"
            dtype = {"auto": "model's", "bfloat16": "bf16"}.get(r.get("lora_dtype", "auto"), r.get("lora_dtype"))
            lines.append(f"| {r['streams']} | {dtype} | {n or 'base'} | {r['popularity'] if n else ''} | {r['tokens_per_s']:.1f} "
                         f"| {r['vs_base']:.2f} | {vs8} | {per_round} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} "
                         f"| {p99} | {r['loads_per_request']:.2f} | {r['adapters_per_step']:.1f} | {bound} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", default="1,8,32,128,512", help="N values (the base always runs)")
    parser.add_argument("--popularity", default="uniform,zipf")
    parser.add_argument("--streams", default="32,64")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--adapter-budget-mb", type=int, default=2600, help="adapter memory budget (2600: 133 rank-16)")
    parser.add_argument("--max-loras-baseline", type=int, default=8,
                        help="also run N=32 uniform capped at this many resident adapters (0: skip)")
    parser.add_argument("--load-ranks", default="8,16,64,128")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every scenario this many times, interleaved, and report medians (a shared "
                        "machine's drift then hits every scenario alike)")
    parser.add_argument("--paired-turn", type=int, default=0, metavar="STEPS",
                        help="run every scenario taking turns of this many engine steps with an 8-adapter loop of "
                        "the same popularity and rows on a twin engine, and compare each with its own twin "
                        "(0: every scenario on its own, compared with the 8-adapter scenario's run)")
    parser.add_argument("--warm", action="store_true",
                        help="load every adapter (that fits) before each scenario's timed loop, instead of none")
    parser.add_argument("--lora-dtypes", default="auto",
                        help="adapter pool dtypes (--lora-dtype), one engine each, interleaved (e.g. auto,bfloat16)")
    parser.add_argument("--adapter-prefetch", default="auto", choices=("auto", "on", "off"),
                        help="EngineConfig.adapter_prefetch of every engine (auto: inline loads where the forward's "
                        "threads take every core)")
    parser.add_argument("--out", default="benchmarks/results/many_adapters.json")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="run nothing: print the markdown table of docs/benchmarks.md from these result files")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(args.table))
        return 0
    keep_freed_memory()  # as `lorafold serve` does at start (process-wide malloc settings)
    if args.threads:
        torch.set_num_threads(args.threads)
    bm = load_base_model()
    streams = [int(s) for s in args.streams.split(",")]
    cfg = dict(block_size=16, max_num_seqs=max(streams), max_num_batched_tokens=512, max_prefill_chunk=256,
               max_model_len=args.prompt_tokens + args.max_tokens + 16, max_queue=4096,
               adapter_budget_bytes=args.adapter_budget_mb << 20, adapter_prefetch=args.adapter_prefetch)
    cfg["num_kv_blocks"] = max(streams) * (cfg["max_model_len"] // 16 + 1)
    dtypes = args.lora_dtypes.split(",")
    engines = {d: LLMEngine(copy.deepcopy(bm.model), bm.tokenizer, EngineConfig(**cfg, lora_dtype=d)) for d in dtypes}
    # --paired-turn: the 8-adapter loop each scenario takes turns with runs on a twin engine
    twins = {d: LLMEngine(copy.deepcopy(bm.model), bm.tokenizer, EngineConfig(**cfg, lora_dtype=d))
             for d in dtypes} if args.paired_turn else {}
    engine = engines[dtypes[0]]
    loads = load_costs(engine, [int(r) for r in args.load_ranks.split(",") if r], reps=5)
    bank = weight_bank(engine.runner.base_modules(), 16)
    plan = [(0, "-")] + [(int(n), p) for n in args.adapters.split(",") for p in args.popularity.split(",")
                         if int(n) > 1 or p == args.popularity.split(",")[0]]
    rows = []
    for s in streams:
        runs: dict[tuple, list[dict]] = {}
        capped = None
        if args.max_loras_baseline and "32" in args.adapters.split(","):
            capped = LLMEngine(copy.deepcopy(bm.model), bm.tokenizer,
                               EngineConfig(**cfg, max_loras=args.max_loras_baseline, lora_dtype=dtypes[0]))
        pairs: dict[tuple, list[tuple[dict, dict]]] = {}  # scenario -> (its result, its twin's), per round
        for _ in range(args.rounds):
            for n, pop in plan:
                if args.paired_turn and n == 8:
                    continue  # every scenario runs next to its own 8-adapter loop
                for dtype, eng in engines.items():
                    popularity = pop if n else "uniform"
                    loop = ClosedLoop(eng, make_adapters(bank, n, f"s{s}n{n}{pop}"), popularity, s,
                                      args.requests_per_stream, args.prompt_tokens, args.max_tokens, seed=s,
                                      warm=args.warm)
                    if args.paired_turn:
                        twin = ClosedLoop(twins[dtype], make_adapters(bank, 8, f"s{s}n8{popularity}"), popularity, s,
                                          args.requests_per_stream, args.prompt_tokens, args.max_tokens, seed=s,
                                          warm=args.warm)
                        res, eight = run_paired(loop, twin, args.paired_turn)
                        runs.setdefault((8, popularity, None, dtype), []).append(eight)
                        pairs.setdefault((n, pop, None, dtype), []).append((res, eight))
                        vs = f" (its 8-adapter twin {eight['tokens_per_s']:.1f})"
                    else:
                        res, vs = loop.run(), ""
                    runs.setdefault((n, pop, None, dtype), []).append(res)
                    print(f"  ran {s} streams, {dtype} rows, N={n} {pop}: {res['tokens_per_s']:.1f} tok/s{vs}", flush=True)
            if capped is not None:
                res = run_scenario(capped, make_adapters(bank, 32, f"cap{s}"), "uniform", s, args.requests_per_stream,
                                   args.prompt_tokens, args.max_tokens, seed=s)
                runs.setdefault((32, "uniform", args.max_loras_baseline, dtypes[0]), []).append(res)
                print(f"  ran {s} streams, N=32 uniform, max_loras={args.max_loras_baseline}: "
                      f"{res['tokens_per_s']:.1f} tok/s", flush=True)
        del capped
        pops, order = args.popularity.split(","), list(engines)
        for (n, pop, cap, dtype), results in sorted(runs.items(), key=lambda kv: (
                kv[0][0], pops.index(kv[0][1]) if kv[0][1] in pops else -1, kv[0][2] or 0, order.index(kv[0][3]))):
            med = {k: statistics.median(r[k] for r in results) for k in results[0]}
            row = {"streams": s, "lora_dtype": dtype, "adapters": n, "popularity": pop, "max_loras": cap, **med,
                   "rounds": results}
            if (n, pop, cap, dtype) in pairs:  # medians of the ratios to the 8-adapter loops it took turns with
                twinned = pairs[(n, pop, cap, dtype)]
                row["paired_ratios"] = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in twinned]
                row["vs_8_adapters"] = statistics.median(row["paired_ratios"])
                row["cpu_vs_8_adapters"] = statistics.median(x["tokens_per_cpu_s"] / y["tokens_per_cpu_s"]
                                                             for x, y in twinned)
                row["ttft_p99_vs_8_adapters"] = statistics.median(x["ttft_p99"] / y["ttft_p99"] for x, y in twinned)
            rows.append(row)
    # What a decode step must read: every base weight once, plus every distinct adapter's rows
    # in the batch once (the kernels gather them per segment). A step bound by memory traffic
    # alone takes time in proportion: bytes_vs_8_adapters is the vs_8_adapters it would give.
    base_bytes = sum(p.nbytes for p in engine.runner.model.parameters())
    adapter_bytes = {d: 16 * e.runner.model.slots.row_bytes for d, e in engines.items()}
    for r in rows:
        r["bytes_per_step"] = base_bytes + r["adapters_per_step"] * adapter_bytes[r["lora_dtype"]]
    for r in rows:  # ratios against the base and the 8-adapter run of the same streams, popularity and dtype
        base = next(b for b in rows if b["streams"] == r["streams"] and b["adapters"] == 0
                    and b["lora_dtype"] == r["lora_dtype"])
        eight = baseline_row(rows, r)
        r["vs_base"] = r["tokens_per_s"] / base["tokens_per_s"]
        if "paired_ratios" not in r:  # else set above, from its twins
            r["cpu_vs_8_adapters"] = r["tokens_per_cpu_s"] / eight["tokens_per_cpu_s"] if eight else None
            r["vs_8_adapters"] = r["tokens_per_s"] / eight["tokens_per_s"] if eight else None
            r["ttft_p99_vs_8_adapters"] = r["ttft_p99"] / eight["ttft_p99"] if eight else None
        r["bytes_vs_8_adapters"] = eight["bytes_per_step"] / r["bytes_per_step"] if eight else None
    held = ", ".join(f"{e.runner.adapter_budget_rows} rank rows = {e.runner.adapter_budget_rows // 16} rank-16 adapters "
                     f"({d} rows)" for d, e in engines.items())
    print(f"adapter budget {engine.runner.adapter_budget_bytes / 2**20:.0f} MiB: {held}; {args.requests_per_stream} requests per stream, "
          f"{args.prompt_tokens}-token prompts, {args.max_tokens} tokens each; torch threads {torch.get_num_threads()}; "
          f"medians of {args.rounds} interleaved round(s)"
          f"{f', each scenario taking turns of {args.paired_turn} steps with an 8-adapter twin' if args.paired_turn else ''}"
          f"; a step reads {base_bytes / 2**20:.0f} MiB of base weights "
          f"+ {adapter_bytes[dtypes[0]] / 2**20:.1f} MiB per distinct adapter in it ({dtypes[0]} rows)")
    print(f"{'streams':>7} {'rows':>8} {'N':>4} {'pop':<8} {'cap':>4} {'tok/s':>7} {'vs base':>7} {'vs N=8':>6} {'TTFT p50':>8} "
          f"{'p99':>6} {'p99/N=8':>7} {'loads/req':>9} {'evict/req':>9} {'resident':>8} {'tok/cpu-s':>9} {'vs N=8':>6} "
          f"{'ad/step':>7} {'bytes N=8/N':>11}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        print(f"{r['streams']:>7} {r['lora_dtype']:>8} {r['adapters']:>4} {r['popularity']:<8} {fmt(r['max_loras'], 'd'):>4} "
              f"{r['tokens_per_s']:>7.1f} {r['vs_base']:>7.2f} {fmt(r['vs_8_adapters'], '.2f'):>6} {r['ttft_p50']:>8.2f} "
              f"{r['ttft_p99']:>6.2f} {fmt(r['ttft_p99_vs_8_adapters'], '.2f'):>7} {r['loads_per_request']:>9.2f} "
              f"{r['evictions_per_request']:>9.2f} {r['resident_at_end']:>8} {r['tokens_per_cpu_s']:>9.1f} "
              f"{fmt(r['cpu_vs_8_adapters'], '.2f'):>6} {r['adapters_per_step']:>7.1f} "
              f"{fmt(r['bytes_vs_8_adapters'], '.2f'):>11}")
    if loads:  # --load-ranks '' skips them
        print("one load, by rank: before (a copy per module) | now, nothing staged (laid out straight into the slot) | "
              "now, prefetched: staging on the worker, then one copy per pool on the engine thread")
        print(f"{'rank':>5} {'MiB':>6} {'before':>9} {'unstaged':>9} {'stage':>9} {'copy':>9} {'before/copy':>11}")
    for r in loads:
        print(f"{r['rank']:>5} {r['adapter_mb']:>6.1f} {r['per_module_s'] * 1e3:>6.1f} ms {r['direct_fill_s'] * 1e3:>6.1f} ms "
              f"{r['stage_s'] * 1e3:>6.1f} ms {r['copy_per_pool_s'] * 1e3:>6.1f} ms {r['per_module_s'] / r['copy_per_pool_s']:>10.1f}x")
    out = write_json(args.out, {"benchmark": "many_adapters", "args": vars(args), "rows": rows, "load_costs": loads,
                                "adapter_budget_bytes": engine.runner.adapter_budget_bytes,
                                "adapter_budget_rows": {d: e.runner.adapter_budget_rows for d, e in engines.items()}})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
