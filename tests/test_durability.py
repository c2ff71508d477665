"""Nothing acknowledged is lost: the SQLite local store under real processes. gunicorn with 3 workers and a
Redis killed -9, the service itself killed -9 (master and workers) or stopped during an outage, restarts
without Redis, write-back exactly once across workers, deletes that stay deleted, a full disk, a corrupt
file, and the store file's size under churn."""

from __future__ import annotations

import resource
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from chaos import session, tagged
from test_faults import health, index_of, saved

from servers import ServiceProcess, request, save_request, wait_for

pytestmark = pytest.mark.slow


def read(server: ServiceProcess, path: str):
    """One GET on a fresh connection, so gunicorn hands it to whichever worker accepts first."""
    return request(server.port, "GET", path)


def body_of(server: ServiceProcess, timestamp: int) -> bytes:
    got = read(server, f"/api/v1/session/{timestamp}")
    assert got.status == 200, (timestamp, got.status, got.body)
    return got.json()["data"]


def test_every_worker_answers_a_session_saved_during_an_outage(service, own_redis) -> None:
    redis_server = own_redis()
    server = service("gunicorn", REDIS_URL=redis_server.url, WEB_CONCURRENCY="3", REDIS_RETRY_INTERVAL="3600")
    older = saved(server, session("older, in redis"))
    redis_server.kill()
    acked = saved(server, session("during the outage"))
    assert acked["storage"] == "memory"
    pids, latest, direct = set(), [], []
    # which worker accepts a connection is the kernel's choice (on a busy machine one may take a long run of
    # them): read until several workers have answered, at least 30 times
    while len(latest) < 30 or (len(pids) < 2 and len(latest) < 1000):
        got = read(server, "/api/v1/session/latest")
        latest.append((got.status, got.json()["data"]["timestamp"], got.json().get("partial")))
        direct.append(read(server, f"/api/v1/session/{acked['timestamp']}").status)
        pids.add(health(server)["pid"])
    assert len(pids) > 1, pids  # the reads really reached several workers
    assert latest == [(200, acked["timestamp"], True)] * len(latest)
    assert direct == [200] * len(direct)
    unreachable = read(server, f"/api/v1/session/{older['timestamp']}")  # it is in the Redis that is away
    assert unreachable.status == 503 and unreachable.headers["retry-after"].isdigit()
    listed = read(server, "/api/v1/session/list").json()
    assert listed["partial"] is True and [s["timestamp"] for s in listed["sessions"]] == [acked["timestamp"]]


@pytest.mark.parametrize("stop", ["SIGTERM", "kill -9"])
def test_sessions_acknowledged_during_an_outage_survive_the_service_and_reach_redis_once(stop, service,
                                                                                         own_redis) -> None:
    redis_server = own_redis()
    env = {"REDIS_URL": redis_server.url, "WEB_CONCURRENCY": "3", "REDIS_RETRY_INTERVAL": "0.3"}
    server = service("gunicorn", **env)
    redis_server.kill()
    with ThreadPoolExecutor(4) as pool:
        acked = list(pool.map(lambda i: saved(server, session(f"outage-{i}")), range(12)))
    assert {a["storage"] for a in acked} == {"memory"}
    bodies = {a["timestamp"]: body_of(server, a["timestamp"]) for a in acked}
    if stop == "SIGTERM":
        server.stop(signal.SIGTERM)
    else:
        server.kill_group()
    redis_server.start()  # back, and empty: nothing had reached it
    assert index_of(redis_server) == {}
    server.restart()
    wait_for(lambda: health(server)["localStore"]["sessions"] == 0, what="write-back after the restart")
    in_redis = index_of(redis_server)
    assert sorted(in_redis) == sorted(bodies), "a loss or a duplicate"
    for ts, data in bodies.items():
        assert body_of(server, ts) == data
        assert read(server, f"/api/v1/session/{ts}").json()["storage"] == "redis"
    client = redis_server.client()
    assert len([k for k in client.scan_iter("storyart:session:*") if k.count(b":") == 2]) == 12


@pytest.mark.parametrize("kind", ["app", "gunicorn"])
@pytest.mark.parametrize("stop", ["SIGTERM", "kill -9"])
def test_without_redis_a_restart_keeps_every_session(kind, stop, service, session_1mb) -> None:
    server = service(kind)
    acked = [saved(server, tagged(session_1mb, f"keep-{i}"))["timestamp"] for i in range(3)]
    before = {ts: read(server, f"/api/v1/session/{ts}").body for ts in acked}
    if stop == "SIGTERM":
        server.stop(signal.SIGTERM)
    else:
        server.kill_group()
    server.restart()
    assert {ts: read(server, f"/api/v1/session/{ts}").body for ts in acked} == before  # byte for byte
    assert read(server, "/api/v1/session/latest").json()["data"]["timestamp"] == acked[-1]
    assert read(server, "/api/v1/session/list").json()["total"] == 3


def test_a_kill_right_after_the_acknowledgement_loses_nothing(service) -> None:
    """The save returns only after its transaction committed: kill -9 the instant the answer arrives."""
    server = service("app")
    for round_ in range(3):
        acked = saved(server, session(f"instant-{round_}"))
        server.kill_group()
        server.restart()
        assert read(server, f"/api/v1/session/{acked['timestamp']}").status == 200


