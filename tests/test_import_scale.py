"""Imports and filters at scale: an import is bounded by items and time and answers with its report, a retried
import stores nothing twice, and filtered lists read the stores' indexes (the timing is in bench/filters.py)."""

from __future__ import annotations

import threading

import orjson
import pytest
from flask.testing import FlaskClient
from test_history import JSON, listing, session

from stores.redis import FACETS_KEY, INDEX_KEY


def imported(client: FlaskClient, items: list) -> dict:
    got = client.post("/api/v1/session/import", data=orjson.dumps(items), headers=JSON)
    assert got.status_code == 200, got.data
    return got.get_json()


@pytest.mark.parametrize("client", ["redis", "sqlite", "memory"], indirect=True)
def test_a_retried_import_stores_nothing_twice(client: FlaskClient) -> None:
    items = [session(title=f"t{i}") for i in range(5)] + [session(title="dated", timestamp=1_700_000_000_000)]
    first = imported(client, items)
    again = imported(client, items)
    assert first["imported"] == 6 and again["imported"] == 5 and again["replaced"] == 1
    assert [r["timestamp"] for r in again["results"]] == [r["timestamp"] for r in first["results"]]
    assert listing(client)["total"] == 6
    changed = imported(client, [session(title="t0", story="another story")])  # other content: a new session
    assert changed["results"][0]["timestamp"] not in {r["timestamp"] for r in first["results"]}
    assert listing(client)["total"] == 7


def test_an_import_over_the_item_limit_is_413_and_stores_nothing(make_app) -> None:
    client = make_app(import_max_items=3).test_client()
    got = client.post("/api/v1/session/import", data=orjson.dumps([session()] * 4), headers=JSON)
    assert got.status_code == 413 and got.get_json()["success"] is False
    assert "IMPORT_MAX_ITEMS" in got.get_json()["error"] and listing(client)["total"] == 0
    assert imported(client, [session(title=str(i)) for i in range(3)])["imported"] == 3


def test_an_import_that_runs_out_of_time_says_which_items_to_send_again(make_app) -> None:
    """Each save into the SQLite file commits to the disk: 1000 of them take longer than 0.1 s."""
    client = make_app(import_time_limit=0.1, local_max_sessions=5000).test_client()
    items = [session(title=f"t{i}") for i in range(1000)]
    report = imported(client, items)
    assert report["complete"] is False and 0 < report["skipped"] < 1000
    assert report["imported"] + report["skipped"] == 1000
    skipped = [r["index"] for r in report["results"] if r["status"] == "skipped"]
    assert skipped == list(range(1000 - report["skipped"], 1000))  # the tail, in order
    assert listing(client, "view=summary")["total"] == report["imported"]
    again = imported(client, items[:1])  # a retry of what landed finds it
    assert again["results"][0]["timestamp"] == report["results"][0]["timestamp"]
    assert listing(client, "view=summary")["total"] == 1000 - len(skipped)
    while skipped:  # what the report says: send the skipped items again
        rest = [items[i] for i in skipped]
        report = imported(client, rest)
        skipped = [skipped[r["index"]] for r in report["results"] if r["status"] == "skipped"]
    assert listing(client, "view=summary")["total"] == 1000


@pytest.mark.parametrize("client", ["redis", "sqlite", "memory"], indirect=True)
def test_filters_follow_resaves_deletes_and_expiry(client: FlaskClient) -> None:
    moved = imported(client, [session(title="Moving", story="s1", episode=1, timestamp=1_700_000_000_000)])
    imported(client, [session(title="Moving", story="s2", episode=2, timestamp=1_700_000_000_000)])
    assert listing(client, "storyUuid=s1")["total"] == 0 and listing(client, "episode=1")["total"] == 0
    assert listing(client, "storyUuid=s2&episode=2&q=MOV")["total"] == 1
    assert client.delete(f"/api/v1/session/{moved['results'][0]['timestamp']}").status_code == 200
    assert listing(client, "storyUuid=s2")["total"] == 0 and listing(client, "q=moving")["total"] == 0


def test_index_members_without_a_session_are_settled_once(make_app, redis_server, redis_db) -> None:
    """Facets are completed while the index has more members than facets: a member whose key another tool
    deleted, or whose record is not a session, must not keep every later filtered list walking the index."""
    client = make_app(redis_url=redis_server.url).test_client()
    imported(client, [session(title="Real", story="s1")])
    redis_db.set("storyart:session:7", b"not json")  # another tool's records, indexed by it
    redis_db.zadd(INDEX_KEY, {"storyart:session:7": 7, "storyart:session:9": 9})  # 9: its key is gone
    assert [s["title"] for s in listing(client, "view=summary&q=real")["sessions"]] == ["Real"]
    assert redis_db.zscore(INDEX_KEY, "storyart:session:9") is None  # forgotten, as a list page forgets it
    assert redis_db.hlen(FACETS_KEY) == redis_db.zcard(INDEX_KEY) == 2  # nothing left to complete
    assert listing(client, "storyUuid=s1")["total"] == 1 and listing(client, "q=not")["total"] == 0


@pytest.mark.slow
def test_an_import_that_loses_redis_midway_reports_each_item_as_it_was(make_app, redis_server, redis_db) -> None:
    """200 sessions of 100 KB, every other one already stored; Redis is killed once it holds 5 of the new ones,
    so the rest go to the local store: each item is still reported imported or replaced as it was (those stored
    locally were all reported imported before: the local store was asked whether Redis held them)."""
    client = make_app(redis_url=redis_server.url, redis_retry_interval=3600).test_client()
    items = [session(title=f"t{i}", timestamp=1_700_000_000_000 + i, pad="x" * 100_000) for i in range(200)]
    assert imported(client, items[::2])["imported"] == 100
    done = threading.Event()

    def kill_redis_midway() -> None:
        watcher = redis_server.client()
        while not done.is_set() and watcher.zcard(INDEX_KEY) < 105:
            pass
        redis_server.kill()

    killer = threading.Thread(target=kill_redis_midway)
    killer.start()
    try:
        report = imported(client, items)
    finally:
        done.set()
        killer.join()
    assert {"redis", "memory"} <= {r["storage"] for r in report["results"]}, "Redis was not killed midway"
    assert [r["status"] for r in report["results"]] == ["replaced", "imported"] * 100
