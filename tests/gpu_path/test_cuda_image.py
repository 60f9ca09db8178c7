"""The CUDA image serves on the GPU by default and carries what Triton's first launch needs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from lorafold.clients.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _step_body(name: str) -> str:
    text = (ROOT / "deploy" / "docker" / "build-steps.sh").read_text()
    return re.search(rf"^step_{name}\(\) \{{\n(.*?)^\}}", text, re.S | re.M).group(1)


def test_cuda_base_installs_a_c_compiler_and_python_headers() -> None:
    system = _step_body("system")
    install = next(line for line in system.splitlines() if "apt-get install" in line)
    for package in ("python3-dev", "gcc", "libc6-dev", "python3-venv"):
        assert package in install.split(), package
    dockerfile = (ROOT / "Dockerfile").read_text()
    # the runtime stage is FROM the CUDA base that ran the system step
    assert re.search(r"FROM \$\{CUDA_IMAGE\} AS base-cuda\n(?:.*\n)*?RUN lorafold-build-steps system", dockerfile)
    assert "FROM base-${VARIANT} AS runtime" in dockerfile
    check = _step_body("check")
    assert "Python.h" in check and "gcc" in check
    assert subprocess.run(["bash", "-n", str(ROOT / "deploy" / "docker" / "build-steps.sh")]).returncode == 0


def test_image_command_serves_on_the_gpu_when_one_is_visible() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r'^CMD (\[.*\])$', dockerfile, re.M).group(1)
    import json

    argv = json.loads(cmd)
    args = build_parser().parse_args(argv[1:])
    assert args.device == "auto" and getattr(args, "dtype", None) in (None, "auto")


def test_deploy_doc_gpu_manifest_patch_parses_and_targets_the_deployment() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    section = doc[doc.index("### GPU"):doc.index("## How CI checks")]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    overlay = next(yaml.safe_load(re.sub(r"^  ", "", b, flags=re.M)) for b in blocks if "kustomization" in b)
    patch = yaml.safe_load(overlay["patches"][0]["patch"])
    paths = {op["path"]: op["value"] for op in patch}
    assert paths["/spec/template/spec/containers/0/resources/limits/nvidia.com~1gpu"] == 1
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    assert overlay["patches"][0]["target"]["name"] == deployment["metadata"]["name"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "resources" in container and "args" in container  # the patched paths exist
    # a GPU start (weights, launch tuning, compiles, CUDA graphs) gets 10 minutes, not the CPU's 2
    probe = container["startupProbe"]
    assert "failureThreshold" in probe
    assert paths["/spec/template/spec/containers/0/startupProbe/failureThreshold"] * probe["periodSeconds"] >= 600
    flags = build_parser().parse_args(["serve", "--device=cuda", "--gpu-memory-utilization=0.9"])
    assert flags.device == "cuda" and flags.gpu_memory_utilization == 0.9
    assert "docker run -d --gpus all" in section
