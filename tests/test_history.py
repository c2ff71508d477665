"""Session history and production readiness: summaries, filters and cursors, delete, export/import, ETags,
the API token, readiness and the access log; on Redis and on memory alike where both apply."""

from __future__ import annotations

import json
import logging
import time

import orjson
import pytest
import redis
from flask.testing import FlaskClient

from allocator import now_ms
from stores.redis import INDEX_KEY, META_PREFIX

JSON = {"Content-Type": "application/json"}
TOKEN = "s3cret-token-0123456789"


def session(title: str = "Pilot", episode: int = 1, story: str = "story-a", scenes: int = 2, beats: int = 3,
            **extra: object) -> dict:
    return {"scriptText": f"script of {title}", "episodeContext": "{}", "storyUuid": story,
            "analyzedEpisode": {"episodeNumber": episode, "title": title,
                                "scenes": [{"beats": [{"n": b} for b in range(beats)]} for _ in range(scenes)]},
            **extra}


def save(client: FlaskClient, body: dict, headers: dict | None = None) -> dict:
    got = client.post("/api/v1/session/save", data=orjson.dumps(body), headers={**JSON, **(headers or {})})
    assert got.status_code == 200, got.data
    return got.get_json()


def listing(client: FlaskClient, query: str = "", headers: dict | None = None) -> dict:
    got = client.get(f"/api/v1/session/list?{query}", headers=headers)
    assert got.status_code == 200, got.data
    return got.get_json()


# --------------------------------------------------------------------------------------------- summaries


def test_summary_view_describes_each_session(client: FlaskClient) -> None:
    saved = save(client, session(title="Undertow", episode=5, scenes=4, beats=7))
    listed = listing(client, "view=summary")
    assert listed["count"] == 1 and listed["total"] == 1
    (item,) = listed["sessions"]
    size = len(client.get(f"/api/v1/session/{saved['timestamp']}/export").data)
    assert item == {
        "timestamp": saved["timestamp"], "sessionKey": saved["sessionKey"], "storyUuid": "story-a",
        "episodeNumber": 5, "title": "Undertow", "sceneCount": 4, "beatCount": 28, "sizeBytes": size,
        "etag": item["etag"], "savedAt": iso(saved["timestamp"]), "storage": saved["storage"], "pinned": False}


