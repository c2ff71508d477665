"""Storage: the public Redis layout read back with plain redis-py and its pruning; then one contract suite run
against every backend (Redis, SQLite, memory), the local stores' caps, and the failover's own rules."""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import redis

import backup
import storage as storage_module
import stores.redis as redis_module
from allocator import Allocator, Slot, now_ms
from config import Config
from payload import Draft, parse_session
from servers import wait_for
from storage import (
    EVERY,
    Query,
    RedisState,
    SessionStorage,
    StorageFull,
    StorageUnavailable,
    WhenFull,
    build_storage,
    session_key,
)
from stores.base import Limits, LocalStore, Origin, Outcome, Record, SessionStore
from stores.memory import MemoryStore
from stores.redis import INDEX_KEY, RedisStore
from stores.sqlite import SqliteStore

DAY_MS = 86_400_000


def draft(text: str = "x", timestamp: int | None = None, **extra: object) -> Draft:
    body = {"scriptText": text, "episodeContext": "", "storyUuid": "s", "analyzedEpisode": {}, **extra}
    if timestamp is not None:
        body["timestamp"] = timestamp
    return parse_session(orjson.dumps(body), now_ms())


ALLOCATOR = Allocator()  # what SessionStorage does: a fresh proposal for every save


def page(store: SessionStore, query: Query, summaries: bool = False) -> tuple[int, list]:
    """What SessionStorage does for a list: the page's timestamps first, then their rows."""
    total, stamps = store.timestamps(query)
    return total, store.rows(stamps[query.offset :], summaries)


def put(store: SessionStore, d: Draft, ttl_ms: int = 60_000, now: int | None = None) -> int:
    now = now_ms() if now is None else now
    return store.save(d, now=now, ttl_ms=ttl_ms, proposal=ALLOCATOR.propose(now))


@pytest.fixture(params=["small bodies", "large bodies"])
def body_sizes(request: pytest.FixtureRequest, monkeypatch) -> None:
    """Run a Redis test twice; with "large bodies" every body takes the path of a large one (staged by a SET and
    renamed by the save script, fetched by a GET after `latest`'s script), whatever its size."""
    if request.param == "large bodies":
        monkeypatch.setattr(redis_module, "INLINE_BODY_MAX", -1)


@pytest.fixture
def redis_store(redis_server, redis_db) -> RedisStore:
    config = dataclasses.replace(Config(), redis_url=redis_server.url)
    store = RedisStore.from_config(config)
    yield store
    store.close()


