"""Foreign data and big lists, on real processes: records other tools wrote under `storyart:session:*` that
are not sessions, a same-size rewrite under ETag polling, and lists of every session in bounded memory."""

from __future__ import annotations

import orjson
import pytest
from chaos import session, tagged

from servers import PeakRss, ServiceProcess, request, save_request
from stores.redis import INDEX_KEY

pytestmark = pytest.mark.slow
JSON = {"Content-Type": "application/json"}


def get(server: ServiceProcess, path: str, headers: dict | None = None):
    got = request(server.port, "GET", path, headers={**JSON, **(headers or {})})
    assert got.status < 500, (path, got.status, got.body)
    return got


def plant(client, ts: int, value: bytes) -> None:
    """What another StoryArt tool does: SET a key of the public pattern and index it."""
    client.set(f"storyart:session:{ts}", value, ex=600)
    client.zadd(INDEX_KEY, {f"storyart:session:{ts}": ts})


def test_records_that_are_not_sessions_are_skipped_and_named(service, own_redis) -> None:
    redis_server = own_redis()
    server = service("app", REDIS_URL=redis_server.url)
    real = [save_request(server.port, session(f"real-{i}")).json()["timestamp"] for i in range(2)]
    client = redis_server.client()
    plant(client, real[-1] + 10, b"[1,2,3]")
    plant(client, real[-1] + 20, b"not json at all")
    for query in ("", "?view=summary", "?q=real", "?limit=5", "?view=summary&q=real"):
        got = get(server, f"/api/v1/session/list{query}")
        listed = orjson.loads(got.body)  # valid JSON, whatever Redis holds
        assert [s["storyUuid"] for s in listed["sessions"]] == ["real-1", "real-0"], (query, listed)
        if "view=summary" not in query and "q=" not in query:
            assert listed["skipped"] == 2
    latest = get(server, "/api/v1/session/latest")
    assert latest.status == 200 and orjson.loads(latest.body)["data"]["storyUuid"] == "real-1"
    for ts in (real[-1] + 10, real[-1] + 20):
        direct = get(server, f"/api/v1/session/{ts}")
        assert direct.status == 422 and orjson.loads(direct.body)["success"] is False
        assert "not a session" in orjson.loads(direct.body)["error"]
    assert server.log().count("is not a session") == 2  # once each, however often they were met


def test_a_same_size_rewrite_changes_the_etag(service, own_redis) -> None:
    redis_server = own_redis()
    server = service("app", REDIS_URL=redis_server.url)
    saved = save_request(server.port, session("poll", note="AAAA")).json()
    first = get(server, "/api/v1/session/latest")
    etag = first.headers["etag"]
    assert get(server, "/api/v1/session/latest", {"If-None-Match": etag}).status == 304
    client = redis_server.client()
    key = saved["sessionKey"]
    client.set(key, client.get(key).replace(b'"AAAA"', b'"BBBB"'), keepttl=True)  # same size, other bytes
    second = get(server, "/api/v1/session/latest", {"If-None-Match": etag})
    assert second.status == 200 and second.headers["etag"] != etag
    assert orjson.loads(second.body)["data"]["note"] == "BBBB"
    assert get(server, "/api/v1/session/latest", {"If-None-Match": second.headers["etag"]}).status == 304
    summary = orjson.loads(client.get(f"storyart:meta:{saved['timestamp']}"))
    assert second.headers["etag"].strip(chr(34)).endswith(summary["etag"])  # the summary was refreshed


def peak_rss_during(server: ServiceProcess, path: str) -> tuple[int, bytes]:
    """(the highest RSS of the service's processes while `path` is read, the answer)."""
    with PeakRss(server.proc.pid) as rss:
        answer = get(server, path).body
    return rss.peak, answer


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_a_bare_list_of_every_session_streams_in_bounded_memory(backend, service, own_redis, session_1mb) -> None:
    """The StoryArt session browser's bare list of 50 sessions of 1 MB: all of them, while the worker's peak
    memory stays within a few MB of what reading one 1 MB session costs."""
    env = {"WEB_CONCURRENCY": "1", "LOCAL_STORE_MAX_SESSIONS": "1000"}
    if backend == "redis":
        env["REDIS_URL"] = own_redis().url
    server = service("gunicorn", **env)
    stamps = [save_request(server.port, tagged(session_1mb, f"big-{i}")).json()["timestamp"] for i in range(50)]
    for _ in range(3):  # warm: the allocator's arenas and the connection pool as after ordinary use
        get(server, "/api/v1/session/latest")
    one, _ = peak_rss_during(server, "/api/v1/session/latest")
    every, body = peak_rss_during(server, "/api/v1/session/list")
    listed = orjson.loads(body)
    assert listed["count"] == listed["total"] == 50 and len(listed["sessions"]) == 50
    assert [s["timestamp"] for s in listed["sessions"]] == stamps[::-1]
    print(f"{backend}: peak RSS reading one 1 MB session {one >> 20} MB, listing 50 of them {every >> 20} MB")
    assert every - one < 24 << 20, (one >> 20, every >> 20)  # not the 50+ MB the whole answer would take


def test_a_bare_list_of_130_sessions_returns_130(service) -> None:
    server = service("app", LOCAL_STORE_MAX_SESSIONS="1000")
    for i in range(130):
        assert save_request(server.port, session(f"s{i}")).status == 200
    listed = orjson.loads(get(server, "/api/v1/session/list").body)
    assert listed["count"] == 130 and len({s["timestamp"] for s in listed["sessions"]}) == 130


def test_a_lost_index_is_rebuilt_from_the_session_keys(service, own_redis) -> None:
    redis_server = own_redis()
    server = service("app", REDIS_URL=redis_server.url, REDIS_RETRY_INTERVAL="3600")  # no reconcile round before
    stamps = [save_request(server.port, session(f"kept-{i}")).json()["timestamp"] for i in range(5)]
    client = redis_server.client()
    client.delete(INDEX_KEY, "storyart:sessions:expiry")  # a tool, a careless FLUSH, an eviction
    latest = get(server, "/api/v1/session/latest")
    assert latest.status == 200 and orjson.loads(latest.body)["data"]["timestamp"] == stamps[-1]
    assert [int(score) for _, score in client.zrange(INDEX_KEY, 0, -1, withscores=True)] == stamps
    assert client.zcard("storyart:sessions:expiry") == 5  # their TTLs are tracked again
    listed = orjson.loads(get(server, "/api/v1/session/list").body)
    assert [s["timestamp"] for s in listed["sessions"]] == stamps[::-1]
    assert "rebuilt it with 5 session(s)" in server.log()


def test_the_reindex_command(own_redis, tmp_path) -> None:
    import os
    import subprocess
    import sys

    from servers import ROOT

    redis_server = own_redis()
    client = redis_server.client()
    for ts in (1_700_000_000_001, 1_700_000_000_002):
        client.set(f"storyart:session:{ts}", orjson.dumps({"scriptText": "x", "timestamp": ts}), ex=600)
    client.set("storyart:session:not-a-session:extra", b"ignored")  # three colons: not a session key
    env = {**os.environ, "REDIS_URL": redis_server.url, "LOCAL_STORE_PATH": str(tmp_path / "s.sqlite3")}
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "sessions", "reindex"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Indexed 2 session(s)" in done.stdout
    assert client.zcard(INDEX_KEY) == 2
