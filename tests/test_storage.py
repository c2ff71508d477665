"""Storage (SPEC §2-§3): the public Redis layout read back with plain redis-py, TTLs, pruning, unique
timestamps under concurrency, and the bounded in-memory store."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import redis

from config import Config
from payload import Draft, parse_session
from storage import INDEX_KEY, MemoryStore, Query, RedisStore, StorageFull, build_storage, now_ms

DAY_MS = 86_400_000


def draft(text: str = "x", timestamp: int | None = None, **extra: object) -> Draft:
    body = {"scriptText": text, "episodeContext": "", "storyUuid": "s", "analyzedEpisode": {}, **extra}
    if timestamp is not None:
        body["timestamp"] = timestamp
    return parse_session(orjson.dumps(body), now_ms())


@pytest.fixture
def store(redis_server, redis_db) -> RedisStore:
    config = dataclasses.replace(Config(), redis_url=redis_server.url)
    redis_store = RedisStore.from_config(config)
    yield redis_store
    redis_store.close()


# ------------------------------------------------------------------------------------- the Redis layout


def test_redis_layout_is_the_public_contract(make_app, redis_server, redis_db: redis.Redis,
                                              session_1mb: bytes) -> None:
    """What other StoryArt tools do: GET + json.loads, ZRANGE index 0 0 REV, SCAN keeping two-colon keys."""
    client = make_app(redis_url=redis_server.url).test_client()
    stamps = [client.post("/api/v1/session/save", data=session_1mb, headers={"Content-Type": "application/json"})
              .get_json()["timestamp"] for _ in range(3)]
    newest = redis_db.zrange(INDEX_KEY, 0, 0, desc=True, withscores=True)
    assert newest == [(f"storyart:session:{stamps[-1]}".encode(), float(stamps[-1]))]
    raw = redis_db.get(f"storyart:session:{stamps[-1]}")
    assert redis_db.type(f"storyart:session:{stamps[-1]}") == b"string"
    assert json.loads(raw.decode("utf-8")) == {**json.loads(session_1mb), "timestamp": stamps[-1]}
    assert raw == session_1mb[:-1] + b',"timestamp":%d}' % stamps[-1]  # plain UTF-8 JSON, no compression
    session_keys = sorted(k.decode() for k in redis_db.scan_iter("storyart:session:*") if k.count(b":") == 2)
    assert session_keys == sorted(f"storyart:session:{ts}" for ts in stamps)
    assert all(k.count(b":") == 2 for k in redis_db.scan_iter("storyart:session:*"))
    ours = {INDEX_KEY, "storyart:sessions:expiry", "storyart:sessions:clock"} | {f"storyart:meta:{ts}" for ts in stamps}
    assert {k.decode() for k in redis_db.scan_iter("*")} - set(session_keys) == ours
    assert redis_db.zcard(INDEX_KEY) == 3


def test_every_write_has_the_ttl_counted_from_the_save(make_app, redis_server, redis_db) -> None:
    client = make_app(redis_url=redis_server.url, session_ttl_seconds=1000).test_client()
    year_ago = now_ms() - 365 * DAY_MS
    for body in ({}, {"timestamp": year_ago}):
        saved = client.post("/api/v1/session/save", headers={"Content-Type": "application/json"},
                            data=orjson.dumps({"scriptText": "a", "episodeContext": "", "storyUuid": "s",
                                               "analyzedEpisode": {}, **body})).get_json()
        ttl = redis_db.ttl(saved["sessionKey"])
        assert 990 <= ttl <= 1000, ttl


def test_session_database_comes_from_the_url(make_app, redis_server, redis_db) -> None:
    client = make_app(redis_url=redis_server.url.rsplit("/", 1)[0] + "/3").test_client()
    key = client.post("/api/v1/session/save", headers={"Content-Type": "application/json"},
                      data=orjson.dumps({"scriptText": "a", "episodeContext": "", "storyUuid": "s",
                                         "analyzedEpisode": {}})).get_json()["sessionKey"]
    assert redis_server.client(db=3).exists(key) and not redis_db.exists(key)


def test_expired_sessions_leave_the_index(store: RedisStore, redis_db: redis.Redis) -> None:
    old = store.save(draft("old"), now_ms(), ttl_ms=200)
    keeper = store.save(draft("keeper"), now_ms(), ttl_ms=60_000)
    time.sleep(0.4)
    assert redis_db.zcard(INDEX_KEY) == 2  # the key expired; its index member is still there
    store.save(draft("new"), now_ms(), ttl_ms=60_000)  # every save prunes what has expired
    members = {m.decode() for m in redis_db.zrange(INDEX_KEY, 0, -1)}
    assert f"storyart:session:{old}" not in members and f"storyart:session:{keeper}" in members
    assert redis_db.zcard("storyart:sessions:expiry") == 2


def test_reads_prune_index_members_whose_key_another_tool_deleted(store: RedisStore, redis_db) -> None:
    first = store.save(draft("first"), now_ms(), 60_000)
    second = store.save(draft("second"), now_ms(), 60_000)
    redis_db.delete(f"storyart:session:{second}")
    assert store.latest().timestamp == first
    redis_db.delete(f"storyart:session:{first}")
    assert store.page(Query()) == (0, [])
    assert redis_db.zcard(INDEX_KEY) == 0


def test_index_stays_bounded_under_churn(store: RedisStore, redis_db) -> None:
    for i in range(300):
        store.save(draft(f"s{i}"), now_ms(), ttl_ms=50)
        if i % 100 == 99:
            time.sleep(0.1)
    time.sleep(0.1)
    store.save(draft("last"), now_ms(), 60_000)
    assert redis_db.zcard(INDEX_KEY) <= 101


def test_sessions_written_by_the_original_service_are_read(store: RedisStore, redis_db) -> None:
    """The Node service wrote SETEX + ZADD and no expiry entry; we read and list them all the same."""
    ts = now_ms() - 1000
    body = orjson.dumps({"scriptText": "legacy", "timestamp": ts})
    redis_db.set(f"storyart:session:{ts}", body, ex=600)
    redis_db.zadd(INDEX_KEY, {f"storyart:session:{ts}": ts})
    assert store.latest().body == body
    assert store.get(ts).body == body
    assert store.page(Query())[0] == 1


# --------------------------------------------------------------------------------- unique timestamps


def test_same_millisecond_saves_from_200_threads_get_200_timestamps(store: RedisStore, redis_db) -> None:
    now = now_ms()
    with ThreadPoolExecutor(16) as pool:
        stamps = list(pool.map(lambda i: store.save(draft(f"s{i}"), now, 60_000), range(200)))
    assert len(set(stamps)) == 200
    for i, ts in enumerate(stamps):
        assert orjson.loads(store.get(ts).body) == {"scriptText": f"s{i}", "episodeContext": "", "storyUuid": "s",
                                               "analyzedEpisode": {}, "timestamp": ts}


def test_two_hosts_with_skewed_clocks_never_collide(store: RedisStore, redis_server) -> None:
    """A second store (another host) whose clock lags still gets fresh timestamps."""
    config = dataclasses.replace(Config(), redis_url=redis_server.url)
    other = RedisStore.from_config(config)
    now = now_ms()
    mine = [store.save(draft("a"), now, 60_000) for _ in range(5)]
    theirs = [other.save(draft("b"), now - 10, 60_000) for _ in range(5)]
    other.close()
    assert len(set(mine + theirs)) == 10 and min(theirs) > max(mine)


def test_assigned_timestamps_skip_ones_taken_by_a_client(store: RedisStore) -> None:
    now = now_ms()
    store.save(draft("client", timestamp=now), now, 60_000)
    assigned = store.save(draft("server"), now, 60_000)
    assert assigned != now
    assert orjson.loads(store.get(now).body)["scriptText"] == "client"


def test_write_back_of_a_clashing_assigned_timestamp_keeps_both(store: RedisStore) -> None:
    now = now_ms()
    store.save(draft("in redis", timestamp=now), now, 60_000)
    moved = store.save(draft("from memory", timestamp=now), now, 60_000, write_back="assigned")
    assert moved > now
    assert orjson.loads(store.get(now).body)["scriptText"] == "in redis"
    assert orjson.loads(store.get(moved).body)["scriptText"] == "from memory"
    assert orjson.loads(store.get(moved).body)["timestamp"] == moved
    same = store.save(draft("in redis", timestamp=now), now, 60_000, write_back="assigned")
    assert same == now  # identical content: nothing to move


def test_write_back_of_a_client_timestamp_lets_the_later_save_win(store: RedisStore) -> None:
    now = now_ms()
    store.save(draft("saved again after the outage", timestamp=now), now, 60_000)
    superseded = store.save(draft("older copy from memory", timestamp=now), now, 30_000, write_back="identity")
    assert superseded == 0
    assert orjson.loads(store.get(now).body)["scriptText"] == "saved again after the outage"
    newer = store.save(draft("newer copy from memory", timestamp=now), now, 90_000, write_back="identity")
    assert newer == now
    assert orjson.loads(store.get(now).body)["scriptText"] == "newer copy from memory"
    assert store.page(Query())[0] == 1


# ------------------------------------------------------------------------------------------ memory store


def test_memory_store_evicts_the_oldest_by_count(caplog) -> None:
    memory = MemoryStore(max_sessions=3, max_bytes=10**6)
    stamps = [memory.save(draft(f"s{i}"), now_ms(), 60_000) for i in range(5)]
    assert len(memory) == 3
    assert [row.timestamp for row in memory.page(Query(limit=10))[1]] == stamps[:1:-1]
    assert "evicted the 1 oldest" in caplog.text


def test_memory_store_evicts_the_oldest_by_bytes_not_the_last_saved() -> None:
    memory = MemoryStore(max_sessions=100, max_bytes=2000)
    newest = memory.save(draft("n" * 500), now_ms() + 10_000, 60_000)
    older = [memory.save(draft(f"{i}" * 500, timestamp=newest - 100 + i), now_ms(), 60_000) for i in range(3)]
    assert memory.nbytes <= 2000
    assert memory.get(newest) is not None and memory.get(older[0]) is None
    assert memory.latest().timestamp == newest


def test_memory_store_without_eviction_refuses_instead_of_dropping() -> None:
    memory = MemoryStore(max_sessions=2, max_bytes=10**6, evict=False)
    kept = [memory.save(draft(f"s{i}"), now_ms(), 60_000) for i in range(2)]
    with pytest.raises(StorageFull):
        memory.save(draft("third"), now_ms(), 60_000)
    assert all(memory.get(ts) for ts in kept)


def test_memory_store_refuses_a_session_larger_than_its_byte_cap() -> None:
    memory = MemoryStore(max_sessions=10, max_bytes=1024)
    with pytest.raises(StorageFull):
        memory.save(draft("x" * 2000), now_ms(), 60_000)
    assert len(memory) == 0


def test_memory_store_honours_the_ttl() -> None:
    memory = MemoryStore()
    gone = memory.save(draft("short"), now_ms(), ttl_ms=100)
    kept = memory.save(draft("long"), now_ms(), ttl_ms=60_000)
    time.sleep(0.2)
    assert memory.get(gone) is None
    assert memory.page(Query(limit=10))[0] == 1 and memory.latest().timestamp == kept
    memory.save(draft("another"), now_ms(), 60_000)
    assert len(memory) == 2  # the expired one was purged, not just hidden


def test_memory_store_expiry_follows_the_latest_save_of_a_timestamp() -> None:
    memory = MemoryStore()
    now = now_ms()
    ts = memory.save(draft("first"), now, ttl_ms=100)
    memory.save(draft("again", timestamp=ts), now, ttl_ms=60_000)  # re-sync: the TTL starts again
    memory.save(draft("short"), now, ttl_ms=100)
    time.sleep(0.2)
    memory.save(draft("trigger"), now_ms(), 60_000)
    assert memory.get(ts) is not None and len(memory) == 2
    for _ in range(300):  # replacing the same session many times keeps its bookkeeping bounded
        memory.save(draft("again", timestamp=ts), now_ms(), 60_000)
    assert len(memory._expiry) <= 2 * len(memory) + 65


def test_memory_store_pages_newest_first_at_any_offset() -> None:
    memory = MemoryStore(max_sessions=1000, max_bytes=10**8)
    now = now_ms()
    stamps = [memory.save(draft(f"s{i}"), now, 60_000) for i in range(50)]
    newest_first = stamps[::-1]
    for offset, limit in ((0, 20), (15, 20), (45, 20), (49, 1), (50, 5), (500, 5)):
        total, rows = memory.page(Query(offset=offset, limit=limit))
        assert total == 50 and [r.timestamp for r in rows] == newest_first[offset : offset + limit]


def test_memory_store_is_thread_safe() -> None:
    memory = MemoryStore(max_sessions=10_000, max_bytes=10**8)
    now = now_ms()
    with ThreadPoolExecutor(16) as pool:
        stamps = list(pool.map(lambda i: memory.save(draft(f"s{i}"), now, 60_000), range(2000)))
    assert len(set(stamps)) == 2000 and len(memory) == 2000
    assert memory.nbytes == sum(len(memory.get(ts).body) for ts in stamps)


def test_memory_only_mode_reports_and_bounds(make_app, caplog) -> None:
    caplog.set_level(logging.WARNING)
    app = make_app(memory_max_sessions=2)
    client = app.test_client()
    for i in range(4):
        saved = client.post("/api/v1/session/save", headers={"Content-Type": "application/json"},
                            data=orjson.dumps({"scriptText": f"s{i}", "episodeContext": "", "storyUuid": "s",
                                               "analyzedEpisode": {}})).get_json()
        assert saved["storage"] == "memory"
    listed = client.get("/api/v1/session/list").get_json()
    assert listed["total"] == 2 and [s["scriptText"] for s in listed["sessions"]] == ["s3", "s2"]
    assert "evicted" in caplog.text


def test_a_session_that_fits_nowhere_is_503_with_retry_after(make_app) -> None:
    from servers import free_port

    app = make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0", memory_max_bytes=1024)
    got = app.test_client().post("/api/v1/session/save", headers={"Content-Type": "application/json"},
                                 data=orjson.dumps({"scriptText": "x" * 5000, "episodeContext": "",
                                                    "storyUuid": "s", "analyzedEpisode": {}}))
    assert got.status_code == 503 and got.headers["Retry-After"].isdigit()
    assert got.get_json()["success"] is False and "retry" in got.get_json()["error"]


def test_build_storage_configures_the_module_level_store() -> None:
    import storage

    config = dataclasses.replace(Config(), memory_max_sessions=7, memory_max_bytes=4096)
    built = build_storage(config)
    assert built.memory is storage.MEMORY
    assert (storage.MEMORY.max_sessions, storage.MEMORY.max_bytes, storage.MEMORY.evict) == (7, 4096, True)


def test_concurrent_saves_through_the_app_are_distinct(make_app, redis_server, redis_db) -> None:
    app = make_app(redis_url=redis_server.url)
    barrier = threading.Barrier(20)

    def one(i: int) -> int:
        client = app.test_client()
        barrier.wait()
        return client.post("/api/v1/session/save", headers={"Content-Type": "application/json"},
                           data=orjson.dumps({"scriptText": f"s{i}", "episodeContext": "", "storyUuid": "s",
                                              "analyzedEpisode": {}})).get_json()["timestamp"]

    with ThreadPoolExecutor(20) as pool:
        stamps = list(pool.map(one, range(200)))
    assert len(set(stamps)) == 200 and redis_db.zcard(INDEX_KEY) == 200


def test_memory_store_replacing_a_session_when_full_keeps_its_books_straight() -> None:
    """Re-saving a client timestamp with a bigger body when memory is full evicts others, never itself."""
    memory = MemoryStore(max_sessions=10, max_bytes=2000)
    first = memory.save(draft("a" * 500, timestamp=now_ms() - 10), now_ms(), 60_000)
    second = memory.save(draft("b" * 500), now_ms(), 60_000)
    memory.save(draft("A" * 1500, timestamp=first), now_ms(), 60_000)
    assert memory.get(second) is None and memory.get(first).body.count(b"A" * 1500) == 1
    assert memory.nbytes == len(memory.get(first).body) and memory.page(Query())[0] == 1
    assert memory.latest().timestamp == first
    assert memory.delete(first) and len(memory) == 0 and memory.nbytes == 0


def test_memory_store_refused_replacement_keeps_the_old_copy() -> None:
    memory = MemoryStore(max_sessions=10, max_bytes=2000, evict=False)
    ts = memory.save(draft("a" * 500, timestamp=now_ms() - 10), now_ms(), 60_000)
    memory.save(draft("b" * 500), now_ms(), 60_000)
    with pytest.raises(StorageFull):
        memory.save(draft("A" * 1500, timestamp=ts), now_ms(), 60_000)
    assert memory.get(ts).body.count(b"a" * 500) == 1 and len(memory) == 2


def test_latest_and_list_look_past_any_number_of_expired_sessions(store: RedisStore, redis_db) -> None:
    now = now_ms()
    live = [store.save(draft(f"live {i}", timestamp=now - 100_000 + i), now, 60_000) for i in range(5)]
    for i in range(260):  # newer timestamps, all expiring at once
        store.save(draft(f"short {i}"), now_ms(), ttl_ms=150)
    time.sleep(0.3)
    assert store.latest().timestamp == live[-1]
    total, rows = store.page(Query(limit=20))
    assert total == 5 and [r.timestamp for r in rows] == live[::-1]
    assert redis_db.zcard(INDEX_KEY) == 5


def test_list_pages_are_full_even_past_members_another_tool_deleted(store: RedisStore, redis_db) -> None:
    stamps = [store.save(draft(f"s{i}"), now_ms(), 60_000) for i in range(30)]
    for ts in stamps[-25:-5]:  # 20 keys deleted behind the service's back, index entries left
        redis_db.delete(f"storyart:session:{ts}")
    total, rows = store.page(Query(limit=10))
    assert total == 10 and [r.timestamp for r in rows] == stamps[-1:-6:-1] + stamps[-26:-31:-1]


def test_a_delete_during_write_back_is_not_undone(redis_server, redis_db) -> None:
    """The race from review: write-back took its snapshot, then a DELETE removed the session everywhere;
    the write-back must not put it back into Redis."""
    import storage as storage_module

    config = dataclasses.replace(Config(), redis_url=redis_server.url, redis_retry_interval=60)
    memory = MemoryStore(evict=False)
    sessions = storage_module.SessionStorage(memory, RedisStore.from_config(config), 600, 60)
    redis_server.kill()
    doomed, kept = (sessions.save(draft(name))[0] for name in ("doomed", "kept"))
    redis_server.start()
    sessions._redis_down = False  # what the retry thread does once Redis answers again
    snapshot = memory.snapshot

    def snapshot_then_delete():
        taken = snapshot()
        assert sessions.delete(doomed)
        return taken

    memory.snapshot = snapshot_then_delete
    assert sessions.write_back() == 1
    memory.snapshot = snapshot
    assert sessions.get(doomed) is None and not redis_db.exists(f"storyart:session:{doomed}")
    assert sessions.get(kept).storage == "redis"
    sessions.close()


def test_a_timestamp_redis_assigned_is_never_assigned_again_from_memory(redis_server, redis_db) -> None:
    """Saves to Redis, then Redis goes away within the same millisecond: memory must not reuse the number
    (write-back would then find another session under it; found by the soak)."""
    import storage as storage_module

    config = dataclasses.replace(Config(), redis_url=redis_server.url, redis_retry_interval=60)
    memory = MemoryStore(evict=False)
    sessions = storage_module.SessionStorage(memory, RedisStore.from_config(config), 600, 60)
    frozen = now_ms() + 60_000  # every save below happens "in the same millisecond"
    storage_module.now_ms, real_now = (lambda: frozen), storage_module.now_ms
    try:
        in_redis = [sessions.save(draft(f"r{i}"))[0] for i in range(3)]
        redis_server.kill()
        in_memory = [sessions.save(draft(f"m{i}"))[0] for i in range(3)]
    finally:
        storage_module.now_ms = real_now
        redis_server.start()
    assert len(set(in_redis + in_memory)) == 6 and min(in_memory) > max(in_redis)
    sessions.close()


def test_two_hosts_in_the_same_millisecond_get_distinct_reserved_timestamps(redis_server, redis_db) -> None:
    """Each host reserves in its own clock; Redis refuses a reserved number already taken and the host
    reserves the next, so every number Redis hands out was reserved first (none can be reused from memory)."""
    import storage as storage_module

    config = dataclasses.replace(Config(), redis_url=redis_server.url, redis_retry_interval=60)
    hosts = [storage_module.SessionStorage(MemoryStore(), RedisStore.from_config(config), 600, 60) for _ in range(2)]
    frozen = now_ms() + 60_000
    storage_module.now_ms, real_now = (lambda: frozen), storage_module.now_ms
    try:
        stamps = [host.save(draft(f"h{i}-{n}"))[0] for n in range(3) for i, host in enumerate(hosts)]
    finally:
        storage_module.now_ms = real_now
    assert len(set(stamps)) == 6 and redis_db.zcard(INDEX_KEY) == 6
    assert store_refuses_a_taken_exact_timestamp(hosts[0].redis, stamps[0])
    for host in hosts:
        host.close()


def store_refuses_a_taken_exact_timestamp(store: RedisStore, taken: int) -> bool:
    return store.save(draft("late"), taken, 60_000, exact=True) == 0
