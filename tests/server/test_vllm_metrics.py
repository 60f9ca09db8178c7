"""/metrics speaks vLLM's metric contract (what the Gateway API Inference Extension's endpoint
picker and vLLM's dashboards read), through a real server on loopback, with the right types
and values that agree with lorafold's own per-adapter series."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lorafold.server.api.settings import ServerSettings
from lorafold.server.engine.config import EngineConfig
from lorafold.server.models.loader import load_base_model
from tests.server.live import live_server
from tests.store.replicas import save_tiny_model

EXPECTED = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge", "vllm:kv_cache_usage_perc": "gauge", "vllm:lora_requests_info": "gauge",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:time_per_output_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram", "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter", "vllm:num_preemptions": "counter",
}


def _families(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(family, sample_name: str, **labels) -> float:
    return sum(s.value for s in family.samples if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def _scrape_mid_stream(url: str) -> dict:
    body = {"prompt": list(range(1, 40)), "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the request is running now
        fams = _families(url)
        for _ in lines:  # let it finish
            pass
    return fams


def test_vllm_series_types_and_values(tmp_path):
    base = load_base_model(save_tiny_model(tmp_path / "tiny"), name="tiny-base")
    settings = ServerSettings(adapter_root=tmp_path / "adapters", state_dir=tmp_path / "state",
                              engine=EngineConfig(num_kv_blocks=64, max_model_len=256, max_num_seqs=4),
                              measure_kv_blocks=False)
    with live_server(settings, base) as url:
        prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
        for prompt in prompts:
            r = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
        fams = _families(url)
        busy = _scrape_mid_stream(url)
    # while a request runs: the gauges the endpoint picker routes by are non-zero and consistent
    assert _value(busy["vllm:num_requests_running"], "vllm:num_requests_running") == 1
    busy_used = _value(busy["lorafold_kv_blocks_used"], "lorafold_kv_blocks_used")
    assert busy_used > 0 and _value(busy["vllm:kv_cache_usage_perc"], "vllm:kv_cache_usage_perc") == busy_used / 64
    for name, kind in EXPECTED.items():
        assert name in fams, f"{name} missing from /metrics"
        assert fams[name].type == kind, (name, fams[name].type)
    for name in EXPECTED:
        if name != "vllm:lora_requests_info":
            assert all(s.labels.get("model_name") == "tiny-base" for s in fams[name].samples), name
    assert _value(fams["vllm:prompt_tokens"], "vllm:prompt_tokens_total") == sum(map(len, prompts))
    assert _value(fams["vllm:prompt_tokens"], "vllm:prompt_tokens_total") == \
        _value(fams["lorafold_prompt_tokens"], "lorafold_prompt_tokens_total")
    assert _value(fams["vllm:generation_tokens"], "vllm:generation_tokens_total") == 12
    assert _value(fams["vllm:e2e_request_latency_seconds"], "vllm:e2e_request_latency_seconds_count") == 2
    assert _value(fams["vllm:time_to_first_token_seconds"], "vllm:time_to_first_token_seconds_bucket", le="+Inf") == 2
    assert _value(fams["vllm:time_per_output_token_seconds"], "vllm:time_per_output_token_seconds_count") == \
        _value(fams["lorafold_inter_token_latency_seconds"], "lorafold_inter_token_latency_seconds_count") > 0
    used = _value(fams["lorafold_kv_blocks_used"], "lorafold_kv_blocks_used")
    usage = _value(fams["vllm:kv_cache_usage_perc"], "vllm:kv_cache_usage_perc")
    assert 0.0 <= usage <= 1.0 and usage == used / 64
    assert _value(fams["vllm:gpu_cache_usage_perc"], "vllm:gpu_cache_usage_perc") == usage
    info = fams["vllm:lora_requests_info"].samples
    assert len(info) == 1 and set(info[0].labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
