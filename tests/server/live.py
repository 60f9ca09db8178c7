"""Run the real app under uvicorn on a loopback port, in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn
from fastapi import FastAPI

from lorafold.server.api.app import create_app
from lorafold.server.api.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(settings: ServerSettings, base) -> Iterator[str]:  # noqa: ANN001
    with live_app(settings, base) as (url, _):
        yield url


@contextlib.contextmanager
def live_app(settings: ServerSettings, base) -> Iterator[tuple[str, FastAPI]]:  # noqa: ANN001
    """The server's URL and its app (whose `state` a test may inspect once it is ready)."""
    port = free_port()
    settings.port = port
    app = create_app(settings, base=base)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not become ready")
        time.sleep(0.05)
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)
