"""Descriptors and memory stay flat however many connections come and go: `python app.py` starts a thread per
connection, and each thread that touched the local store used to keep its SQLite connection (two descriptors,
the file and its WAL) after it ended, until the process ran out of descriptors."""

from __future__ import annotations

import os
from collections.abc import Callable

import psutil
import pytest

from servers import RedisServer, ServiceProcess, request, save_request, wait_for

CONNECTIONS = 1000
FD_SLACK = 24  # idle pooled SQLite connections (2 descriptors each), Redis pool connections, log files
RSS_SLACK_MB = 30  # 1,000 leaked connections grew `python app.py` by about 140 MB


def _processes(service: ServiceProcess) -> list[psutil.Process]:
    top = psutil.Process(service.proc.pid)
    return [top, *top.children(recursive=True)]


def _descriptors(service: ServiceProcess) -> int:
    return sum(len(os.listdir(f"/proc/{proc.pid}/fd")) for proc in _processes(service))


def _rss_mb(service: ServiceProcess) -> float:
    return sum(proc.memory_info().rss for proc in _processes(service)) / 2**20


def _connections(service: ServiceProcess, count: int) -> None:
    """`count` fresh connections, as browsers and the history page's /health poll make them."""
    for n in range(count):
        path = ("/health", "/api/v1/session/latest", "/api/v1/session/list?limit=2")[n % 3]
        assert request(service.port, "GET", path).status == 200


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["app", "gunicorn"])
@pytest.mark.parametrize("with_redis", [False, True], ids=["local-store", "redis"])
def test_descriptors_and_memory_stay_flat_over_a_thousand_connections(
        kind: str, with_redis: bool, service: Callable[..., ServiceProcess],
        own_redis: Callable[..., RedisServer], session_10kb: bytes) -> None:
    env = {"REDIS_URL": own_redis().url if with_redis else ""}
    if kind == "gunicorn":
        env["WEB_CONCURRENCY"] = "2"
    proc = service(kind, **env)
    assert save_request(proc.port, session_10kb).status == 200
    _connections(proc, 100)  # warm up: pools, caches and the workers' first requests
    fds_before, rss_before = _descriptors(proc), _rss_mb(proc)

    _connections(proc, CONNECTIONS)

    # a thread ends just after its connection closes: wait for them, not for a fixed time
    wait_for(lambda: _descriptors(proc) <= fds_before + FD_SLACK, "descriptors back near their count", timeout=15)
    assert _rss_mb(proc) - rss_before < RSS_SLACK_MB, (rss_before, _rss_mb(proc))
