"""Which copy a write-back keeps (docs/contract.md §2, "Which copy wins"), on real processes: `python app.py`
hosts, each with its own SQLite local store, and one redis-server with an fsynced AOF that is killed -9 and
started again on the same port and files. Copies are ordered by when they were acknowledged, never by their
expiry; a delete leaves a tombstone that every later write-back honours; a retried import never costs the
session it was first stored as."""

from __future__ import annotations

import orjson
import pytest
from chaos import PERSISTENT, session
from test_faults import health

from allocator import now_ms
from servers import RedisServer, ServiceProcess, request, save_request, wait_for

pytestmark = pytest.mark.slow

JSON = {"Content-Type": "application/json"}
QUICK = {"REDIS_RETRY_INTERVAL": "0.3"}


def host(service, redis_server: RedisServer, index: int = 0, hosts: int = 1, **env: str) -> ServiceProcess:
    return service("app", REDIS_URL=redis_server.url, SERVICE_HOSTS=str(hosts), SERVICE_HOST_INDEX=str(index),
                   **{**QUICK, **env})


def store(server: ServiceProcess, body: bytes, where: str) -> int:
    got = save_request(server.port, body)
    assert got.status == 200 and got.json()["storage"] == where, got.body
    return got.json()["timestamp"]


def tag_of(server: ServiceProcess, timestamp: int) -> str | int:
    """The storyUuid of the session under `timestamp` as `server` reads it, or the status when it is not 200."""
    got = request(server.port, "GET", f"/api/v1/session/{timestamp}")
    return got.json()["data"]["storyUuid"] if got.status == 200 else got.status


def pin(server: ServiceProcess, timestamp: int, pinned: bool = True) -> None:
    got = request(server.port, "POST" if pinned else "DELETE", f"/api/v1/session/{timestamp}/pin", headers=JSON)
    assert got.status == 200 and got.json()["pinned"] is pinned, got.body


def written_back(server: ServiceProcess) -> None:
    wait_for(lambda: health(server)["redis"] == "connected" and health(server)["localStore"]["sessions"] == 0,
             what=f"the write-back of port {server.port}")


def test_a_retried_import_during_an_outage_keeps_the_pinned_original(service, own_redis) -> None:
    """An item without a timestamp imported (T1, in Redis) and pinned, then imported again while Redis is down
    (T2, in the local store): the retry shares T1's save id (it comes from the content), but T1 was confirmed
    to a client and pinned, so the write-back never removes it. Both sessions stay, T1 pinned."""
    redis_server = own_redis(*PERSISTENT)
    server = host(service, redis_server)
    item = session("imported twice")

    def imported() -> dict:
        got = request(server.port, "POST", "/api/v1/session/import", item, JSON)
        assert got.status == 200, got.body
        return got.json()["results"][0]

    first = imported()
    assert first["status"] == "imported" and first["storage"] == "redis"
    pin(server, first["timestamp"])
    redis_server.kill()
    retried = imported()
    assert retried["storage"] == "memory" and retried["timestamp"] != first["timestamp"]
    redis_server.start(*PERSISTENT)
    written_back(server)
    original = request(server.port, "GET", f"/api/v1/session/{first['timestamp']}")
    assert original.status == 200 and original.json()["storage"] == "redis", original.body
    client = redis_server.client()
    assert client.smembers("storyart:sessions:pinned") == {first["sessionKey"].encode()}
    assert client.pttl(first["sessionKey"]) == -1
    assert tag_of(server, retried["timestamp"]) == "imported twice"  # the copy its client was told of, too
    assert "not a session" not in server.log()


def test_an_unpin_just_before_the_write_back_keeps_the_later_copy(service, own_redis) -> None:
    """T (v0) saved and pinned; Redis goes away; T re-saved (v1, pending); Redis returns and T is unpinned
    before the write-back: v1 was acknowledged later, so v1 stays (its expiry does not matter)."""
    redis_server = own_redis(*PERSISTENT)
    server = host(service, redis_server, REDIS_RETRY_INTERVAL="3")  # the default: the unpin comes first
    ts = now_ms() - 60_000
    store(server, session("v0", timestamp=ts), "redis")
    pin(server, ts)
    redis_server.kill()
    store(server, session("v1", timestamp=ts), "memory")
    redis_server.start(*PERSISTENT)
    pin(server, ts, pinned=False)  # Redis answers this one: the write-back has not run yet
    written_back(server)
    assert tag_of(server, ts) == "v1"
    assert "the later copy stays" not in server.log()
    assert 0 < redis_server.client().pttl(f"storyart:session:{ts}") <= 7 * 86_400_000  # unpinned: its TTL runs


