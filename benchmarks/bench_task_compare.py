"""A fair real-task comparison of the LoRA optimizers: an lr sweep per method family, several
seeds, the tasks' whole validation splits, AdamW-LoRA and plain LoRA-SGD as controls.

    nice -n 10 python -m benchmarks.bench_task_compare                      # the default design
    nice -n 10 python -m benchmarks.bench_task_compare --tasks sentiment --methods adamw,sgd,scaled_adamw

Model: SmolLM2-135M-Instruct with adapters (rank 8, α 16, ``q_proj,v_proj``) on its top
``--top-layers`` (4 of 30) decoder blocks. The frozen blocks below them are evaluated once per
example and cached (``hidden_states[L−K]`` is the top blocks' input, exact for right-padded
causal batches), so a step costs the top blocks only — about 10 % of a full step; that is
what makes sweeps × seeds × two tasks fit a shared 2-core CPU. Every method sees the same
cached inputs, data order per seed (``BatchOrder``), warm-up + cosine schedule
(``trainer.adapters.lr_lambda``), run-sized defaults (``build_optimizer_for``) and
registry optimizer as ``lorafold train`` would build it.

Tasks (``training/data/recipes.py``, the splits ``lorafold train prepare`` writes):
``sentiment`` (Pang & Lee polarity) and ``arithmetic`` (reasoning-gym basic arithmetic).
Validation = the whole val split (200 rows each); training draws from the first
``--train-rows`` rows of train; accuracy on ``--test-samples`` test rows.

Per task and method:

1. **lr sweep** over the method family's grid (``GRIDS``: one grid for the Adam-type
   methods, one for the plain-gradient ones) on the first ``--sweep-seeds`` seeds; the lr
   with the lowest mean best-validation loss wins (ties: the smaller lr);
2. **seeds**: the chosen lr on ``--seeds`` seeds (the sweep's runs are reused).

Reported: steps to AdamW's best validation loss (AdamW's mean over seeds of its best
evaluated validation loss at its chosen lr; per seed the first evaluated step at or below
it — mean ± sd over the seeds that reach it, and how many do), best validation loss and
task accuracy (mean ± sd): the completion is the greedy continuation, checked in one
teacher-forced pass (every completion token is the argmax given the prompt and the earlier
completion tokens — exactly when greedy decoding starts with the completion).

Writes ``benchmarks/results/task_compare.json`` (every run's validation curve) after each
method, so an interrupted run keeps what finished; prints the table with the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lorafold.server.models.loader import load_base_model
from lorafold.training.config import TrainConfig
from lorafold.training.data import recipes
from lorafold.training.data.jsonl import IGNORE, Example, encode_rows, parse_row
from lorafold.training.trainer import adapters
from lorafold.training.trainer.loop import BatchOrder

RESULTS = Path(__file__).resolve().parent / "results"
# A factor ~3 apart, wide enough to bracket each family's best lr on both tasks (with
# 40 steps the Adam types prefer rates near 1e-2, well above the 2e-4 of `lorafold train`).
ADAM_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SGD_GRID = (3e-2, 1e-1, 3e-1, 1.0)
GRIDS = {"adamw": ADAM_GRID, "scaled_adamw": ADAM_GRID, "reflora": ADAM_GRID, "reflora_s": ADAM_GRID,
         "loraplus": ADAM_GRID,
         "lora_pro": ADAM_GRID, "adaprelora": ADAM_GRID, "lora_rite": ADAM_GRID, "geolora": ADAM_GRID,
         "geo_adam": ADAM_GRID, "sgd": SGD_GRID, "scaled_gd": SGD_GRID, "lora_pro_sgd": SGD_GRID,
         "dlrt": SGD_GRID, "geo_heavy_ball": SGD_GRID}
TASKS = {"sentiment": lambda: recipes.sentiment(seed=0), "arithmetic": lambda: recipes.arithmetic(seed=0)}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--tasks", default="sentiment,arithmetic", help=f"comma-separated, from {sorted(TASKS)}")
    a("--methods", default="adamw,sgd,scaled_adamw,scaled_gd,reflora,geolora",
      help=f"comma-separated registry names with a grid: {sorted(GRIDS)}")
    a("--seeds", type=int, default=3, help="seeds per method at its chosen lr")
    a("--sweep-seeds", type=int, default=1, help="seeds used to choose the lr (<= --seeds)")
    a("--steps", type=int, default=60, help="optimizer steps per run")
    a("--eval-every", type=int, default=10, help="validation every N steps (and at 0)")
    a("--train-rows", type=int, default=960, help="training rows drawn from (the start of the train split)")
    a("--test-samples", type=int, default=200, help="test rows for accuracy")
    a("--top-layers", type=int, default=4, help="adapted decoder blocks at the top; those below are cached")
    a("--rank", type=int, default=8)
    a("--targets", default="q_proj,v_proj")
    a("--batch-size", type=int, default=8)
    a("--max-length", type=int, default=64)
    a("--threads", type=int, default=1, help="torch intra-op threads (1: the machine is shared)")
    a("--out", default=str(RESULTS / "task_compare.json"))
    a("--resume", nargs="+", default=[], metavar="JSON",
      help="earlier JSONs of this benchmark with the same settings: their runs are reused, "
           "only missing (task, method, lr, seed) runs are trained")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in GRIDS]
    if unknown:
        p.error(f"no lr grid for {unknown}; choose from {sorted(GRIDS)}")
    if not 1 <= args.sweep_seeds <= args.seeds:
        p.error("need 1 <= --sweep-seeds <= --seeds")
    return args


class Cached:
    """One example with the frozen trunk's output at its tokens: ``hidden [T, d]``, ``labels [T]``."""

    def __init__(self, hidden: torch.Tensor, e: Example) -> None:
        self.hidden, self.labels = hidden, torch.tensor(e.labels)


