"""vLLM's metric names over lorafold's own series, for gateways and dashboards built on vLLM.

The Gateway API Inference Extension's endpoint picker scrapes a model server for its queue
(`vllm:num_requests_waiting`), its KV-cache utilisation as a fraction
(`vllm:gpu_cache_usage_perc`, renamed `vllm:kv_cache_usage_perc` in newer vLLM: both are
exported) and the adapters it holds (`vllm:lora_requests_info`, exported by metrics.py), and
routes LoRA traffic by them. vLLM's Grafana dashboards read the latency and token series.

Nothing is counted twice: at scrape time this collector re-exports lorafold's series under
vLLM's names with vLLM's one label, `model_name` (the base model), summing the per-adapter
label away; lorafold's per-adapter series stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import Metric

# lorafold family -> the vLLM names it is exported under (same type, same buckets)
ALIASES: dict[str, tuple[str, ...]] = {
    "lorafold_num_requests_running": ("vllm:num_requests_running",),
    "lorafold_num_requests_waiting": ("vllm:num_requests_waiting",),
    "lorafold_kv_cache_usage_ratio": ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    "lorafold_time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",),
    "lorafold_inter_token_latency_seconds": ("vllm:time_per_output_token_seconds", "vllm:inter_token_latency_seconds"),
    "lorafold_e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds",),
    "lorafold_request_queue_time_seconds": ("vllm:request_queue_time_seconds",),
    "lorafold_prompt_tokens": ("vllm:prompt_tokens",),
    "lorafold_generation_tokens": ("vllm:generation_tokens",),
    "lorafold_preemptions": ("vllm:num_preemptions",),
}


def alias_family(family: Metric, name: str, model_name: str) -> Metric:
    """`family` renamed to `name`, its labels (e.g. adapter) summed away, `model_name` added."""
    out = Metric(name, f"{family.documentation} (vLLM name for {family.name})", family.type)
    totals: dict[tuple[str, str | None], float] = {}  # (sample suffix, le) -> value; keeps bucket order
    for sample in family.samples:
        suffix = sample.name[len(family.name):]
        if suffix == "_created":  # per-child creation times do not sum
            continue
        key = (suffix, sample.labels.get("le"))
        totals[key] = totals.get(key, 0.0) + sample.value
    for (suffix, le), value in totals.items():
        labels = {"model_name": model_name} | ({"le": le} if le is not None else {})
        out.add_sample(name + suffix, labels, value)
    return out


class VLLMAliases:
    """A prometheus-client collector; `sources` are the lorafold metric objects to alias."""

    def __init__(self, sources: Iterable, model_name: str) -> None:
        self.sources = list(sources)
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            for family in source.collect():
                for name in ALIASES.get(family.name, ()):
                    yield alias_family(family, name, self.model_name)
