"""benchmarks/gpu_check.py --smoke: the GPU check's every section on tiny shapes on the CPU
(Triton interpreter, forced GPU path), so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_runs_every_section_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["mode"] == "smoke" and result["complete"]
    env_info = result["env"]
    assert env_info["triton_interpreter"] is (not torch.cuda.is_available())
    assert len(env_info["first_compile_s"]) == 4
    kernels = result["kernels"]
    assert {(r["dtype"], r["mix"]) for r in kernels} == {(d, m) for d in ("bfloat16", "float16")
                                                         for m in ("zipf", "uniform")}
    assert all(r["pass"] and r["base_rows_identical"] and 0 < r["err/tol"] <= 1 for r in kernels)
    attention = result["attention"]
    assert [(r["shape"], r["dtype"]) for r in attention] == [("tiny", "bfloat16"), ("tiny", "float16")]
    assert all(r["pass"] and 0 < r["max_err"] <= r["tol"] and r["sequences"] == 8 for r in attention)
    engine = result["engine"]
    assert engine["backends"] == "flex+triton" and engine["pass"]
    assert engine["fp32_equal_requests"] == f"{engine['requests']}/{engine['requests']}"
    thr = result["throughput"]
    assert [r["adapters"] for r in thr["scenarios"]][:3] == [0, 2, 4]  # (+ 4 without graphs on a GPU)
    assert all(r["tokens_per_s"] > 0 for r in thr["scenarios"]) and thr["scenarios"][0]["vs_base"] == 1
    assert {r["layer"] for r in thr["lora_vs_gemm"]} == {"qkv", "down"}
    # nothing measured on the CPU (interpreter timings mean nothing): the default launch
    assert all((r["split_k"], r["num_warps"]) == (1, 4) and r["shrink_us_default"] > 0 and r["shrink_us_chosen"] > 0
               for r in thr["lora_vs_gemm"])
    assert all("torch_compiles" in r and "host_syncs" in r for r in thr["scenarios"])
    assert thr["checks"]["cold_adapter_first_token_ms"] > 0
    for table in ("environment", "kernels vs float64", "paged attention vs float64", "engine vs merged reference",
                  "decode throughput"):
        assert table in proc.stdout


def test_gpu_check_keeps_what_it_measured_when_killed(tmp_path: Path) -> None:
    """A device call is one shot with a time limit: the JSON is written after every section,
    so a run killed mid-way (here right after its first section) still leaves valid results,
    marked incomplete."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert out.exists(), "no JSON after the first section"
    finally:
        proc.kill()
        proc.wait()
    result = json.loads(out.read_text())
    assert result["complete"] is False and "env" in result and "throughput" not in result, sorted(result)
    assert result["env"]["first_compile_s"], result["env"]


def test_gpu_check_prints_every_stack_at_its_deadline() -> None:
    """A hang inside a one-shot device call must show where it is: --deadline seconds after
    its imports the check prints every thread's stack and exits (3 s: it is in its first
    sections). faulthandler's dump is best effort (it reads the stacks while the main thread
    runs), so the test asks for the header and a frame, and a non-zero exit: 1, or a signal
    should the dump itself crash."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--deadline", "3", "--out",
                           os.devnull], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "Timeout (0:00:03)!" in proc.stderr and "Thread 0x" in proc.stderr and 'File "' in proc.stderr, \
        proc.stderr[-2000:]
