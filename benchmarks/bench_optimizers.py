"""Factorization test bed: iterations to f ≤ 1e-8 for every optimizer, κ ∈ {10, 100, 1000}.

f(X, Y) = ½‖A* − X Yᵀ‖²_F, m = 30, n = 20, r = rank(A*) = 4, float64; A*'s singular values
are geometric from 1 to 1/κ. Every method starts from the same small Gaussian factors and
gets its best step size from a sweep (fewest iterations; ties → lower final f). The sweep
runs to ``--sweep-iters``; a method that reaches the tolerance at no step size there is
re-run at its best step size up to ``--max-iters`` (phase 2). Also
compares AdaPreLoRA's cheap low-rank statistic with the transient-G one.

    python benchmarks/bench_optimizers.py --out benchmarks/results/optimizers.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch

from lorafold.training.optim.registry import OPTIMIZERS, build_optimizer
from lorafold.training.optim.testbed import FactorModel, make_target, random_factors

GD_GRID = [0.03, 0.1, 0.3, 1.0, 3.0]
ADAM_GRID = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
# name -> (registry name or None for a local baseline, fixed overrides, lr grid, gauge invariant?)
METHODS: dict[str, tuple[str | None, dict, list[float], bool]] = {
    "gd": (None, {}, GD_GRID, False),
    "adamw": ("adamw", {}, ADAM_GRID, False),
    "loraplus": ("loraplus", {}, ADAM_GRID, False),
    "scaled_gd": ("scaled_gd", {}, GD_GRID, True),
    "scaled_adamw": ("scaled_adamw", {}, ADAM_GRID, False),
    "reflora_sgd": ("reflora", {"base": "sgd", "warmup_steps": 0}, GD_GRID, True),
    "reflora": ("reflora", {"warmup_steps": 0}, ADAM_GRID, False),
    "reflora_s": ("reflora_s", {"warmup_steps": 0}, ADAM_GRID, False),
    "lora_pro_sgd": ("lora_pro_sgd", {}, GD_GRID, True),
    "lora_pro": ("lora_pro", {}, ADAM_GRID, False),
    "adaprelora": ("adaprelora", {}, ADAM_GRID, True),
    "adaprelora_full": ("adaprelora", {"statistic": "full"}, ADAM_GRID, True),
    "adaprelora_every10": ("adaprelora", {"stat_interval": 10}, ADAM_GRID, True),
    "adaprelora_every20": ("adaprelora", {"stat_interval": 20}, ADAM_GRID, True),
    "lora_rite": ("lora_rite", {"skip_threshold": 0.0}, ADAM_GRID, True),
    # the U S Vᵀ engineer's methods, when registered
    # τ = 1e-5: the spec's τ = 0.15 would truncate A*'s small singular values (f stalls at ½σ_min²)
    "dlrt": ("dlrt", {"tau": 1e-5}, GD_GRID, True),
    "geolora": ("geolora", {"tau": 1e-5}, ADAM_GRID, True),
    "geo_heavy_ball": ("geo_heavy_ball", {"tau": 1e-5}, GD_GRID, True),
    "geo_adam": ("geo_adam", {"tau": 1e-5}, ADAM_GRID, True),
}
TOL = 1e-8
INIT_STD = 0.1
# U S Vᵀ methods run on the USV form of the same test bed (training/optim/usv_testbed.py):
# W = U S Vᵀ over a zero base, U, V random orthonormal, S = 0, r0 = 4, r_max = 10.
USV_METHODS = {"dlrt", "geolora", "geo_heavy_ball", "geo_adam"}


def build(method: str, model: FactorModel, target: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    registry_name, fixed, _, _ = METHODS[method]
    if registry_name is None:
        return torch.optim.SGD(model.parameters(), lr=lr)
    kw = dict(fixed)
    if kw.get("statistic") == "full":
        kw["full_grad_fn"] = lambda _name: model.full_grad(target)
    return build_optimizer(registry_name, model, lr=lr, **kw)


def run(method: str, kappa: float, lr: float, max_iters: int, seed: int = 0) -> dict:
    """One run; returns iterations to f ≤ TOL (None if never), final f and a thinned curve."""
    torch.set_num_threads(1)  # tiny problem: threads only add scheduling stalls
    target = make_target(kappa=kappa, seed=seed)
    if method in USV_METHODS:
        return run_usv(method, target, lr, max_iters, seed)
    model = FactorModel(*random_factors(seed=seed + 1, std=INIT_STD))
    try:
        opt = build(method, model, target, lr)
    except (ValueError, TypeError, NotImplementedError) as exc:
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    curve, hit, f = [], None, float("nan")
    start = time.perf_counter()
    for it in range(max_iters + 1):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(target)
        f = loss.item()
        if it % 10 == 0:
            curve.append(f)
        if f <= TOL:
            hit = it
            break
        if not math.isfinite(f) or f > 1e10 or it == max_iters:
            break
        loss.backward()
        opt.step()
    return {"iters": hit, "final_f": f, "steps": it, "curve": curve, "seconds": time.perf_counter() - start}


def run_usv(method: str, target: torch.Tensor, lr: float, max_iters: int, seed: int) -> dict:
    """As :func:`run` for the rank-adaptive U S Vᵀ optimizers (closure-based steps)."""
    from lorafold.training.optim.usv_testbed import usv_layer, usv_loss, usv_step

    layer = usv_layer(seed=seed)
    registry_name, fixed, _, _ = METHODS[method]
    try:
        opt = build_optimizer(registry_name, layer, lr=lr, **fixed)
    except (ValueError, TypeError, NotImplementedError) as exc:
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    curve, hit, f = [], None, float("nan")
    start = time.perf_counter()
    for it in range(max_iters + 1):
        if it == max_iters:
            with torch.no_grad():
                f = usv_loss(layer, target).item()
        else:
            f = usv_step(layer, opt, target)  # f before this step
        if it % 10 == 0:
            curve.append(f)
        if f <= TOL:
            hit = it
            break
        if not math.isfinite(f) or f > 1e10 or it == max_iters:
            break
    return {"iters": hit, "final_f": f, "steps": it, "curve": curve, "seconds": time.perf_counter() - start, "rank": int(layer.rank) if hasattr(layer, "rank") else None}


def _job(args: tuple) -> tuple:
    method, kappa, lr, max_iters = args
    return args, run(method, kappa, lr, max_iters)


def available(method: str) -> bool:
    registry_name = METHODS[method][0]
    return registry_name is None or registry_name in OPTIMIZERS


def best_of(results: dict[float, dict]) -> tuple[float | None, dict | None]:
    ok = {lr: r for lr, r in results.items() if "skipped" not in r}
    if not ok:
        return None, None
    key = lambda lr: (ok[lr]["iters"] if ok[lr]["iters"] is not None else math.inf, ok[lr]["final_f"] if math.isfinite(ok[lr]["final_f"]) else math.inf)
    lr = min(ok, key=key)
    return lr, ok[lr]


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kappas = list(summary)
    fig, axes = plt.subplots(1, len(kappas), figsize=(6 * len(kappas), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    colors = plt.get_cmap("tab20").colors
    for ax, kappa in zip(axes, kappas, strict=True):
        for i, (method, row) in enumerate(summary[kappa].items()):
            if row.get("curve"):
                xs = [10 * i for i in range(len(row["curve"]))]
                style = {"color": colors[i % len(colors)], "ls": "-" if METHODS[method][3] else "--"}
                ax.semilogy(xs, [max(v, 1e-30) for v in row["curve"]], label=f"{method} (lr {row['lr']:g})", **style)
        ax.axhline(TOL, color="k", lw=0.5, ls=":")
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xlim(left=0)
        ax.set_title(f"κ = {kappa}")
        ax.set_xlabel("iteration")
    axes[0].set_ylabel("f = ½‖A* − XYᵀ‖²  (solid: gauge invariant)")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/optimizers.json")
    parser.add_argument("--kappas", default="10,100,1000")
    parser.add_argument("--max-iters", type=int, default=20000)
    parser.add_argument("--sweep-iters", type=int, default=3000)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    kappas = [float(k) for k in args.kappas.split(",")]
    methods = [m for m in args.methods.split(",") if available(m)]
    missing = [m for m in args.methods.split(",") if not available(m)]
    if missing:
        print(f"not registered (skipped): {', '.join(missing)}")
    sweep_cap = min(args.sweep_iters, args.max_iters)
    jobs = [(m, k, lr, sweep_cap) for k in kappas for m in methods for lr in METHODS[m][2]]
    results: dict = {}
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for (m, k, lr, _), res in pool.imap_unordered(_job, jobs):
            results.setdefault(k, {}).setdefault(m, {})[lr] = res
        # phase 2: no step size reached the tolerance within the sweep cap -> longer run
        long_jobs = []
        for k in kappas:
            for m in methods:
                lr, best = best_of(results[k][m])
                if best is not None and best["iters"] is None and sweep_cap < args.max_iters:
                    long_jobs.append((m, k, lr, args.max_iters))
        for (m, k, lr, _), res in pool.imap_unordered(_job, long_jobs):
            results[k][m][lr] = res
    summary: dict = {}
    for k in kappas:
        print(f"\nκ = {k:g}   (iterations to f ≤ {TOL:g}; sweep cap {sweep_cap}, best re-run to {args.max_iters})")
        print(f"{'method':<16}{'gauge-inv':>10}{'best lr':>10}{'iters':>9}{'final f':>12}   sweep lr:iters")
        for m in methods:
            lr, best = best_of(results[k][m])
            sweep = "  ".join(
                f"{x:g}:{'skip' if 'skipped' in r else (r['iters'] if r['iters'] is not None else ('div' if not math.isfinite(r['final_f']) or r['final_f'] > 1e3 else '-'))}"
                for x, r in sorted(results[k][m].items())
            )
            if best is None:
                reason = next(iter(results[k][m].values()))["skipped"]
                print(f"{m:<16}{'':>10}{'—':>10}{'skip':>9}{'':>12}   {reason[:80]}")
                continue
            iters = best["iters"] if best["iters"] is not None else f">{args.max_iters}"
            print(f"{m:<16}{str(METHODS[m][3]):>10}{lr:>10g}{iters!s:>9}{best['final_f']:>12.2e}   {sweep}")
            summary.setdefault(f"{k:g}", {})[m] = {"lr": lr, **best, "gauge_invariant": METHODS[m][3]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_json = {
        f"{k:g}": {m: {f"{lr:g}": {kk: v for kk, v in r.items() if kk != "curve"} for lr, r in d.items()} for m, d in ms.items()}
        for k, ms in results.items()
    }
    meta = {"tol": TOL, "max_iters": args.max_iters, "sweep_iters": sweep_cap, "init_std": INIT_STD, "m": 30, "n": 20, "r": 4}
    out.write_text(json.dumps({**meta, "best": summary, "sweep": sweep_json}, indent=1))
    png = out.with_suffix(".png")
    plot(summary, png)
    print(f"\nwrote {out} and {png}")


if __name__ == "__main__":
    main()
