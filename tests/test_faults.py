"""Fault injection (docs/contract.md §2, §5): a real `redis-server` killed (-9), restarted, blackholed, made read-only,
out of memory and paused, while real service processes serve; graceful shutdown with a save in flight; the
in-memory store's RSS plateau. Each test starts its own Redis so it can break it freely."""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from pathlib import Path

import orjson
import psutil
import pytest
from chaos import PERSISTENT, Blackhole, SlowUpload, session, tagged, timed

from allocator import now_ms
from servers import RedisServer, ServiceProcess, free_port, request, save_request, wait_for
from stores.redis import INDEX_KEY

pytestmark = pytest.mark.slow

UNAVAILABLE = "Redis unavailable"  # storage's one log line when Redis fails


def saved(server: ServiceProcess, body: bytes) -> dict:
    got = save_request(server.port, body)
    assert got.status == 200, got.body
    return got.json()


def get(server: ServiceProcess, path: str) -> dict:
    got = request(server.port, "GET", path)
    assert got.status < 500, (path, got.status, got.body)
    return got.json()


def health(server: ServiceProcess) -> dict:
    return get(server, "/health")


def log_count(server: ServiceProcess, text: str) -> int:
    return server.log().count(text)


def index_of(redis_server: RedisServer) -> dict[int, bytes]:
    """What the public layout holds: {timestamp: stored bytes} for every index member, read as other tools do."""
    client = redis_server.client()
    members = client.zrange(INDEX_KEY, 0, -1, withscores=True)
    return {int(score): client.get(member) for member, score in members}


# ------------------------------------------------------------------------------------ failover both ways


@pytest.mark.parametrize("kind", ["app", "gunicorn"])
def test_redis_unreachable_at_start_then_appears(kind, service, own_redis) -> None:
    port = free_port()  # nothing listens yet: connection refused
    server = service(kind, REDIS_URL=f"redis://127.0.0.1:{port}/0", REDIS_RETRY_INTERVAL="0.3",
                     WEB_CONCURRENCY="2")
    assert health(server)["status"] == "degraded"
    during = [saved(server, session(f"early-{i}")) for i in range(6)]
    assert {s["storage"] for s in during} == {"memory"}
    if kind == "app":  # (gunicorn: each worker has its own memory until the write-back)
        assert get(server, "/api/v1/session/latest")["data"]["timestamp"] == during[-1]["timestamp"]

    redis_server = own_redis(port=port)
    wait_for(lambda: len(index_of(redis_server)) == len(during), what="write-back of the early sessions")
    in_redis = index_of(redis_server)
    for s in during:
        assert orjson.loads(in_redis[s["timestamp"]])["storyUuid"] == f"early-{during.index(s)}"
    wait_for(lambda: saved(server, session("later"))["storage"] == "redis", what="saves going to Redis")
    assert health(server)["status"] == "healthy"


@pytest.mark.parametrize("breaker", ["refused", "blackholed"])
def test_a_dead_redis_costs_one_connect_timeout_then_is_skipped(breaker, service, own_redis) -> None:
    """kill -9 mid-run. Refused connects fail at once; a blackholed port makes each connect wait the full
    REDIS_CONNECT_TIMEOUT. Either way only one request pays, later ones skip Redis while the background
    retry (which pays the timeouts from now on) keeps failing."""
    redis_server = own_redis()
    server = service("app", REDIS_URL=redis_server.url, REDIS_CONNECT_TIMEOUT="1", REDIS_RETRY_INTERVAL="1")
    assert saved(server, session("before"))["storage"] == "redis"
    redis_server.kill()
    hole = Blackhole(redis_server.port) if breaker == "blackholed" else None
    try:
        durations: list[float] = []
        stamps: list[int] = []
        deadline = time.monotonic() + 3.5  # spans three background retries
        while time.monotonic() < deadline:
            elapsed, got = timed(save_request, server.port, session(f"during-{len(stamps)}"))
            durations.append(elapsed)
            assert got.status == 200 and got.json()["storage"] == "memory", got.body
            stamps.append(got.json()["timestamp"])
            for path in ("/api/v1/session/latest", f"/api/v1/session/{stamps[-1]}", "/api/v1/session/list",
                         "/health"):
                elapsed, got = timed(request, server.port, "GET", path)
                durations.append(elapsed)
                assert got.status == 200, (path, got.body)
            time.sleep(0.05)
    finally:
        if hole:
            hole.close()
    slow = [d for d in durations if d > 0.75]
    assert len(durations) > 40
    assert len(slow) <= 1, f"{len(slow)} of {len(durations)} requests waited on Redis: {slow}"
    assert max(durations) < 1 + 1, max(durations)
    if breaker == "blackholed":
        assert len(slow) == 1  # the one request that found Redis gone paid the connect timeout
    assert log_count(server, UNAVAILABLE) == 1


