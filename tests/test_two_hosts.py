"""Two hosts behind one nginx (docs/high-availability.md): two gunicorn instances, each with its own
SQLite local store as two machines would have, one Redis (AOF fsynced, so kill -9 keeps what it acknowledged),
and a real nginx running deploy/nginx-storyart.conf with both in its `upstream`. Clients connect from
different 127.0.0.0/8 addresses, so nginx's `hash $remote_addr consistent` sees different browsers."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from chaos import PERSISTENT, session, tagged
from test_proxy import Nginx

from bench.soak import Soak, chaos, settle, stored_tags
from servers import ROOT, RedisServer, ServiceProcess, request, save_request, wait_for

pytestmark = pytest.mark.slow

BROWSERS = [f"127.0.0.{n}" for n in range(2, 18)]


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.redis = RedisServer(workdir / "redis")
        env = {"TRUSTED_PROXY_HOPS": "1", "REDIS_RETRY_INTERVAL": "0.5", "LOCAL_STORE_MAX_SESSIONS": "100000",
               "LOCAL_STORE_MAX_BYTES": str(4 << 30)}
        self.hosts = [ServiceProcess("gunicorn", {**env, "REDIS_URL": self.redis.url, "SERVICE_HOSTS": "2",
                                                  "SERVICE_HOST_INDEX": str(n)}, workdir / f"host-{n}.log")
                      for n in (0, 1)]
        self.nginx = Nginx(workdir / "nginx", *(host.port for host in self.hosts))

    def host_of(self, source: str) -> ServiceProcess:
        """The host nginx routes this browser to (found from the host's access log)."""
        marker = f"route-{source}-{time.monotonic_ns()}"
        assert request(self.nginx.port, "GET", "/health", headers={"X-Request-ID": marker}, source=source).status == 200
        wait_for(lambda: any(marker in host.log() for host in self.hosts), what=f"the access line of {marker}")
        return next(host for host in self.hosts if marker in host.log())

    def pending(self) -> list[int]:
        return [request(host.port, "GET", "/health").json()["localStore"]["sessions"] for host in self.hosts]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("two-hosts"))
    try:
        stack.redis.start(*PERSISTENT)
        for host in stack.hosts:
            host.start()
        stack.nginx.start()
        yield stack
    finally:
        stack.nginx.stop()
        for host in stack.hosts:
            host.stop()
        stack.redis.kill_all()


def test_timestamps_are_unique_across_hosts_and_every_save_reads_from_both(stack: Stack) -> None:
    """Service-chosen timestamps: both hosts save at once, as fast as they can; Redis's save script picks each
    timestamp, so no two collide, and each host reads what the other saved."""
    jobs = [(host.port, f"both-{n}-{k}") for k in range(30) for n, host in enumerate(stack.hosts)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: (job[1], save_request(job[0], session(job[1]))), jobs))
    assert all(got.status == 200 and got.json()["storage"] == "redis" for _, got in answers)
    stamps = {tag: got.json()["timestamp"] for tag, got in answers}
    assert len(set(stamps.values())) == len(jobs)
    for tag, timestamp in stamps.items():
        for host in stack.hosts:
            got = request(host.port, "GET", f"/api/v1/session/{timestamp}")
            assert got.status == 200 and got.json()["data"]["storyUuid"] == tag


def test_nginx_keeps_each_browser_on_one_host(stack: Stack) -> None:
    routes = {source: stack.host_of(source) for source in BROWSERS}
    assert {host.port for host in routes.values()} == {host.port for host in stack.hosts}  # both get browsers
    for source in BROWSERS[:4]:
        assert all(stack.host_of(source) is routes[source] for _ in range(3))