def v1_pending_on_a_host_that_is_down(redis_server, host_a, host_b, ts: int) -> None:
    """Redis goes away, host B acknowledges v1 of `ts` into its local store and is killed before Redis returns;
    host A sees Redis again."""
    redis_server.kill()
    store(host_b, session("v1", timestamp=ts), "memory")
    host_b.kill_group()
    redis_server.start(*PERSISTENT)
    wait_for(lambda: health(host_a)["redis"] == "connected", what="host A to see Redis again")


@pytest.mark.parametrize("later", ["pinned", "no ttl"])
def test_a_pending_copy_on_a_host_that_was_down_loses_to_a_later_save(later, service, own_redis) -> None:
    """Host B holds v1 of T, pending, and is down when Redis returns; v2 of T is saved on host A and (with the
    default TTL) pinned, or (SESSION_TTL_SECONDS=0) has no TTL at all. B comes back and writes back: v2 was
    acknowledged after v1, so both hosts read v2, and B's log says its copy was superseded."""
    redis_server = own_redis(*PERSISTENT)
    env = {"SESSION_TTL_SECONDS": "0"} if later == "no ttl" else {}
    host_a, host_b = (host(service, redis_server, n, 2, **env) for n in (0, 1))
    ts = now_ms() - 60_000
    store(host_a, session("v0", timestamp=ts), "redis")
    v1_pending_on_a_host_that_is_down(redis_server, host_a, host_b, ts)
    store(host_a, session("v2", timestamp=ts), "redis")
    if later == "pinned":
        pin(host_a, ts)
    host_b.restart()
    written_back(host_b)
    assert [tag_of(h, ts) for h in (host_a, host_b)] == ["v2", "v2"]
    assert f"session {ts} was saved again since; the later copy stays" in host_b.log()


def test_an_unpin_on_another_host_does_not_make_the_older_copy_win(service, own_redis) -> None:
    """T (v0) saved and pinned on host A; during an outage v1 of T goes to host B, which is down when Redis
    returns; A unpins T (its TTL starts again, so v0 now expires after v1 would). B comes back: v1 was
    acknowledged later and is the copy both hosts read."""
    redis_server = own_redis(*PERSISTENT)
    host_a, host_b = (host(service, redis_server, n, 2) for n in (0, 1))
    ts = now_ms() - 60_000
    store(host_a, session("v0", timestamp=ts), "redis")
    pin(host_a, ts)
    v1_pending_on_a_host_that_is_down(redis_server, host_a, host_b, ts)
    pin(host_a, ts, pinned=False)
    host_b.restart()
    written_back(host_b)
    assert [tag_of(h, ts) for h in (host_a, host_b)] == ["v1", "v1"]
    assert "the later copy stays" not in host_b.log()


def test_a_delete_wins_over_a_pending_copy_on_a_host_that_was_down(service, own_redis) -> None:
    """T (v0) in Redis; during an outage v1 of T is saved through host B, which is down when Redis returns;
    DELETE T on host A answers 200. When B comes back its write-back meets the tombstone the delete left and
    drops v1: T stays deleted on both hosts. A save of T after the delete is kept."""
    redis_server = own_redis(*PERSISTENT)
    host_a, host_b = (host(service, redis_server, n, 2) for n in (0, 1))
    ts, kept = now_ms() - 60_000, now_ms() - 50_000
    store(host_a, session("v0", timestamp=ts), "redis")
    store(host_a, session("k0", timestamp=kept), "redis")
    v1_pending_on_a_host_that_is_down(redis_server, host_a, host_b, ts)
    for doomed in (ts, kept):
        deleted = request(host_a.port, "DELETE", f"/api/v1/session/{doomed}")
        assert deleted.status == 200 and deleted.json()["message"] == "Session deleted", deleted.body
    assert tag_of(host_a, ts) == 404
    store(host_a, session("k1", timestamp=kept), "redis")  # saved again after its delete
    host_b.restart()
    written_back(host_b)
    assert [tag_of(h, ts) for h in (host_a, host_b)] == [404, 404]
    assert [tag_of(h, kept) for h in (host_a, host_b)] == ["k1", "k1"]
    assert f"session {ts} was deleted after this copy was saved" in host_b.log()
    left = redis_server.client().pttl(f"storyart:deleted:{ts}")
    assert 7 * 86_400_000 < left <= 30 * 86_400_000  # the tombstone's bound (docs/decisions.md)
    assert orjson.loads(request(host_b.port, "GET", "/api/v1/session/list").body)["total"] == 1
