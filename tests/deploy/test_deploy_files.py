"""Deployment files: every YAML/JSON parses, compose and Kubernetes manifests pass their
official schemas, the pieces reference each other consistently, and the Dockerfile's build
steps run on the host.

Validators (test extras in pyproject.toml):
- compose: check-jsonschema's vendored compose-spec schema (`--builtin-schema vendor.compose-spec`).
- Kubernetes: kubernetes-validate's bundled JSON schemas, strict mode (unknown fields fail).
- ServiceMonitor, InferencePool and HTTPRoute (CRDs) and Kustomization have no schema in
  either package: they are skipped by the schema check and checked structurally below,
  against the Deployment, Service and file lists they refer to.
- prometheus.yml: `promtool check config` (Debian package `prometheus`) where installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose"
K8S = ROOT / "deploy" / "k8s"
GIE = K8S / "gie"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "lorafold.json"
BUILD_STEPS = ROOT / "deploy" / "docker" / "build-steps.sh"
K8S_VERSION = "1.30"

YAML_FILES = sorted([*COMPOSE.rglob("*.yml"), *COMPOSE.rglob("*.yaml"), *K8S.rglob("*.yaml")])
CRDS = ("ServiceMonitor", "Kustomization", "InferencePool", "HTTPRoute")
JSON_FILES = sorted(COMPOSE.rglob("*.json"))


def k8s_docs(folder: Path = K8S) -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_docs() if d["kind"] == kind]


# -- parsing ---------------------------------------------------------------------------------


def test_files_exist() -> None:
    for rel in ["Dockerfile", ".dockerignore", "deploy/docker/build-steps.sh", "docs/deploy.md", "docs/api.md",
                "deploy/compose/docker-compose.yml", "deploy/compose/prometheus.yml",
                "deploy/compose/grafana/provisioning/datasources/prometheus.yml",
                "deploy/compose/grafana/provisioning/dashboards/dashboards.yml",
                "deploy/compose/grafana/dashboards/lorafold.json"]:
        assert (ROOT / rel).is_file(), rel
    assert len(list(K8S.glob("*.yaml"))) >= 7


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


# -- compose ---------------------------------------------------------------------------------


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["docker-compose.yml", "multi-replica.yml"])
def test_compose_matches_compose_spec_schema(name: str) -> None:
    result = _check_compose(COMPOSE / name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_replica_compose_shares_one_store() -> None:
    doc = yaml.safe_load((COMPOSE / "multi-replica.yml").read_text())
    replicas = [s for n, s in doc["services"].items() if n.startswith("lorafold-")]
    assert len(replicas) == 2 and "seaweedfs" in doc["services"]
    weed = doc["services"]["seaweedfs"]
    bucket = next(a.split("=", 1)[1] for a in weed["command"] if a.startswith("-bucket="))
    s3_port = next(a.split("=", 1)[1] for a in weed["command"] if a.startswith("-s3.port="))
    for svc in replicas:
        store = next(a.split("=", 1)[1] for a in svc["command"] if a.startswith("--adapter-store="))
        assert store.startswith(f"s3://{bucket}/")
        assert svc["environment"]["AWS_ENDPOINT_URL"] == f"http://seaweedfs:{s3_port}"
        assert svc["environment"]["AWS_ACCESS_KEY_ID"] == weed["environment"]["AWS_ACCESS_KEY_ID"]
        assert not any(v.split(":")[1].startswith("/data/state") for v in svc.get("volumes", []))  # stateless
    assert len({s["ports"][0].split(":")[0] for s in replicas}) == 2


def test_compose_schema_check_catches_mistakes(tmp_path: Path) -> None:
    doc = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    doc["services"]["lorafold"]["healthcheck"]["retries"] = "three"
    doc["services"]["lorafold"]["restart_policy"] = "always"  # not a compose key
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(doc))
    assert _check_compose(bad).returncode != 0


def test_compose_services_volumes_and_keys() -> None:
    doc = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    assert {"lorafold", "prometheus", "grafana"} <= set(doc["services"])
    server = doc["services"]["lorafold"]
    assert server["build"]["context"] == "../.." and (COMPOSE / "../.." / server["build"]["dockerfile"]).exists()
    mounts = {m.split(":")[1]: m.split(":")[0] for m in server["volumes"]}
    assert mounts["/data/adapters"] in doc["volumes"] and mounts["/data/state"] in doc["volumes"]
    # Without a key the server binds 127.0.0.1 and the container is unreachable.
    assert {"LORAFOLD_API_KEYS", "LORAFOLD_ADMIN_KEY"} <= set(server["environment"])
    assert "--host=0.0.0.0" in server["command"]
    for svc in ("prometheus", "grafana"):
        for mount in doc["services"][svc]["volumes"]:
            src = mount.split(":")[0]
            assert src in doc["volumes"] or (COMPOSE / src).exists(), f"{svc}: {src} missing"


def test_prometheus_config_scrapes_server_every_5s() -> None:
    cfg = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "lorafold"]
    assert job["scrape_interval"] == "5s" and job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["lorafold:8000"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool absent: apt-get install -y prometheus")
def test_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(["promtool", "check", "config", str(COMPOSE / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_compose_paths() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    mounts = dict(m.rsplit(":", 2)[:2] for m in compose["services"]["grafana"]["volumes"])
    ds = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == path and mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("tokens / s", "adapter and status", "time to first token", "inter-token", "end-to-end", "queue",
                  "running and waiting", "batch size", "distinct adapters", "per adapter", "resident per tier",
                  "load latency", "hits and evictions", "kv cache", "preemptions"):
        assert topic in titles, topic


# -- Kubernetes ------------------------------------------------------------------------------


def test_k8s_manifests_match_kubernetes_schemas() -> None:
    import kubernetes_validate

    checked = set()
    for name, doc in k8s_docs():
        if doc["kind"] in CRDS:
            continue  # CRD / kustomize: no bundled schema; checked structurally below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any violation
        checked.add(doc["kind"])
    assert {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler", "Secret"} <= checked


def test_k8s_schema_check_catches_mistakes() -> None:
    import kubernetes_validate

    (deploy,) = by_kind("Deployment")
    bad = json.loads(json.dumps(deploy))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = json.loads(json.dumps(deploy))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_deployment_probes_resources_keys_and_volumes() -> None:
    (deploy,) = by_kind("Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "--host=0.0.0.0" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    (secret,) = [s for s in by_kind("Secret") if s["metadata"]["name"] == "lorafold-keys"]
    for var in ("LORAFOLD_API_KEYS", "LORAFOLD_ADMIN_KEY"):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    pvcs = {p["metadata"]["name"]: p for p in by_kind("PersistentVolumeClaim")}
    assert claims == set(pvcs) == {"lorafold-adapters"}  # shared and read-only; no per-pod state volume
    assert pvcs["lorafold-adapters"]["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/data/adapters"]["readOnly"] is True
    assert any(a.startswith("--adapter-root=/data/adapters") for a in c["args"])
    assert not any(a.startswith("--state-dir") for a in c["args"]) and "lifecycle" not in c
    assert not by_kind("ConfigMap")  # the catalogue lives in the store, not in a ConfigMap + hook
    assert deploy["spec"]["replicas"] >= 2


def test_deployment_reads_the_store_from_a_secret() -> None:
    (deploy,) = by_kind("Deployment")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert any(a.startswith("--adapter-store=s3://") for a in c["args"])
    refresh = next(float(a.split("=")[1]) for a in c["args"] if a.startswith("--store-refresh-seconds="))
    assert 0 < refresh <= 15
    secrets = {s["metadata"]["name"]: s for s in by_kind("Secret")}
    (ref,) = [e["secretRef"]["name"] for e in c["envFrom"]]
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(secrets[ref]["stringData"])
    # the flags the manifests pass exist on `lorafold serve`
    from lorafold.clients.cli import build_parser

    serve_flags = {a.split("=")[0] for a in c["args"]}
    args = build_parser().parse_args(["serve", *[a for a in c["args"] if a.split("=")[0] in serve_flags]])
    assert args.adapter_store.startswith("s3://") and args.store_refresh_seconds == refresh


def test_gie_pool_selects_the_server_pods() -> None:
    (deploy,) = by_kind("Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    port = deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    docs = dict((d["kind"], d) for _, d in k8s_docs(GIE))
    pool, route, kust = docs["InferencePool"], docs["HTTPRoute"], docs["Kustomization"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port]
    assert pool["spec"]["endpointPickerRef"]["name"] and pool["spec"]["endpointPickerRef"]["port"]["number"]
    assert set(kust["resources"]) == {p.name for p in GIE.glob("*.yaml")} - {"kustomization.yaml"}
    (rule,) = route["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == ("inference.networking.k8s.io", "InferencePool",
                                                                   pool["metadata"]["name"])


def test_services_hpa_and_servicemonitor_agree() -> None:
    (deploy,) = by_kind("Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in deploy["spec"]["template"]["spec"]["containers"][0]["ports"]}
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    assert services["lorafold-headless"]["spec"]["clusterIP"] == "None"
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (sm,) = by_kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [s for s in services.values() if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["lorafold"], "scrape exactly one Service, not the headless too"
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in {p["name"] for p in selected[0]["spec"]["ports"]} and ep["path"] == "/metrics"
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
                           "metricRelabelings"}
        assert re.fullmatch(r"\d+s", ep["interval"])


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = by_kind("Kustomization")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


# -- Dockerfile and its build script ---------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_shape() -> None:
    ins = dockerfile_instructions()
    froms = [arg for op, arg in ins if op == "FROM"]
    assert any(re.search(r"python:3\.11-slim\s+AS\s+\S+", f, re.I) for f in froms)
    assert any(re.search(r"nvidia/cuda|CUDA_IMAGE", f) for f in froms)
    assert len([f for f in froms if re.search(r"\sAS\s", f, re.I)]) >= 3  # multi-stage
    users = [arg for op, arg in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("EXPOSE", "8000") in ins
    (health,) = [arg for op, arg in ins if op == "HEALTHCHECK"]
    assert "/health" in health and "urllib" in health
    cmd = json.loads(next(arg for op, arg in reversed(ins) if op == "CMD"))
    assert cmd[:2] == ["lorafold", "serve"] and "0.0.0.0" in cmd
    assert {"/data/adapters", "/data/state"} <= set(cmd)
    volumes = json.loads(next(arg for op, arg in ins if op == "VOLUME"))
    assert set(volumes) == {"/data/adapters", "/data/state"}
    # Every RUN is the shared build script: the image and CI cannot drift apart.
    runs = [arg for op, arg in ins if op == "RUN"]
    assert runs and all("lorafold-build-steps" in r for r in runs)
    assert any("deploy/docker/build-steps.sh" in arg for op, arg in ins if op == "COPY")
    assert "https://download.pytorch.org/whl/cpu" in dict((a.split("=")[0], a) for op, a in ins if op == "ARG")["TORCH_INDEX_CPU"]


def test_dockerignore_keeps_sources_and_drops_noise() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for needed in (".git", "tests", "**/__pycache__", "*.egg-info"):
        assert needed in patterns
    for kept in ("server", "kernels", "training", "clients", "pyproject.toml", "README.md", "deploy/docker"):
        assert kept not in patterns and not any(p.rstrip("/") == kept for p in patterns)


def test_build_steps_script_syntax_and_usage() -> None:
    assert subprocess.run(["bash", "-n", str(BUILD_STEPS)], capture_output=True).returncode == 0
    bad = subprocess.run(["bash", str(BUILD_STEPS), "no-such-step"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown step" in bad.stderr


@pytest.mark.slow
def test_build_steps_run_on_host(tmp_path: Path) -> None:
    """venv → torch → app → model → check, as in the image, but on the host: the venv sees
    the host's packages (nothing is downloaded twice) and the model cache links to the one
    deploy/setup.sh built, so the model step finds it converted and only prunes/fixes modes."""
    from lorafold.server.models.assets import DEFAULT_MODEL, default_model_dir

    host_model = default_model_dir()  # fetched by deploy/setup.sh
    cache = tmp_path / "cache"
    model = cache / "models" / DEFAULT_MODEL.name
    model.mkdir(parents=True)
    for f in host_model.iterdir():
        (model / f.name).symlink_to(f)
    (cache / "gguf").mkdir()
    (cache / "gguf" / "placeholder.gguf").write_bytes(b"")
    # The same files the Dockerfile COPYs (a build in the checkout itself would leave build/ there).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("server", "kernels", "training", "clients"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, "VENV": str(tmp_path / "venv"), "VENV_SYSTEM_SITE": "1", "TORCH_SPEC": "torch==2.13.0",
           "TORCH_INDEX": "", "LORAFOLD_CACHE": str(cache), "PRUNE_GGUF": "1", "SRC": str(src),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(["bash", str(BUILD_STEPS), "venv", "torch", "app", "kernels", "model", "check"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ok: torch 2.13.0" in result.stderr
    assert not (cache / "gguf").exists(), "PRUNE_GGUF=1 must drop the GGUF"
    # The app step installed the package into the venv itself (not only visible through the host).
    site = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c",
                           "import lorafold.server.api.app as m; print(m.__file__)"],
                          capture_output=True, text=True, timeout=120)
    assert str(tmp_path / "venv") in site.stdout, site.stdout + site.stderr
    # The kernels step built the CPU kernels from the installed package's own source (package
    # data), into the image's cache, where the server loads them without a compiler.
    built = list((cache / "cpu_kernels").glob("*/lorafold_cpu_ops.so"))
    assert len(built) == 1, built
