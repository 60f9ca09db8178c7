"""The monitoring stack against a real server: the Grafana dashboard queries only metrics
that a live /metrics exports, and a real Prometheus (Debian package `prometheus`) scrapes
the server, accepts every dashboard expression and sees the request counter.

One live server (the packaged SmolLM2) serves the whole module; a completion and a streamed
chat completion are made first so that histograms and counters have samples.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorafold.server.api.settings import ServerSettings
from lorafold.server.engine.config import EngineConfig
from tests.server.live import free_port, live_server

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "grafana" / "dashboards" / "lorafold.json"

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan", "start", "end"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers left once strings, label matchers,
    range/subquery brackets and grouping clauses are removed, minus function calls and keywords."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group())
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":  # label_values(metric, label): the metric must exist too
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", var["definition"]))
    return exprs


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, tier) (rate(a_seconds_bucket{instance=~"$instance",x="y(z)"}'
            '[$__rate_interval]))) / on(instance) group_left b_total + sum without (q) (vllm:info) offset 5m > bool 1e3')
    assert promql_metric_names(expr) == {"a_seconds_bucket", "b_total", "vllm:info"}


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory) -> Iterator[str]:  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("deploy-server")
    settings = ServerSettings(adapter_root=tmp / "adapters", state_dir=tmp / "state",
                              engine=EngineConfig(num_kv_blocks=256), measure_kv_blocks=False)
    (tmp / "adapters").mkdir()
    with live_server(settings, smollm2) as url:
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "The sky is", "max_tokens": 4},
                       timeout=120)
        assert r.status_code == 200, r.text
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                          json={"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 4, "stream": True}) as s:
            assert s.status_code == 200
            assert any(line == "data: [DONE]" for line in s.iter_lines())
        yield url


def _families(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_dashboard_queries_only_exported_metrics(server: str) -> None:
    families = _families(server)
    names = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    assert len(names) >= 20, sorted(names)  # the extractor found the dashboard's metrics
    problems = []
    for name in sorted(names):
        family, suffix = name, ""
        for sfx, kind in (("_bucket", "histogram"), ("_sum", "histogram"), ("_count", "histogram"), ("_total", "counter")):
            if name.endswith(sfx) and name[: -len(sfx)] in families and families[name[: -len(sfx)]].type == kind:
                family, suffix = name[: -len(sfx)], sfx
                break
        f = families.get(family)
        if f is None:
            problems.append(f"{name}: not exported")
        elif not suffix and f.type in ("counter", "histogram"):
            fix = f"{name}_total" if f.type == "counter" else f"{name}_bucket / _sum / _count"
            problems.append(f"{name}: a {f.type} has no bare series; query {fix}")
        elif f.samples and name not in {s.name for s in f.samples}:
            problems.append(f"{name}: family {family} exports {sorted({s.name for s in f.samples})}")
    assert not problems, "\n".join(problems)
    # The request made by the fixture shows up where the dashboard looks for it.
    for sample_name in ("lorafold_requests_total", "lorafold_generation_tokens_total",
                        "lorafold_time_to_first_token_seconds_bucket", "lorafold_inter_token_latency_seconds_bucket"):
        family = families[re.sub(r"_(total|bucket)$", "", sample_name)]
        assert sum(s.value for s in family.samples if s.name == sample_name) >= 1, sample_name


def test_dashboard_check_rejects_unknown_metric(server: str) -> None:
    families = _families(server)
    assert "lorafold_requests" in families and "lorafold_tokens_per_second" not in families
    assert families["lorafold_requests"].type == "counter"  # so a bare `lorafold_requests` would be refused


# -- a real Prometheus ------------------------------------------------------------------------


def _wait_for(fn, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def prometheus(server: str, tmp_path_factory) -> Iterator[str]:  # noqa: ANN001
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is absent: apt-get install -y prometheus (Debian package)")
    tmp = tmp_path_factory.mktemp("prometheus")
    target = server.removeprefix("http://")
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: lorafold\n    scrape_timeout: 1s\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}")
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200

        try:
            _wait_for(ready, 30, "Prometheus to become ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{(tmp / 'prometheus.log').read_text()[-3000:]}") from exc
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _query(url: str, expr: str) -> dict:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]


def test_prometheus_scrapes_request_counter(prometheus: str, server: str) -> None:
    def scraped() -> float | None:
        result = _query(prometheus, "sum(lorafold_requests_total)")["result"]
        return float(result[0]["value"][1]) if result else None

    assert _wait_for(scraped, 30, "lorafold_requests_total in Prometheus") >= 1
    up = _query(prometheus, 'up{job="lorafold"}')["result"]
    assert [r["value"][1] for r in up] == ["1"]
    by_status = _query(prometheus, "lorafold_requests_total")["result"]
    assert {r["metric"]["status"] for r in by_status} and sum(float(r["value"][1]) for r in by_status) >= 2


def test_prometheus_accepts_every_dashboard_expression(prometheus: str) -> None:
    for expr in dashboard_exprs():
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        _query(prometheus, concrete)  # a parse error comes back as status "error" (HTTP 400)
    with pytest.raises(AssertionError):
        _query(prometheus, "sum(rate(lorafold_requests_total[1m])")  # the check does catch bad PromQL


def test_prometheus_ingests_the_vllm_series(prometheus: str) -> None:
    """The vllm:* names (colons and all) as vLLM dashboards and the GIE model-server protocol
    use them: ingested, labelled with model_name, usable in the usual expressions."""
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:e2e_request_latency_seconds_count"):
        result = _wait_for(lambda n=name: _query(prometheus, n)["result"], 30, name)
        assert all(r["metric"].get("model_name") for r in result), (name, result)
    tokens = _query(prometheus, "sum(vllm:prompt_tokens_total)")["result"]
    ours = _query(prometheus, "sum(lorafold_prompt_tokens_total)")["result"]
    assert float(tokens[0]["value"][1]) == float(ours[0]["value"][1]) > 0
    info = _wait_for(lambda: _query(prometheus, "vllm:lora_requests_info")["result"], 30, "vllm:lora_requests_info")
    # Prometheus drops empty labels: with no adapter running or waiting only max_lora remains
    # (the endpoint picker scrapes the pods directly and sees the empty lists as exported).
    assert info[0]["metric"]["max_lora"] and set(info[0]["metric"]) <= {
        "__name__", "instance", "job", "max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    _query(prometheus, "histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[1m])))")
