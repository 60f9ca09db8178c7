"""Optimizer-step and training-step time on SmolLM2-135M with rank-16 adapters on all 7 projections.

Two measurements, both with one thread by default and interleaved (one step of every method
per round, so load drift on a shared machine hits all methods alike), median over rounds:

1. **optimizer step** — ``opt.step()`` alone, with fixed gradients from one real
   forward/backward pass; the factors are put back (untimed) before every step. Reports the
   ratio to ``adamw`` (``torch.optim.AdamW`` with torch's default implementation choice,
   which on CPU is the per-parameter for-loop), to ``adamw_foreach`` and to ``adamw_fused``,
   and the optimizer-state bytes.
2. **training step** (``--full-steps N``, 0 skips it) — ``zero_grad`` + forward + backward +
   ``opt.step()`` on a batch of random token ids (``--full-batch`` × ``--full-seq``), ratio to
   AdamW's training step.

LoRA methods run on a LoRA model (210 pairs, rank 16, α = 32). The U S Vᵀ methods (GeoLoRA)
run on a second copy of the base with ``USVLinear`` adapters at ``r0 = r_max = 16`` — the
same U, V sizes as the LoRA factors plus a 16×16 core — and their ratios are to AdamW **on the
LoRA pairs** (the equivalent rank-16 LoRA); ``adamw_usv`` (AdamW over U, S, V) is shown for
reference. GeoLoRA alternates two kinds of step: ``geolora_coef`` (Adam on S, bases fixed)
and ``geolora_aug`` (augment + Adam in the augmented basis + truncate, what every step is
with ``coefficient_steps = 1``); ``geolora`` is the default schedule's amortized cost,
``(29 · coef + aug) / 30``. Likewise ``adaprelora_skip`` times AdaPreLoRA's step without the
statistic (``stat_interval`` never due) and ``adaprelora_every10`` is ``stat_interval = 10``
amortized, ``(9 · skip + adaprelora) / 10``.

The base is the real SmolLM2 checkpoint when ``--model`` points at one, else a random
LlamaForCausalLM with SmolLM2-135M's exact config.

    python benchmarks/bench_optimizer_step.py --steps 11
    python benchmarks/bench_optimizer_step.py --steps 11 --methods scaled_adamw,adaprelora --full-steps 0
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from lorafold.training.adapters.lora import inject_lora, lora_pairs
from lorafold.training.adapters.usv import inject_usv, usv_modules
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
BIG = 10**9  # coefficient_steps that never augments
# (label, registry name, overrides, adapter kind): RefLoRA without warm-up so the refactoring path is timed
METHODS = [
    ("adamw", "adamw", {}, "lora"),
    ("adamw_foreach", "adamw", {"foreach": True}, "lora"),
    ("adamw_fused", "adamw", {"fused": True}, "lora"),
    ("loraplus", "loraplus", {}, "lora"),
    ("scaled_gd", "scaled_gd", {}, "lora"),
    ("scaled_adamw", "scaled_adamw", {}, "lora"),
    ("reflora", "reflora", {"warmup_steps": 0}, "lora"),
    ("reflora_s", "reflora_s", {"warmup_steps": 0}, "lora"),
    ("lora_pro", "lora_pro", {}, "lora"),
    ("lora_pro_sgd", "lora_pro_sgd", {}, "lora"),
    ("adaprelora", "adaprelora", {}, "lora"),
    ("adaprelora_skip", "adaprelora", {"stat_interval": BIG}, "lora"),
    ("lora_rite", "lora_rite", {}, "lora"),
    ("adamw_usv", "adamw", {}, "usv"),
    ("geolora_coef", "geolora", {"coefficient_steps": BIG}, "usv"),
    ("geolora_aug", "geolora", {"coefficient_steps": 1}, "usv"),
]
BASELINES = ("adamw", "adamw_foreach", "adamw_fused")
GEOLORA_PERIOD = 30  # GeoLoRA's default coefficient_steps
ADAPRELORA_INTERVAL = 10  # AdaPreLoRA's stat_interval shown amortized (the default is 1)


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


class Setup:
    """One adapted model with fixed gradients and an untimed ``reset()`` of the adapter state."""

    def __init__(self, kind: str, model_path: Path, rank: int, gen: torch.Generator) -> None:
        self.kind = kind
        self.model, self.source = load_base(model_path)
        self.ids = torch.randint(0, 49152, (1, 64), generator=gen)
        with torch.no_grad():
            if kind == "lora":
                inject_lora(self.model, r=rank, alpha=2 * rank)
                self.pairs = lora_pairs(self.model)
                for p in self.pairs:  # B ≠ 0: every method runs its steady-state path
                    p.B.copy_(0.01 * torch.randn(p.B.shape, generator=gen))
                self.tensors = [t for p in self.pairs for t in (p.A, p.B)]
            else:
                inject_usv(self.model, r0=rank, r_max=rank, alpha=1.0)
                self.mods = list(usv_modules(self.model).values())
                for mod in self.mods:  # S ≠ 0 (a rank-r point), like B ≠ 0 above
                    mod.S.copy_(torch.diag(0.01 * (1.0 + torch.rand(mod.rank, generator=gen))))
                self.tensors = [t for mod in self.mods for t in (mod.U, mod.S, mod.V)]
        self.initial = [t.detach().clone() for t in self.tensors]
        self.model(self.ids, labels=self.ids).loss.backward()  # real gradients, reused by every step
        if kind == "usv":
            self.ranks = [mod.rank for mod in self.mods]
            self.probes = [mod.probe_grads() for mod in self.mods]
            self.probe_leaves = [mod.probe_leaves() for mod in self.mods]
            self.probe_full = [(k.grad, l.grad) for k, l in self.probe_leaves]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def reset(self) -> None:
        """Factors (and for USV: rank and probe gradients, which the step clears) back."""
        with torch.no_grad():
            for t, t0 in zip(self.tensors, self.initial, strict=True):
                t.copy_(t0)
        if self.kind == "usv":
            for mod, r, (k, l), (gk, gl) in zip(self.mods, self.ranks, self.probe_leaves, self.probe_full, strict=True):
                mod.set_rank(r)
                k.grad, l.grad = gk, gl

    def train_step(self, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.model(ids, labels=ids).loss.backward()
        opt.step()


def time_round_robin(
    jobs: dict[str, tuple[Callable[[], None], Callable[[], None]]], warmup: int, steps: int
) -> dict[str, list[float]]:
    """``jobs[label] = (prepare, timed)``: per round, every label runs ``prepare()`` (untimed)
    then ``timed()`` (timed), so load drift on a shared machine hits all methods alike."""
    times: dict[str, list[float]] = {label: [] for label in jobs}
    for round_ in range(warmup + steps):
        for label, (prepare, timed) in jobs.items():
            prepare()
            t0 = time.perf_counter()
            timed()
            if round_ >= warmup:
                times[label].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]], opts: dict[str, torch.optim.Optimizer]) -> list[dict]:
    rows = [
        {"method": label, "median_s": statistics.median(t), "min_s": min(t), "state_bytes": state_bytes(opts[label])}
        for label, t in times.items()
    ]
    by = {r["method"]: r for r in rows}
    if "geolora_coef" in by and "geolora_aug" in by:
        c, a = by["geolora_coef"], by["geolora_aug"]
        k = GEOLORA_PERIOD
        rows.append(
            {
                "method": "geolora",
                "median_s": ((k - 1) * c["median_s"] + a["median_s"]) / k,
                "min_s": ((k - 1) * c["min_s"] + a["min_s"]) / k,
                "state_bytes": max(c["state_bytes"], a["state_bytes"]),
                "note": f"default schedule: ({k - 1} * geolora_coef + geolora_aug) / {k}",
            }
        )
    if "adaprelora" in by and "adaprelora_skip" in by:
        full, skip = by["adaprelora"], by["adaprelora_skip"]
        k = ADAPRELORA_INTERVAL
        rows.append(
            {
                "method": f"adaprelora_every{k}",
                "median_s": ((k - 1) * skip["median_s"] + full["median_s"]) / k,
                "min_s": ((k - 1) * skip["min_s"] + full["min_s"]) / k,
                "state_bytes": full["state_bytes"],
                "note": f"stat_interval={k}: ({k - 1} * adaprelora_skip + adaprelora) / {k}",
            }
        )
    by = {r["method"]: r for r in rows}
    for r in rows:
        for base in BASELINES:
            if base in by:
                key = "time_ratio" if base == "adamw" else f"time_ratio_{base.removeprefix('adamw_')}"
                r[key] = r["median_s"] / by[base]["median_s"]
        if "adamw" in by:
            r["memory_ratio"] = r["state_bytes"] / max(by["adamw"]["state_bytes"], 1)
    return rows


def print_rows(title: str, rows: list[dict], with_memory: bool) -> None:
    print(f"\n{title}")
    head = f"{'method':<14}{'median ms':>11}{'min ms':>9}{'x adamw':>9}{'x foreach':>10}{'x fused':>9}"
    print(head + (f"{'state MiB':>11}" if with_memory else ""))
    for r in rows:
        line = (
            f"{r['method']:<14}{1e3 * r['median_s']:>11.1f}{1e3 * r['min_s']:>9.1f}{r.get('time_ratio', float('nan')):>9.2f}"
            f"{r.get('time_ratio_foreach', float('nan')):>10.2f}{r.get('time_ratio_fused', float('nan')):>9.2f}"
        )
        print(line + (f"{r['state_bytes'] / 2**20:>11.1f}" if with_memory else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", default="benchmarks/results/optimizer_step.json")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds of the optimizer-step measurement")
    parser.add_argument("--methods", default="", help="comma-separated labels (the AdamW baselines are always added)")
    parser.add_argument("--full-steps", type=int, default=3, help="timed rounds of the training-step measurement (0: skip)")
    parser.add_argument("--full-warmup", type=int, default=1)
    parser.add_argument("--full-batch", type=int, default=4)
    parser.add_argument("--full-seq", type=int, default=128)
    parser.add_argument(
        "--full-methods",
        default="adamw,adamw_foreach,adamw_fused,scaled_adamw,reflora,adaprelora,lora_pro,"
        "geolora_coef,geolora_aug",
        help="labels for the training-step measurement",
    )
    # one thread by default: on a shared CPU a multi-threaded region waits for its slowest thread
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
    methods = [m for m in METHODS if not wanted or m[0] in wanted | set(BASELINES)]
    full_wanted = {m.strip() for m in args.full_methods.split(",") if m.strip()} if args.full_steps > 0 else set()
    if wanted:
        full_wanted &= wanted | set(BASELINES)
    kinds = {kind for _, _, _, kind in methods}
    gen = torch.Generator().manual_seed(0)
    setups = {kind: Setup(kind, args.model, args.rank, gen) for kind in ("lora", "usv") if kind in kinds}
    lora = setups["lora"]
    print(
        f"base: {lora.source}; {len(lora.pairs)} LoRA pairs, {lora.numel / 1e6:.2f} M LoRA parameters; "
        f"threads {args.threads}"
    )
    if "usv" in setups:
        print(f"USV copy: {len(setups['usv'].mods)} USVLinear (r0 = r_max = {args.rank}), {setups['usv'].numel / 1e6:.2f} M parameters")

    opts: dict[str, torch.optim.Optimizer] = {}
    kind_of: dict[str, str] = {}
    for label, name, overrides, kind in methods:
        if name not in OPTIMIZERS:
            print(f"{label:<14} not registered (skipped)")
            continue
        try:
            opts[label] = build_optimizer(name, setups[kind].model, **overrides)
            kind_of[label] = kind
        except (ValueError, TypeError) as exc:
            print(f"{label:<14} cannot be built ({exc}); skipped")

    jobs = {label: (setups[kind_of[label]].reset, opt.step) for label, opt in opts.items()}
    rows = summarize(time_round_robin(jobs, args.warmup, args.steps), opts)
    print_rows("optimizer step (opt.step() only; ratios to AdamW on the 210 LoRA pairs)", rows, with_memory=True)

    full_rows: list[dict] = []
    if full_wanted:
        ids = torch.randint(0, 49152, (args.full_batch, args.full_seq), generator=gen)
        full_jobs = {}
        for label, opt in opts.items():
            if label in full_wanted:
                setup = setups[kind_of[label]]
                full_jobs[label] = (setup.reset, lambda s=setup, o=opt: s.train_step(o, ids))
        full_rows = summarize(time_round_robin(full_jobs, args.full_warmup, args.full_steps), opts)
        for r in full_rows:
            r.pop("state_bytes", None), r.pop("memory_ratio", None)
        print_rows(
            f"training step (zero_grad + forward + backward + step, batch {args.full_batch}x{args.full_seq} tokens)",
            full_rows,
            with_memory=False,
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "base": lora.source,
        "rank": args.rank,
        "pairs": len(lora.pairs),
        "lora_params": lora.numel,
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "ratio_baseline": "time_ratio: torch.optim.AdamW default (for-loop on CPU); time_ratio_foreach / "
        "time_ratio_fused: foreach=True / fused=True. USV methods are compared with AdamW on the LoRA pairs.",
        "full_step": {
            "batch": args.full_batch,
            "seq": args.full_seq,
            "warmup": args.full_warmup,
            "steps": args.full_steps,
            "rows": full_rows,
        },
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