@pytest.fixture(params=["redis", "sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path) -> SessionStore:
    """Every backend, for the contract below: what one does, all do."""
    if request.param == "redis":
        yield request.getfixturevalue("redis_store")
        return
    limits = Limits(100_000, 1 << 30)
    local = SqliteStore.open(tmp_path / "s.sqlite3", limits) if request.param == "sqlite" else MemoryStore(limits)
    yield local
    local.close()


@pytest.fixture(params=["sqlite", "memory"])
def local_kind(request: pytest.FixtureRequest, tmp_path) -> Callable[[Limits], LocalStore]:
    """Make a local store of each kind with the given limits."""
    made: list[LocalStore] = []

    def make(limits: Limits) -> LocalStore:
        store = SqliteStore.open(tmp_path / f"l{len(made)}.sqlite3", limits) if request.param == "sqlite" \
            else MemoryStore(limits)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


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
    ours |= {k.decode() for k in redis_db.scan_iter("storyart:save:*")}
    assert len(ours) == 3 + 2 * len(stamps)  # one save id per save
    ours |= {"storyart:sessions:facets"} | {k.decode() for k in redis_db.scan_iter("storyart:sessions:story:*")}
    ours |= {k.decode() for k in redis_db.scan_iter("storyart:sessions:episode:*")}
    ours |= {"storyart:sessions:acked"}  # when each copy was acknowledged: a hash beside the session keys
    assert len(ours) == 7 + 2 * len(stamps)  # the list filters' facets: one story, one episode
    assert sorted(int(ts) for ts in redis_db.hkeys("storyart:sessions:acked")) == sorted(stamps)
    ours |= {k.decode() for k in redis_db.scan_iter("storyart:sessions:reconciler")}  # once a round has run
    ours |= {"storyart:activity"}  # the default user's activity log: one event per save
    assert redis_db.zcard("storyart:activity") == len(stamps)
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


def test_expired_sessions_leave_the_index(redis_store: RedisStore, redis_db: redis.Redis) -> None:
    old = put(redis_store, draft("old"), 200)
    keeper = put(redis_store, draft("keeper"), 60_000)
    time.sleep(0.4)
    assert redis_db.zcard(INDEX_KEY) == 2  # the key expired; its index member is still there
    put(redis_store, draft("new"), 60_000)  # every save prunes what has expired
    members = {m.decode() for m in redis_db.zrange(INDEX_KEY, 0, -1)}
    assert f"storyart:session:{old}" not in members and f"storyart:session:{keeper}" in members
    assert redis_db.zcard("storyart:sessions:expiry") == 2


def test_reads_prune_index_members_whose_key_another_tool_deleted(redis_store: RedisStore, redis_db) -> None:
    first = put(redis_store, draft("first"), 60_000)
    second = put(redis_store, draft("second"), 60_000)
    redis_db.delete(f"storyart:session:{second}")
    assert redis_store.latest().timestamp == first
    redis_db.delete(f"storyart:session:{first}")
    assert page(redis_store, Query()) == (0, [])
    assert redis_db.zcard(INDEX_KEY) == 0


def test_index_stays_bounded_under_churn(redis_store: RedisStore, redis_db) -> None:
    for i in range(300):
        put(redis_store, draft(f"s{i}"), 50)
        if i % 100 == 99:
            time.sleep(0.1)
    time.sleep(0.1)
    put(redis_store, draft("last"), 60_000)
    assert redis_db.zcard(INDEX_KEY) <= 101


def test_sessions_written_by_the_original_service_are_read(redis_store: RedisStore, redis_db) -> None:
    """The Node service wrote SETEX + ZADD and no expiry entry; we read and list them all the same."""
    ts = now_ms() - 1000
    body = orjson.dumps({"scriptText": "legacy", "timestamp": ts})
    redis_db.set(f"storyart:session:{ts}", body, ex=600)
    redis_db.zadd(INDEX_KEY, {f"storyart:session:{ts}": ts})
    assert redis_store.latest().body == body
    assert redis_store.get(ts).body == body
    assert page(redis_store, Query())[0] == 1



# ------------------------------------------------------------------ the contract: every backend, same answers


def body_of(stored) -> dict:
    return orjson.loads(stored.body)


def test_interface_is_uniform() -> None:
    """Every backend implements every operation of the interface with the interface's own signature, and the
    two local stores add the same failover operations: a caller never needs to know which one it holds."""
    import inspect

    def public(cls: type) -> dict[str, list[tuple[str, object, object]]]:
        return {name: [(p.name, p.kind, p.default) for p in inspect.signature(getattr(cls, name)).parameters.values()]
                for name in dir(cls)
                if not name.startswith("_") and callable(getattr(cls, name)) and name not in ("open", "from_config")}

    for backend in (RedisStore, SqliteStore, MemoryStore):
        assert not getattr(backend, "__abstractmethods__", None), backend
        for name, signature in public(SessionStore).items():
            assert public(backend)[name] == signature, (backend.__name__, name)
    for backend in (SqliteStore, MemoryStore):
        for name, signature in public(LocalStore).items():
            assert public(backend)[name] == signature, (backend.__name__, name)


class TestContract:
    """cachelib-style: one suite, run against Redis, SQLite and memory through the `store` fixture."""

    def test_a_session_reads_back_byte_for_byte(self, store: SessionStore, session_1mb: bytes) -> None:
        d = parse_session(session_1mb, now_ms())
        ts = put(store, d)
        assert store.get(ts).body == session_1mb[:-1] + b',"timestamp":%d}' % ts
        assert store.latest().timestamp == ts and store.exists(ts)
        assert orjson.loads(store.get(ts).summary)["sizeBytes"] == len(store.get(ts).body)

    def test_a_client_timestamp_is_kept_and_a_resave_replaces(self, store: SessionStore) -> None:
        ts = now_ms() - 5000
        assert put(store, draft("first", timestamp=ts)) == ts
        assert put(store, draft("second", timestamp=ts)) == ts
        assert body_of(store.get(ts))["scriptText"] == "second" and page(store, Query())[0] == 1

    def test_200_threads_in_one_millisecond_get_200_timestamps(self, store: SessionStore) -> None:
        now = now_ms()
        with ThreadPoolExecutor(16) as pool:
            stamps = list(pool.map(lambda i: store.save(draft(f"s{i}"), now=now, ttl_ms=60_000, proposal=now),
                                   range(200)))
        assert len(set(stamps)) == 200
        assert all(body_of(store.get(ts)) == {"scriptText": f"s{i}", "episodeContext": "", "storyUuid": "s",
                                              "analyzedEpisode": {}, "timestamp": ts}
                   for i, ts in enumerate(stamps))

    def test_assigned_timestamps_skip_taken_ones_and_follow_the_proposal(self, store: SessionStore) -> None:
        now = now_ms()
        for offset in range(3):
            put(store, draft("client", timestamp=now + offset))
        assigned = store.save(draft("service"), now=now, ttl_ms=60_000, proposal=now)
        assert assigned == now + 3  # one call, however many are taken
        assert store.save(draft("later"), now=now, ttl_ms=60_000, proposal=now + 100) == now + 100
        # saves reach a store in any order: a proposal a little behind the last assignment is used as it is
        assert store.save(draft("overtaken"), now=now, ttl_ms=60_000, proposal=now + 50) == now + 50
        # a proposal far behind (a host whose clock lags) continues after the last assignment instead
        assert store.save(draft("lagging"), now=now, ttl_ms=60_000, proposal=now - 5000) == now + 101

    def test_latest_is_the_newest_timestamp(self, store: SessionStore) -> None:
        now = now_ms()
        put(store, draft("new", timestamp=now - 10))
        put(store, draft("old", timestamp=now - 20))
        assert body_of(store.latest())["scriptText"] == "new"

    def test_pages_newest_first_at_any_offset(self, store: SessionStore) -> None:
        base = now_ms() - 100_000
        stamps = [put(store, draft(f"s{i}", timestamp=base + i)) for i in range(30)]
        newest_first = stamps[::-1]
        for offset, limit in ((0, 20), (15, 20), (29, 1), (30, 5), (500, 5)):
            total, rows = page(store, Query(offset=offset, limit=limit))
            assert total == 30 and [r.timestamp for r in rows] == newest_first[offset : offset + limit]
        total, rows = page(store, Query(since=base + 10, until=base + 12))
        assert total == 3 and [r.timestamp for r in rows] == [base + 12, base + 11, base + 10]
        assert [r.timestamp for r in page(store, Query(before=base + 5, limit=2))[1]] == [base + 4, base + 3]
        assert store.timestamps(Query(offset=2, limit=3)) == (30, newest_first[:5])

    def test_filters_and_summaries(self, store: SessionStore) -> None:
        base = now_ms() - 100_000
        for i in range(6):
            put(store, draft(f"s{i}", timestamp=base + i, storyUuid=f"story-{i % 2}",
                             analyzedEpisode={"episodeNumber": i % 3, "title": f"Pilot {i}", "scenes": []}))
        total, rows = page(store, Query(story_uuid="story-1"), summaries=True)
        assert total == 3 and [orjson.loads(r.body)["title"] for r in rows] == ["Pilot 5", "Pilot 3", "Pilot 1"]
        assert page(store, Query(episode="2", text="pilot"))[0] == 2
        assert [r.timestamp for r in page(store, Query(text="PILOT 4"))[1]] == [base + 4]

    def test_rows_come_back_in_the_order_asked_without_the_missing(self, store: SessionStore) -> None:
        base = now_ms() - 100_000
        for i in range(3):
            put(store, draft(f"s{i}", timestamp=base + i))
        rows = store.rows([base + 2, base + 7, base], summaries=False)
        assert [r.timestamp for r in rows] == [base + 2, base]
        assert orjson.loads(store.rows([base + 1], summaries=True)[0].body)["sizeBytes"] > 0

    def test_delete(self, store: SessionStore) -> None:
        ts = put(store, draft("doomed"))
        assert store.delete(ts) and not store.delete(ts)
        assert store.get(ts) is None and store.latest() is None and page(store, Query()) == (0, [])

    def test_the_ttl_is_honoured(self, store: SessionStore) -> None:
        gone = put(store, draft("short"), ttl_ms=100)
        kept = put(store, draft("long"))
        time.sleep(0.25)
        assert store.get(gone) is None and not store.exists(gone)
        assert store.latest().timestamp == kept and page(store, Query())[0] == 1

    def test_latest_and_list_look_past_many_expired_sessions(self, store: SessionStore) -> None:
        now = now_ms()
        live = [put(store, draft(f"live {i}", timestamp=now - 100_000 + i)) for i in range(5)]
        for i in range(120):  # newer timestamps, all expiring at once
            put(store, draft(f"short {i}"), ttl_ms=150)
        time.sleep(0.3)
        assert store.latest().timestamp == live[-1]
        total, rows = page(store, Query(limit=20))
        assert total == 5 and [r.timestamp for r in rows] == live[::-1]

    def test_a_pinned_session_outlives_its_ttl_and_unpinning_restarts_it(self, store: SessionStore) -> None:
        kept = put(store, draft("keep"), ttl_ms=150)
        resaved = put(store, draft("keep too", timestamp=now_ms() - 1000), ttl_ms=150)
        assert store.pin(kept, True, now=now_ms(), ttl_ms=150) and store.pin(resaved, True, now=now_ms(), ttl_ms=150)
        put(store, draft("saved again, still pinned", timestamp=resaved), ttl_ms=150)
        assert not store.pin(kept + 999, True, now=now_ms(), ttl_ms=150)  # no such session
        time.sleep(0.3)
        assert store.get(kept).pinned and body_of(store.get(resaved))["scriptText"] == "saved again, still pinned"
        assert [r.pinned for r in page(store, Query(), summaries=True)[1]] == [True, True]
        unpinned = now_ms()
        assert store.pin(kept, False, now=unpinned, ttl_ms=1500)  # long enough for a busy machine to look
        assert store.pin(resaved, False, now=now_ms(), ttl_ms=60_000)
        assert not store.get(kept).pinned and page(store, Query())[0] == 2  # the TTL counts from the unpin
        wait_for(lambda: store.get(kept) is None, "the unpinned session's expiry", timeout=10)
        assert now_ms() >= unpinned + 1500 - 5  # not before its TTL from the unpin
        assert store.get(kept) is None and store.get(resaved) is not None
        assert store.pin(resaved, False, now=now_ms(), ttl_ms=1)  # not pinned: nothing changes ...
        time.sleep(0.05)
        assert store.get(resaved) is not None  # ... its expiry included

    def test_no_ttl_means_no_expiry(self, store: SessionStore) -> None:
        ts = put(store, draft("forever"), ttl_ms=0)
        assert store.get(ts) is not None and not store.get(ts).pinned
        assert store.pin(ts, True, now=now_ms(), ttl_ms=0) and store.pin(ts, False, now=now_ms(), ttl_ms=0)
        time.sleep(0.05)
        assert store.get(ts) is not None and store.latest().timestamp == ts


# ------------------------------------------------------------------------------------- the local stores


def test_pinned_sessions_are_never_evicted_and_a_store_full_of_them_refuses(local_kind) -> None:
    local = local_kind(Limits(3, 10**6, WhenFull.EVICT_OLDEST))
    base = now_ms() - 10_000
    stamps = [put(local, draft(f"s{i}", timestamp=base + i)) for i in range(3)]
    assert local.pin(stamps[0], True, now=now_ms(), ttl_ms=60_000)
    newer = put(local, draft("newer"))  # the oldest unpinned one makes room
    assert local.get(stamps[0]) is not None and local.get(stamps[1]) is None
    for ts in (stamps[2], newer):
        local.pin(ts, True, now=now_ms(), ttl_ms=60_000)
    with pytest.raises(StorageFull):
        put(local, draft("no room"))
    assert sorted(row.timestamp for row in page(local, Query())[1]) == [stamps[0], stamps[2], newer]


def test_a_full_local_store_evicts_the_oldest_when_it_is_the_only_store(local_kind, caplog) -> None:
    local = local_kind(Limits(3, 10**6, WhenFull.EVICT_OLDEST))
    stamps = [put(local, draft(f"s{i}")) for i in range(5)]
    assert local.count()[0] == 3
    assert [row.timestamp for row in page(local, Query(limit=10))[1]] == stamps[:1:-1]
    assert "evicted the 1 oldest" in caplog.text


def test_a_full_local_store_evicts_by_bytes_never_the_one_being_saved(local_kind) -> None:
    local = local_kind(Limits(100, 2000, WhenFull.EVICT_OLDEST))
    newest = put(local, draft("n" * 500), now=now_ms() + 10_000)
    older = [put(local, draft(f"{i}" * 500, timestamp=newest - 100 + i)) for i in range(3)]
    assert local.count()[1] <= 2000
    assert local.get(newest) is not None and local.get(older[0]) is None
    assert local.latest().timestamp == newest


def test_a_local_store_of_pending_sessions_refuses_instead_of_dropping(local_kind) -> None:
    local = local_kind(Limits(2, 10**6, WhenFull.REFUSE))
    kept = [put(local, draft(f"s{i}")) for i in range(2)]
    with pytest.raises(StorageFull):
        put(local, draft("third"))
    assert all(local.get(ts) for ts in kept) and local.count()[0] == 2
    ts = kept[0]
    with pytest.raises(StorageFull):  # a bigger replacement that does not fit keeps the old copy
        local.save(draft("A" * 2_000_000, timestamp=ts), now=now_ms(), ttl_ms=60_000, proposal=0)
    assert body_of(local.get(ts))["scriptText"] == "s0"


def test_a_session_larger_than_the_byte_cap_is_refused(local_kind) -> None:
    local = local_kind(Limits(10, 1024))
    with pytest.raises(StorageFull):
        put(local, draft("x" * 2000))
    assert local.count() == (0, 0)


def test_replacing_a_session_when_full_keeps_the_books_straight(local_kind) -> None:
    local = local_kind(Limits(10, 2000))
    first = put(local, draft("a" * 500, timestamp=now_ms() - 10))
    second = put(local, draft("b" * 500))
    put(local, draft("A" * 1500, timestamp=first))
    assert local.get(second) is None and local.get(first).body.count(b"A" * 1500) == 1
    assert local.count() == (1, len(local.get(first).body))
    assert local.delete(first) and local.count() == (0, 0)


def test_expired_sessions_are_purged_not_just_hidden(local_kind) -> None:
    local = local_kind(Limits())
    put(local, draft("short"), ttl_ms=100)
    put(local, draft("long"))
    time.sleep(0.2)
    put(local, draft("another"))
    assert local.count()[0] == 2


def test_oldest_and_exclusive_are_what_a_write_back_walks(local_kind) -> None:
    local = local_kind(Limits())
    now = now_ms()
    put(local, draft("client", timestamp=now - 50))
    assigned = put(local, draft("service"))
    oldest = local.oldest()
    assert isinstance(oldest, Record) and oldest.timestamp == now - 50 and oldest.origin is Origin.CLIENT
    assert oldest.draft.render(oldest.timestamp) == oldest.body
    with local.exclusive():
        assert local.delete(oldest.timestamp)
    assert local.oldest().origin is Origin.SERVICE and local.oldest().timestamp == assigned


def test_each_copy_keeps_when_it_was_acknowledged(local_kind) -> None:
    """What orders a pending copy against Redis's: the time of its save, after the copy it replaced even when
    the clock stepped back; a pin or an unpin is not a save and changes nothing."""
    local = local_kind(Limits())
    now = now_ms()
    ts = put(local, draft("v0", timestamp=now - 50), now=now)
    assert local.oldest().acked == now
    put(local, draft("v1", timestamp=ts), now=now - 5_000)  # the clock stepped back
    assert local.oldest().acked == now + 1
    assert local.pin(ts, True, now=now + 10, ttl_ms=60_000) and local.pin(ts, False, now=now + 20, ttl_ms=60_000)
    assert local.oldest().acked == now + 1


def test_build_storage_uses_the_configured_local_store(tmp_path) -> None:
    from stores import memory as store_memory

    config = dataclasses.replace(Config(), local_store="memory", local_max_sessions=7, local_max_bytes=4096)
    built = build_storage(config)
    assert built.local is store_memory.MEMORY and built.local.limits == Limits(7, 4096, WhenFull.EVICT_OLDEST)
    path = tmp_path / "deep" / "er" / "s.sqlite3"
    built = build_storage(dataclasses.replace(Config(), local_store_path=path, redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(built.local, SqliteStore) and path.is_file()
    assert built.local.limits.when_full is WhenFull.REFUSE
    built.close()


# ----------------------------------------------------------------------------------------- the failover


def failover(redis_server, local: LocalStore, retry: float = 60) -> SessionStorage:
    config = dataclasses.replace(Config(), redis_url=redis_server.url, redis_retry_interval=retry)
    return SessionStorage(local, RedisStore.from_config(config), 600, retry)


@pytest.fixture
def pending_store(tmp_path) -> SqliteStore:
    store = SqliteStore.open(tmp_path / "pending.sqlite3", Limits(1000, 1 << 30, WhenFull.REFUSE))
    yield store
    store.close()


def test_write_back_moves_each_session_once_with_its_timestamp(redis_server, redis_db, pending_store) -> None:
    sessions = failover(redis_server, pending_store)
    redis_server.kill()
    stamps = [sessions.save(draft(f"p{i}"))[0] for i in range(5)]
    redis_server.start()
    other = failover(redis_server, SqliteStore.open(pending_store.path, pending_store.limits))  # another worker
    assert sessions.recover() + other.recover() == 5
    assert sorted(int(m.rsplit(b":", 1)[1]) for m in redis_db.zrange(INDEX_KEY, 0, -1)) == sorted(stamps)
    assert pending_store.count() == (0, 0)
    assert all(sessions.get(ts).storage == "redis" for ts in stamps)
    other.close()
    sessions.close()


def test_a_delete_during_write_back_is_not_undone(redis_server, redis_db, pending_store) -> None:
    """A DELETE that arrives while a write-back is moving the same session waits for the move, then deletes
    the session from Redis too: it never comes back."""
    sessions = failover(redis_server, pending_store)
    redis_server.kill()
    doomed, kept = (sessions.save(draft(name))[0] for name in ("doomed", "kept"))
    redis_server.start()
    deleting = threading.Thread(target=sessions.delete, args=(doomed,))
    real_write_back = sessions.redis.write_back

    def slow_write_back(record, now):
        moved = real_write_back(record, now=now)
        if record.timestamp == doomed:
            deleting.start()  # the delete arrives right now, while this move holds the local store
            time.sleep(0.3)
        return moved

    sessions.redis.write_back = slow_write_back
    assert sessions.recover() == 2
    deleting.join()
    assert sessions.get(doomed) is None and not redis_db.exists(f"storyart:session:{doomed}")
    assert sessions.get(kept).storage == "redis"
    sessions.close()


def test_pins_reach_every_store_or_none(redis_server, redis_db, pending_store) -> None:
    """A pin needs Redis, like a delete; a pending copy that was pinned is written back pinned, one that was not
    leaves Redis's pin alone."""
    sessions = failover(redis_server, pending_store)
    in_redis = sessions.save(draft("in redis"))[0]
    assert sessions.pin(in_redis, True)
    assert redis_db.pttl(f"storyart:session:{in_redis}") == -1 and redis_db.pttl(f"storyart:meta:{in_redis}") == -1
    redis_db.save()  # the restart below loads it back: an outage, not a loss
    redis_server.kill()
    with pytest.raises(storage_module.StorageUnavailable):
        sessions.pin(in_redis, False)
    resaved = sessions.save(draft("saved again while Redis was away", timestamp=in_redis))
    assert resaved == (in_redis, "memory") and not pending_store.get(in_redis).pinned
    redis_server.start()
    sessions.recover()
    assert sessions.get(in_redis).pinned and sessions.get(in_redis).storage == "redis"
    assert redis_db.pttl(f"storyart:session:{in_redis}") == -1
    assert sessions.pin(in_redis, False) and 0 < redis_db.pttl(f"storyart:session:{in_redis}") <= 600_000
    assert not redis_db.sismember("storyart:sessions:pinned", f"storyart:session:{in_redis}")
    # pinned while pending (Redis answered the pin, then went away before the write-back)
    redis_db.save()
    redis_server.kill()
    waiting = sessions.save(draft("waiting"))[0]
    redis_server.start()
    assert sessions.pin(waiting, True) and pending_store.get(waiting).pinned
    sessions.recover()
    assert redis_db.pttl(f"storyart:session:{waiting}") == -1 and sessions.get(waiting).pinned
    assert sessions.delete(waiting)
    assert not redis_db.sismember("storyart:sessions:pinned", f"storyart:session:{waiting}")
    sessions.close()


def test_a_pending_copy_wins_over_an_older_redis_copy(redis_server, redis_db, pending_store) -> None:
    sessions = failover(redis_server, pending_store)
    ts = now_ms() - 1000
    assert sessions.save(draft("v1 in redis", timestamp=ts))[1] == "redis"
    redis_db.config_set("maxmemory", "1")  # Redis refuses writes (OOM), reads still work
    redis_db.config_set("maxmemory-policy", "noeviction")
    try:
        assert sessions.save(draft("v2 pending", timestamp=ts))[1] == "memory"
        assert body_of(sessions.get(ts))["scriptText"] == "v2 pending"
        assert body_of(sessions.latest()[0])["scriptText"] == "v2 pending"
        assert [body_of(r)["scriptText"] for r in sessions.listing(Query()).rows] == ["v2 pending"]
    finally:
        redis_db.config_set("maxmemory", "0")
    assert sessions.recover() == 1
    assert body_of(sessions.get(ts))["scriptText"] == "v2 pending" and sessions.get(ts).storage == "redis"
    sessions.close()


def test_a_timestamp_redis_assigned_is_never_assigned_again_locally(redis_server, redis_db, pending_store,
                                                                    monkeypatch) -> None:
    """Saves to Redis, then Redis goes away within the same millisecond: the local store must not reuse the
    number (the write-back would then find another session under it)."""
    sessions = failover(redis_server, pending_store)
    frozen = now_ms() + 60_000  # every save below happens "in the same millisecond"
    monkeypatch.setattr(storage_module, "now_ms", lambda: frozen)
    in_redis = [sessions.save(draft(f"r{i}"))[0] for i in range(3)]
    redis_server.kill()
    in_local = [sessions.save(draft(f"m{i}"))[0] for i in range(3)]
    redis_server.start()
    assert len(set(in_redis + in_local)) == 6 and min(in_local) > max(in_redis)
    sessions.close()


def test_hosts_in_their_own_slots_never_propose_the_same_timestamp(tmp_path) -> None:
    """What keeps two hosts' outage saves apart (SERVICE_HOSTS=3, SERVICE_HOST_INDEX=0..2)."""
    hosts = [Allocator(tmp_path / f"clock-{i}", Slot(i, 3)) for i in range(3)]
    now = now_ms()
    proposals = [[host.propose(now + step // 7) for step in range(50)] for host in hosts]
    for index, mine in enumerate(proposals):
        assert all(ts % 3 == index for ts in mine) and mine == sorted(set(mine))
        assert mine[0] - now < 3
    assert len(set().union(*proposals)) == 150
    assert Allocator().propose(now) == now  # one host: every millisecond is its own


def test_two_hosts_in_the_same_millisecond_get_distinct_timestamps(redis_server, redis_db, tmp_path,
                                                                   monkeypatch) -> None:
    hosts = [failover(redis_server, SqliteStore.open(tmp_path / f"h{i}.sqlite3", Limits())) for i in range(2)]
    frozen = now_ms() + 60_000
    monkeypatch.setattr(storage_module, "now_ms", lambda: frozen)
    stamps = [host.save(draft(f"h{i}-{n}"))[0] for n in range(3) for i, host in enumerate(hosts)]
    assert len(set(stamps)) == 6 and redis_db.zcard(INDEX_KEY) == 6
    for host in hosts:
        host.close()


def test_write_back_outcomes(redis_store: RedisStore, redis_db, body_sizes) -> None:
    """Redis holds another copy under a pending one's timestamp: the copy acknowledged later wins, whatever
    their expiries and pins; a service-assigned clash keeps both; the same bytes again change nothing; a delete
    acknowledged after the pending copy drops it, and a copy acknowledged after the delete is stored."""
    now = now_ms()
    put(redis_store, draft("in redis", timestamp=now), now=now)
    assert redis_store.pin(now, True, now=now, ttl_ms=60_000)  # no expiry at all: expiry must not decide

    def pending(text: str, origin: Origin, acked: int, ttl_ms: int = 30_000) -> Record:
        d = draft(text, timestamp=now)
        return Record(now, d.render(now), d.summary, now_ms() + ttl_ms, origin, acked=acked)

    older = redis_store.write_back(pending("older", Origin.CLIENT, now - 1, ttl_ms=90_000), now=now_ms())
    assert older == (Outcome.SUPERSEDED, now, None)
    assert body_of(redis_store.get(now))["scriptText"] == "in redis"
    moved = redis_store.write_back(pending("clash", Origin.SERVICE, now + 5), now=now_ms())
    assert moved.outcome is Outcome.RENUMBERED and moved.timestamp > now
    assert body_of(redis_store.get(moved.timestamp)) == {**body_of(redis_store.get(now)), "scriptText": "clash",
                                                          "timestamp": moved.timestamp}
    same = redis_store.write_back(pending("in redis", Origin.SERVICE, now - 5), now=now_ms())
    assert same == (Outcome.STORED, now, None) and redis_db.hget("storyart:sessions:acked", now) == b"%d" % now
    newer = redis_store.write_back(pending("newer", Origin.CLIENT, now + 1, ttl_ms=1_000), now=now_ms())
    assert newer == (Outcome.STORED, now, None)
    assert body_of(redis_store.get(now))["scriptText"] == "newer" and redis_store.get(now).pinned
    assert redis_store.delete(now) and not redis_store.delete(now)
    dead = int(redis_db.get(f"storyart:deleted:{now}"))
    assert dead > now + 1 and redis_db.pttl(f"storyart:deleted:{now}") > 29 * DAY_MS  # the tombstone, bounded
    dropped = redis_store.write_back(pending("acknowledged before the delete", Origin.CLIENT, dead), now=now_ms())
    assert dropped == (Outcome.DELETED, now, None) and redis_store.get(now) is None
    again = redis_store.write_back(pending("acknowledged after it", Origin.CLIENT, dead + 1), now=now_ms())
    assert again == (Outcome.STORED, now, None)
    assert body_of(redis_store.get(now))["scriptText"] == "acknowledged after it"
    put(redis_store, draft("saved after a later delete", timestamp=now), now=now - 60_000)  # a clock behind
    redis_store.delete(now)
    put(redis_store, draft("saved after that", timestamp=now), now=now - 60_000)
    assert int(redis_db.hget("storyart:sessions:acked", now)) > int(redis_db.get(f"storyart:deleted:{now}")) > dead


def test_a_key_another_tool_rewrote_is_ordered_by_what_the_service_knows(redis_store: RedisStore, redis_db,
                                                                        body_sizes) -> None:
    """A tool SETs a session key without touching `storyart:sessions:acked`: it wrote after the service's last
    recorded copy, so a pending copy acknowledged before that loses to the tool's bytes; one acknowledged after
    it (or any, for a key the service never wrote) is the copy a client was told is saved, and wins."""
    now = now_ms()
    put(redis_store, draft("service", timestamp=now), now=now)
    redis_db.set(f"storyart:session:{now}", draft("tool", timestamp=now).render(now), keepttl=True)

    def pending(text: str, timestamp: int, acked: int) -> Record:
        d = draft(text, timestamp=timestamp)
        return Record(timestamp, d.render(timestamp), d.summary, now_ms() + 60_000, Origin.CLIENT, acked=acked)

    assert redis_store.write_back(pending("before", now, now - 1), now=now_ms()).outcome is Outcome.SUPERSEDED
    assert body_of(redis_store.get(now))["scriptText"] == "tool"
    assert redis_store.write_back(pending("after", now, now + 1), now=now_ms()).outcome is Outcome.STORED
    assert body_of(redis_store.get(now))["scriptText"] == "after"
    foreign = now - 1000
    redis_db.set(f"storyart:session:{foreign}", draft("tool only", timestamp=foreign).render(foreign))
    assert redis_store.write_back(pending("pending", foreign, 0), now=now_ms()).outcome is Outcome.STORED
    assert body_of(redis_store.get(foreign))["scriptText"] == "pending"


def test_reads_during_an_outage_say_they_may_be_incomplete(redis_server, redis_db, pending_store) -> None:
    sessions = failover(redis_server, pending_store)
    in_redis = sessions.save(draft("in redis"))[0]
    redis_server.kill()
    try:
        with pytest.raises(storage_module.StorageUnavailable):
            sessions.get(in_redis)
        with pytest.raises(storage_module.StorageUnavailable):
            sessions.latest()
        listing = sessions.listing(Query())
        assert (listing.total, list(listing.rows), listing.partial) == (0, [], True)
        pending = sessions.save(draft("pending"))[0]
        assert sessions.get(pending).storage == "memory"
        found, partial = sessions.latest()
        assert found.timestamp == pending and partial
        listing = sessions.listing(Query())
        assert [r.timestamp for r in listing.rows] == [pending] and listing.partial
    finally:
        redis_server.start()
    sessions.close()


def pending_and_in_redis(redis_server, sessions: SessionStorage, pending: int, in_redis: int) -> list[int]:
    """`pending` sessions saved while Redis was away, then `in_redis` older ones in Redis once it answers again
    (before any write-back): every timestamp, newest first."""
    redis_server.kill()
    stamps = [sessions.save(draft(f"pending {i}"))[0] for i in range(pending)]
    redis_server.start()
    assert sessions.check(when_down=True) is RedisState.CONNECTED and sessions.local.count()[0] == pending
    stamps += [put(sessions.redis, draft(f"in redis {i}", timestamp=stamps[0] - 1000 - i)) for i in range(in_redis)]
    return sorted(stamps, reverse=True)


@pytest.mark.parametrize("summaries", [False, True], ids=["full", "summary"])
def test_a_list_read_while_the_write_back_runs_misses_nothing(own_redis, pending_store, summaries: bool) -> None:
    """The list is made while 10 sessions are pending; the write-back moves them all to Redis after its first
    rows are read: the rest of them are read from Redis (they were in neither store as listed, and left out).
    (A Redis of its own: it is restarted, and the shared one may load a snapshot another test saved.)"""
    server = own_redis()
    sessions = failover(server, pending_store)
    everything = pending_and_in_redis(server, sessions, pending=10, in_redis=3)
    listing = sessions.listing(Query(limit=EVERY), summaries)
    first = next(listing.rows)
    assert sessions.write_back() == 10 and pending_store.count() == (0, 0)
    rows = [first, *listing.rows]
    assert [row.timestamp for row in rows] == everything and listing.total == 13
    assert {row.storage for row in rows[storage_module.ROWS_PER_READ :]} == {"redis"}  # the first batch was read
    assert not listing.partial and listing.missed == 0
    sessions.close()


def test_a_listed_session_a_store_holds_but_the_list_did_not_read_makes_it_partial(redis_server, redis_db,
                                                                                   pending_store) -> None:
    """Every listed session is read, gone (deleted or expired meanwhile), or counted `missed`: here Redis lost
    it while a copy was saved locally (the list read Redis only), so the list says it is partial and a backup
    refuses rather than write a manifest without it."""
    sessions = failover(redis_server, pending_store)
    kept, moved, gone = (sessions.save(draft(name))[0] for name in ("kept", "moved", "gone"))
    listing = sessions.listing(Query(limit=EVERY))
    written = backup.stream(sessions)
    redis_db.delete(session_key(moved), session_key(gone))  # as another tool deletes them
    put(pending_store, draft("moved", timestamp=moved))
    assert [row.timestamp for row in listing.rows] == [kept]
    assert (listing.total, listing.missed, listing.partial) == (3, 1, True)
    with pytest.raises(StorageUnavailable, match=r"^1 listed session\(s\) could not be read while the backup ran"):
        b"".join(written.chunks)
    sessions.close()


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


def test_without_redis_the_oldest_are_evicted_and_that_is_logged(make_app, caplog) -> None:
    caplog.set_level(logging.WARNING)
    client = make_app(local_max_sessions=2).test_client()
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

    app = make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0", local_max_bytes=1024)
    got = app.test_client().post("/api/v1/session/save", headers={"Content-Type": "application/json"},
                                 data=orjson.dumps({"scriptText": "x" * 5000, "episodeContext": "",
                                                    "storyUuid": "s", "analyzedEpisode": {}}))
    assert got.status_code == 503 and got.headers["Retry-After"].isdigit()
    assert got.get_json()["success"] is False and "retry" in got.get_json()["error"]


def test_a_save_redis_applied_but_could_not_confirm_ends_up_once(redis_store: RedisStore, redis_db, body_sizes,
                                                                pending_store) -> None:
    """Redis applied a save and died before answering: the service stored the session locally under another
    timestamp and told the client that one. The write-back leaves exactly one copy, under the client's."""
    d = draft("reply lost")
    now = now_ms()
    unconfirmed = redis_store.save(d, now=now, ttl_ms=60_000, proposal=now)
    acknowledged = pending_store.save(d, now=now, ttl_ms=60_000, proposal=unconfirmed + 5)
    assert acknowledged != unconfirmed
    assert redis_store.write_back(pending_store.oldest(), now=now_ms()) == (Outcome.STORED, acknowledged, unconfirmed)
    assert redis_store.get(unconfirmed) is None and redis_db.zcard(INDEX_KEY) == 1
    assert not redis_db.hexists("storyart:sessions:acked", unconfirmed)
    assert body_of(redis_store.get(acknowledged))["scriptText"] == "reply lost"
    other = draft("another session that took the number")  # never removes a different session
    taken = put(redis_store, other)
    record = Record(taken + 7, d.render(taken + 7), d.summary, now_ms() + 60_000, Origin.SERVICE, other.save_id)
    redis_store.write_back(record, now=now_ms())
    assert body_of(redis_store.get(taken))["scriptText"] == "another session that took the number"


@pytest.mark.parametrize("pinned", [False, True])
def test_a_retried_save_never_removes_the_copy_its_first_attempt_confirmed(redis_store: RedisStore, redis_db,
                                                                          body_sizes,
                                                                          pending_store, pinned: bool) -> None:
    """The same save id and bytes (a retried import), stored in Redis and confirmed, then stored again in the
    local store by a later attempt while Redis was away: that is not a reply that was lost, so the write-back
    keeps both copies (and never one that is pinned)."""
    d = draft("imported twice")
    first = redis_store.save(d, now=now_ms() - 5_000, ttl_ms=60_000, proposal=now_ms() - 5_000)
    if pinned:
        redis_store.pin(first, True, now=now_ms(), ttl_ms=60_000)
    retried = pending_store.save(d, now=now_ms(), ttl_ms=60_000, proposal=first + 5)
    assert redis_store.write_back(pending_store.oldest(), now=now_ms()) == (Outcome.STORED, retried, None)
    assert body_of(redis_store.get(first))["scriptText"] == body_of(redis_store.get(retried))["scriptText"]
    assert redis_store.get(first).pinned is pinned


class CountingCommits(SqliteStore):
    """The SQLite store whose connections count the COMMITs they run (SQLite's own trace of its statements)."""

    commits = 0

    def _connect(self):
        db = super()._connect()
        db.set_trace_callback(self._traced)
        return db

    def _traced(self, statement: str) -> None:
        if statement.strip().upper() == "COMMIT":
            type(self).commits += 1


def _saves_while_the_write_lock_is_held(store: SqliteStore, drafts: list[Draft]) -> list[object]:
    """Start one thread per draft while another connection holds the file's write lock, let go once every save
    waits, and return what each save answered (its timestamp, or the error it raised)."""
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    answers: list[object] = [None] * len(drafts)

    def run(i: int) -> None:
        now = now_ms()
        try:
            answers[i] = store.save(drafts[i], now=now, ttl_ms=60_000, proposal=now)
        except Exception as error:  # noqa: BLE001 - the answer this test looks at
            answers[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(drafts))]
    threads[0].start()  # the first leads a commit of its own save, and waits for the lock
    wait_for(lambda: store._group.leading and not store._group.queue, what="the first save to wait for the lock")
    for t in threads[1:]:
        t.start()
    wait_for(lambda: len(store._group.queue) == len(drafts) - 1, what="the saves to wait for the write lock")
    holder.execute("COMMIT")
    holder.close()
    for t in threads:
        t.join(10)
    return answers


def test_saves_arriving_together_commit_in_one_transaction(tmp_path) -> None:
    """With LOCAL_STORE_SYNC=FULL, saves from threads of one process that wait for the write lock together are
    committed together: one COMMIT (one fsync) for all that queued behind the first, each answered with its own
    timestamp only then, all stored."""
    store = CountingCommits.open(tmp_path / "group.sqlite3", Limits(1000, 1 << 30, WhenFull.REFUSE))
    CountingCommits.commits = 0
    drafts = [parse_session(orjson.dumps({"scriptText": f"s{i}", "episodeContext": "", "storyUuid": "u",
                                          "analyzedEpisode": {}}), now_ms()) for i in range(8)]
    answers = _saves_while_the_write_lock_is_held(store, drafts)
    assert all(isinstance(a, int) for a in answers) and len(set(answers)) == 8
    assert CountingCommits.commits == 2  # the first save, then the seven that queued behind it
    assert store.count()[0] == 8 and {s.timestamp for s in store.rows(answers)} == set(answers)
    store.close()


@pytest.mark.parametrize("failure", ["no room", "a summary that is not JSON"])
def test_a_save_that_fails_in_a_group_commit_fails_alone(tmp_path, failure: str) -> None:
    """A save that fails inside a group commit (no room left under the cap, or a summary that is not JSON, which
    fails after the row's timestamp was chosen and room made) is undone alone: the others of its batch are
    committed and answered."""
    cap = 5 if failure == "no room" else 1000
    store = SqliteStore.open(tmp_path / "group.sqlite3", Limits(cap, 1 << 30, WhenFull.REFUSE))

    def one(i: int) -> Draft:
        return parse_session(orjson.dumps({"scriptText": f"s{i}", "episodeContext": "", "storyUuid": "u",
                                           "analyzedEpisode": {}}), now_ms())

    drafts = [one(i) for i in range(7)]
    if failure != "no room":
        drafts[3] = dataclasses.replace(drafts[3], summary=b"not json")
    answers = _saves_while_the_write_lock_is_held(store, drafts)
    stored = [a for a in answers if isinstance(a, int)]
    if failure == "no room":
        assert len(stored) == 5 and sum(isinstance(a, storage_module.StorageFull) for a in answers) == 2
    else:
        assert len(stored) == 6 and isinstance(answers[3], orjson.JSONDecodeError)
    assert store.count()[0] == len(stored) and {s.timestamp for s in store.rows(stored)} == set(stored)
    store.close()
