"""``lorafold train``: argument parsing only; the work is in :func:`lorafold.training.trainer.train`.

    lorafold train --data data/sentiment/train.jsonl --val data/sentiment/val.jsonl --out runs/s1 \
        --optimizer scaled_adamw --rank 16 --steps 200 --register http://127.0.0.1:8000 --admin-key K
    lorafold train prepare sentiment --out data/sentiment
    lorafold train --config run.toml --steps 50      # flags override the TOML file
    torchrun --nproc_per_node 2 -m lorafold.training.cli_entry --data ... --out ...   # data parallel
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
from typing import Any

from lorafold.training.config import INITS, SCHEDULES, TrainConfig, load_toml

S = argparse.SUPPRESS  # only flags actually given reach the config, so the TOML file supplies the rest


def _targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _keyword(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (KEY, VALUE as a Python literal when it parses as one, else the string)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. stat_interval=10), got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    from lorafold.training.optim.registry import OPTIMIZERS

    p = argparse.ArgumentParser(prog="lorafold train", argument_default=S,
                                description="Train a LoRA adapter; the output folder is a PEFT adapter. "
                                            "`lorafold train prepare NAME --out DIR` writes a task as JSONL.")
    a = p.add_argument
    a("--config", help="TOML file with the same keys (top level or [train]); flags override it")
    a("--data", help="training JSONL ({prompt,completion} | {messages} | {text} per line)")
    a("--val", help="validation JSONL (default: a seeded --val-fraction of --data)")
    a("--val-fraction", type=float)
    a("--out", help="output folder: PEFT adapter + report.json + loss_curve.png + checkpoints/")
    a("--model", help="base model: HF folder or .gguf (default: the packaged SmolLM2-135M-Instruct)")
    a("--optimizer", choices=sorted(OPTIMIZERS))
    a("--optimizer-arg", dest="optimizer_args", action="append", type=_keyword, metavar="KEY=VALUE",
      help="optimizer-specific keyword, repeatable, e.g. --optimizer-arg stat_interval=10 (AdaPreLoRA)")
    a("--init", choices=INITS)
    a("--rank", type=int)
    a("--alpha", type=float)
    a("--targets", type=_targets, help="comma-separated module names, e.g. q_proj,v_proj")
    a("--lr", type=float, help="learning rate (default: the optimizer's own default)")
    a("--weight-decay", type=float)
    a("--warmup-steps", type=int)
    a("--schedule", choices=SCHEDULES)
    a("--steps", type=int, help="optimizer steps (overrides --epochs)")
    a("--epochs", type=float)
    a("--batch-size", type=int)
    a("--grad-accum", type=int)
    a("--max-length", type=int)
    a("--bf16", action="store_true", help="bfloat16 autocast (GPU with bf16 or CPU; off by default)")
    a("--seed", type=int)
    a("--eval-every", type=int)
    a("--eval-samples", type=int)
    a("--accuracy", choices=("auto", "on", "off"))
    a("--save-every", type=int)
    a("--resume", help="run folder (latest checkpoint) or a checkpoints/step-N folder")
    a("--register", metavar="URL", help="register the result with a running lorafold server")
    a("--name", help="adapter name for --register (default: the output folder's name)")
    a("--admin-key", help="the server's admin key for --register")
    a("--device", help="auto | cpu | cuda | cuda:N")
    a("--no-progress", dest="progress", action="store_false")
    a("-v", "--verbose", action="store_true", dest="verbose")
    return p


def parse_config(argv: list[str]) -> tuple[TrainConfig, bool]:
    args = vars(build_parser().parse_args(argv))
    verbose = args.pop("verbose", False)
    values: dict[str, Any] = load_toml(args.pop("config")) if "config" in args else {}
    values.update(args)
    for key in ("data", "out"):
        if not values.get(key):
            raise SystemExit(f"lorafold train: --{key} is required (or set `{key}` in --config)")
    return TrainConfig.from_dict(values), verbose


def train_main(argv: list[str]) -> int:
    """Entry point of ``lorafold train``; returns the exit status."""
    if argv and argv[0] == "prepare":
        from lorafold.training.data.recipes import main as prepare_main

        return prepare_main(argv[1:])
    cfg, verbose = parse_config(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: only rank 0 logs progress and prints the summary
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s{f' [rank {rank}]' if rank else ''} %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # `lorafold train` may have configured logging already
    from lorafold.training.trainer import train

    result = train(cfg)
    if rank != 0:
        return 0
    summary = {"out": str(result.out), "eval_before": result.report["eval_before"],
               "eval_after": result.report["eval_after"], "tokens_per_s": result.report["tokens_per_s"]}
    if result.registered is not None:
        summary["registered"] = result.registered
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(train_main(sys.argv[1:]))
