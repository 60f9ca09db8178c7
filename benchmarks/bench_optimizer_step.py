"""Optimizer-step time and state memory on SmolLM2-135M with rank-16 LoRA on all 7 projections.

Times ``opt.step()`` only (median over rounds, after warm-up rounds that allocate state; one
step of every method per round, so load drift on a shared machine cancels in the ratios), with
fixed gradients from one real forward/backward pass; reports the ratio to AdamW and the
optimizer-state bytes. The base is the real SmolLM2 checkpoint when ``--model`` points at
one, else a random LlamaForCausalLM with SmolLM2-135M's exact config.

    python benchmarks/bench_optimizer_step.py --out benchmarks/results/optimizer_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from lorafold.training.adapters.lora import inject_lora, lora_pairs
from lorafold.training.optim.registry import OPTIMIZERS, build_optimizer

DEFAULT_MODEL = Path.home() / ".cache/lorafold/models/SmolLM2-135M-Instruct"
SMOLLM2_135M = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
}
# (label, registry name, overrides): RefLoRA without warm-up so the refactoring path is timed
METHODS = [
    ("adamw", "adamw", {}),
    ("adamw_foreach", "adamw", {"foreach": True}),
    ("loraplus", "loraplus", {}),
    ("scaled_gd", "scaled_gd", {}),
    ("scaled_adamw", "scaled_adamw", {}),
    ("reflora", "reflora", {"warmup_steps": 0}),
    ("reflora_s", "reflora_s", {"warmup_steps": 0}),
    ("lora_pro", "lora_pro", {}),
    ("lora_pro_sgd", "lora_pro_sgd", {}),
    ("adaprelora", "adaprelora", {}),
    ("lora_rite", "lora_rite", {}),
    ("dlrt", "dlrt", {}),
    ("geolora", "geolora", {}),
    ("geo_adam", "geo_adam", {}),
]


def load_base(path: Path) -> tuple[torch.nn.Module, str]:
    if (path / "config.json").exists():
        try:
            return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32), f"checkpoint {path}"
        except (OSError, ValueError) as exc:
            print(f"could not load {path} ({exc}); using a random model with its config")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)), "random init, SmolLM2-135M config"


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def time_round_robin(
    opts: dict[str, torch.optim.Optimizer], reset, warmup: int, steps: int
) -> dict[str, list[float]]:
    """Time ``opt.step()`` alone, one step of every method per round, so load drift on a
    shared machine hits all methods alike. ``reset()`` (untimed) puts the factors back before
    each step, keeping the fixed gradients consistent with the factors (no drift, no overflow)."""
    times: dict[str, list[float]] = {label: [] for label in opts}
    for round_ in range(warmup + steps):
        for label, opt in opts.items():
            reset()
            t0 = time.perf_counter()
            opt.step()
            if round_ >= warmup:
                times[label].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", default="benchmarks/results/optimizer_step.json")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    # one thread by default: on a shared CPU a multi-threaded region waits for its slowest thread
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, source = load_base(args.model)
    inject_lora(model, r=args.rank, alpha=2 * args.rank)
    pairs = lora_pairs(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B ≠ 0 so every method runs its steady-state path (no B = 0 fallback)
        for p in pairs:
            p.B.copy_(0.01 * torch.randn(p.B.shape, generator=gen))
    initial = {id(t): t.detach().clone() for p in pairs for t in (p.A, p.B)}
    ids = torch.randint(0, 49152, (1, 64), generator=gen)
    model(ids, labels=ids).loss.backward()  # real gradients, reused by every step
    lora_params = sum(t.numel() for p in pairs for t in (p.A, p.B))
    print(f"base: {source}; {len(pairs)} LoRA pairs, {lora_params / 1e6:.2f} M LoRA parameters; threads {args.threads}")
    def reset() -> None:
        with torch.no_grad():
            for p in pairs:
                p.A.copy_(initial[id(p.A)])
                p.B.copy_(initial[id(p.B)])

    opts: dict[str, torch.optim.Optimizer] = {}
    for label, name, overrides in METHODS:
        if name not in OPTIMIZERS:
            print(f"{label:<14} not registered (skipped)")
            continue
        try:
            opts[label] = build_optimizer(name, model, **overrides)
        except (ValueError, TypeError) as exc:
            print(f"{label:<14} cannot be built on a LoRA model ({exc}); skipped")
    times = time_round_robin(opts, reset, args.warmup, args.steps)
    rows = [
        {"method": label, "median_s": statistics.median(t), "min_s": min(t), "state_bytes": state_bytes(opts[label])}
        for label, t in times.items()
    ]
    base_t = next(r["median_s"] for r in rows if r["method"] == "adamw")
    base_m = next(r["state_bytes"] for r in rows if r["method"] == "adamw")
    print(f"\n{'method':<14}{'step ms (median)':>18}{'min ms':>9}{'× AdamW':>9}{'state MiB':>11}{'× AdamW':>9}")
    for r in rows:
        r["time_ratio"], r["memory_ratio"] = r["median_s"] / base_t, r["state_bytes"] / base_m
        print(
            f"{r['method']:<14}{1e3 * r['median_s']:>18.1f}{1e3 * r['min_s']:>9.1f}{r['time_ratio']:>9.2f}"
            f"{r['state_bytes'] / 2**20:>11.1f}{r['memory_ratio']:>9.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "base": source,
        "rank": args.rank,
        "pairs": len(pairs),
        "lora_params": lora_params,
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
