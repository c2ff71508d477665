"""Keys other StoryArt tools write straight into Redis reach the service's index and list filters: a new
`storyart:session:<ms>` SET without the index shows in `latest`, the list and a backup; a session rewritten with
`SET ... KEEPTTL` is filtered by its new story and title. Real redis-servers and real service processes; the
bounds of one round are checked on a `Reconciler` driven round by round."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import zipfile

import orjson
import pytest
import redis
from chaos import session

from allocator import now_ms
from config import Config
from servers import ROOT, ServiceProcess, request, save_request, wait_for
from storage import Query
from stores.redis import FACETS_KEY, INDEX_KEY, RECONCILER_KEY, Budget, Reconciler, RedisStore

JSON = {"Content-Type": "application/json"}
INTERVAL = 0.2  # REDIS_RETRY_INTERVAL of the services here: a reconcile round every 0.2 s


def listed(server: ServiceProcess, query: str = "") -> dict:
    got = request(server.port, "GET", f"/api/v1/session/list?{query}", headers=JSON)
    assert got.status == 200, got.body
    return got.json()


def latest(server: ServiceProcess) -> int | None:
    got = request(server.port, "GET", "/api/v1/session/latest", headers=JSON)
    return got.json()["data"]["timestamp"] if got.status == 200 else None


def tool_session(tag: str, ts: int, title: str | None = None) -> bytes:
    """A session as another StoryArt tool writes it: its own serialization, `timestamp` among the fields."""
    return orjson.dumps({"timestamp": ts, "scriptText": f"script {tag}", "episodeContext": "{}", "storyUuid": tag,
                         "analyzedEpisode": {"episodeNumber": 1, "title": title or tag, "scenes": []}})


@pytest.mark.slow
def test_a_key_a_tool_sets_without_the_index_shows_in_latest_and_the_list(service, own_redis) -> None:
    redis_server = own_redis()
    server = service("app", REDIS_URL=redis_server.url, REDIS_RETRY_INTERVAL=str(INTERVAL))
    saved = [save_request(server.port, session(f"saved-{i}")).json()["timestamp"] for i in range(2)]
    client = redis_server.client()
    ts = saved[-1] + 1000
    client.set(f"storyart:session:{ts}", tool_session("tool", ts), ex=600)  # SET alone: no ZADD to the index
    started = time.monotonic()
    wait_for(lambda: latest(server) == ts, "the tool's key as latest", timeout=20)
    shown = time.monotonic() - started
    every = listed(server)
    assert [s["timestamp"] for s in every["sessions"]] == [ts, *saved[::-1]] and every["total"] == 3
    assert [s["timestamp"] for s in listed(server, "storyUuid=tool")["sessions"]] == [ts]
    assert 590 <= client.zscore("storyart:sessions:expiry", f"storyart:session:{ts}") / 1000 - time.time() <= 600
    print(f"a tool's new key was latest after {shown:.2f} s (rounds every {INTERVAL} s)")
    assert "reconcile: 1 session key(s) another tool wrote indexed" in server.log()


@pytest.mark.slow
def test_a_backup_from_the_cli_has_a_key_a_tool_set_a_moment_before(make_app, redis_server, redis_db,
                                                                     tmp_path) -> None:
    app = make_app(redis_url=redis_server.url, redis_retry_interval=3600)  # no reconcile round of its own
    client = app.test_client()
    saved = [client.post("/api/v1/session/save", data=session(f"saved-{i}"), headers=JSON).get_json()["timestamp"]
             for i in range(2)]
    ts = saved[-1] + 1000
    redis_db.set(f"storyart:session:{ts}", tool_session("tool", ts), ex=600)
    env = {**os.environ, "REDIS_URL": redis_server.url, "LOCAL_STORE_PATH": str(tmp_path / "cli.sqlite3"),
           "REDIS_RETRY_INTERVAL": "3600", "LOG_LEVEL": "WARNING"}
    target = tmp_path / "backup.zip"
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "sessions", "backup", str(target)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Backed up 3 session(s)"), done.stdout
    with zipfile.ZipFile(target) as archive:
        assert archive.read(f"sessions/{ts}.json") == tool_session("tool", ts)
        assert sorted(e["timestamp"] for e in orjson.loads(archive.read("manifest.json"))["sessions"]) == [*saved, ts]
    assert "indexed 1 session key(s) another tool wrote" in done.stderr


@pytest.mark.slow
def test_a_keepttl_rewrite_is_followed_by_the_story_and_title_filters(service, own_redis) -> None:
    """Two sessions rewritten in place by a tool, keeping their TTL: one to other sizes, one to the very same size
    (only its bytes' hash tells). The summary views read no session body, so nothing else refreshes them."""
    redis_server = own_redis()
    server = service("app", REDIS_URL=redis_server.url, REDIS_RETRY_INTERVAL=str(INTERVAL))
    old = {tag: save_request(server.port, session(tag, note="x")).json()["timestamp"]
           for tag in ("story-aaaa", "story-cccc")}
    assert listed(server, "storyUuid=story-aaaa&view=summary")["total"] == 1
    client = redis_server.client()
    for before, after in (("story-aaaa", "story-bbbb-longer"), ("story-cccc", "story-dddd")):
        key = f"storyart:session:{old[before]}"
        body = client.get(key)
        client.set(key, body.replace(before.encode(), after.encode()), keepttl=True)
        assert (len(client.get(key)) == len(body)) is (after == "story-dddd")
    started = time.monotonic()

    def followed() -> bool:
        return all(
            [s["timestamp"] for s in listed(server, f"storyUuid={after}&view=summary")["sessions"]] == [old[before]]
            and [s["title"] for s in listed(server, f"q={after}&view=summary")["sessions"]] == [after]
            and listed(server, f"storyUuid={before}&view=summary")["total"] == 0
            and listed(server, f"q={before}&view=summary")["total"] == 0
            for before, after in (("story-aaaa", "story-bbbb-longer"), ("story-cccc", "story-dddd")))

    wait_for(followed, "the filters following the rewritten bytes", timeout=30)
    print(f"the filters followed both rewrites after {time.monotonic() - started:.2f} s")
    assert all(604_000 < client.ttl(f"storyart:session:{ts}") <= 604_800 for ts in old.values())  # KEEPTTL kept
    for ts in old.values():  # the summary and its ETag are the rewritten bytes'
        got = request(server.port, "GET", f"/api/v1/session/{ts}", headers=JSON)
        assert got.headers["etag"].strip('"').endswith(orjson.loads(client.get(f"storyart:meta:{ts}"))["etag"])


@pytest.fixture
def store(redis_server, redis_db):
    made = RedisStore.from_config(dataclasses.replace(Config(), redis_url=redis_server.url))
    yield made
    made.close()


def plant(client: redis.Redis, count: int, first: int, size: int = 0) -> list[int]:
    """`count` sessions as another tool writes them, without the index; each `size` bytes longer than the
    smallest."""
    stamps = list(range(first, first + count))
    with client.pipeline(transaction=False) as pipe:
        for ts in stamps:
            pipe.set(f"storyart:session:{ts}", tool_session(f"story-{ts}", ts, "t" * (size + 1)), ex=600)
        pipe.execute()
    return stamps


def test_the_work_of_a_round_is_bounded_and_many_keys_take_several_rounds(store: RedisStore, redis_db) -> None:
    first = now_ms() - 10_000
    stamps = plant(redis_db, 180, first)
    reconciler = Reconciler(store, Budget(keys=50, reads=40, bytes=1 << 30, rest=0))
    rounds = []
    while redis_db.zcard(INDEX_KEY) < 180:
        rounds.append(reconciler.round(lease_ms=5000))
        assert len(rounds) <= 8, rounds
    assert [r.indexed for r in rounds] == [50, 50, 50, 30], rounds  # 50 keys a round at most
    assert all(r.checked <= 50 for r in rounds)
    assert store.timestamps(Query(limit=100))[0] == 180
    while redis_db.hlen(FACETS_KEY) < 180:  # each key the index lacked is summarized, 40 a round at most
        rounds.append(reconciler.round(lease_ms=5000))
        assert len(rounds) <= 8, rounds
    assert all(r.recorded <= 40 for r in rounds) and len(rounds) >= 5
    assert store.timestamps(Query(story_uuid=f"story-{stamps[7]}")) == (1, [stamps[7]])


def test_the_bytes_read_in_a_round_are_bounded(store: RedisStore, redis_db) -> None:
    """Same-size rewrites are found by reading the sessions in full: at most about `Budget.bytes` a round."""
    first = now_ms() - 10_000
    stamps = plant(redis_db, 40, first, size=10_000)
    size = len(redis_db.get(f"storyart:session:{stamps[0]}"))
    reconciler = Reconciler(store, Budget(keys=1000, bytes=8 * size, rest=0))
    while redis_db.hlen(FACETS_KEY) < 40:
        assert reconciler.round(lease_ms=5000).read <= 8 * size + 2 * size  # the session crossing it, read twice
    for ts in stamps:  # the same size: the stored size tells nothing, only the bytes' hash does
        body = redis_db.get(f"storyart:session:{ts}")
        redis_db.set(f"storyart:session:{ts}", body.replace(b'"story-', b'"other-'), keepttl=True)
    rounds = []
    while sum(b'"other-' in facets for facets in redis_db.hvals(FACETS_KEY)) < 40:
        rounds.append(reconciler.round(lease_ms=5000))
        assert len(rounds) <= 20, rounds
    assert all(r.read <= 10 * size for r in rounds), rounds
    assert sum(r.recorded for r in rounds) == 40 and len(rounds) >= 40 * 2 * size // (10 * size)
    assert all(store.timestamps(Query(story_uuid=f"story-{ts}"))[0] == 0 for ts in stamps)


def test_a_pass_reading_every_session_rests_between_passes(store: RedisStore, redis_db) -> None:
    plant(redis_db, 5, now_ms() - 10_000)
    reconciler = Reconciler(store, Budget(rest=4))
    reads = [reconciler.round(lease_ms=5000).read for _ in range(9)]
    assert [bool(read) for read in reads] == [True, False, False, False, True, False, False, False, True], reads


def test_one_process_reconciles_at_a_time(store: RedisStore, redis_db, redis_server) -> None:
    plant(redis_db, 3, now_ms() - 10_000)
    other = RedisStore.from_config(dataclasses.replace(Config(), redis_url=redis_server.url))
    try:
        assert store.reconciler.round(lease_ms=5000).indexed == 3
        assert other.reconciler.round(lease_ms=5000) is None  # the lease is taken
        redis_db.delete(RECONCILER_KEY)  # its holder is gone: the lease expired
        assert other.reconciler.round(lease_ms=5000) is not None
        assert store.reconciler.round(lease_ms=5000) is None
    finally:
        other.close()


def test_a_session_rewritten_into_something_else_leaves_the_filters(store: RedisStore, redis_db) -> None:
    [ts] = plant(redis_db, 1, now_ms() - 10_000)
    reconciler = Reconciler(store, Budget(rest=0))
    reconciler.round(lease_ms=5000)
    assert store.timestamps(Query(story_uuid=f"story-{ts}")) == (1, [ts])
    redis_db.set(f"storyart:session:{ts}", b"[1,2,3]", keepttl=True)
    reconciler.round(lease_ms=5000)
    assert store.timestamps(Query(story_uuid=f"story-{ts}")) == (0, [])
    assert redis_db.get(f"storyart:meta:{ts}") is None  # no summary of what is no session
    assert redis_db.zscore(INDEX_KEY, f"storyart:session:{ts}") == ts  # still listed, and skipped, as before
    redis_db.delete(f"storyart:session:{ts}")
    reconciler.round(lease_ms=5000)
    assert redis_db.zcard(INDEX_KEY) == 0 and redis_db.hlen(FACETS_KEY) == 0  # gone: forgotten everywhere


@pytest.mark.slow
def test_a_backup_from_a_redis_refusing_writes_is_whole_or_refused(make_app, own_redis, tmp_path) -> None:
    """A full Redis (maxmemory, noeviction) cannot take the missing index entries: the backup still runs when
    none is missing, and refuses, naming why, when a key another tool wrote is not indexed."""
    redis_server = own_redis()
    app = make_app(redis_url=redis_server.url, redis_retry_interval=3600, backup_dir=tmp_path / "backups")
    client = app.test_client()
    saved = [client.post("/api/v1/session/save", data=session(f"saved-{i}"), headers=JSON).get_json()["timestamp"]
             for i in range(2)]
    tool = redis_server.client()
    runner = app.test_cli_runner()
    tool.config_set("maxmemory", 1)
    done = runner.invoke(args=["sessions", "backup", str(tmp_path / "full.zip")])
    assert done.exit_code == 0 and done.stdout.startswith("Backed up 2 session(s)"), done.output
    tool.config_set("maxmemory", 0)
    ts = saved[-1] + 1000
    tool.set(f"storyart:session:{ts}", tool_session("tool", ts), ex=600)
    tool.config_set("maxmemory", 1)
    done = runner.invoke(args=["sessions", "backup", str(tmp_path / "missing.zip")])
    assert done.exit_code == 1 and not (tmp_path / "missing.zip").exists(), done.output
    assert "1 session key(s) another tool wrote are not in the index, and Redis refuses to add them (" in done.output
    tool.config_set("maxmemory", 0)
    done = runner.invoke(args=["sessions", "backup", str(tmp_path / "whole.zip")])
    assert done.exit_code == 0 and done.stdout.startswith("Backed up 3 session(s)"), done.output
