"""Mixed-adapter forward on SmolLM2: ours vs the base model alone vs PEFT's mixed batch.

    python -m benchmarks.bench_multi_lora_forward [--out benchmarks/results/multi_lora_forward.json]

Shapes: decode-shaped (64 sequences x 1 token) and prefill-shaped (8 x 128 tokens), rank-16
adapters on all seven projections, N distinct adapters in the batch (tokens spread evenly).
Ours is the serving decoder (`LeanLlama`: fused q/k/v and gate/up, paged KV cache, the LoRA
backend serving picks: the compiled kernel for fp32 on the CPU); the base and PEFT run the
transformers forward, PEFT with `adapter_names=[...]`.

Next to each measurement: the roofline bound of that forward, max(bytes read / measured
read bandwidth, FLOPs / measured matmul rate), with bytes = base weights + the distinct
adapters' weights.

Timing: every configuration of a shape runs once per round, rounds interleaved, median over
`--reps` rounds (PEFT, 2-10x slower, is timed on its own afterwards).

`decode 64x1 @128` (``--context``): one decode step of 64 sequences holding 128 cached tokens
each, transformers' forward with its KV cache against the lean decoder's paged cache — the
like-for-like decode comparison (the no-cache "decode 64x1" rows give the lean decoder the
cache writes and reads that transformers skips there).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from benchmarks._common import machine_rates as measure_rates
from benchmarks._common import interleaved_medians, timeit
from lorafold.server.engine.attention import build_attention_metadata
from lorafold.server.engine.host_memory import keep_freed_memory
from lorafold.server.engine.llama import LeanLlama
from lorafold.server.lora.peft_format import load_adapter
from lorafold.server.models.loader import LLAMA_TARGETS, load_base_model, module_specs
from tests.conftest import lean_prefill_inputs, make_peft_adapter


def machine_rates() -> tuple[float, float]:
    """(read bandwidth bytes/s, fp32 matmul FLOP/s) measured on this machine."""
    rates = measure_rates()
    return rates["read_bandwidth_Bps"], rates["matmul_flops"]


def make_adapters(base, n: int, rank: int, folder: Path) -> list[Path]:  # noqa: ANN001
    """n random rank-`rank` PEFT adapters on all seven projections, saved by PEFT itself."""
    return [make_peft_adapter(base, folder / f"a{i}", r=rank, alpha=2 * rank, seed=i, targets=LLAMA_TARGETS,
                              strength=0.05) for i in range(n)]


def decode_with_context_rows(base, lean: LeanLlama, batch: int, context: int, reps: int, bound: float) -> list[dict]:  # noqa: ANN001
    """One decode step of `batch` sequences that each already hold `context` tokens of KV
    cache: transformers' forward with its DynamicCache (cropped back after every step) against
    the lean decoder over the paged cache. Both write the new token's K/V and attend over
    context + 1 positions; no adapters. The prefill that fills the caches is not timed."""
    gen = torch.Generator().manual_seed(1)
    ctx_ids = torch.randint(0, base.config.vocab_size, (batch, context), generator=gen)
    step_ids = torch.randint(0, base.config.vocab_size, (batch, 1), generator=gen)
    with torch.no_grad():
        cache = base(ctx_ids, use_cache=True).past_key_values

    def run_hf() -> None:
        base(step_ids, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to `context` tokens (transformers 5: negative = tokens to drop)

    block = 16
    per_seq = (context + 1 + block - 1) // block
    shape = (batch * per_seq * block, lean.num_kv_heads, lean.head_dim)
    caches = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in lean.layers]
    seqs, slot_mapping = [], []
    for b in range(batch):
        table = list(range(b * per_seq, (b + 1) * per_seq))
        seqs.append((b, 1, context + 1, table))
        slot_mapping.append(table[context // block] * block + context % block)
    meta = build_attention_metadata(slot_mapping, seqs, block, torch.device("cpu"))
    inputs = (step_ids.reshape(-1), torch.full((batch,), context), caches, meta, None)
    with torch.no_grad():
        medians = interleaved_medians({"base + KV cache": run_hf, "lean base": lambda: lean(*inputs)}, reps)
    t_base = medians["base + KV cache"]
    name = f"decode {batch}x1 @{context}"
    return [dict(shape=name, method=m, adapters=0, seconds=t, vs_base=t / t_base, bound_s=bound) for m, t in medians.items()]


def base_bytes_flops(model, tokens: int) -> tuple[int, int]:
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return linear_params * 4, 2 * tokens * linear_params


def _run_lean(lean: LeanLlama, token_slots: torch.Tensor, inputs: tuple) -> None:
    lean(*inputs, lean.slots.meta(token_slots))  # metadata built per forward, as served


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/multi_lora_forward.json")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--context", type=int, default=128,
                        help="also time one decode step over this many cached tokens per sequence (0: skip)")
    args = parser.parse_args()
    keep_freed_memory()  # as `lorafold serve` does at start (process-wide malloc settings)
    torch.manual_seed(0)
    bw, rate = machine_rates()
    base = load_base_model().model
    max_n = max(args.adapters)
    tmp = Path(tempfile.mkdtemp(prefix="lorafold-bench-"))
    paths = make_adapters(base, max_n, args.rank, tmp)

    adapters = [load_adapter(p, module_specs(base)) for p in paths]
    adapter_bytes = sum(m.lora_a.numel() + m.lora_b.numel() for m in adapters[0].modules.values()) * 4

    # The serving path: the lean decoder with fused q/k/v and gate/up slices over a paged KV cache.
    lean = LeanLlama(copy.deepcopy(base), num_slots=max_n, rows=max_n * args.rank)
    for i, ad in enumerate(adapters):
        lean.slots.fill(i, ad)

    peft_model = None
    if not args.skip_peft:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="a0").eval()
        for i in range(1, max_n):
            peft_model.load_adapter(paths[i], adapter_name=f"a{i}")

    rows = []
    for shape_name, (batch, seq) in {"decode 64x1": (64, 1), "prefill 8x128": (8, 128)}.items():
        ids = torch.randint(0, base.config.vocab_size, (batch, seq))
        tokens = batch * seq
        wbytes, wflops = base_bytes_flops(base, tokens)
        lean_inputs = lean_prefill_inputs(lean, ids, block=16)
        # Every configuration of this shape is timed in the same interleaved rounds, so the
        # "x base" ratios compare runs taken side by side (see `interleaved_medians`).
        jobs: dict[tuple[str, int], Callable[[], None]] = {
            ("base", 0): lambda: base(ids),
            ("lean base", 0): lambda: lean(*lean_inputs),
        }
        bounds = {0: max(wbytes / bw, wflops / rate)}
        peft_names: dict[int, list[str]] = {}
        for n in args.adapters:
            # sequences round-robin over the adapters (the kernels read any order)
            per_row = torch.arange(batch) % n
            bounds[n] = max((wbytes + n * adapter_bytes) / bw, wflops / rate)
            jobs[("lean", n)] = partial(_run_lean, lean, per_row.repeat_interleave(seq), lean_inputs)
            peft_names[n] = [f"a{int(s)}" for s in per_row]
        with torch.no_grad():
            medians = interleaved_medians(jobs, args.reps)
        t_base = medians[("base", 0)]
        for (method, n), t in medians.items():
            rows.append(dict(shape=shape_name, method=method, adapters=n, seconds=t, vs_base=t / t_base,
                             bound_s=bounds[n]))
        if peft_model is not None:
            # PEFT is 2-10x slower: timed on its own, fewer repetitions, ratio to the same base median
            for n, names in peft_names.items():
                with torch.no_grad():
                    tp = timeit(lambda: peft_model(input_ids=ids, adapter_names=names), max(2, args.reps // 2))
                rows.append(dict(shape=shape_name, method="peft", adapters=n, seconds=tp, vs_base=tp / t_base,
                                 bound_s=bounds[n]))

    if args.context > 0:
        wbytes, wflops = base_bytes_flops(base, 64)
        rows += decode_with_context_rows(base, lean, 64, args.context, args.reps, max(wbytes / bw, wflops / rate))
    for r in rows:
        r["vs_bound"] = r["seconds"] / r["bound_s"]
    speedups = {}
    for r in rows:
        if r["method"] == "peft":
            mine = min((x for x in rows if x["method"] == "lean" and x["shape"] == r["shape"]
                        and x["adapters"] == r["adapters"]), key=lambda x: x["seconds"])
            speedups[f"{r['shape']} / {r['adapters']} adapters"] = r["seconds"] / mine["seconds"]
    print(f"machine: read bandwidth {bw / 1e9:.1f} GB/s, fp32 matmul {rate / 1e9:.0f} GFLOP/s, "
          f"threads {torch.get_num_threads()}, rank {args.rank}, adapter size {adapter_bytes / 1e6:.1f} MB")
    print(f"{'shape':<14} {'method':<15} {'adapters':>8} {'seconds':>9} {'x base':>7} {'bound s':>8} {'x bound':>8}")
    for r in rows:
        print(f"{r['shape']:<14} {r['method']:<15} {r['adapters']:>8} {r['seconds']:>9.4f} {r['vs_base']:>7.2f} "
              f"{r['bound_s']:>8.4f} {r['vs_bound']:>8.2f}")
    for k, v in speedups.items():
        print(f"lorafold speed-up over PEFT, {k}: {v:.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        benchmark="multi_lora_forward", machine=dict(platform=platform.platform(), threads=torch.get_num_threads(),
        read_bandwidth_Bps=bw, matmul_flops=rate), rank=args.rank, adapter_bytes=adapter_bytes,
        rows=rows, speedup_over_peft=speedups), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
