"""Time the README's quick-start training command as a user runs it.

    python -m benchmarks.bench_quickstart --data-dir data/sentiment --steps 60 --timeout 300

Runs ``lorafold train --data DIR/train.jsonl --val DIR/val.jsonl --out OUT --optimizer
scaled_adamw --rank 16 --steps N`` (prepare DIR first: ``lorafold train prepare sentiment
--out DIR``) and records, in seconds since the start: the first output line, the model load,
the first evaluation's announcement and result, the first training-progress update, the end
of training, and the exit — every line the process writes (progress-bar redraws included)
is timestamped. The process is stopped at ``--timeout`` (the quick start's target is 300 s
on 2 cores); what it reached by then is recorded. The load average at start and end is
recorded with it, since the machine may be shared. Writes ``benchmarks/results/quickstart.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MILESTONES = {
    "first_line": r".",
    "model_loaded": r"base model .* loaded",
    "first_eval_announced": r"evaluating at step 0",
    "first_eval_done": r"eval at step 0:",
    "first_train_update": r"train:\s+\d+%.*\b1/\d+|step 1/",
    "training_done": r"evaluating at step [1-9]",
    "final_eval_done": r"eval at step [1-9]\d*:",
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/sentiment", help="output of `lorafold train prepare sentiment`")
    p.add_argument("--steps", type=int, default=60, help="--steps of the timed command (the README's)")
    p.add_argument("--timeout", type=float, default=300.0, help="stop the run after this many seconds")
    p.add_argument("--work", default="/tmp/lorafold_bench_quickstart", help="run folder (--out)")
    p.add_argument("--out", default=str(RESULTS / "quickstart.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    data = Path(args.data_dir)
    cmd = ["lorafold", "train", "--data", str(data / "train.jsonl"), "--val", str(data / "val.jsonl"),
           "--out", args.work, "--optimizer", "scaled_adamw", "--rank", "16", "--steps", str(args.steps)]
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    reached: dict[str, float] = {}
    lines: list[tuple[float, str]] = []
    buf = b""
    timed_out = False
    os.set_blocking(proc.stdout.fileno(), False)
    while True:
        now = time.perf_counter() - t0
        if now > args.timeout:
            timed_out = True
            proc.kill()
            break
        chunk = proc.stdout.read()
        if chunk:
            buf += chunk
            parts = re.split(rb"[\r\n]", buf)
            buf = parts.pop()
            for raw in parts:
                text = raw.decode(errors="replace").strip()
                if not text:
                    continue
                lines.append((round(now, 2), text))
                for name, pattern in MILESTONES.items():
                    if name not in reached and re.search(pattern, text):
                        reached[name] = round(now, 2)
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.wait()
    result = {"command": "python -m benchmarks.bench_quickstart " + " ".join(sys.argv[1:] if argv is None else argv),
              "timed_command": " ".join(cmd), "timeout_s": args.timeout, "timed_out": timed_out,
              "exit_code": None if timed_out else proc.returncode, "wall_s": round(wall, 1),
              "cpu_count": os.cpu_count(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
              "milestones_s": reached, "last_lines": lines[-8:]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(f"{result['command']}\nwall {result['wall_s']} s (timed out: {timed_out}), load "
                     f"{load_start[0]:.1f} -> {result['load_average_end'][0]:.1f}\n")
    for name, sec in reached.items():
        sys.stdout.write(f"  {name:<22} {sec:8.1f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
