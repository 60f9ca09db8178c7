"""Metric label bounds: the adapter label set stays finite however many adapters are served."""

from __future__ import annotations

from prometheus_client import generate_latest

from lorafold.server.api.metrics import Metrics


def test_adapter_label_is_top_n_plus_other():
    metrics = Metrics(top_n=3)
    labels = [metrics.adapter_label(f"ad{i}") for i in range(10)]
    assert labels[:3] == ["ad0", "ad1", "ad2"] and set(labels[3:]) == {"other"}
    assert metrics.adapter_label("ad1") == "ad1"  # a known adapter keeps its label
    assert metrics.adapter_label(None) == "base"
    for label in labels:
        metrics.requests.labels(label, "stop").inc()
    text = generate_latest(metrics.registry).decode()
    series = [line for line in text.splitlines() if line.startswith("lorafold_requests_total{")]
    assert len(series) == 4 and 'lorafold_requests_total{adapter="other",status="stop"} 7.0' in series