def iso(timestamp: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp // 1000)) + f".{timestamp % 1000:03d}Z"


def test_a_session_past_the_year_9999_keeps_the_summary_list_whole(redis_server, redis_db, make_app) -> None:
    """Only another tool writes such a key (a save takes at most one day ahead); ISO 8601 has no year for it."""
    client = make_app(redis_url=redis_server.url).test_client()
    saved = save(client, session("Now"))
    far = 253_402_300_800_000  # 10000-01-01T00:00:00Z
    redis_db.set(f"storyart:session:{far}", orjson.dumps({**session("Far"), "timestamp": far}))
    redis_db.zadd(INDEX_KEY, {f"storyart:session:{far}": far})
    listed = listing(client, "view=summary")
    assert [(s["title"], s["savedAt"]) for s in listed["sessions"]] == [("Far", None),
                                                                         ("Now", iso(saved["timestamp"]))]


def test_summary_of_an_odd_session_does_not_fail(client: FlaskClient) -> None:
    save(client, {"scriptText": "x", "episodeContext": "", "storyUuid": "", "analyzedEpisode": {"scenes": "none"}})
    (item,) = listing(client, "view=summary")["sessions"]
    assert (item["episodeNumber"], item["title"], item["sceneCount"], item["beatCount"]) == (None, None, 0, 0)


def test_summary_page_reads_no_session_body(make_app, redis_server, redis_db: redis.Redis) -> None:
    """Redis MONITOR shows every command the page runs, Lua's included: summaries are read, bodies never (no
    reconcile round of the background thread, which reads bodies, runs meanwhile)."""
    client = make_app(redis_url=redis_server.url, redis_retry_interval=3600).test_client()
    stamps = [save(client, session(title=f"T{i}"))["timestamp"] for i in range(5)]
    commands = []
    with redis_db.monitor() as watch:
        listed = listing(client, "view=summary&limit=3")
        redis_server.client().echo("end of page")
        for seen in watch.listen():
            commands.append(seen["command"])
            if seen["command"].startswith("ECHO"):
                break
    reads = [c for c in commands if c.split(" ")[0] in ("GET", "MGET")]
    keys = [key for c in reads for key in c.split(" ")[1:]]
    assert keys == [f"{META_PREFIX}{ts}" for ts in stamps[::-1][:3]], reads  # summaries only, no session key
    assert [s["timestamp"] for s in listed["sessions"]] == stamps[::-1][:3]


def test_summaries_of_sessions_saved_by_another_tool_are_backfilled(make_app, redis_server, redis_db) -> None:
    client = make_app(redis_url=redis_server.url).test_client()
    ts = now_ms() - 5000
    body = orjson.dumps({**session(title="Legacy", scenes=1, beats=2), "timestamp": ts})
    redis_db.set(f"storyart:session:{ts}", body, ex=600)
    redis_db.zadd(INDEX_KEY, {f"storyart:session:{ts}": ts})
    (item,) = listing(client, "view=summary")["sessions"]
    assert (item["title"], item["beatCount"], item["sizeBytes"]) == ("Legacy", 2, len(body))
    assert 0 < redis_db.ttl(f"{META_PREFIX}{ts}") <= 600
    assert listing(client, "view=summary&q=legacy")["total"] == 1


# -------------------------------------------------------------------------------- filters and paging


@pytest.fixture
def catalogue(client: FlaskClient) -> list[dict]:
    specs = [("Pilot", 1, "story-a"), ("The Undertow", 2, "story-a"), ("Glass Rooms", 1, "story-b"),
             ("Undertow Part Two", 3, "story-a"), ("Night Market", 2, "story-b")]
    return [save(client, session(title=t, episode=e, story=s)) for t, e, s in specs]


@pytest.mark.parametrize("view", ["full", "summary"])
def test_filters(client: FlaskClient, catalogue: list[dict], view: str) -> None:
    stamps = [c["timestamp"] for c in catalogue]

    def found(query: str) -> list[int]:
        listed = listing(client, f"view={view}&{query}")
        assert listed["total"] == len(listed["sessions"]) == listed["count"]
        return [s["timestamp"] for s in listed["sessions"]]

    assert found("storyUuid=story-b") == [stamps[4], stamps[2]]
    assert found("episode=1") == [stamps[2], stamps[0]]
    assert found("q=UNDERTOW") == [stamps[3], stamps[1]]
    assert found("q=undertow&episode=3") == [stamps[3]]
    assert found(f"since={stamps[1]}&until={stamps[3]}") == stamps[3:0:-1]
    assert found(f"before={stamps[2]}") == [stamps[1], stamps[0]]
    assert found(f"before={stamps[4]}&storyUuid=story-a") == [stamps[3], stamps[1], stamps[0]]
    assert found("storyUuid=nobody") == []


def test_filtered_paging_counts_all_matches(client: FlaskClient, catalogue: list[dict]) -> None:
    listed = listing(client, "storyUuid=story-a&limit=2&offset=1")
    assert listed["total"] == 3 and listed["count"] == 2
    assert [s["timestamp"] for s in listed["sessions"]] == [catalogue[1]["timestamp"], catalogue[0]["timestamp"]]


def test_keyset_cursor_does_not_drift_while_sessions_arrive(client: FlaskClient) -> None:
    stamps = [save(client, session(title=f"T{i}"))["timestamp"] for i in range(6)]
    first = listing(client, "view=summary&limit=3")["sessions"]
    for i in range(4):
        save(client, session(title=f"new {i}"))
    second = listing(client, f"view=summary&limit=3&before={first[-1]['timestamp']}")["sessions"]
    assert [s["timestamp"] for s in first + second] == stamps[::-1]


@pytest.mark.parametrize("query", ["view=compact", "since=abc", "until=-1", "before=0", "before=1.5",
                                   "since=" + "9" * 20, "q=" + "x" * 201, "storyUuid=" + "u" * 300,
                                   "episode=" + "1" * 300])
def test_bad_list_filters_are_400(client: FlaskClient, query: str) -> None:
    got = client.get(f"/api/v1/session/list?{query}")
    assert got.status_code == 400 and got.get_json()["success"] is False


# ---------------------------------------------------------------------------------------------- delete


def test_delete_removes_session_index_and_summary(client: FlaskClient, catalogue: list[dict]) -> None:
    victim = catalogue[2]
    got = client.delete(f"/api/v1/session/{victim['timestamp']}")
    assert got.status_code == 200
    assert got.get_json() == {"success": True, "message": "Session deleted", "sessionKey": victim["sessionKey"],
                              "timestamp": victim["timestamp"]}
    assert client.get(f"/api/v1/session/{victim['timestamp']}").status_code == 404
    assert victim["timestamp"] not in [s["timestamp"] for s in listing(client, "view=summary")["sessions"]]
    assert listing(client)["total"] == 4
    again = client.delete(f"/api/v1/session/{victim['timestamp']}")
    assert again.status_code == 404 and again.get_json() == {"success": False, "error": "Session not found"}
    assert client.delete("/api/v1/session/abc").status_code == 400


def test_delete_while_redis_is_away_is_503_and_deletes_nothing(make_app, redis_server, redis_db) -> None:
    app = make_app(redis_url=redis_server.url)
    client = app.test_client()
    saved = save(client, session())
    redis_server.kill()
    for _ in range(2):  # the first call finds Redis gone, the second already knows
        got = client.delete(f"/api/v1/session/{saved['timestamp']}")
        assert got.status_code == 503 and got.headers["Retry-After"].isdigit()
        assert "cannot be deleted everywhere" in got.get_json()["error"]
    redis_server.start()


def test_delete_leaves_nothing_in_redis(make_app, redis_server, redis_db) -> None:
    client = make_app(redis_url=redis_server.url).test_client()
    saved = save(client, session())
    assert client.delete(f"/api/v1/session/{saved['timestamp']}").status_code == 200
    assert redis_db.keys("storyart:session:*") == [] and redis_db.keys(f"{META_PREFIX}*") == []
    assert redis_db.zcard(INDEX_KEY) == 0 and redis_db.zcard("storyart:sessions:expiry") == 0


# --------------------------------------------------------------------------------------- export/import


def test_export_downloads_the_exact_saved_object(client: FlaskClient, session_1mb: bytes) -> None:
    saved = client.post("/api/v1/session/save", data=session_1mb, headers=JSON).get_json()
    got = client.get(f"/api/v1/session/{saved['timestamp']}/export")
    assert got.status_code == 200 and got.mimetype == "application/json"
    assert got.headers["Content-Disposition"] == f'attachment; filename="storyart-session-{saved["timestamp"]}.json"'
    assert got.data == session_1mb[:-1] + b',"timestamp":%d}' % saved["timestamp"]
    assert client.get("/api/v1/session/123/export").status_code == 404
    assert client.get("/api/v1/session/x1/export").status_code == 400


def test_export_then_import_round_trips_into_an_empty_store(make_app, redis_server, redis_db) -> None:
    source = make_app(redis_url=redis_server.url).test_client()
    stamps = [save(source, session(title=f"T{i}"))["timestamp"] for i in range(3)]
    exported = [orjson.loads(source.get(f"/api/v1/session/{ts}/export").data) for ts in stamps]
    redis_db.flushdb()
    target = make_app().test_client()  # memory mode, empty
    got = target.post("/api/v1/session/import", data=orjson.dumps(exported), headers=JSON)
    assert got.status_code == 200
    report = got.get_json()
    assert (report["success"], report["imported"], report["replaced"], report["rejected"]) == (True, 3, 0, 0)
    assert [r["timestamp"] for r in report["results"]] == stamps
    for original in exported:
        assert target.get(f"/api/v1/session/{original['timestamp']}").get_json()["data"] == original


def test_import_reports_each_item(client: FlaskClient) -> None:
    existing = save(client, session(title="old"))
    items = [session(title="new", timestamp=now_ms() - 1000), {**session(title="replacement"),
             "timestamp": existing["timestamp"]}, {"scriptText": ""}, [1, 2], session(title="no timestamp")]
    got = client.post("/api/v1/session/import", data=orjson.dumps(items), headers=JSON)
    assert got.status_code == 200
    report = got.get_json()
    assert [r["status"] for r in report["results"]] == ["imported", "replaced", "rejected", "rejected", "imported"]
    assert (report["imported"], report["replaced"], report["rejected"]) == (2, 1, 2)
    assert "scriptText must be a non-empty string" in report["results"][2]["error"]
    assert "must be a JSON object" in report["results"][3]["error"]
    assert client.get(f"/api/v1/session/{existing['timestamp']}").get_json()["data"]["analyzedEpisode"]["title"] \
        == "replacement"
    assert listing(client)["total"] == 3


def test_import_of_one_object(client: FlaskClient) -> None:
    ts = now_ms() - 10
    got = client.post("/api/v1/session/import", data=orjson.dumps(session(timestamp=ts)), headers=JSON)
    assert got.get_json()["results"] == [{"index": 0, "status": "imported", "timestamp": ts,
                                          "sessionKey": f"storyart:session:{ts}", "storage": got.get_json()[
                                              "results"][0]["storage"]}]


@pytest.mark.parametrize(("raw", "headers", "status"), [(b"[]", JSON, 400), (b"{", JSON, 400),
                                                         (b"[{}]", {"Content-Type": "text/plain"}, 415)])
def test_import_of_a_bad_body(client: FlaskClient, raw: bytes, headers: dict, status: int) -> None:
    got = client.post("/api/v1/session/import", data=raw, headers=headers)
    assert got.status_code == status and got.get_json()["success"] is False
    assert listing(client)["total"] == 0


def test_import_body_limit_applies_to_the_whole_request(make_app, session_10kb: bytes) -> None:
    client = make_app(max_content_length=16_384).test_client()
    two = b"[%s,%s]" % (session_10kb, session_10kb)
    assert client.post("/api/v1/session/import", data=two, headers=JSON).status_code == 413
    assert listing(client)["total"] == 0


# -------------------------------------------------------------------------------------------- ETag


def test_etag_makes_polling_cheap(client: FlaskClient) -> None:
    first = save(client, session(title="one"))
    got = client.get("/api/v1/session/latest")
    etag = got.headers["ETag"]
    assert etag and got.headers["Cache-Control"] == "no-cache"
    again = client.get("/api/v1/session/latest", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == etag
    by_id = client.get(f"/api/v1/session/{first['timestamp']}", headers={"If-None-Match": etag})
    assert by_id.status_code == 304
    save(client, session(title="two"))
    changed = client.get("/api/v1/session/latest", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag


def test_etag_changes_when_a_session_is_replaced_under_the_same_timestamp(client: FlaskClient) -> None:
    ts = now_ms() - 100
    save(client, session(title="v1", timestamp=ts))
    etag = client.get(f"/api/v1/session/{ts}").headers["ETag"]
    save(client, session(title="v2", timestamp=ts))
    got = client.get(f"/api/v1/session/{ts}", headers={"If-None-Match": etag})
    assert got.status_code == 200 and got.get_json()["data"]["analyzedEpisode"]["title"] == "v2"


def test_etag_is_exposed_to_the_browser(client: FlaskClient) -> None:
    save(client, session())
    got = client.get("/api/v1/session/latest", headers={"Origin": "http://localhost:3000"})
    assert "ETag" in got.headers["Access-Control-Expose-Headers"]


# ------------------------------------------------------------------------------------------ API token


@pytest.fixture
def guarded(make_app) -> FlaskClient:
    return make_app(api_token=TOKEN).test_client()


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer wrong-token-0123456789",
                                           f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer é"])
def test_api_token_is_required(guarded: FlaskClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("GET", "/api/v1/session/latest"), ("POST", "/api/v1/session/save"),
                         ("GET", "/api/v1/session/list"), ("DELETE", "/api/v1/session/1")):
        got = guarded.open(path, method=method, headers={**JSON, **headers}, data=orjson.dumps(session()))
        assert got.status_code == 401, (method, path)
        assert got.get_json() == {"success": False,
                                  "error": "A valid API token is required (Authorization: Bearer <token>)."}
        assert got.headers["WWW-Authenticate"].startswith("Bearer")
    assert guarded.get("/api/v1/session/list", headers={"Authorization": f"Bearer {TOKEN}"}).get_json()["total"] == 0


def test_api_token_lets_the_right_bearer_in(guarded: FlaskClient) -> None:
    auth = {"Authorization": f"bearer {TOKEN}"}
    assert save(guarded, session(), headers=auth)["success"] is True
    assert guarded.get("/api/v1/session/latest", headers=auth).status_code == 200


def test_with_a_token_preflights_and_health_stay_open(guarded: FlaskClient) -> None:
    pre = guarded.options("/api/v1/session/save", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})
    assert pre.status_code == 200 and pre.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"].lower()
    assert guarded.get("/health").status_code == 200 and guarded.get("/health/ready").status_code == 200
    denied = guarded.get("/api/v1/session/latest", headers={"Origin": "http://localhost:5173"})
    assert denied.status_code == 401 and denied.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"


def test_production_without_a_token_warns(make_app, caplog) -> None:
    caplog.set_level(logging.WARNING)
    make_app(app_env="production")
    assert "API is open" in caplog.text
    caplog.clear()
    make_app(app_env="production", api_token=TOKEN)
    assert "API is open" not in caplog.text


def test_token_is_never_logged_or_shown(make_app, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    app = make_app(api_token=TOKEN)
    app.test_client().get("/api/v1/session/latest", headers={"Authorization": f"Bearer {TOKEN}"})
    assert TOKEN not in caplog.text and TOKEN not in repr(app.config["STORYART"])


# ------------------------------------------------------------------------------------------ readiness


def test_readiness(client: FlaskClient) -> None:
    got = client.get("/health/ready")
    assert got.status_code == 200 and got.get_json()["ready"] is True


def test_not_ready_while_redis_is_unreachable_but_health_stays_200(make_app) -> None:
    from servers import free_port

    port = free_port()
    client = make_app(redis_url=f"redis://127.0.0.1:{port}/0").test_client()
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.get_json() == {"success": False, "error": "Redis is configured but unreachable.", "ready": False,
                                "redis": "disconnected", "redisMaster": f"127.0.0.1:{port}"}
    assert client.get("/health").status_code == 200


# ------------------------------------------------------------------------------------------ access log


def test_access_log_line_per_request_without_content(make_app, caplog) -> None:
    caplog.set_level(logging.INFO, logger="storyart.access")
    client = make_app().test_client()
    secret = "TOP-SECRET-SCRIPT-TEXT"
    client.post("/api/v1/session/save", data=json.dumps(session(title=secret, scriptText=secret)),
                headers={**JSON, "X-Request-ID": "abc-123"})
    lines = [r.getMessage() for r in caplog.records if r.name == "storyart.access"]
    assert len(lines) == 1
    request_id, method, path, status, size, ms, address = lines[0].split(" ")
    assert (request_id, method, path, status, address) == ("abc-123", "POST", "/api/v1/session/save", "200",
                                                           "127.0.0.1")
    assert int(size) > 0 and ms.endswith("ms")
    assert secret not in caplog.text


def test_forwarded_for_is_trusted_only_for_configured_hops(make_app, caplog) -> None:
    caplog.set_level(logging.INFO, logger="storyart.access")
    spoofed = {"X-Forwarded-For": "203.0.113.7"}
    make_app().test_client().get("/health", headers=spoofed)
    make_app(trusted_proxy_hops=1).test_client().get("/health", headers=spoofed)
    addresses = [r.getMessage().rsplit(" ", 1)[1] for r in caplog.records if r.name == "storyart.access"]
    assert addresses == ["127.0.0.1", "203.0.113.7"]


def test_etag_follows_a_body_rewritten_by_another_tool(make_app, redis_server, redis_db) -> None:
    client = make_app(redis_url=redis_server.url).test_client()
    saved = save(client, session(title="ours"))
    etag = client.get("/api/v1/session/latest").headers["ETag"]
    rewritten = orjson.dumps({**session(title="edited by a tool"), "timestamp": saved["timestamp"]})
    redis_db.set(saved["sessionKey"], rewritten, keepttl=True)
    got = client.get("/api/v1/session/latest", headers={"If-None-Match": etag})
    assert got.status_code == 200 and got.get_json()["data"]["analyzedEpisode"]["title"] == "edited by a tool"


def test_a_path_cannot_forge_access_log_lines(make_app, caplog) -> None:
    caplog.set_level(logging.INFO, logger="storyart.access")
    make_app().test_client().get("/api/v1/session/1%0A2026-01-01 INFO storyart.access: forged")
    lines = [r.getMessage() for r in caplog.records if r.name == "storyart.access"]
    assert len(lines) == 1 and "\n" not in lines[0] and "\\n" in lines[0]


@pytest.mark.parametrize("body", [b"5", b'"text"', b"null", b"true", b"{}"])
def test_import_of_something_that_is_no_session_list_is_400(client: FlaskClient, body: bytes) -> None:
    got = client.post("/api/v1/session/import", data=body, headers=JSON)
    expected = 200 if body == b"{}" else 400  # {} is one (invalid) session: reported as rejected
    assert got.status_code == expected
