"""The arithmetic recipe: reasoning-gym basic_arithmetic rows, correct, verifiable, disjoint splits."""

from __future__ import annotations

import json

import reasoning_gym

from lorafold.training.data.recipes import arithmetic, prepare
from lorafold.training.evaluate import is_correct


def test_rows_are_correct_verifiable_and_disjoint(tmp_path) -> None:
    counts = prepare("arithmetic", tmp_path)
    splits = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
              for name in ("train", "val", "test")}
    assert {k: len(v) for k, v in splits.items()} == {k: counts[k] for k in splits}
    assert counts["test"] == 400 and counts["val"] == 200 and counts["train"] > 1000
    prompts = [r["prompt"] for rows in splits.values() for r in rows]
    assert len(prompts) == len(set(prompts)), "a question appears in two rows or two splits"
    scorer = reasoning_gym.create_dataset("basic_arithmetic", seed=0, size=1)
    for row in splits["test"] + splits["val"][:50]:
        expr = row["prompt"].removeprefix("Calculate ").split(".\n")[0]
        answer = row["completion"].strip()
        assert eval(expr) == int(answer), row  # noqa: S307 - digits and + - * only
        assert scorer.score_answer(answer, {"answer": answer}) == 1.0
        assert is_correct(" " + answer, row["completion"])


def test_seeded() -> None:
    assert arithmetic(seed=3)["test"][:5] == arithmetic(seed=3)["test"][:5]
    assert arithmetic(seed=3)["test"][:5] != arithmetic(seed=4)["test"][:5]
