"""Training throughput of `lorafold train` on SmolLM2: tokens/s per optimizer, step time vs AdamW.

    python -m benchmarks.bench_train_throughput --steps 8 --batch-size 8 --max-length 256

Runs the real trainer (`lorafold.training.trainer.train`, the code behind `lorafold train`) on
the packaged SmolLM2-135M with rank-16 adapters on all seven projections, over {"text"} rows of
real English (Pang & Lee sentences joined to ~`--max-length` tokens), once per optimizer with
the same data order. Throughput = non-pad tokens through forward + backward per second of
optimizer steps, as `report.json` reports it (evaluation excluded), over the whole run: the
first step's allocations are included, so a short run slightly understates it.
Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from benchmarks._common import write_json
from lorafold.server.models.loader import load_base_model
from lorafold.training.config import TrainConfig
from lorafold.training.data.recipes import prepare
from lorafold.training.trainer import train

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def text_rows(work: Path, tokenizer, rows: int, max_length: int) -> Path:  # noqa: ANN001
    """`rows` {"text"} lines of ~max_length tokens each, from the sentiment sentences."""
    data = work / "sentiment"
    prepare("sentiment", data)
    sentences = [json.loads(line)["prompt"] for line in (data / "train.jsonl").read_text().splitlines()]
    out, current, n_tok, i = [], [], 0, 0
    while len(out) < rows:
        s = sentences[i % len(sentences)]
        i += 1
        n = len(tokenizer(s, add_special_tokens=False)["input_ids"])
        if current and n_tok + n > max_length - 2:
            out.append({"text": " ".join(current)})
            current, n_tok = [], 0
        current.append(s)
        n_tok += n
    path = work / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--optimizers", default="adamw,scaled_adamw,reflora,adaprelora,geolora")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--work", default="/tmp/lorafold_bench_throughput")
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = load_base_model()
    data = text_rows(work, base.tokenizer, args.steps * args.batch_size + 4, args.max_length)
    val = work / "val.jsonl"
    val.write_text("".join(data.read_text().splitlines(keepends=True)[-4:]))
    runs = []
    for name in args.optimizers.split(","):
        cfg = TrainConfig(data=str(data), val=str(val), out=str(work / f"run-{name}"), optimizer=name, rank=args.rank,
                          alpha=2 * args.rank, targets=ALL_SEVEN, steps=args.steps, batch_size=args.batch_size,
                          max_length=args.max_length, warmup_steps=1, accuracy="off", progress=False, bf16=args.bf16)
        rep = train(cfg, base=load_base_model()).report
        runs.append({"optimizer": name, "tokens_per_s": rep["tokens_per_s"], "step_seconds": rep["step_seconds"],
                     "train_tokens": rep["train_tokens"], "train_seconds": rep["train_seconds"]})
    ref = next((r for r in runs if r["optimizer"] == "adamw"), runs[0])
    for r in runs:
        r["step_time_vs_adamw"] = round(r["step_seconds"] / ref["step_seconds"], 3)
    result = {"command": "python -m benchmarks.bench_train_throughput " + " ".join(sys.argv[1:] if argv is None else argv),
              "threads": torch.get_num_threads(), "steps": args.steps, "batch_size": args.batch_size,
              "max_length": args.max_length, "rank": args.rank, "targets": ALL_SEVEN, "bf16": args.bf16,
              "target_tokens_per_s": 150, "target_step_ratio": 1.3, "runs": runs}
    write_json(args.out, result)
    print(f"SmolLM2-135M, rank {args.rank} on all seven projections, batch {args.batch_size} x <= {args.max_length} "
          f"tokens, {args.steps} steps, {torch.get_num_threads()} threads (targets: AdamW >= 150 tok/s, others <= 1.3x)")
    print(f"{'optimizer':<14}{'tokens/s':>10}{'step s':>9}{'vs adamw':>10}")
    for r in runs:
        print(f"{r['optimizer']:<14}{r['tokens_per_s']:>10.1f}{r['step_seconds']:>9.2f}{r['step_time_vs_adamw']:>10.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
