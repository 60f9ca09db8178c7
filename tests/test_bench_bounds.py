"""The decode-step rooflines `bench_engine` reports (pure arithmetic, checked by hand)."""

from __future__ import annotations

import pytest

from benchmarks.bench_engine import decode_phases

RATES = {"read_bandwidth_Bps": 50e9, "matmul_flops": 100e9}


def test_bounds_by_hand():
    # 1e8 base params, batch 10: base 4e8 bytes (8 ms) vs 2e9 FLOPs (20 ms) -> compute-bound;
    # 10 adapters of 1e6 params: 4e7 bytes (0.8 ms) vs 2e7 FLOPs (0.2 ms) -> memory-bound;
    # KV 10 x 100 tokens x 1e4 bytes = 1e7 bytes (0.2 ms) vs 4 x 10 x 100 x 500 = 2e6 FLOPs
    ph = decode_phases(base_params=100_000_000, batch=10, distinct=10, mean_adapter_params=1_000_000, mean_ctx=100,
                       kv_per_token=10_000, hidden=500)
    assert ph.per_phase_bound(RATES) == pytest.approx(0.020 + 0.0008 + 0.0002)
    # whole step: max(4.5e8 bytes / 50e9 = 9 ms, 2.022e9 FLOPs / 100e9 = 20.22 ms)
    assert ph.whole_step_bound(RATES) == pytest.approx(0.02022)


def test_base_only_has_no_adapter_phase_and_whole_step_never_exceeds_per_phase():
    base = decode_phases(100_000_000, 10, 0, 0.0, 100, 10_000, 500)
    assert base.lora_bytes == base.lora_flops == 0
    for distinct in (0, 1, 8, 64):
        ph = decode_phases(100_000_000, 35, distinct, 2_000_000, 300, 10_000, 500)
        assert ph.whole_step_bound(RATES) <= ph.per_phase_bound(RATES)
    more = decode_phases(100_000_000, 35, 64, 2_000_000, 300, 10_000, 500)
    fewer = decode_phases(100_000_000, 35, 8, 2_000_000, 300, 10_000, 500)
    assert more.per_phase_bound(RATES) > fewer.per_phase_bound(RATES), "adapter bytes must be charged"
