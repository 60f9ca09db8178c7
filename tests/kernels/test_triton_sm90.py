"""The Triton LoRA kernels compiled for an H100 (sm_90) in CI, which has no GPU (the rest of
the suite only interprets them): every variant the GPU server's start-up compiles, in bf16
(its default dtype) at SmolLM2's layer shapes, must compile, keep everything in registers
(no local-memory spills) and run its dots on the tensor cores. `benchmarks/triton_sm90.py`
is the full report (three dtypes, Llama-3-8B's shapes too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_start_up_variants_compile_for_sm90_without_spills(tmp_path: Path) -> None:
    out = tmp_path / "sm90.json"
    # its own process: under TRITON_INTERPRET=1 (this suite) Triton cannot generate code
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.triton_sm90", "--dtypes", "bfloat16", "--models",
                           "smollm2", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["variants"]
    blocks = {(m, r) for m in (16, 32, 64) for r in (16, 32)}
    for kernel in ("shrink", "expand"):
        assert {(v["BLOCK_M"], v["BLOCK_R"]) for v in rows if v["kernel"] == kernel} == blocks
    # the decode shrink's launch choices, all compiled at start for the measurement to pick from
    decode = {(v["BLOCK_R"], v["SPLIT_K"], v["num_warps"]) for v in rows if v["kernel"] == "shrink" and v["BLOCK_M"] == 16}
    assert decode == {(r, k, w) for r in (16, 32) for k in (1, 2, 4, 8) for w in (2, 4)}
    for v in rows:
        assert v["local_bytes"] == 0 and v["sass_LDL"] == 0 and v["sass_STL"] == 0, f"spills: {v}"
        assert v["sass_HMMA"] + v["sass_HGMMA"] > 0 and v["sass_FFMA"] == 0, f"dots off the tensor cores: {v}"
        assert v["shared_bytes"] <= 227 * 1024 and 0 < v["occupancy"] <= 1
    assert any(v["sass_HGMMA"] for v in rows if v["BLOCK_M"] == 64), "prefill tiles use Hopper's wgmma"