def test_during_an_outage_each_host_holds_its_own_saves_then_both_read_all(stack: Stack) -> None:
    """Redis killed (-9): each host keeps what it saves in its own local store and answers it (through nginx,
    the browser that saved it reaches that host again); the other host cannot know it yet and says so (503).
    Redis back: both write back, and every session saved on either host reads back from both."""
    before = save_request(stack.hosts[0].port, session("before-outage")).json()["timestamp"]
    stack.redis.kill()
    saved: dict[str, tuple[int, ServiceProcess]] = {}
    try:
        for n, source in enumerate(BROWSERS):
            tag = f"outage-{n}"
            got = save_request(stack.nginx.port, session(tag), source=source)
            assert got.status == 200 and got.json()["storage"] == "memory", got.body  # the local store
            saved[tag] = (got.json()["timestamp"], stack.host_of(source))
            again = request(stack.nginx.port, "GET", f"/api/v1/session/{saved[tag][0]}", source=source)
            assert again.status == 200 and again.json()["data"]["storyUuid"] == tag  # its browser reads it back
        assert {host.port for _, host in saved.values()} == {host.port for host in stack.hosts}
        for timestamp, holder in saved.values():
            other = next(host for host in stack.hosts if host is not holder)
            assert request(other.port, "GET", f"/api/v1/session/{timestamp}").status == 503  # not "not found"
        assert sorted(stack.pending()) == sorted(Counter(host.port for _, host in saved.values()).values())
    finally:
        stack.redis.start(*PERSISTENT)
    wait_for(lambda: stack.pending() == [0, 0], what="both hosts' write-back", timeout=30)
    # Each worker finds Redis back on its own next retry (REDIS_RETRY_INTERVAL); until then it answers 503.
    wait_for(lambda: all(request(host.port, "GET", f"/api/v1/session/{before}").status == 200
                         for host in stack.hosts for _ in range(12)), what="every worker to read Redis again")
    everything = {tag: ts for tag, (ts, _) in saved.items()} | {"before-outage": before}
    for host in stack.hosts:
        listed = request(host.port, "GET", "/api/v1/session/list?view=summary&limit=100").json()
        by_tag = {s["storyUuid"]: s["timestamp"] for s in listed["sessions"]}
        assert set(everything) <= set(by_tag) and not listed.get("partial")
        for tag, timestamp in everything.items():
            got = request(host.port, "GET", f"/api/v1/session/{by_tag[tag]}")
            assert got.status == 200 and got.json()["data"]["storyUuid"] == tag
            assert by_tag[tag] == timestamp  # the hosts' slots keep their outage timestamps apart


def test_soak_through_nginx_to_two_hosts_while_redis_is_killed(stack: Stack) -> None:
    """bench/soak.py's load (8 clients, 1 MB saves and latest reads) from 8 browser addresses through nginx to
    both hosts, Redis kill -9ed and restarted once: nothing acknowledged is lost, no 5xx (but `latest`'s honest
    503 while Redis is away and the local store holds nothing newer)."""
    base = (ROOT / "tests" / "fixtures" / "session-1mb.json").read_bytes()
    stack.redis.client().flushall()
    soak = Soak(stack.nginx.port, base, read_ratio=0.5, sources=BROWSERS[:8])
    clients = [threading.Thread(target=soak.client, args=(n,)) for n in range(8)]
    windows: list[tuple[float, float]] = []
    duration = 10.0
    breaker = threading.Thread(target=chaos, args=(stack.redis, None, duration, 1, 3.0, time.monotonic(), soak.stop,
                                                   windows, []))
    for thread in [*clients, breaker]:
        thread.start()
    soak.stop.wait(duration)
    soak.stop.set()
    for thread in [*clients, breaker]:
        thread.join()
    for host in stack.hosts:
        settle(host.port, patience=30)
    calls = soak.calls
    acknowledged = [c for c in calls if c.kind == "save" and c.status == 200]
    honest = [c for c in calls if c.kind == "latest" and c.status == 503 and any(
        c.started < end + 1 and c.started + c.elapsed > down for down, end in windows)]
    server_errors = [c for c in calls if (c.status >= 500 or c.status == 0) and c not in honest]
    stored = stored_tags(stack.redis)
    lost = [c for c in acknowledged if stored[c.tag] != 1]
    mismatched = []
    for call in acknowledged:  # each acknowledged session reads back through nginx as exactly what was saved
        got = request(stack.nginx.port, "GET", f"/api/v1/session/{call.timestamp}", source=BROWSERS[0])
        expected = tagged(base, call.tag)[:-1] + b',"timestamp":%d}' % call.timestamp
        if got.status != 200 or got.body != b'{"success":true,"data":%s,"storage":"redis"}' % expected:
            mismatched.append(call)
    print(f"two-host soak: {len(calls)} requests, {len(acknowledged)} acknowledged "
          f"({sum(c.storage == 'memory' for c in acknowledged)} to the local stores), lost {len(lost)}, "
          f"renumbered at write-back {len(mismatched)}, 5xx {len(server_errors)}, honest 503 {len(honest)}, "
          f"slowest {max(c.elapsed for c in calls):.3f} s, outage {[round(e - d, 2) for d, e in windows]} s")
    assert len(windows) == 1 and sum(c.storage == "memory" for c in acknowledged) > 0
    assert len(acknowledged) > 30
    assert lost == [] and server_errors == [], (lost[:3], Counter(c.status for c in server_errors))
    assert mismatched == []  # every session under the timestamp its client was given: the hosts' slots differ
