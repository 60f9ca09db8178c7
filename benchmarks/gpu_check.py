"""One check of the GPU path on a GPU: environment, kernels against float64, the engine against
merged references, throughput with many adapters. No network, at most ~6 minutes on one H100.

    python3 -m benchmarks.gpu_check            # on a machine with a CUDA GPU
    python3 -m benchmarks.gpu_check --smoke    # tiny shapes on the CPU (Triton interpreter), ~1 min

Works from a plain checkout (lorafold need not be installed: the repo's folders are mapped to
`lorafold.*`); needs torch, triton, transformers and safetensors (all in the lent GPU
machines' image). On such a machine, from the repo root, bring the JSON back through $OUT:

    set -o pipefail; PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

(`--sections env,kernels` and `--sections engine,throughput` split it in two if one run
would not fit the time left.) Prints a table per section and writes
benchmarks/results/gpu_check.json (`--out`) after every section, so a run killed at its time
limit still brings back what it measured. A run still checking `--deadline` seconds after
its imports (default 480) prints every thread's stack and exits 1: a hang (a lost CUDA event, a deadlock
on the engine thread) then shows where it was, inside a one-shot device call. Sections:

- env: device, torch / triton / transformers versions, C compiler and Python headers (Triton's
  first launch builds a small C module), the first Triton compile per kernel variant.
- kernels: `lorafold::lora_shrink` + `lora_expand` (Triton) in bf16 and fp16 at SmolLM2's and
  Llama-3-8B's layer shapes, 8 / 64 / 512 adapters of mixed ranks (8-64), zipf and uniform
  popularity, 15 % of rows without adapter; against a float64 reference; rows without adapter
  must stay bit-identical to the base output.
- attention (`_gpu_check_attention.py`): the optional FlashInfer backend against a float64
  run of its plan/run contract at SmolLM2's and Llama-3-8B's attention shapes, where
  flashinfer-python is installed ("not installed" otherwise: it is not in the lent machines'
  image and its wheel is too large to travel there).
- engine (`_gpu_check_engine.py`): greedy tokens equal to transformers on merged weights in
  fp32; bf16 teacher-forced top-1 agreement (>= 99 %, no token off by more than a bf16 tie)
  with an fp32 reference of the same bf16 weights, on a model and adapters trained on the
  device for a few seconds to confident predictions (`_confident_llama.py`); decode throughput on a random-init model of Llama-3-8B's layer shapes
  (fewer layers, stated in the JSON) all on the base vs 8 / 64 / 512 distinct rank-16
  adapters (decode steps replaying CUDA graphs), the 64-adapter case again without graphs,
  wall vs profiled GPU time per step, synchronising CUDA calls per step (one expected: the
  sampled tokens), Triton compiles during and after warm-up and
  torch.compile graphs (FlexAttention) built while each scenario ran, a cold
  adapter's first token; shrink+expand time as a fraction of each layer's base GEMM at
  decode sizes, and the shrink at the default launch vs at the (split-K, warps) the engine's
  start-up measured.
Targets (figures to compare, not asserts): <= 5 % throughput loss at 64 adapters vs the base,
shrink+expand <= 10 % of the base GEMM at decode, no compile after warm-up, cold adapter to
first token <= 50 ms. The exit status is 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bootstrap(smoke: bool) -> None:
    """Make `lorafold.*` importable from this checkout, and pick interpreted Triton kernels on
    a machine without CUDA (must happen before triton's kernels are defined)."""
    import torch

    if not torch.cuda.is_available():
        if not smoke:
            raise SystemExit("no CUDA GPU visible: run with --smoke for the CPU check of this script")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import lorafold.server.engine.config  # noqa: F401
    except ImportError:
        # a plain checkout: lorafold.<x> -> ROOT/<x> through a namespace folder of symlinks
        shim = Path(tempfile.mkdtemp(prefix="lorafold-shim-")) / "lorafold"
        shim.mkdir()
        for sub in ("server", "kernels", "training", "clients"):
            (shim / sub).symlink_to(ROOT / sub)
        sys.path.insert(0, str(shim.parent))


SIZES = {
    # (group, slice widths, d_in) of one decoder layer
    "full": dict(
        shapes={
            "smollm2": [("qkv", [576, 192, 192], 576), ("o", [576], 576), ("gate_up", [1536, 1536], 576),
                        ("down", [576], 1536)],
            "llama3-8b": [("qkv", [4096, 1024, 1024], 4096), ("o", [4096], 4096),
                          ("gate_up", [14336, 14336], 4096), ("down", [4096], 14336)],
        },
        adapters=(8, 64, 512), tokens=1024, ranks=(8, 16, 32, 64), variants_dtypes=("bfloat16", "float16"),
    ),
    "smoke": dict(
        shapes={"tiny": [("qkv", [48, 16, 16], 64), ("down", [48], 80)]},
        adapters=(2, 5), tokens=16, ranks=(4, 8, 16, 32), variants_dtypes=("bfloat16", "float16"),
    ),
}


def compiler_present() -> dict:
    import shutil
    import sysconfig

    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return {"c_compiler": shutil.which(cc) if cc else None, "python_headers": header.exists()}


def env_section(device, smoke: bool) -> dict:  # noqa: ANN001
    import torch
    import triton
    import transformers

    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        **compiler_present(),
    }
    info["first_compile_s"] = first_compile_times(device, smoke)
    return info