def test_a_frozen_redis_costs_one_request_less_than_the_browsers_fetch_timeout(service, own_redis) -> None:
    """A Redis that is gone but whose connections stay open (SIGSTOP here; after a crash, a child it forked
    for an AOF rewrite or a snapshot holds them) answers nothing: the one request that finds out waits the
    socket timeout, which with the defaults must stay under the browser's 5 s fetch timeout (docs/contract.md §0)."""
    redis_server = own_redis()
    server = service("app", REDIS_URL=redis_server.url, REDIS_RETRY_INTERVAL="1")
    assert saved(server, session("before"))["storage"] == "redis"
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        durations = []
        for i in range(12):
            elapsed, got = timed(save_request, server.port, session(f"frozen-{i}"))
            assert got.status == 200 and got.json()["storage"] == "memory", got.body
            durations.append(elapsed)
            elapsed, got = timed(request, server.port, "GET", "/api/v1/session/latest")
            assert got.status == 200 and got.json()["data"]["storyUuid"] == f"frozen-{i}"
            durations.append(elapsed)
            time.sleep(0.1)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    slow = [d for d in durations if d > 0.75]
    assert len(slow) == 1, slow
    assert slow[0] < 5 - 1.5, f"a frozen Redis held a request {slow[0]:.1f}s: the browser gives up after 5s"
    wait_for(lambda: health(server)["memorySessions"] == 0, what="write-back after SIGCONT")
    assert len(index_of(redis_server)) == 13


def test_health_never_waits_on_a_frozen_redis_longer_than_the_connect_timeout(service, own_redis) -> None:
    redis_server = own_redis()
    server = service("app", REDIS_URL=redis_server.url, REDIS_CONNECT_TIMEOUT="0.5", REDIS_SOCKET_TIMEOUT="4")
    assert health(server)["redis"] == "connected"
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        elapsed, got = timed(request, server.port, "GET", "/health")
        assert got.json()["status"] == "degraded" and got.json()["redis"] == "disconnected"
        assert elapsed < 0.5 + 1, elapsed
        elapsed, got = timed(request, server.port, "GET", "/health/ready")
        assert got.status == 503 and elapsed < 0.5
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)


