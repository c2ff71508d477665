"""Keep forever: pin and unpin through the API on every storage mode, a TTL that would have expired a pinned
session, no TTL at all, and an older SQLite file that gains the columns pins and filters need."""

from __future__ import annotations

import sqlite3
import time

import orjson
import pytest
from flask.testing import FlaskClient
from test_history import listing, save, session


def pin(client: FlaskClient, timestamp: int, method: str = "POST"):
    return client.open(f"/api/v1/session/{timestamp}/pin", method=method, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("client", ["redis", "sqlite", "memory"], indirect=True)
def test_pin_and_unpin_answer_and_show_in_the_list(client: FlaskClient) -> None:
    saved = save(client, session("Keeper"))
    got = pin(client, saved["timestamp"])
    assert got.status_code == 200 and got.get_json() == {"success": True, "timestamp": saved["timestamp"],
                                                         "sessionKey": saved["sessionKey"], "pinned": True}
    assert [s["pinned"] for s in listing(client, "view=summary")["sessions"]] == [True]
    assert pin(client, saved["timestamp"], "DELETE").get_json()["pinned"] is False
    assert [s["pinned"] for s in listing(client, "view=summary")["sessions"]] == [False]
    for bad, status in (("12x", 400), (str(saved["timestamp"] + 1), 404)):
        answer = pin(client, bad)
        assert answer.status_code == status and answer.is_json and answer.get_json()["success"] is False


@pytest.mark.parametrize("store", ["redis", "sqlite", "memory"])
def test_a_pinned_session_outlives_the_ttl_that_drops_the_others(store, make_app, request) -> None:
    settings: dict = {"session_ttl_seconds": 1}
    if store == "redis":
        settings["redis_url"] = request.getfixturevalue("redis_server").url
        request.getfixturevalue("redis_db")
    else:
        settings["local_store"] = store
    client = make_app(**settings).test_client()
    kept, dropped = save(client, session("kept")), save(client, session("dropped"))
    assert pin(client, kept["timestamp"]).status_code == 200
    time.sleep(1.3)
    assert client.get(f"/api/v1/session/{dropped['timestamp']}").status_code == 404
    assert client.get(f"/api/v1/session/{kept['timestamp']}").status_code == 200
    assert pin(client, kept["timestamp"], "DELETE").status_code == 200
    time.sleep(1.3)
    assert client.get(f"/api/v1/session/{kept['timestamp']}").status_code == 404  # the TTL ran from the unpin


def test_no_ttl_keeps_every_session(make_app, redis_server, redis_db) -> None:
    client = make_app(redis_url=redis_server.url, session_ttl_seconds=0).test_client()
    saved = save(client, session("forever"))
    assert redis_db.pttl(saved["sessionKey"]) == -1 and redis_db.pttl(f"storyart:meta:{saved['timestamp']}") == -1
    assert not redis_db.zscore("storyart:sessions:expiry", saved["sessionKey"])
    assert listing(client, "view=summary")["sessions"][0]["pinned"] is False


def test_a_pin_waits_for_redis_rather_than_half_happen(make_app, redis_server, redis_db) -> None:
    client = make_app(redis_url=redis_server.url).test_client()
    saved = save(client, session("kept"))
    redis_server.kill()
    try:
        got = pin(client, saved["timestamp"])
        assert got.status_code == 503 and got.headers["Retry-After"] and got.get_json()["success"] is False
    finally:
        redis_server.start()
    assert listing(client, "view=summary")["sessions"] == []  # Redis came back empty: it persists nothing here


OLD_SCHEMA = """CREATE TABLE sessions (timestamp INTEGER PRIMARY KEY, body BLOB NOT NULL, summary BLOB NOT NULL,
    expires_at INTEGER NOT NULL, origin TEXT NOT NULL)"""  # the first files had no save_id either


def test_a_store_file_of_the_previous_version_gains_pins_and_filter_columns(make_app, tmp_path) -> None:
    """A file written before pins and filter indexes existed: its sessions are listed, filtered and pinned."""
    path = tmp_path / "old.sqlite3"
    summary = orjson.dumps({"storyUuid": "story-old", "episodeNumber": 3, "title": "Old Times", "sceneCount": 0,
                            "beatCount": 0, "sizeBytes": 10, "etag": "x"})
    body = b'{"scriptText":"x","episodeContext":"","storyUuid":"story-old","analyzedEpisode":{},"timestamp":1000}'
    with sqlite3.connect(path) as db:
        db.execute(OLD_SCHEMA)
        db.execute("INSERT INTO sessions VALUES (1000, ?, ?, ?, 'client')", (body, summary, 2**50))
    app = make_app(local_store_path=path)
    client = app.test_client()
    assert client.get("/api/v1/session/1000").get_json()["data"]["timestamp"] == 1000
    assert app.extensions["storyart"].local.oldest().acked == 0  # acknowledged before anything recorded since
    for query in ("storyUuid=story-old", "episode=3", "q=old%20TIMES"):
        assert listing(client, f"view=summary&{query}")["total"] == 1, query
    assert listing(client, "view=summary&storyUuid=other")["total"] == 0
    assert pin(client, 1000).status_code == 200
    assert listing(client, "view=summary")["sessions"][0]["pinned"] is True


def test_a_store_file_from_before_users_keeps_its_sessions_for_the_default_user(make_app, tmp_path) -> None:
    """The file is rebuilt once with an owner column: its sessions are the default user's, and a user's session
    under the same timestamp is another session in her own space."""
    from users import Users

    path = tmp_path / "old.sqlite3"
    body = b'{"scriptText":"x","episodeContext":"","storyUuid":"story-old","analyzedEpisode":{},"timestamp":1000}'
    with sqlite3.connect(path) as db:
        db.execute(OLD_SCHEMA)
        db.execute("INSERT INTO sessions VALUES (1000, ?, ?, ?, 'client')", (body, b"{}", 2**50))
    users_file = tmp_path / "users.json"
    _, token = Users.open(users_file).add("hana")
    app = make_app(local_store_path=path, users_file=users_file, api_token="default-token-0123456789")
    client = app.test_client()
    default = {"Authorization": "Bearer default-token-0123456789"}
    assert client.get("/api/v1/session/1000", headers=default).get_json()["data"]["timestamp"] == 1000
    hers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    assert client.get("/api/v1/session/1000", headers=hers).status_code == 404
    saved = client.post("/api/v1/session/save", headers=hers, data=body).get_json()
    assert (saved["timestamp"], saved["sessionKey"]) == (1000, "storyart:{u:hana}:session:1000")
    assert client.delete("/api/v1/session/1000", headers=hers).status_code == 200
    assert client.get("/api/v1/session/1000", headers=default).status_code == 200  # the default user's stays
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT owner, timestamp FROM sessions").fetchall() == [("", 1000)]


def test_a_store_file_whose_table_is_not_ours_stops_start_up_naming_it(tmp_path) -> None:
    from config import ConfigError
    from stores.base import Limits
    from stores.sqlite import SqliteStore

    path = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE sessions (something_else TEXT)")
    with pytest.raises(ConfigError, match=f"LOCAL_STORE_PATH: cannot open {path}"):
        SqliteStore.open(path, Limits())


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_a_local_activity_log_keeps_its_days_and_its_most(kind, tmp_path) -> None:
    """Without Redis the local store is the log's home: it drops events older than its days and beyond its most."""
    from stores.base import Event, Keep, Limits, Share
    from stores.memory import MemoryStore
    from stores.sqlite import SqliteStore

    keep = Keep(days=1, most=5, prune_every=1)
    store = SqliteStore.open(tmp_path / "log.sqlite3", Limits(), keep=keep) if kind == "sqlite" else MemoryStore()
    if kind == "memory":
        store.configure(Limits(), keep)
    alice = store.scoped("alice")
    now = 10 * 86_400_000
    alice.add_share(Share("s1", "alice", 1, "a" * 64, now, now + 1), Event("old", now - 2 * 86_400_000, "share", "-"))
    for n in range(8):
        store.add_share(Share(f"d{n}", "", 1, f"{n:064d}", now, now + 1), Event(f"e{n}", now + n, "share", "-"))
    assert [orjson.loads(e)["id"] for e in store.events(now + 100, 100)] == ["e7", "e6", "e5", "e4", "e3"]
    assert alice.events(now + 100, 100) != []  # another user's log is hers alone: pruned only by her events
    alice.add_share(Share("s2", "alice", 1, "b" * 64, now, now + 1), Event("new", now, "share", "-"))
    assert [orjson.loads(e)["id"] for e in alice.events(now + 100, 100)] == ["new"]  # the 2-day-old one dropped
    store.close()
