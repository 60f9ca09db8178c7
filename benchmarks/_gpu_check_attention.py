"""The attention section of `gpu_check`: the optional FlashInfer backend's paged kernel, through
the engine's own entry point (`paged_attention`, K/V written into the cache first), against a
float64 run of the same plan/run contract (`ReferencePagedAttention`), at SmolLM2's and
Llama-3-8B's attention shapes on a mixed step (long decodes, a prompt, a resumed chunk).

FlashInfer is not in the lent GPU machines' image and its wheel (~100 MB) is past what travels
there, so on those machines the section reports "not installed"; where it is installed the
section checks it. `--smoke` runs the reference contract itself on the CPU (the section's code
path). FlexAttention, the default GPU backend, is checked by the engine section.
"""

from __future__ import annotations

import random
import time

import torch

from lorafold.server.engine.attention import build_attention_metadata, paged_attention
from lorafold.server.engine.flashinfer_paged import (
    FlashInferAttention,
    ReferencePagedAttention,
    flashinfer_available,
    make_wrapper,
)

# (query heads, KV heads, head_dim)
SHAPES = {"smollm2": (9, 3, 64), "llama3-8b": (32, 8, 128)}
SMOKE_SHAPES = {"tiny": (6, 2, 16)}
BLOCK = 16
# The output is a convex mix of V rows (|v| ~ 1): 4 units in the last place of the format.
TOL = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-8}


def mixed_step(rng: random.Random, num_blocks: int, smoke: bool) -> list[tuple[int, int, int, list[int]]]:
    """(q_start, q_len, ctx_len, block table): decodes of 1..1500-token contexts, a whole
    prompt and a chunk resuming one mid-block, on shuffled blocks."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    lengths = [(1, rng.randint(1, 40 if smoke else 1500)) for _ in range(6 if smoke else 24)]
    lengths += [(13, 13), (9, 30)] if smoke else [(200, 200), (120, 333)]
    seqs, q_start = [], 0
    for q_len, ctx in lengths:
        table = [free.pop() for _ in range(-(-ctx // BLOCK))]
        seqs.append((q_start, q_len, ctx, table))
        q_start += q_len
    return seqs


def _run(planner: FlashInferAttention, seqs: list, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         cache: torch.Tensor, scale: float) -> torch.Tensor:
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for _, n, ctx, table in seqs for p in range(ctx - n, ctx)]
    meta = build_attention_metadata(slots, seqs, BLOCK, q.device, dtype=q.dtype, backend="flashinfer",
                                    flashinfer=planner)
    return paged_attention(q, k, v, cache[0].clone(), cache[1].clone(), meta, scale)


def attention_section(device: torch.device, smoke: bool) -> list[dict]:
    if device.type == "cuda" and not flashinfer_available():
        return [{"backend": "flashinfer", "status": "not installed", "pass": True}]
    rows = []
    for name, (heads, kv_heads, dim) in (SMOKE_SHAPES if smoke else SHAPES).items():
        for dtype in (torch.bfloat16, torch.float16):
            rng = random.Random(0)
            gen = torch.Generator(device=device).manual_seed(0)
            num_blocks = 64 if smoke else 4096
            seqs = mixed_step(rng, num_blocks, smoke)
            n = sum(s[1] for s in seqs)
            q, k, v = (torch.randn(n, h, dim, generator=gen, device=device).to(dtype) for h in (heads, kv_heads, kv_heads))
            cache = torch.randn(2, num_blocks * BLOCK, kv_heads, dim, generator=gen, device=device).to(dtype)
            scale = dim**-0.5
            # the kernel under test: FlashInfer on a GPU; the reference contract itself in --smoke
            wrapper = make_wrapper(device, dtype) if device.type == "cuda" else ReferencePagedAttention()
            planner = FlashInferAttention(wrapper, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, dtype=dtype,
                                          scale=scale)
            out = _run(planner, seqs, q, k, v, cache, scale)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = _run(planner, seqs, q, k, v, cache, scale)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            ref64 = FlashInferAttention(ReferencePagedAttention(), num_heads=heads, num_kv_heads=kv_heads, head_dim=dim,
                                        dtype=torch.float64, scale=scale)
            ref = _run(ref64, seqs, q.double(), k.double(), v.double(), cache.double(), scale)
            err = float((out.double() - ref).abs().max())
            rows.append({"backend": "flashinfer" if device.type == "cuda" else "reference (smoke)", "shape": name,
                         "dtype": str(dtype).removeprefix("torch."), "tokens": n, "sequences": len(seqs),
                         "max_err": err, "tol": TOL[dtype], "step_s": round(seconds, 5), "pass": err <= TOL[dtype]})
    return rows