def test_sessions_saved_during_an_outage_are_written_back(service, own_redis) -> None:
    redis_server = own_redis(*PERSISTENT)
    ttl_ms = 600_000
    server = service("app", REDIS_URL=redis_server.url, REDIS_RETRY_INTERVAL="0.3",
                     SESSION_TTL_SECONDS=str(ttl_ms // 1000))
    before = saved(server, session("before"))
    assert before["storage"] == "redis"
    redis_server.kill()

    resync_ts = now_ms() - 3_600_000  # the browser re-posting an old session with its own timestamp
    during = [saved(server, session(f"during-{i}")) for i in range(3)]
    during.append(saved(server, session("resync", timestamp=resync_ts)))
    acked_at = time.time()
    assert {s["storage"] for s in during} == {"memory"}
    assert during[-1]["timestamp"] == resync_ts
    latest = get(server, "/api/v1/session/latest")
    assert latest["storage"] == "memory" and latest["data"]["storyUuid"] == "during-2"
    bodies = {s["timestamp"]: request(server.port, "GET", f"/api/v1/session/{s['timestamp']}").body
              for s in during}

    redis_server.start(*PERSISTENT)  # same port, same AOF: what Redis had acknowledged is back
    wait_for(lambda: health(server)["memorySessions"] == 0, what="write-back")
    client = redis_server.client()
    in_redis = index_of(redis_server)
    assert sorted(in_redis) == sorted([before["timestamp"], *bodies]), "a duplicate or a loss"
    assert len([k for k in client.scan_iter("storyart:session:*") if k.count(b":") == 2]) == len(in_redis)
    for ts, body in bodies.items():
        assert b'{"success":true,"data":%s,"storage":"memory"}' % in_redis[ts] == body  # same bytes, same ts
        left = client.pttl(f"storyart:session:{ts}")
        waited = (time.time() - acked_at) * 1000
        assert ttl_ms - waited - 5_000 < left <= ttl_ms - waited + 1_000, left  # the remaining TTL
        got = get(server, f"/api/v1/session/{ts}")
        assert got["storage"] == "redis"
    assert get(server, "/api/v1/session/latest")["data"]["storyUuid"] == "during-2"
    assert saved(server, session("after"))["storage"] == "redis"
    assert log_count(server, UNAVAILABLE) == 1


def test_a_session_that_expired_during_the_outage_is_not_revived(make_app, own_redis) -> None:
    redis_server = own_redis()
    app = make_app(redis_url=redis_server.url, session_ttl_seconds=1, redis_retry_interval=0.2)
    storage, client = app.extensions["storyart"], app.test_client()
    redis_server.kill()
    gone = client.post("/api/v1/session/save", data=session("short-lived"),
                       headers={"Content-Type": "application/json"}).get_json()
    assert gone["storage"] == "memory"
    time.sleep(1.2)
    redis_server.start()
    wait_for(lambda: storage.redis_state.value == "connected" and storage.local.count()[0] == 0,
             what="recovery")
    assert index_of(redis_server) == {}
    assert not redis_server.client().exists(gone["sessionKey"])
    assert client.get(f"/api/v1/session/{gone['timestamp']}").status_code == 404


def test_reads_see_both_stores_and_the_newest_wins(make_app, redis_server, redis_db) -> None:
    """While sessions wait in memory for the write-back, latest/get/list show the union, newest first, and a
    timestamp held in both stores is one session."""
    app = make_app(redis_url=redis_server.url, redis_retry_interval=3600)
    storage, client = app.extensions["storyart"], app.test_client()
    headers = {"Content-Type": "application/json"}
    base = now_ms() - 100_000
    for offset in (0, 2, 4):
        client.post("/api/v1/session/save", data=session(f"redis-{offset}", timestamp=base + offset),
                    headers=headers)
    from payload import parse_session

    for offset in (1, 3, 4, 5):
        storage.local.save(parse_session(session(f"memory-{offset}", timestamp=base + offset), now_ms()),
                           now=now_ms(), ttl_ms=60_000, proposal=now_ms())
    listed = client.get("/api/v1/session/list").get_json()
    assert [s["timestamp"] - base for s in listed["sessions"]] == [5, 4, 3, 2, 1, 0]
    assert listed["total"] == 6
    # the pending copy of 4 was acknowledged after the one in Redis (a later save of it would have removed it)
    assert [s["storyUuid"] for s in listed["sessions"]][:2] == ["memory-5", "memory-4"]
    paged = client.get("/api/v1/session/list?limit=2&offset=2").get_json()
    assert [s["timestamp"] - base for s in paged["sessions"]] == [3, 2]
    latest = client.get("/api/v1/session/latest").get_json()
    assert latest["storage"] == "memory" and latest["data"]["storyUuid"] == "memory-5"
    assert client.get(f"/api/v1/session/{base + 1}").get_json()["data"]["storyUuid"] == "memory-1"
    assert client.get(f"/api/v1/session/{base + 2}").get_json()["data"]["storyUuid"] == "redis-2"


# ---------------------------------------------------------------------------- other Redis failures


def test_a_read_only_replica_degrades_to_memory_with_one_log_line(service, own_redis) -> None:
    primary = own_redis()
    old = primary.client()
    old_ts = now_ms() - 60_000
    old.set(f"storyart:session:{old_ts}", session("old", timestamp=old_ts), ex=600)
    old.zadd(INDEX_KEY, {f"storyart:session:{old_ts}": old_ts})
    replica = own_redis("--replicaof", "127.0.0.1", str(primary.port))
    wait_for(lambda: replica.client().exists(f"storyart:session:{old_ts}"), what="replication")
    server = service("app", REDIS_URL=replica.url, REDIS_RETRY_INTERVAL="0.3")

    acked = []
    for i in range(8):  # across several background retries
        got = save_request(server.port, session(f"ro-{i}"))
        assert got.status == 200 and got.json()["storage"] == "memory", got.body
        acked.append(got.json()["timestamp"])
        time.sleep(0.15)
    assert get(server, "/api/v1/session/latest")["data"]["timestamp"] == max(acked)
    assert get(server, f"/api/v1/session/{old_ts}")["data"]["storyUuid"] == "old"  # Redis still answers reads
    assert log_count(server, UNAVAILABLE) == 1
    line = next(line for line in server.log().splitlines() if UNAVAILABLE in line)
    assert "ReadOnlyError" in line or "READONLY" in line or "read only" in line

    replica.client().replicaof("NO", "ONE")  # promoted: writable again
    wait_for(lambda: health(server)["memorySessions"] == 0, what="write-back to the promoted replica")
    assert set(acked) <= set(index_of(replica))
    assert saved(server, session("after"))["storage"] == "redis"


def test_redis_out_of_memory_degrades_to_memory_with_one_log_line(service, own_redis, session_1mb) -> None:
    redis_server = own_redis()
    server = service("app", REDIS_URL=redis_server.url, REDIS_RETRY_INTERVAL="0.3")
    first = saved(server, tagged(session_1mb, "fits"))
    assert first["storage"] == "redis"
    control = redis_server.client()
    control.config_set("maxmemory-policy", "noeviction")
    control.config_set("maxmemory", str(control.info("memory")["used_memory"] + 200_000))
    acked = []
    for i in range(5):
        got = save_request(server.port, tagged(session_1mb, f"oom-{i}"))
        assert got.status == 200 and got.json()["storage"] == "memory", got.body
        acked.append(got.json()["timestamp"])
        time.sleep(0.2)
    assert get(server, "/api/v1/session/latest")["data"]["soakTag"] == "oom-4"
    assert get(server, f"/api/v1/session/{first['timestamp']}")["data"]["soakTag"] == "fits"
    assert log_count(server, UNAVAILABLE) == 1
    assert "maxmemory" in next(line for line in server.log().splitlines() if UNAVAILABLE in line)

    control.config_set("maxmemory", "0")
    wait_for(lambda: health(server)["memorySessions"] == 0, what="write-back after OOM")
    in_redis = index_of(redis_server)
    assert sorted(in_redis) == sorted([first["timestamp"], *acked])
    assert [orjson.loads(in_redis[ts])["soakTag"] for ts in acked] == [f"oom-{i}" for i in range(5)]


@pytest.mark.parametrize("stall", ["paused", "busy"])
def test_a_redis_timeout_degrades_to_memory_without_duplicates(stall, service, own_redis, session_1mb) -> None:
    """Redis stalls longer than REDIS_SOCKET_TIMEOUT: the save goes to memory. `paused` (CLIENT PAUSE) drops
    the stalled command with the connection; `busy` (DEBUG SLEEP: the event loop is blocked) still runs it
    once the loop is free, after the client gave up. Either way, after the write-back the session must be
    in Redis exactly once, under the timestamp the client was given."""
    redis_server = own_redis()
    server = service("app", REDIS_URL=redis_server.url, REDIS_SOCKET_TIMEOUT="0.5", REDIS_RETRY_INTERVAL="0.3")
    assert saved(server, session("before"))["storage"] == "redis"
    if stall == "paused":
        redis_server.client().execute_command("CLIENT", "PAUSE", "1500", "ALL")
    else:
        threading.Thread(target=redis_server.client().execute_command, args=("DEBUG", "SLEEP", "1.5"),
                         daemon=True).start()
        time.sleep(0.1)
    body = tagged(session_1mb if stall == "paused" else session("small"), "stalled")
    elapsed, got = timed(save_request, server.port, body)
    assert got.status == 200 and got.json()["storage"] == "memory", got.body
    assert elapsed < 0.5 + 1
    stalled = got.json()["timestamp"]
    elapsed, got = timed(save_request, server.port, session("next"))
    assert got.json()["storage"] == "memory" and elapsed < 0.5
    wait_for(lambda: health(server)["memorySessions"] == 0, what="write-back after the stall")
    in_redis = index_of(redis_server)
    tags = [orjson.loads(body).get("soakTag") for body in in_redis.values()]
    assert tags.count("stalled") == 1, f"the stalled save is in Redis {tags.count('stalled')} times"
    assert orjson.loads(in_redis[stalled])["soakTag"] == "stalled"
    assert len(in_redis) == 3
    assert log_count(server, UNAVAILABLE) == 1
    assert "Timeout" in next(line for line in server.log().splitlines() if UNAVAILABLE in line)


# ------------------------------------------------------------------------------------ graceful shutdown


@pytest.mark.parametrize(("kind", "sig"), [("gunicorn", signal.SIGTERM), ("app", signal.SIGTERM),
                                           ("app", signal.SIGINT)])
def test_a_save_in_flight_completes_on_shutdown(kind, sig, service, own_redis, session_1mb) -> None:
    redis_server = own_redis()
    server = service(kind, REDIS_URL=redis_server.url, WEB_CONCURRENCY="1")
    upload = SlowUpload(server.port, tagged(session_1mb, "in-flight"))
    upload.send(0.5)
    time.sleep(0.3)  # the server is reading the body now
    server.proc.send_signal(sig)
    time.sleep(0.3)
    got = upload.finish(pieces=5, pause=0.1)
    assert got.status == 200, got.body
    answer = got.json()
    assert answer["storage"] == "redis"
    assert server.proc.wait(30) == 0
    body = redis_server.client().get(answer["sessionKey"])
    assert orjson.loads(body)["soakTag"] == "in-flight"
    assert "shutdown: wrote 0 session(s) back to Redis; 0 pending session(s) kept in the local store" in server.log()


@pytest.mark.parametrize(("kind", "sig"), [("gunicorn", signal.SIGTERM), ("app", signal.SIGTERM),
                                           ("app", signal.SIGINT)])
def test_shutdown_flushes_memory_to_redis_and_says_what_could_not_be(kind, sig, service, own_redis) -> None:
    redis_server = own_redis()
    env = {"REDIS_URL": redis_server.url, "REDIS_RETRY_INTERVAL": "3600", "WEB_CONCURRENCY": "1"}
    flushed = service(kind, **env)
    redis_server.kill()
    acked = [saved(flushed, session(f"flush-{i}"))["timestamp"] for i in range(3)]
    redis_server.start()  # back, but the next retry is an hour away: only the shutdown flush can move them
    flushed.proc.send_signal(sig)
    assert flushed.proc.wait(30) == 0
    assert sorted(index_of(redis_server)) == sorted(acked)
    assert "shutdown: wrote 3 session(s) back to Redis; 0 pending session(s) kept in the local store" in flushed.log()

    stranded = service(kind, **env)
    redis_server.kill()
    for i in range(2):
        saved(stranded, session(f"stranded-{i}"))
    stranded.proc.send_signal(sig)
    assert stranded.proc.wait(30) == 0
    line = next(line for line in stranded.log().splitlines() if "shutdown:" in line)
    assert "wrote 0 session(s) back to Redis; 2 pending session(s) kept in the local store" in line


def test_an_idle_connection_does_not_hold_up_python_app_py_shutdown(service) -> None:
    """A browser's preconnect (or any client that connects and says nothing) must not block SIGINT."""
    server = service("app")
    import socket

    idle = socket.create_connection(("127.0.0.1", server.port))
    try:
        time.sleep(0.2)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(15)
        assert time.monotonic() - started < 10
    finally:
        idle.close()


# --------------------------------------------------------------------------------------- bounded memory


def rss_of_worker(server: ServiceProcess) -> int:
    """The largest resident set of the processes that serve requests."""
    proc = psutil.Process(server.proc.pid)
    workers = proc.children() if server.kind == "gunicorn" else [proc]
    return max(worker.memory_info().rss for worker in workers)


@pytest.mark.parametrize("cap", ["count", "bytes"])
def test_local_store_rss_and_file_plateau_at_the_caps(cap, service, session_1mb) -> None:
    """Sustained 1 MB saves without Redis: the SQLite store stops at its caps, evicts the oldest (logged), and
    both the worker's resident memory and the store file level off instead of growing with every save."""
    caps = {"MEMORY_MAX_SESSIONS": "20", "MEMORY_MAX_BYTES": str(1 << 30)} if cap == "count" else \
        {"LOCAL_STORE_MAX_SESSIONS": "100000", "LOCAL_STORE_MAX_BYTES": str(24 << 20)}
    server = service("gunicorn", **caps)
    store = Path(server.env["LOCAL_STORE_PATH"])
    bodies = [tagged(session_1mb, f"m{i}") for i in range(8)]
    stamps: list[int] = []
    lock = threading.Lock()

    def hammer(count: int) -> None:
        def one(i: int) -> None:
            got = save_request(server.port, bodies[i % len(bodies)])
            assert got.status == 200, got.body
            with lock:
                stamps.append(got.json()["timestamp"])

        threads = [threading.Thread(target=lambda k=k: [one(k * 1000 + j) for j in range(count // 4)])
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    baseline = rss_of_worker(server)
    samples, files, wals = [], [], []
    for _ in range(10):
        hammer(40)
        samples.append(rss_of_worker(server))
        files.append(store.stat().st_size >> 20)
        wals.append(Path(f"{store}-wal").stat().st_size >> 20)
    held = health(server)["memorySessions"]
    cap_bytes = 20 * len(bodies[0]) if cap == "count" else 24 << 20
    assert held == (20 if cap == "count" else (24 << 20) // len(bodies[0]))  # full, and no more than full
    growth = [(s - baseline) >> 20 for s in samples]
    settled = samples[3:]
    assert max(settled) - min(settled) < 48 << 20, f"RSS kept growing (MB over baseline): {growth}"
    assert max(samples) - baseline < cap_bytes * 3 + (96 << 20), f"RSS far above the cap: {growth}"
    assert "local store full: evicted" in server.log()
    # up to 16 MB of freed pages wait to be handed back: the store file does not keep growing. The WAL comes and
    # goes between checkpoints (journal_size_limit 16 MB once one resets it); how far it runs ahead while
    # back-to-back writers delay a checkpoint depends on the machine's load (68 MB seen on a busy one), so it is
    # only held to a bound that still catches a WAL that is never reset.
    assert max(files[3:]) - min(files[3:]) <= 24 and max(files) < (cap_bytes >> 20) + 48, f"file grew (MB): {files}"
    assert max(wals) < (cap_bytes >> 20) * 4 + 128, f"the WAL was never reset (MB): {wals}"
    assert request(server.port, "GET", f"/api/v1/session/{min(stamps)}").status == 404  # the oldest went
    assert get(server, "/api/v1/session/latest")["data"]["timestamp"] == max(stamps)
    logging.getLogger(__name__).info("RSS growth per 40 saves (MB): %s", growth)
    print(f"local store plateau ({cap} cap): RSS over baseline after each 40 saves, MB: {growth}; "
          f"file, MB: {files}; WAL, MB: {wals}")


def test_log_lines_name_the_failure(service) -> None:
    """The one log line says what failed, in words an operator can act on (no traceback)."""
    server = service("app", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    saved(server, session("x"))
    lines = [line for line in server.log().splitlines() if UNAVAILABLE in line]
    assert len(lines) == 1 and re.search(r"ConnectionError: .*(refused|connect)", lines[0], re.I), lines
    assert "Traceback" not in server.log()


# ------------------------------------------------------------------ workers assigning timestamps in memory


def save_retrying(store, draft, now: int) -> int:
    """A save as a client makes it: a 503 (the store busy past its patience; back-to-back saves in three
    processes with no request in between are harsher than any real load) is tried again."""
    from storage import StorageUnavailable

    while True:
        try:
            return store.save(draft, now=now, ttl_ms=60_000, proposal=now)
        except StorageUnavailable:
            continue


def test_forked_processes_on_one_local_store_never_give_two_saves_the_same_timestamp(tmp_path) -> None:
    """gunicorn's workers share the SQLite store while Redis is away, and each assigns timestamps in it. Three
    processes saving "in the same millisecond" must still hand out different timestamps: the write-back could
    not put two sessions under one key, so one client would later read another client's session."""
    import os
    from dataclasses import replace

    from payload import new_save_id, parse_session
    from storage import WhenFull
    from stores.base import Limits
    from stores.sqlite import SqliteStore

    path = tmp_path / "shared.sqlite3"
    SqliteStore.open(path, Limits()).close()
    draft = parse_session(session("same-ms"), now_ms())
    now = now_ms()
    children = []
    for worker in range(3):
        pid = os.fork()
        if pid == 0:  # a worker: 300 saves, all "in the same millisecond"
            try:
                store = SqliteStore.open(path, Limits(100_000, 1 << 30, WhenFull.REFUSE))
                # 300 saves of their own (a retry keeps its save's id: that is what it retries)
                stamps = [save_retrying(store, replace(draft, save_id=new_save_id()), now) for _ in range(300)]
                (tmp_path / f"stamps.{worker}").write_text(" ".join(map(str, stamps)))
            except BaseException as error:  # said in the parent's failure, not lost with the child
                (tmp_path / f"stamps.{worker}").write_text(f"{type(error).__name__}: {error}")
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    outputs = [(tmp_path / f"stamps.{worker}").read_text() for worker in range(3)]
    assert not [out for out in outputs if not out[:1].isdigit()], outputs
    stamps = [int(s) for out in outputs for s in out.split()]
    assert len(stamps) == 900
    assert len(set(stamps)) == 900, f"{900 - len(set(stamps))} timestamps were given twice"


def test_gunicorn_workers_never_give_two_saves_the_same_timestamp_while_redis_is_away(service) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server = service("gunicorn", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", WEB_CONCURRENCY="3",
                     REDIS_RETRY_INTERVAL="3600", LOCAL_STORE_MAX_SESSIONS="1000")
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: saved(server, session(f"w{i}")), range(600)))
    assert {a["storage"] for a in answers} == {"memory"}
    with ThreadPoolExecutor(6) as pool:  # concurrent, so one idle worker cannot take every accept
        pids = set(pool.map(lambda _: health(server)["pid"], range(60)))
    assert len(pids) > 1  # the saves really were spread over several workers
    stamps = [a["timestamp"] for a in answers]
    assert len(set(stamps)) == len(stamps), f"{len(stamps) - len(set(stamps))} timestamps were given twice"
