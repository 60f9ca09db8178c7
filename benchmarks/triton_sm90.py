"""Every Triton LoRA kernel variant a GPU server compiles at start, compiled for an H100 (sm_90)
here, without a GPU: registers, spills, shared memory, tensor-core instructions, occupancy.

    python -m benchmarks.triton_sm90 [--dtypes bfloat16,float16,float32] [--models llama3-8b,smollm2]
                                     [--out benchmarks/results/triton_sm90.json]

(In a process without TRITON_INTERPRET=1: the interpreter replaces Triton's code generation.)

The variants are the ones the engine's start-up launches (`triton_lora.tune_shrink`, every
(split-K, warps) choice of the decode shrink, then `triton_lora.warm_up`, every block-size
variant), found by running those functions on CPU tensors of Llama-3-8B's and SmolLM2's
layer shapes with every kernel launch compiling its variant (Triton's own key and pipeline,
`_triton_offline.lora_launches`) instead of running. Not timings: which
variants compile, and what each costs the SM. A static report, no baseline to beat; the GPU
timings come from `benchmarks/gpu_check.py`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import write_json
from benchmarks._triton_offline import Offline, lora_launches
from lorafold.kernels import triton_lora

ROOT = Path(__file__).resolve().parent.parent
# (slice widths, d_in) of one decoder layer's LoRA targets
LAYERS = {
    "llama3-8b": [([4096, 1024, 1024], 4096), ([4096], 4096), ([14336, 14336], 4096), ([4096], 14336)],
    "smollm2": [([576, 192, 192], 576), ([576], 576), ([1536, 1536], 576), ([576], 1536)],
}
NUM_SLOTS = 64  # tune_shrink measures segment buckets up to the slot count: all of them
POOL_ROWS = 64
# sm_90 limits per SM (CUDA occupancy calculator): 64K registers allocated per warp in units of
# 256, 228 KiB shared memory with 1 KiB reserved per block, 64 warps, 32 blocks.
REGISTERS, SHARED, RESERVED, MAX_WARPS, MAX_BLOCKS = 65536, 228 * 1024, 1024, 64, 32


def occupancy(registers: int, warps: int, shared: int) -> float:
    """Resident warps per SM / 64, from the register and shared-memory limits."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    blocks = min(REGISTERS // (per_warp * warps), SHARED // (shared + RESERVED), MAX_BLOCKS, MAX_WARPS // warps)
    return blocks * warps / MAX_WARPS


def start_variants(layers: list[tuple[list[int], int]], dtype: torch.dtype, seen: set | None = None) -> list[dict]:
    """Compile, for sm_90, the variants the start-up launches on layers of these shapes
    (variants already in `seen` are skipped). Returns one row per new variant."""
    seen = set() if seen is None else seen
    rows: list[dict] = []

    def compile_once(name: str, sm90: Offline, args: tuple, kwargs: dict) -> None:
        key = (name, sm90.key(*args, **kwargs))
        if key in seen:
            return
        seen.add(key)
        report = sm90.compile(*args, **kwargs)
        data = args[0] if name == "shrink" else args[2]  # x / out: the model's dtype
        rows.append({
            "kernel": name, "dtype": str(data.dtype).removeprefix("torch."), "BLOCK_M": kwargs["BLOCK_M"],
            "BLOCK_R": kwargs["BLOCK_R"], "SPLIT_K": kwargs.get("SPLIT_K", 1), **report,
            "occupancy": round(occupancy(report["registers"], report["num_warps"], report["shared_bytes"]), 3),
        })

    check_device, table = triton_lora._check_device, dict(triton_lora._SHRINK_TABLE)
    # the launchers, compiled Triton's path (not the interpreter's), take CUDA tensors only:
    # nothing runs here, so CPU tensors of the right shapes serve
    triton_lora._check_device = lambda device: None
    try:
        triton_lora._SHRINK_TABLE.clear()
        with lora_launches(compile_once, run=False):
            for widths, d_in in layers:
                a_pool = torch.zeros((len(widths), POOL_ROWS, d_in), dtype=dtype)
                b_pool = torch.zeros((POOL_ROWS, sum(widths)), dtype=dtype)
                row_start = torch.zeros(NUM_SLOTS, dtype=torch.int32)
                ranks = torch.zeros((len(widths), NUM_SLOTS), dtype=torch.int32)
                offsets = [0] + [sum(widths[: i + 1]) for i in range(len(widths))]
                triton_lora.tune_shrink(a_pool, ranks, timer=lambda fn: (fn(), 0.0)[1])
                triton_lora.warm_up(a_pool, b_pool, row_start, ranks, offsets)
    finally:
        triton_lora._check_device = check_device
        triton_lora._SHRINK_TABLE.clear()
        triton_lora._SHRINK_TABLE.update(table)
    return rows


COLUMNS = ("kernel", "dtype", "BLOCK_M", "BLOCK_R", "SPLIT_K", "num_warps", "num_stages", "registers", "local_bytes",
           "shared_bytes", "sass_HGMMA", "sass_HMMA", "sass_FFMA", "occupancy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--models", default=",".join(LAYERS), help=f"layer shapes of: {', '.join(LAYERS)}")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "triton_sm90.json"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    seen: set = set()
    rows = []
    for dtype in args.dtypes.split(","):
        for model in args.models.split(","):  # a second model adds variants only where widths divide differently
            rows += start_variants(LAYERS[model], getattr(torch, dtype), seen)
    print(" | ".join(COLUMNS))
    for r in rows:
        print(" | ".join(str(r[c]) for c in COLUMNS))
    spills = [r for r in rows if r["local_bytes"]]
    summary = {"variants": len(rows), "with_spills": len(spills), "max_registers": max(r["registers"] for r in rows),
               "compile_s": round(sum(r["compile_s"] for r in rows), 1), "seconds": round(time.perf_counter() - t0, 1)}
    print(summary)
    write_json(args.out, {"target": "sm_90 (H100), compiled offline", "triton": __import__("triton").__version__,
                          "layers": LAYERS, "summary": summary, "variants": rows})
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
