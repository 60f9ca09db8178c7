"""Before/after: one benchmark on two revisions of the code, runs interleaved in one job.

    python -m benchmarks.bench_ab --before c52d4fe --bench bench_decode_step --metric median_s \
        --rounds 2 --out benchmarks/results/ab_decode_step.json -- --steps 3

The `--before` revision of the library is checked out into a temporary git worktree and
imported through a `lorafold` package of symlinks put first on PYTHONPATH (the installed
editable package is the working tree, the "after" side); both sides run this tree's
benchmark script, so only the library differs. The two sides run alternately, round after round, so
that a machine whose speed drifts over the job affects both alike; each run writes its own
JSON, and the table gives per row of the benchmark (its `scenario` or `label`) the median of
`--metric` over the rounds on each side, and after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import write_json

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "training", "kernels", "clients")


def checkout(rev: str, root: Path) -> tuple[Path, Path]:
    """A worktree of `rev` and a folder whose `lorafold/` links to its packages."""
    tree = root / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(tree), rev], check=True,
                   capture_output=True)
    shim = root / "shim" / "lorafold"
    shim.mkdir(parents=True)
    for name in PACKAGES:
        (shim / name).symlink_to(tree / name)
    return tree, shim.parent


def run_once(pythonpath: Path | None, bench: str, out: Path, extra: list[str]) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}:{REPO}"
    cmd = [sys.executable, "-m", f"benchmarks.{bench}", "--out", str(out), *extra]
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return json.loads(out.read_text())


def row_key(row: dict) -> str:
    return str(row.get("scenario") or row.get("label") or row.get("name"))


def summarise(runs: dict[str, list[dict]], metric: str) -> list[dict]:
    rows = []
    keys = [row_key(r) for r in runs["after"][0]["rows"]]
    labels = {row_key(r): r.get("label", "") for r in runs["after"][0]["rows"]}
    for key in keys:
        side = {name: statistics.median(r[metric] for run in per for r in run["rows"] if row_key(r) == key)
                for name, per in runs.items()}
        rows.append({"row": key, "label": labels[key], "before": side["before"], "after": side["after"],
                     "after_over_before": side["after"] / side["before"],
                     "before_runs": [r[metric] for run in runs["before"] for r in run["rows"] if row_key(r) == key],
                     "after_runs": [r[metric] for run in runs["after"] for r in run["rows"] if row_key(r) == key]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the 'before' side")
    parser.add_argument("--bench", required=True, help="module under benchmarks/, e.g. bench_engine")
    parser.add_argument("--metric", required=True, help="field of each JSON row to compare, e.g. tokens_per_s")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("extra", nargs="*", help="arguments passed to the benchmark (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorafold-ab-") as tmp:
        root = Path(tmp)
        tree, shim = checkout(args.before, root)
        try:
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for r in range(args.rounds):
                runs["before"].append(run_once(shim, args.bench, root / f"before{r}.json", args.extra))
                runs["after"].append(run_once(None, args.bench, root / f"after{r}.json", args.extra))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    rows = summarise(runs, args.metric)
    sys.stdout.write(f"{args.bench}: {args.metric}, median of {args.rounds} interleaved rounds per side "
                     f"(before = {args.before}, after = working tree)\n")
    sys.stdout.write(f"{'row':<6} {'label':<34} {'before':>10} {'after':>10} {'after/before':>13}\n")
    for row in rows:
        sys.stdout.write(f"{row['row']:<6} {row['label'][:34]:<34} {row['before']:>10.4g} {row['after']:>10.4g} "
                         f"{row['after_over_before']:>13.3f}\n")
    # every run's own JSON is kept: the after side's are this tree's current results
    write_json(args.out, {"benchmark": "ab", "bench": args.bench, "metric": args.metric, "before": args.before,
                          "rounds": args.rounds, "bench_args": args.extra, "rows": rows,
                          "machine": runs["after"][0].get("machine"), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
