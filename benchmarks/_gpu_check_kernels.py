"""The kernel section of `gpu_check`: the Triton shrink/expand, through the registered ops,
against a float64 reference (cases built on the device, the reference looped per adapter)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

# 2^-6 (bf16) / 2^-9 (fp16) of the value: 2-4 units in the last place of the output format.
# The expand rounds once into it (round-to-nearest on a GPU: ratios ~0.25; Triton's
# interpreter truncates bf16: ~0.5), and the 16-bit models' expand multiplies tf32 (10-bit)
# copies of the float32 shrink output.
REL_TOL = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9, torch.float32: 1e-5}
BASE_FRACTION = 0.15


@dataclass
class Case:
    x: torch.Tensor  # [T, d_in]
    out0: torch.Tensor  # [T, D_total] the base output the delta is added to
    a_pool: torch.Tensor
    b_pool: torch.Tensor
    row_start: torch.Tensor  # [S] int32
    ranks: torch.Tensor  # [n_slices, S] int32
    alloc: torch.Tensor  # [S] int64 rows per slot
    slots: torch.Tensor  # [T] int64, -1 = base only
    slice_offsets: list[int]


def token_slots(mix: str, tokens: int, num_adapters: int, rng: random.Random, base_fraction: float) -> list[int]:
    if mix == "blocks":  # equal consecutive segments (compile-time variants)
        return [t * num_adapters // tokens for t in range(tokens)]
    if mix == "zipf":
        weights = [1.0 / (k + 1) ** 1.1 for k in range(num_adapters)]
        slots = rng.choices(range(num_adapters), weights=weights, k=tokens)
    else:
        slots = [rng.randrange(num_adapters) for _ in range(tokens)]
    return [-1 if rng.random() < base_fraction else s for s in slots]


def make_case(widths: list[int], d_in: int, dtype: torch.dtype, device: torch.device, *, num_adapters: int,
              tokens: int, ranks: tuple[int, ...], mix: str, seed: int, base_fraction: float = BASE_FRACTION) -> Case:
    """Adapters of mixed ranks (each slice its own), rows laid out in a shuffled slot order;
    rows of a slot past a slice's rank are zero (the pools' invariant)."""
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    n = len(widths)
    rank = torch.tensor([[rng.choice(ranks) for _ in range(num_adapters)] for _ in range(n)], dtype=torch.int32)
    alloc = rank.max(0).values.to(torch.int64)
    order = list(range(num_adapters))
    rng.shuffle(order)
    row_start = torch.zeros(num_adapters, dtype=torch.int64)
    total = 0
    for s in order:
        row_start[s] = total
        total += int(alloc[s])
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    a_pool = (torch.randn((n, total, d_in), generator=gen, device=device) * 0.05).to(dtype)
    b_pool = (torch.randn((total, offsets[-1]), generator=gen, device=device) * 0.05).to(dtype)
    for s in range(num_adapters):  # zero past each slice's rank
        lo = int(row_start[s])
        for i in range(n):
            r = int(rank[i, s])
            a_pool[i, lo + r : lo + int(alloc[s])] = 0
            b_pool[lo + r : lo + int(alloc[s]), offsets[i] : offsets[i + 1]] = 0
    return Case(
        x=torch.randn((tokens, d_in), generator=gen, device=device).to(dtype),
        out0=torch.randn((tokens, offsets[-1]), generator=gen, device=device).to(dtype),
        a_pool=a_pool, b_pool=b_pool,
        row_start=row_start.to(device=device, dtype=torch.int32), ranks=rank.to(device), alloc=alloc.to(device),
        slots=torch.tensor(token_slots(mix, tokens, num_adapters, rng, base_fraction), device=device),
        slice_offsets=offsets,
    )


def run_lora(case: Case) -> torch.Tensor:
    """The serving path: batch metadata as the engine builds it on a GPU, then
    `lorafold::lora_shrink` / `lora_expand` on the Triton backend. Returns the output."""
    from lorafold.kernels.meta import build_lora_meta
    from lorafold.kernels.ops import expand, shrink

    meta = build_lora_meta(case.slots, case.row_start, case.alloc, backend="triton")
    out = case.out0.clone()
    y = shrink(case.x, case.a_pool, case.row_start, case.ranks, meta)
    expand(y, case.b_pool, case.row_start, case.ranks, case.slice_offsets, meta, out)
    return out


def reference(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, delta) in float64: out = out0 + x A_sᵀ B_s per slice, looped over adapters."""
    delta = torch.zeros(case.out0.shape, dtype=torch.float64, device=case.out0.device)
    x = case.x.double()
    for s in torch.unique(case.slots[case.slots >= 0]).tolist():
        toks = torch.nonzero(case.slots == s).flatten()
        lo = int(case.row_start[s])
        for i in range(case.ranks.shape[0]):
            r = int(case.ranks[i, s])
            c0, c1 = case.slice_offsets[i], case.slice_offsets[i + 1]
            a = case.a_pool[i, lo : lo + r].double()
            b = case.b_pool[lo : lo + r, c0:c1].double()
            delta[toks, c0:c1] = (x[toks] @ a.T) @ b
    return case.out0.double() + delta, delta


def check_case(case: Case) -> tuple[float, bool]:
    """(max error / tolerance, rows without adapter bit-identical to the base output)."""
    out = run_lora(case)
    ref, delta = reference(case)
    tol = REL_TOL[case.out0.dtype] * torch.maximum(torch.maximum(ref.abs(), delta.abs()), torch.tensor(2.0**-4))
    ratio = float(((out.double() - ref).abs() / tol).max())
    base = case.slots < 0
    identical = bool(torch.equal(out[base], case.out0[base]))
    return ratio, identical


def kernels_section(device: torch.device, sizes: dict) -> list[dict]:
    rows = []
    seed = 0
    for model, groups in sizes["shapes"].items():
        for dtype_name in sizes["variants_dtypes"]:
            dtype = getattr(torch, dtype_name)
            for num_adapters in sizes["adapters"]:
                for mix in ("zipf", "uniform"):
                    worst, identical = 0.0, True
                    for _, widths, d_in in groups:
                        seed += 1
                        case = make_case(widths, d_in, dtype, device, num_adapters=num_adapters, tokens=sizes["tokens"],
                                         ranks=sizes["ranks"], mix=mix, seed=seed)
                        ratio, same = check_case(case)
                        worst, identical = max(worst, ratio), identical and same
                        del case
                    rows.append({"model": model, "dtype": dtype_name, "adapters": num_adapters, "mix": mix,
                                 "err/tol": round(worst, 4), "base_rows_identical": identical,
                                 "pass": worst <= 1.0 and identical})
    return rows