@torch.no_grad()
def cache_trunk(model: nn.Module, examples: list[Example], pad: int, top: int, batch_size: int = 16) -> list[Cached]:
    """The input of block ``L − top`` for every example (right-padded batches, so exact)."""
    depth = len(model.model.layers)
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in chunk])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk])
        states = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        h = states[depth - top]
        out.extend(Cached(h[j, : len(e.input_ids)].clone(), e) for j, e in enumerate(chunk))
    return out


def top_model(model: nn.Module, top: int) -> nn.Module:
    """A copy of ``model`` that keeps only its top ``top`` blocks (fed ``inputs_embeds``)."""
    blocks = model.model.layers
    model.model.layers = nn.ModuleList()
    try:
        clone = copy.deepcopy(model)
    finally:
        model.model.layers = blocks
    clone.model.layers = nn.ModuleList(copy.deepcopy(list(blocks)[-top:]))
    return clone


def collate_cached(batch: list[Cached]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(c.labels) for c in batch)
    d = batch[0].hidden.shape[-1]
    h = torch.zeros(len(batch), width, d)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, c in enumerate(batch):
        n = len(c.labels)
        h[i, :n], labels[i, :n], mask[i, :n] = c.hidden, c.labels, 1
    return h, labels, mask


def loss_sum(model: nn.Module, batch: list[Cached]) -> tuple[torch.Tensor, int]:
    """Sum of next-token CE over the labeled tokens (the LM head only at those positions)."""
    h, labels, mask = collate_cached(batch)
    hidden = model.model(inputs_embeds=h, attention_mask=mask).last_hidden_state
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    return nn.functional.cross_entropy(logits, shifted[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def val_loss(model: nn.Module, rows: list[Cached], batch_size: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        s, n = loss_sum(model, rows[i : i + batch_size])
        total, count = total + float(s), count + n
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def greedy_prefix_accuracy(model: nn.Module, rows: list[Cached], eos: int | None, batch_size: int = 16) -> float:
    """Share of rows whose completion (trailing EOS aside) greedy decoding would produce."""
    model.eval()
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        h, labels, mask = collate_cached(chunk)
        hidden = model.model(inputs_embeds=h, attention_mask=mask).last_hidden_state
        guess = model.lm_head(hidden[:, :-1]).argmax(-1)
        for row, want in zip(guess, labels[:, 1:], strict=True):
            pos = (want != IGNORE).nonzero().flatten()
            if eos is not None and len(pos) and int(want[pos[-1]]) == eos:
                pos = pos[:-1]
            correct += bool(len(pos)) and bool((row[pos] == want[pos]).all())
    model.train()
    return correct / max(len(rows), 1)


def run_one(task: str, method: str, lr: float, seed: int, args: argparse.Namespace, trunk_top: nn.Module,
            data: dict[str, list[Cached]], eos: int | None) -> dict:
    cfg = TrainConfig(data="-", out="-", optimizer=method, rank=args.rank, alpha=2 * args.rank,
                      targets=args.targets.split(","), lr=lr, steps=args.steps, batch_size=args.batch_size,
                      seed=seed, warmup_steps=max(1, args.steps // 20))
    torch.manual_seed(seed)
    model = copy.deepcopy(trunk_top)
    adapters.inject_adapters(model, cfg, [], 0, torch.device("cpu"))
    opt = adapters.build_optimizer_for(model, cfg, args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, adapters.lr_lambda(cfg, args.steps))
    order = BatchOrder(len(data["train"]), args.batch_size, seed)
    needs_closure = bool(getattr(opt, "needs_closure", False))
    curve = [(0, val_loss(model, data["val"]))]
    model.train()
    t_train = 0.0
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = [data["train"][j] for j in order.indices(step)]

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            s, n = loss_sum(model, batch)
            loss = s / max(n, 1)
            loss.backward()
            return loss

        loss = closure()
        opt.step(closure) if needs_closure else opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t_train += time.perf_counter() - t0
        if not math.isfinite(float(loss)):
            curve.append((step + 1, float("nan")))
            break
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, val_loss(model, data["val"])))
    finite = [v for _, v in curve if math.isfinite(v)]
    return {"task": task, "method": method, "lr": lr, "seed": seed, "val_curve": curve,
            "best_val": min(finite) if finite else None,
            "accuracy": greedy_prefix_accuracy(model, data["test"], eos),
            "step_seconds": round(t_train / args.steps, 4)}


def steps_to(curve: list, target: float) -> int | None:
    return next((s for s, v in curve if v is not None and math.isfinite(v) and v <= target), None)


def _mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: list[dict], chosen: dict, seeds: int) -> list[dict]:
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):
        ref = [r for r in runs if r["task"] == task and r["method"] == "adamw" and r["lr"] == chosen.get((task, "adamw"))]
        target = statistics.fmean(r["best_val"] for r in ref if r["best_val"] is not None) if ref else None
        for (t, method), lr in chosen.items():
            if t != task:
                continue
            mine = [r for r in runs if r["task"] == t and r["method"] == method and r["lr"] == lr][:seeds]
            reached = [s for s in (steps_to(r["val_curve"], target) for r in mine) if s is not None] if target else []
            st_mean, st_sd = _mean_sd([float(s) for s in reached])
            acc_mean, acc_sd = _mean_sd([r["accuracy"] for r in mine])
            bv_mean, bv_sd = _mean_sd([r["best_val"] for r in mine if r["best_val"] is not None])
            rows.append({"task": t, "method": method, "lr": lr, "seeds": len(mine), "adamw_best_val": target,
                         "reached": len(reached), "steps_to_adamw_best_mean": st_mean, "steps_to_adamw_best_sd": st_sd,
                         "best_val_mean": bv_mean, "best_val_sd": bv_sd, "accuracy_mean": acc_mean,
                         "accuracy_sd": acc_sd, "step_seconds": statistics.fmean(r["step_seconds"] for r in mine)})
    return rows


def _fmt(mean: float | None, sd: float | None, spec: str) -> str:
    return "—" if mean is None else f"{mean:{spec}} ± {sd:{spec}}"


def table(rows: list[dict], steps: int) -> str:
    """Markdown table. Step time is left out: the runs share a loaded machine, so wall time per
    step says more about the other jobs than about the method (it is in the JSON)."""
    lines = ["| task | method | chosen lr | steps to AdamW's best val (seeds reaching it) | best val loss | accuracy |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        reach = (f"{_fmt(r['steps_to_adamw_best_mean'], r['steps_to_adamw_best_sd'], '.0f')} ({r['reached']}/{r['seeds']})"
                 if r["reached"] else f"not within {steps} (0/{r['seeds']})")
        lines.append(f"| {r['task']} | {r['method']} | {r['lr']:g} | {reach} | "
                     f"{_fmt(r['best_val_mean'], r['best_val_sd'], '.4f')} | "
                     f"{_fmt(r['accuracy_mean'], r['accuracy_sd'], '.3f')} |")
    return "\n".join(lines)


def load_task(name: str, args: argparse.Namespace, base, pad: int) -> dict[str, list[Cached]]:
    splits = {k: [parse_row(Path(f"{name}/{k}"), i + 1, r) for i, r in enumerate(rows)]
              for k, rows in TASKS[name]().items()}
    tok = base.tokenizer
    enc = {"train": encode_rows(splits["train"][: args.train_rows], tok, args.max_length),
           "val": encode_rows(splits["val"], tok, args.max_length),
           "test": encode_rows(splits["test"][: args.test_samples], tok, args.max_length)}
    return {k: cache_trunk(base.model, v, pad, args.top_layers) for k, v in enc.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    base = load_base_model()
    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trunk_top = top_model(base.model, args.top_layers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    chosen: dict[tuple[str, str], float] = {}
    done = _resumable(args) if args.resume else {}

    def run(task: str, method: str, lr: float, seed: int, data: dict) -> dict:
        key = (task, method, lr, seed)
        if key in done:
            return done[key]
        return run_one(task, method, lr, seed, args, trunk_top, data, tok.eos_token_id)

    command = "python -m benchmarks.bench_task_compare " + " ".join(argv)
    t_start = time.perf_counter()
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        data = load_task(task, args, base, pad)
        logging.warning("%s: cached %s rows in %.0f s", task, {k: len(v) for k, v in data.items()}, time.perf_counter() - t0)
        for method in args.methods.split(","):
            sweep = {}
            for lr in GRIDS[method]:
                mine = [run(task, method, lr, s, data) for s in range(args.sweep_seeds)]
                runs.extend(mine)
                sweep[lr] = statistics.fmean(r["best_val"] if r["best_val"] is not None else float("inf") for r in mine)
                logging.warning("%s %s lr %g: best val %.4f, accuracy %s", task, method, lr, sweep[lr],
                                [r["accuracy"] for r in mine])
            lr = min(sweep, key=lambda k: (sweep[k], k))
            chosen[(task, method)] = lr
            runs.extend(run(task, method, lr, s, data) for s in range(args.sweep_seeds, args.seeds))
            _write(out, command, args, runs, chosen, t_start)  # partial results survive an interruption
    rows = _write(out, command, args, runs, chosen, t_start)
    sys.stdout.write(f"{command}\n\n{table(rows, args.steps)}\n")
    return 0


# settings that change what one run computes: a resumed file must agree on all of them
_RUN_SETTINGS = ("steps", "eval_every", "train_rows", "test_samples", "top_layers", "rank", "targets", "batch_size",
                 "max_length")


def _resumable(args: argparse.Namespace) -> dict[tuple[str, str, float, int], dict]:
    """The runs of the `args.resume` files by (task, method, lr, seed); SystemExit when one's
    settings differ from this invocation's."""
    runs = {}
    for path in args.resume:
        old = json.loads(Path(path).read_text())
        differ = [k for k in _RUN_SETTINGS if old["config"].get(k) != getattr(args, k)]
        if differ:
            raise SystemExit(f"--resume {path}: its runs used other settings ({', '.join(differ)}); "
                             "rerun them or match the settings")
        runs.update({(r["task"], r["method"], r["lr"], r["seed"]): r for r in old["runs"]})
    return runs


def _write(out: Path, command: str, args: argparse.Namespace, runs: list[dict], chosen: dict, t_start: float) -> list[dict]:
    rows = summarize(runs, chosen, args.seeds)
    result = {"command": command, "config": vars(args), "threads": torch.get_num_threads(),
              "grids": {m: GRIDS[m] for m in args.methods.split(",")},
              "chosen_lr": {f"{t}/{m}": lr for (t, m), lr in chosen.items()},
              "wall_seconds": round(time.perf_counter() - t_start, 1), "summary": rows, "runs": runs}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
