"""Klein et al.'s comparison on the two real EEG subjects (SCP1 = A, SCP2 = B, 6 shared channels).

Conditions (test accuracy per subject; every model is the small EEGEncoder):

- ``agnostic``: one encoder trained on A+B train, no subject information.
- ``single_A``: trained on A only (the assets note says it scores chance on B).
- ``lora_from_other``: encoder pre-trained on the *other* subject, then a LoRA (rank r,
  base frozen) trained on this subject alone.
- ``lora_from_pooled``: the agnostic encoder, then a LoRA per subject trained separately.
- ``conditioned``: shared encoder (trainable W_gen and convs) + per-subject adapters trained
  jointly on mixed-subject batches (the subject-conditioned layer), AdamW;
  ``conditioned_scaled``: the same with the registry's ``scaled_adamw`` on the pairs.

    python -m benchmarks.bench_eeg_subjects --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch

from benchmarks._common import write_json
from lorafold.training.optim.registry import build_optimizer
from lorafold.training.subject import eeg
from lorafold.training.subject.layer import inject_subject_lora, subject_batch
from lorafold.training.subject.train import joint_train

SUBJECTS = ["A", "B"]
TARGETS = ["spatial", "hidden", "head"]


def accuracy(model: torch.nn.Module, split: eeg.EEGSplit, subject: str | None) -> float:
    sid = -1 if subject is None else SUBJECTS.index(subject)
    model.eval()
    with torch.no_grad(), subject_batch(torch.full((len(split.y),), sid), len(SUBJECTS)):
        return float((model(split.x).argmax(-1) == split.y).float().mean())


def _fit(model, rows, opt, steps, batch, seed):
    return joint_train(model, rows, SUBJECTS, opt, eeg.classification_loss, steps=steps, batch_size=batch, seed=seed,
                       log_every=10**9)


def train_full(rows, seed, args) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = eeg.EEGEncoder()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)
    _fit(model, rows, opt, args.steps, args.batch, seed)
    return model


def train_lora(base: torch.nn.Module, subject: str, rows, seed, args) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    inject_subject_lora(model, SUBJECTS, targets=TARGETS, r=args.rank, alpha=2 * args.rank)  # base frozen
    opt = build_optimizer("adamw", model, lr=args.lr, weight_decay=args.wd)
    _fit(model, [r for r in rows if r.subject == subject], opt, args.steps, args.batch, seed)
    return model


def train_conditioned(rows, seed, args, optimizer: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = eeg.EEGEncoder()
    inject_subject_lora(model, SUBJECTS, targets=TARGETS, r=args.rank, alpha=2 * args.rank, train_base=True)
    for p in model.parameters():  # W_gen and the convs train jointly with the adapters
        p.requires_grad_(True)
    opt = build_optimizer(optimizer, model, lr=args.lr, weight_decay=args.wd)
    _fit(model, rows, opt, args.steps, args.batch, seed)
    return model


def run_seed(data, seed: int, args) -> dict[str, dict[str, float]]:
    tagged = {s: eeg.trials(data[s]["train"], s) for s in SUBJECTS}
    untagged = [eeg.EEGTrial(r.x, r.y, None) for s in SUBJECTS for r in tagged[s]]
    test = {s: data[s]["test"] for s in SUBJECTS}
    res: dict[str, dict[str, float]] = {}

    agnostic = train_full(untagged, seed, args)
    res["agnostic"] = {s: accuracy(agnostic, test[s], None) for s in SUBJECTS}
    single = {s: train_full([eeg.EEGTrial(r.x, r.y, None) for r in tagged[s]], seed, args) for s in SUBJECTS}
    res["single_A"] = {s: accuracy(single["A"], test[s], None) for s in SUBJECTS}
    res["single_own"] = {s: accuracy(single[s], test[s], None) for s in SUBJECTS}
    all_tagged = tagged["A"] + tagged["B"]
    res["lora_from_other"] = {s: accuracy(train_lora(single["B" if s == "A" else "A"], s, all_tagged, seed, args),
                                          test[s], s) for s in SUBJECTS}
    res["lora_from_pooled"] = {s: accuracy(train_lora(agnostic, s, all_tagged, seed, args), test[s], s)
                               for s in SUBJECTS}
    for name, opt in (("conditioned", "adamw"), ("conditioned_scaled", "scaled_adamw")):
        model = train_conditioned(all_tagged, seed, args, opt)
        res[name] = {s: accuracy(model, test[s], s) for s in SUBJECTS}
    for v in res.values():
        v["mean"] = (v["A"] + v["B"]) / 2
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--wd", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/eeg_subjects.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = eeg.load_subjects()
    per_seed = {seed: run_seed(data, seed, args) for seed in args.seeds}
    conds = list(next(iter(per_seed.values())))
    summary = {}
    print(f"{'condition':<20} {'A (SCP1)':>16} {'B (SCP2)':>16} {'mean':>16}")
    for c in conds:
        row = {}
        for k in ("A", "B", "mean"):
            vals = [per_seed[s][c][k] for s in args.seeds]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row[k] = {"mean": statistics.mean(vals), "std": sd, "values": vals}
        summary[c] = row
        print(f"{c:<20} " + " ".join(f"{row[k]['mean']:>9.3f} ± {row[k]['std']:.3f}" for k in ("A", "B", "mean")))
    elapsed = time.perf_counter() - start
    print(f"test trials: A {len(data['A']['test'].y)}, B {len(data['B']['test'].y)}; seeds {args.seeds}; {elapsed:.0f} s")
    write_json(args.out, {"args": vars(args), "summary": summary, "per_seed": per_seed, "seconds": elapsed})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
