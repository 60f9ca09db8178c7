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
from dataclasses import MISSING, fields
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


def _default_text(dest: str) -> str | None:
    """The TrainConfig default of ``dest`` as help text shows it (None: no such field)."""
    for f in fields(TrainConfig):
        if f.name == dest:
            value = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
            if isinstance(value, list):
                return ",".join(value)
            if value == "":
                return None  # a required value: no default to show
            if value is None or value == {}:
                return "none"
            return str(value)
    return None


def build_parser() -> argparse.ArgumentParser:
    from lorafold.training.optim.registry import OPTIMIZERS

    p = argparse.ArgumentParser(prog="lorafold train", argument_default=S,
                                description="Train a LoRA adapter; the output folder is a PEFT adapter. "
                                            "`lorafold train prepare NAME --out DIR` writes a task as JSONL.")

    def a(*flags: str, help: str, **kw: Any) -> None:
        # Flags are SUPPRESSed (a TOML file may supply the value), so argparse cannot show the
        # default: append TrainConfig's own, the one that applies when neither sets it.
        dest = kw.get("dest") or flags[-1].lstrip("-").replace("-", "_")
        default = _default_text(dest)
        if default is not None and kw.get("action") not in ("store_true", "store_false"):
            help = f"{help} (default: {default})"
        p.add_argument(*flags, help=help, **kw)

    a("--config", help="TOML file with the same keys (top level or [train]); flags override it")
    a("--data", help="training JSONL ({prompt,completion} | {messages} | {text} per line); required")
    a("--val", help="validation JSONL; none: a seeded --val-fraction of --data")
    a("--val-fraction", type=float, help="share of --data held out for validation when --val is not given")
    a("--out", help="output folder: PEFT adapter + report.json + loss_curve.png + checkpoints/; required")
    a("--model", help="base model: HF folder or .gguf; none: the packaged SmolLM2-135M-Instruct")
    a("--optimizer", choices=sorted(OPTIMIZERS), help="optimizer (docs/training.md compares them)")
    a("--optimizer-arg", dest="optimizer_args", action="append", type=_keyword, metavar="KEY=VALUE",
      help="optimizer-specific keyword, repeatable, e.g. --optimizer-arg stat_interval=10 (AdaPreLoRA)")
    a("--init", choices=INITS, help="adapter initialization")
    a("--rank", type=int, help="LoRA rank r (the rank-adaptive optimizers' maximum rank)")
    a("--alpha", type=float, help="LoRA alpha; the update is scaled by alpha / rank")
    a("--targets", type=_targets, help="comma-separated module names to adapt, e.g. q_proj,v_proj")
    a("--lr", type=float, help="learning rate; none: the optimizer's own default")
    a("--weight-decay", type=float, help="decoupled weight decay; none: the optimizer's own default")
    a("--warmup-steps", type=int, help="linear learning-rate warm-up steps of the schedule")
    a("--schedule", choices=SCHEDULES, help="learning-rate schedule after the warm-up")
    a("--steps", type=int, help="optimizer steps (overrides --epochs); none: --epochs decides")
    a("--epochs", type=float, help="passes over the training data when --steps is not given")
    a("--batch-size", type=int, help="rows per micro-batch")
    a("--grad-accum", type=int, help="micro-batches per optimizer step")
    a("--max-length", type=int, help="tokens per row; longer rows are truncated")
    a("--bf16", action="store_true", help="bfloat16 autocast (GPU with bf16 or CPU; default: off)")
    a("--seed", type=int, help="seed of the initialization, the data order and the validation split")
    a("--eval-every", type=int, help="evaluate every N steps; 0: only before and after training")
    a("--eval-samples", type=int, help="validation rows per evaluation (loss and accuracy); 0: all of them")
    a("--accuracy", choices=("auto", "on", "off"),
      help="greedy-decoding accuracy at each evaluation; auto: when every completion is short")
    a("--save-every", type=int, help="checkpoint every N steps; 0: only at the end")
    a("--resume", help="run folder (latest checkpoint) or a checkpoints/step-N folder to continue from")
    a("--register", metavar="URL", help="register the result with a running lorafold server at URL")
    a("--name", help="adapter name for --register; none: the output folder's name")
    a("--admin-key", help="the server's admin key for --register (also read from $LORAFOLD_ADMIN_KEY); "
                          "never written to report.json, checkpoints or logs")
    a("--device", help="auto | cpu | cuda | cuda:N")
    a("--no-progress", dest="progress", action="store_false",
      help="log lines instead of progress bars (default: bars when tqdm is installed)")
    a("-v", "--verbose", action="store_true", dest="verbose", help="debug logging (default: off)")
    return p


def parse_config(argv: list[str]) -> tuple[TrainConfig, bool]:
    args = vars(build_parser().parse_args(argv))
    verbose = args.pop("verbose", False)
    values: dict[str, Any] = load_toml(args.pop("config")) if "config" in args else {}
    values.update(args)
    if not values.get("admin_key") and os.environ.get("LORAFOLD_ADMIN_KEY"):
        values["admin_key"] = os.environ["LORAFOLD_ADMIN_KEY"]  # keeps the key off the command line
    for key in ("data", "out"):
        if not values.get(key):
            raise SystemExit(f"lorafold train: --{key} is required (or set `{key}` in --config)")
    return TrainConfig.from_dict(values), verbose


def _setup_logging(verbose: bool, rank: int) -> None:
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s{f' [rank {rank}]' if rank else ''} %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # `lorafold train` may have configured logging already


def train_main(argv: list[str]) -> int:
    """Entry point of ``lorafold train``; returns the exit status."""
    if argv and argv[0] == "prepare":
        from lorafold.training.data.recipes import main as prepare_main

        return prepare_main(argv[1:])
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: only rank 0 logs progress and prints the summary
    if not {"-h", "--help"} & set(argv):
        # The first line within a second: importing torch, transformers and the optimizers
        # (the parser lists them) takes many seconds on a loaded CPU, before any other output.
        _setup_logging(bool({"-v", "--verbose"} & set(argv)), rank)
        logging.getLogger(__name__).info("lorafold train: starting (importing torch and the trainer)")
    cfg, verbose = parse_config(argv)
    _setup_logging(verbose, rank)
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