def first_compile_times(device, smoke: bool) -> dict[str, float]:  # noqa: ANN001
    """Seconds of the first launch minus a warm launch, per kernel variant (dtype, BLOCK_M
    from the longest segment, BLOCK_R from the largest rank): the compile a request would
    wait for without a warm-up."""
    import torch

    from benchmarks._gpu_check_kernels import make_case, run_lora

    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        for seg, rank in ((1, 16), (17, 32)) if smoke else ((1, 16), (1, 64), (64, 16), (64, 64)):
            case = make_case([32, 16] if smoke else [256, 64], 32 if smoke else 256, dtype, device, num_adapters=4, tokens=4 * seg, ranks=(rank,),
                             mix="blocks", seed=1, base_fraction=0.0)
            timings = []
            for _ in range(2):
                t0 = time.perf_counter()
                run_lora(case)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - t0)
            out[f"{str(dtype).removeprefix('torch.')} seg{seg} r{rank}"] = round(timings[0] - timings[1], 4)
    return out


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n== {title}")
    if not rows:
        print("(none)")
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on the CPU (Triton interpreter)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--sections", default="env,kernels,attention,engine,throughput",
                        help="comma-separated subset of env,kernels,attention,engine,throughput")
    parser.add_argument("--deadline", type=float, default=480.0,
                        help="seconds after the imports at which every thread's stack is printed and the run exits (0: none)")
    args = parser.parse_args(argv)
    _bootstrap(args.smoke)
    import torch

    from benchmarks._common import write_json
    from benchmarks._gpu_check_attention import attention_section
    from benchmarks._gpu_check_engine import engine_section, throughput_section
    from benchmarks._gpu_check_kernels import kernels_section

    if args.deadline > 0:  # armed after the imports: dumping stacks mid-import can crash the dump
        faulthandler.dump_traceback_later(args.deadline, exit=True)

    mode = "smoke" if args.smoke else "full"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sections = set(args.sections.split(","))
    # complete: False until every section has run (a file from a run cut short says so)
    result: dict = {"mode": mode, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ok": True,
                    "complete": False}
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def section(name: str, fn, show) -> None:  # noqa: ANN001
        """Run one section; a failure is recorded and printed, and the others still run (a GPU
        run is one shot: what it measured must come back)."""
        t0 = time.perf_counter()
        try:
            result[name] = fn()
            show(result[name])
        except Exception as exc:  # noqa: BLE001 - reported in the JSON and the exit status
            traceback.print_exc()
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            result["ok"] = False
        seconds[name] = time.perf_counter() - t0
        result["section_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
        write_json(args.out, result)  # what is measured so far survives a kill

    def show_env(env: dict) -> None:
        print_table("environment", [{k: v for k, v in env.items() if k != "first_compile_s"}])
        print_table("first Triton compile (s)", [env["first_compile_s"]])

    def show_kernels(rows: list[dict]) -> None:
        print_table("kernels vs float64 (err / tol <= 1 passes)", rows)
        result["ok"] &= all(r["pass"] for r in rows)

    def show_attention(rows: list[dict]) -> None:
        print_table("paged attention vs float64 (FlashInfer where installed)", rows)
        result["ok"] &= all(r["pass"] for r in rows)

    def show_engine(row: dict) -> None:
        print_table("engine vs merged reference", [row])
        result["ok"] &= bool(row["pass"])

    def show_throughput(thr: dict) -> None:
        print_table(f"decode throughput ({thr['model']})", thr["scenarios"])
        print_table("shrink+expand vs base GEMM at decode", thr["lora_vs_gemm"])
        print_table("serving checks", [thr["checks"]])

    if "env" in sections:
        section("env", lambda: env_section(device, args.smoke), show_env)
    if "kernels" in sections:
        section("kernels", lambda: kernels_section(device, SIZES[mode]), show_kernels)
    if "attention" in sections:
        section("attention", lambda: attention_section(device, args.smoke), show_attention)
    if "engine" in sections:
        section("engine", lambda: engine_section(device, smoke=args.smoke), show_engine)
    if "throughput" in sections:
        section("throughput", lambda: throughput_section(device, smoke=args.smoke), show_throughput)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["complete"] = True
    path = write_json(args.out, result)
    print(f"\n{'PASS' if result['ok'] else 'FAIL'} in {result['seconds']} s {result['section_seconds']}; wrote {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
