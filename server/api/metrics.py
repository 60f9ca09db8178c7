"""Prometheus metrics of the service (prometheus-client, one registry per app).

Adapter labels are bounded: the first `top_n` adapters seen get their own label value, the
rest share "other", so a server with thousands of adapters cannot blow up the series count.
`vllm:lora_requests_info` is exported under vLLM's own name and labels so existing
gateways can route by adapter unchanged.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lorafold.server.api.vllm_metrics import VLLMAliases
from lorafold.server.engine.engine import StepStats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self, top_n: int = 20, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        self.top_n = top_n
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.requests = Counter("lorafold_requests", "Finished requests by adapter and status", ["adapter", "status"], registry=r)
        self.ttft = Histogram("lorafold_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY, registry=r)
        self.itl = Histogram("lorafold_inter_token_latency_seconds", "Time between streamed tokens", buckets=_LATENCY, registry=r)
        self.e2e = Histogram("lorafold_e2e_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY, registry=r)
        self.queue = Histogram("lorafold_request_queue_time_seconds", "Time waiting before the first scheduled step", buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("lorafold_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generation_tokens = Counter("lorafold_generation_tokens", "Tokens generated", ["adapter"], registry=r)
        self.running = Gauge("lorafold_num_requests_running", "Requests running", registry=r)
        self.engine_alive = Gauge("lorafold_engine_alive", "1 while the engine thread runs; 0: restart the server",
                                  registry=r)
        self.waiting = Gauge("lorafold_num_requests_waiting", "Requests waiting", registry=r)
        self.batch_tokens = Histogram("lorafold_batch_size_tokens", "Tokens per engine step", buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_seqs = Histogram("lorafold_batch_size_sequences", "Sequences per engine step", buckets=_TOKEN_BUCKETS, registry=r)
        self.step_adapters = Histogram("lorafold_step_distinct_adapters", "Distinct adapters per engine step", buckets=_TOKEN_BUCKETS, registry=r)
        self.step_seconds = Histogram("lorafold_step_seconds", "Engine step duration", buckets=_LATENCY, registry=r)
        self.preemptions = Counter("lorafold_preemptions", "Sequences preempted (recompute)", registry=r)
        self.kv_used = Gauge("lorafold_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_total = Gauge("lorafold_kv_blocks_total", "KV cache blocks in the budget", registry=r)
        self.adapter_loads = Counter("lorafold_adapter_loads", "Adapter loads into a tier", ["tier"], registry=r)
        self.adapter_load_seconds = Histogram("lorafold_adapter_load_seconds", "Adapter load latency by destination tier", ["tier"], buckets=_LATENCY, registry=r)
        self.tier_hits = Counter("lorafold_adapter_cache_hits", "Adapter lookups served by a tier", ["tier"], registry=r)
        self.tier_evictions = Counter("lorafold_adapter_cache_evictions", "Adapters evicted from a tier", ["tier"], registry=r)
        self.resident = Gauge("lorafold_adapters_resident", "Adapters resident per tier", ["tier"], registry=r)
        self.registered = Gauge("lorafold_adapters_registered", "Registered adapters", registry=r)
        self.store_up = Gauge("lorafold_adapter_store_up", "1 while the adapter store answers this replica's polls", registry=r)
        self.store_last_sync = Gauge("lorafold_adapter_store_last_sync_timestamp_seconds",
                                     "Wall time of this replica's last successful catalogue sync with the store", registry=r)
        self.adapter_budget = Gauge("lorafold_adapter_memory_budget_bytes",
                                    "Device memory budget for resident adapters' weights", registry=r)
        self.adapter_resident_bytes = Gauge("lorafold_adapter_memory_resident_bytes",
                                            "Device memory the resident adapters' weights hold", registry=r)
        self.lora_info = Gauge("lorafold_lora_requests_info", "Running and waiting adapters (vLLM-compatible labels)",
                               ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r)
        self.vllm_lora_info = Gauge("vllm:lora_requests_info", "Running and waiting adapters (vLLM's metric name)",
                                    ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r)
        self.kv_usage = Gauge("lorafold_kv_cache_usage_ratio", "KV cache blocks in use, as a fraction of the budget (0-1)", registry=r)
        # vllm:* names for the GIE endpoint picker and vLLM dashboards (see vllm_metrics.py)
        r.register(VLLMAliases([self.running, self.waiting, self.kv_usage, self.ttft, self.itl, self.e2e, self.queue,
                                self.prompt_tokens, self.generation_tokens, self.preemptions], model_name))
        self._last_counts: dict[str, int] = {}

    def adapter_label(self, name: str | None) -> str:
        if name is None:
            return "base"
        with self._lock:
            if name in self._labels:
                return name
            if len(self._labels) < self.top_n:
                self._labels.add(name)
                return name
        return "other"

    def on_step(self, stats: StepStats, snapshot: dict) -> None:
        """Called on the engine thread after every step (prometheus-client is thread-safe)."""
        self.batch_tokens.observe(stats.num_tokens)
        self.batch_seqs.observe(stats.num_seqs)
        self.step_adapters.observe(stats.num_adapters)
        self.step_seconds.observe(stats.seconds)
        if stats.num_preempted:
            self.preemptions.inc(stats.num_preempted)
        if stats.adapter_loads:
            self.adapter_loads.labels("device").inc(stats.adapter_loads)
            self.adapter_load_seconds.labels("device").observe(stats.adapter_load_seconds / stats.adapter_loads)
        self.update_engine(snapshot)

    def update_engine(self, snap: dict) -> None:
        self.running.set(snap["running"])
        self.waiting.set(snap["waiting"])
        self.kv_used.set(snap["kv_used"])
        self.kv_total.set(snap["kv_total"])
        self.kv_usage.set(snap["kv_used"] / snap["kv_total"] if snap["kv_total"] else 0.0)
        self.resident.labels("device").set(snap["device_resident"])
        self.adapter_budget.set(snap["adapter_budget_bytes"])
        self.adapter_resident_bytes.set(snap["adapter_resident_bytes"])
        self._delta(self.tier_hits.labels("device"), "device_hits", snap)
        self._delta(self.tier_evictions.labels("device"), "device_evictions", snap)
        info = snap["lora_info"]
        for gauge in (self.lora_info, self.vllm_lora_info):
            gauge.clear()  # one series: the current sets of adapters
            gauge.labels(info["max_lora"], info["running_lora_adapters"], info["waiting_lora_adapters"]).set(time.time())

    def update_registry(self, registry) -> None:  # noqa: ANN001 - AdapterRegistry (avoids an import cycle)
        stats = registry.stats
        snap = {"cpu_hits": stats.cpu_hits, "cpu_evictions": stats.cpu_evictions, "disk_loads": stats.disk_loads}
        self._delta(self.tier_hits.labels("cpu"), "cpu_hits", snap)
        self._delta(self.tier_evictions.labels("cpu"), "cpu_evictions", snap)
        self._delta(self.adapter_loads.labels("cpu"), "disk_loads", snap)
        while stats.load_seconds:
            self.adapter_load_seconds.labels("cpu").observe(stats.load_seconds.pop())
        registered = len(registry.names())
        self.resident.labels("cpu").set(registry.cpu_resident)
        self.resident.labels("disk").set(registered)
        self.registered.set(registered)
        catalogue = registry.catalogue
        self.store_up.set(0 if catalogue.last_error else 1)
        if catalogue.last_sync is not None:
            self.store_last_sync.set(catalogue.last_sync)

    def _delta(self, counter, key: str, snap: dict) -> None:  # noqa: ANN001
        """Advance a Counter to an absolute count kept elsewhere."""
        with self._lock:
            delta = snap[key] - self._last_counts.get(key, 0)
            self._last_counts[key] = snap[key]
        if delta > 0:
            counter.inc(delta)
