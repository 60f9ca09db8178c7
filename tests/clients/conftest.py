"""One fake server per test session (real uvicorn on loopback); its state is reset for every test."""

from __future__ import annotations

import pytest

from .fake_server import ADMIN_KEY, API_KEY, FakeServer, FakeState


@pytest.fixture(scope="session")
def fake_server():
    with FakeServer() as server:
        yield server


@pytest.fixture()
def server(fake_server: FakeServer) -> FakeServer:
    fake_server.state.reset()
    return fake_server


@pytest.fixture()
def state(server: FakeServer) -> FakeState:
    return server.state


@pytest.fixture()
def client(server: FakeServer):
    from lorafold.clients import LorafoldClient

    with LorafoldClient(server.url, api_key=API_KEY, admin_key=ADMIN_KEY, timeout=5.0, backoff_base=0.01) as c:
        yield c
