from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import GatewayProcess  # noqa: E402

from smg.testing import FakeWorker  # noqa: E402


@pytest.fixture
def fake_workers():
    """Factory: fake_workers(n, **config) starts n fake workers on free ports."""
    started: list[FakeWorker] = []

    def make(n: int = 1, host: str = "127.0.0.1", **config) -> list[FakeWorker]:
        out = []
        for _ in range(n):
            w = FakeWorker(host, 0, **config).start()
            started.append(w)
            out.append(w)
        return out

    yield make
    for w in started:
        w.stop()


@pytest.fixture
def gateway():
    """Factory: gateway(args, env=None) runs `smg` and waits until it is live."""
    running: list[GatewayProcess] = []

    def make(args: list[str], env=None, wait_workers: int = 0, worker_type: str = None) -> GatewayProcess:
        g = GatewayProcess(args, env)
        running.append(g)
        g.wait_live()
        if wait_workers:
            g.wait_ready_workers(wait_workers, worker_type=worker_type)
        return g

    yield make
    for g in running:
        g.__exit__(None, None, None)


@pytest.fixture
def k8s():
    """An emulated Kubernetes API server (kmock based), see tests/k8s_api.py."""
    from k8s_api import ApiServer

    api = ApiServer().start()
    yield api
    api.stop()


@pytest.fixture
def pod_workers():
    """Factory: pod_workers(n) starts fake workers on 127.0.0.2, 127.0.0.3, ...
    sharing one port, as pods of a StatefulSet would; returns (port, workers)."""
    import socket

    started: list[FakeWorker] = []
    state = {"next": 2}

    def make(n: int, port: int = 0, **config):
        if port == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.2", 0))
                port = s.getsockname()[1]
        out = []
        for _ in range(n):
            ip = f"127.0.0.{state['next']}"
            state["next"] += 1
            w = FakeWorker(ip, port, **config).start()
            started.append(w)
            out.append(w)
        return port, out

    yield make
    for w in started:
        w.stop()