def test_saves_spread_over_three_workers_reach_redis_exactly_once(service, own_redis) -> None:
    redis_server = own_redis()
    server = service("gunicorn", REDIS_URL=redis_server.url, WEB_CONCURRENCY="3", REDIS_RETRY_INTERVAL="0.2")
    redis_server.kill()
    with ThreadPoolExecutor(6) as pool:
        acked = list(pool.map(lambda i: saved(server, session(f"spread-{i}")), range(20)))
    assert len({a["timestamp"] for a in acked}) == 20
    redis_server.start()
    wait_for(lambda: health(server)["localStore"]["sessions"] == 0, what="write-back")
    time.sleep(1)  # every worker's write-back thread has had more rounds: none may add a copy
    in_redis = index_of(redis_server)
    assert sorted(in_redis) == sorted(a["timestamp"] for a in acked)
    stored_tags = sorted(value.split(b'"storyUuid":"')[1].split(b'"')[0] for value in in_redis.values())
    assert stored_tags == sorted(f"spread-{i}".encode() for i in range(20))


def test_a_deleted_session_does_not_come_back(service, own_redis) -> None:
    """DELETE answered 200 must stay true: no worker's pending copy may be written back afterwards."""
    redis_server = own_redis()
    server = service("gunicorn", REDIS_URL=redis_server.url, WEB_CONCURRENCY="3", REDIS_RETRY_INTERVAL="0.5")
    redis_server.kill()
    doomed = [saved(server, session(f"doomed-{i}"))["timestamp"] for i in range(10)]
    redis_server.start()
    wait_for(lambda: health(server)["redis"] == "connected", what="Redis seen again")
    for ts in doomed:
        got = request(server.port, "DELETE", f"/api/v1/session/{ts}")
        assert got.status == 200, got.body
    time.sleep(2)  # several write-back rounds of every worker
    assert index_of(redis_server) == {}
    assert all(read(server, f"/api/v1/session/{ts}").status == 404 for ts in doomed)


def test_a_full_disk_refuses_the_save_and_breaks_nothing_else(service, session_1mb) -> None:
    """The service may write at most 6 MB to any file (RLIMIT_FSIZE, as a full disk would): the save that
    does not fit gets 503 with Retry-After, what was acknowledged before stays readable, and nothing else
    breaks (Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing the process)."""
    limit = 6 * 1024 * 1024

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    ServiceProcess.preexec = staticmethod(limit_file_size)
    try:
        server = service("app", LOCAL_STORE_SYNC="FULL", LOG_LEVEL="WARNING")
    finally:
        ServiceProcess.preexec = None
    acked, refused = [], None
    for i in range(12):
        got = save_request(server.port, tagged(session_1mb, f"fill-{i}"))
        if got.status != 200:
            refused = got
            break
        acked.append(got.json()["timestamp"])
    assert refused is not None and acked, "the limit was never reached"
    assert refused.status == 503 and refused.headers["retry-after"].isdigit(), refused.body
    assert refused.json()["success"] is False and "local store" in refused.json()["error"]
    assert all(read(server, f"/api/v1/session/{ts}").status == 200 for ts in acked)
    assert health(server)["success"] is True
    assert read(server, "/api/v1/session/latest").json()["data"]["timestamp"] == acked[-1]
    assert save_request(server.port, tagged(session_1mb, "again")).status == 503  # refused again, cleanly
    assert server.proc.poll() is None


def test_a_corrupt_store_file_is_moved_aside_not_discarded(service, tmp_path) -> None:
    path = tmp_path / "corrupt.sqlite3"
    garbage = b"this is not an SQLite database, but somebody's data all the same" * 100
    path.write_bytes(garbage)
    server = service("app", LOCAL_STORE_PATH=str(path))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("corrupt.sqlite3.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    assert f"moved it to {aside[0]}" in server.log()
    assert saved(server, session("fresh"))["storage"] == "memory"
    assert sqlite3.connect(path).execute("SELECT count(*) FROM sessions").fetchone() == (1,)


def test_the_store_file_plateaus_under_save_and_delete_churn(service, tmp_path, session_1mb) -> None:
    path = tmp_path / "churn.sqlite3"
    server = service("app", LOCAL_STORE_PATH=str(path), LOCAL_STORE_MAX_SESSIONS="5", LOG_LEVEL="WARNING")
    sizes = []
    for i in range(60):
        ts = saved(server, tagged(session_1mb, f"churn-{i}"))["timestamp"]
        if i % 2:
            assert request(server.port, "DELETE", f"/api/v1/session/{ts}").status == 200
        if i % 10 == 9:
            sizes.append(path.stat().st_size + Path(f"{path}-wal").stat().st_size)
    # 5 sessions of 1 MB at most, plus the WAL: the file stops growing instead of holding 60 MB of history
    assert max(sizes) < 24 * 1024 * 1024, sizes
    assert sizes[-1] <= sizes[1] * 1.5, sizes
