"""The optional FlashInfer attention backend, as far as the CPU reaches: the step's layout in
FlashInfer's paged-KV CSR form, the plan/run contract (`ReferencePagedAttention`) equal to the
engine's own paged attention, the engine through that contract against merged-weight
references, and the refusals (CPU, fp32, not installed) naming the fix, from the engine and
from `lorafold serve`. FlashInfer's own kernel needs CUDA: `benchmarks/gpu_check.py` compares
it with the reference where it is installed."""

from __future__ import annotations

import logging

import pytest
import torch

from lorafold.clients.cli import build_parser
from lorafold.server.api.cli_entry import serve_main, settings_from_args
from lorafold.server.engine import flashinfer_paged
from lorafold.server.engine.attention import build_attention_metadata, paged_attention
from lorafold.server.engine.flashinfer_paged import (
    FlashInferAttention,
    ReferencePagedAttention,
    check_usable,
    paged_layout,
)
from tests.conftest import merged_model
from tests.engine.test_engine import hf_greedy, run_to_completion
from tests.gpu_path.test_gpu_path_engine import MAX_TOKENS, _engine, _model, _workload

CPU = torch.device("cpu")

# (q_start, q_len, ctx_len, block table): a decode deep in its third block, a whole prompt, a
# chunk resuming a prompt mid-block, a decode whose context fills its block exactly; block
# tables longer than the context (the block manager allocates ahead) and out of order
STEP = [(0, 1, 10, [7, 2, 5, 9]), (1, 6, 6, [0, 3]), (7, 5, 9, [4, 8, 6]), (12, 1, 8, [1, 11])]
BLOCK = 4


def test_layout_is_flashinfers_csr_of_the_block_tables() -> None:
    layout = paged_layout(STEP, BLOCK)
    assert layout.qo_indptr.tolist() == [0, 1, 7, 12, 13]
    assert layout.kv_indptr.tolist() == [0, 3, 5, 8, 10]
    assert layout.kv_indices.tolist() == [7, 2, 5, 0, 3, 4, 8, 6, 1, 11]
    assert layout.last_page_len.tolist() == [2, 2, 1, 4]
    assert {t.dtype for t in (layout.qo_indptr, layout.kv_indptr, layout.kv_indices, layout.last_page_len)} == {
        torch.int32}
    with pytest.raises(ValueError, match="expected 1"):  # a gap in the flat batch
        paged_layout([(0, 1, 3, [0]), (2, 1, 3, [1])], BLOCK)
    with pytest.raises(ValueError, match="block table covers 4 tokens"):
        paged_layout([(0, 1, 5, [0])], BLOCK)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_run_contract_equals_the_engines_paged_attention(dtype: torch.dtype) -> None:
    """Through the engine's own entry point (`paged_attention`, which writes the step's K/V
    into the cache first): the FlashInfer backend on the reference contract against the SDPA
    backend, on a mixed step with GQA (6 query heads over 2 KV heads)."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, blocks = 6, 2, 16, 12
    n = sum(s[1] for s in STEP)
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for _, q_len, ctx, table in STEP for p in range(ctx - q_len, ctx)]
    q, k, v = (torch.randn(n, h, dim, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads))
    cache = torch.randn(2, blocks * BLOCK, kv_heads, dim, generator=gen).to(dtype)  # earlier tokens' K/V
    planner = FlashInferAttention(ReferencePagedAttention(), num_heads=heads, num_kv_heads=kv_heads, head_dim=dim,
                                  dtype=dtype, scale=0.3)
    outs = {}
    for backend in ("sdpa", "flashinfer"):
        kc, vc = cache[0].clone(), cache[1].clone()
        meta = build_attention_metadata(slots, STEP, BLOCK, CPU, dtype=dtype, backend=backend, flashinfer=planner)
        outs[backend] = paged_attention(q, k, v, kc, vc, meta, 0.3)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs["flashinfer"], outs["sdpa"], **tol)
    with pytest.raises(ValueError, match="planned for 13 query rows"):
        planner.plan(STEP, BLOCK).run(q[:5], cache[0], cache[1])
    with pytest.raises(ValueError, match="FlashInferAttention"):
        build_attention_metadata(slots, STEP, BLOCK, CPU, backend="flashinfer")


def test_engine_on_the_contract_matches_merged_references_token_for_token(monkeypatch) -> None:
    """The engine with attention_backend="flashinfer" (the reference contract in place of the
    CUDA kernel): every step, prefill chunks and decodes, planned once and run per layer;
    adapters of several ranks evicted and reloaded; greedy outputs equal to transformers'
    generate on merged weights."""
    made: list[tuple] = []

    def make_wrapper(device: torch.device, dtype: torch.dtype) -> ReferencePagedAttention:
        made.append((device, dtype))
        return ReferencePagedAttention()

    monkeypatch.setattr(flashinfer_paged, "make_wrapper", make_wrapper)
    hf = _model(torch.float32)
    engine = _engine(hf, dict(attention_backend="flashinfer", lora_backend="torch", prepack_weights=False))
    assert made == [(CPU, torch.float32)] and engine.runner.decode_graphs is None
    plans = []
    plan = engine.runner.flashinfer.plan
    monkeypatch.setattr(engine.runner.flashinfer, "plan", lambda seqs, bs: plans.append(len(seqs)) or plan(seqs, bs))
    arrivals, setup, adapters = _workload(engine)
    got = run_to_completion(engine, arrivals)
    assert engine.adapter_table.stats.evictions > 0, "the test must exercise eviction"
    assert len(plans) >= 20 and max(plans) > 1, "one plan per step, steps of several sequences"
    merged: dict = {}
    for rid, prompt, a in setup:
        if a not in merged:
            merged[a] = hf if a is None else merged_model(hf, adapters[a])
        assert got[rid] == hf_greedy(merged[a], prompt, MAX_TOKENS, None), f"{rid} (adapter {a})"


def test_refused_where_it_cannot_run_with_the_fix_named(monkeypatch, caplog) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_usable(CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        check_usable(torch.device("cuda"), torch.float32)
    monkeypatch.setattr(flashinfer_paged, "flashinfer_available", lambda: False)
    with pytest.raises(ValueError, match="pip install flashinfer-python"):
        check_usable(torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="needs a CUDA device"):  # the engine, before any allocation
        _engine(_model(torch.float32), dict(attention_backend="flashinfer"))
    args = build_parser().parse_args(["serve", "--attention-backend", "flashinfer", "--device", "cpu"])
    assert settings_from_args(args).engine.attention_backend == "flashinfer"
    with caplog.at_level(logging.ERROR):  # `lorafold serve` exits 2 before loading the model
        assert serve_main(args) == 2
    assert "needs a CUDA device" in caplog.text
