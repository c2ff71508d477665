"""Redis connections (README "Redis connections"): each process has `REDIS_MAX_CONNECTIONS`, and a request that
finds them all in use waits up to `REDIS_POOL_TIMEOUT` for one. A busy pool is never a Redis that is down: a
wait that runs out is a 503 with Retry-After for that request alone, while saves go on to Redis and
`/health/ready` stays 200."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import pytest
from chaos import session

from servers import ServiceProcess, request, save_request

pytestmark = pytest.mark.slow

READERS = 40  # at once, of one session of SESSION_MB, through ONE connection: each waits for the others' reads
SESSION_MB = 16
UNAVAILABLE = "Redis unavailable"


@pytest.fixture(scope="module")
def large() -> bytes:
    payload = orjson.loads(session("large"))
    payload["scriptText"] = "x" * (SESSION_MB << 20)
    return orjson.dumps(payload)


def start(service: Callable[..., ServiceProcess], own_redis, large: bytes, **env: str) -> tuple[ServiceProcess, int]:
    """`python app.py` with one Redis connection and the reply timeout a quick loopback Redis allows (before,
    a request also waited that long for a connection), and the large session saved."""
    server = service("app", REDIS_URL=own_redis().url, REDIS_MAX_CONNECTIONS="1", REDIS_SOCKET_TIMEOUT="0.5", **env)
    answer = save_request(server.port, large).json()
    assert answer["storage"] == "redis"
    return server, answer["timestamp"]


@dataclass
class Load:
    """What the clients got: (status, Retry-After given, error sentence) per read; (status, storage or error
    sentence) per save; the status of each /health/ready."""

    reads: list[tuple[int, bool, str]] = field(default_factory=list)
    saves: list[tuple[int, str]] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)


def under_readers(port: int, timestamp: int) -> Load:
    """READERS concurrent reads of the session, while another client saves small sessions and a load balancer
    asks /health/ready, one after the other, until the reads are done."""
    load, done = Load(), threading.Event()

    def read() -> None:
        got = request(port, "GET", f"/api/v1/session/{timestamp}", timeout=120)
        load.reads.append((got.status, "retry-after" in got.headers, "" if got.status == 200 else got.json()["error"]))

    def save_and_ask() -> None:
        while not done.is_set():
            got = save_request(port, session(f"during-{len(load.saves)}"))
            load.saves.append((got.status, got.json()["storage" if got.status == 200 else "error"]))
            load.ready.append(request(port, "GET", "/health/ready").status)

    readers = [threading.Thread(target=read) for _ in range(READERS)]
    side = threading.Thread(target=save_and_ask)
    for thread in [*readers, side]:
        thread.start()
    for thread in readers:
        thread.join()
    done.set()
    side.join()
    return load


def test_readers_of_a_large_session_wait_for_the_busy_connection_and_redis_stays_up(service, own_redis,
                                                                                    large) -> None:
    server, timestamp = start(service, own_redis, large, REDIS_POOL_TIMEOUT="60")
    load = under_readers(server.port, timestamp)
    assert [status for status, _, _ in load.reads] == [200] * READERS, load.reads
    assert load.saves and set(load.saves) == {(200, "redis")}
    assert set(load.ready) == {200}
    assert UNAVAILABLE not in server.log()


def test_a_wait_for_a_connection_that_runs_out_is_a_503_for_that_request_alone(service, own_redis, large) -> None:
    server, timestamp = start(service, own_redis, large, REDIS_POOL_TIMEOUT="0.01")
    load = under_readers(server.port, timestamp)
    busy = [read for read in load.reads if read[0] != 200]
    assert busy, "no read waited for the connection"
    for status, retry_after, message in busy:
        assert status == 503 and retry_after and "busy" in message and "REDIS_POOL_TIMEOUT" in message, message
    assert {storage for status, storage in load.saves if status == 200} <= {"redis"}, load.saves  # never diverted
    assert all(status == 503 and "busy" in message for status, message in load.saves if status != 200), load.saves
    assert set(load.ready) == {200}
    assert request(server.port, "GET", "/health").json()["redis"] == "connected"
    assert UNAVAILABLE not in server.log()
