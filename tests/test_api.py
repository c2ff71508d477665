"""The HTTP contract (docs/contract.md §1) through Flask's test client, on Redis and on memory alike."""

from __future__ import annotations

import json
import time

import orjson
import pytest
from flask.testing import FlaskClient

JSON = {"Content-Type": "application/json"}


def minimal(**extra: object) -> dict:
    return {"scriptText": "INT. LAB - NIGHT", "episodeContext": "{}", "storyUuid": "u-1",
            "analyzedEpisode": {"episodeNumber": 1, "title": "Pilot", "scenes": []}, **extra}


def save(client: FlaskClient, body: bytes | dict, headers: dict | None = None):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post("/api/v1/session/save", data=data, headers=JSON if headers is None else headers)


def stored_count(client: FlaskClient) -> int:
    return client.get("/api/v1/session/list").get_json()["total"]


def mode(client: FlaskClient) -> str:
    return "redis" if client.application.extensions["storyart"].redis else "memory"


# ------------------------------------------------------------------------------------------ round trip


def test_1mb_session_round_trips_byte_for_byte(client: FlaskClient, session_1mb: bytes) -> None:
    saved = save(client, session_1mb)
    assert saved.status_code == 200
    meta = saved.get_json()
    ts = meta["timestamp"]
    assert meta == {"success": True, "message": "Session saved successfully",
                    "sessionKey": f"storyart:session:{ts}", "timestamp": ts, "storage": mode(client)}
    expected = session_1mb[:-1] + b',"timestamp":%d}' % ts  # the fixture is compact UTF-8 JSON
    for path in ("/api/v1/session/latest", f"/api/v1/session/{ts}"):
        got = client.get(path)
        assert got.status_code == 200
        assert got.mimetype == "application/json"
        assert got.data == b'{"success":true,"data":%s,"storage":"%s"}' % (expected, mode(client).encode())
    original = json.loads(session_1mb)
    assert json.loads(client.get("/api/v1/session/latest").data)["data"] == {**original, "timestamp": ts}


def test_every_field_and_character_survives(client: FlaskClient) -> None:
    odd = "quote\" backslash\\ tab\t nul\u0000 line-sep\u2028 emoji 🎬 rtl \u202e é ß 中文 \U0001f600"
    session = minimal(scriptText=odd, episodeContext=json.dumps({"k": odd}), promptMode="database",
                      retrievalMode=None, selectedLLM="gemini", nested={"list": [1, 2.5, -0.0, 1e300, True]},
                      bigint=2**63 - 1, empty={}, emptyList=[])
    ts = save(client, session).get_json()["timestamp"]
    data = client.get(f"/api/v1/session/{ts}").get_json()["data"]
    assert data == {**session, "timestamp": ts}
    assert list(data) == [*session, "timestamp"]


def test_client_timestamp_is_the_identity(client: FlaskClient) -> None:
    ts = int(time.time() * 1000) - 3_600_000
    first = save(client, minimal(timestamp=ts, title="first")).get_json()
    assert first["timestamp"] == ts and first["sessionKey"] == f"storyart:session:{ts}"
    save(client, minimal(timestamp=ts, title="second"))
    assert stored_count(client) == 1
    assert client.get(f"/api/v1/session/{ts}").get_json()["data"]["title"] == "second"


def test_latest_is_the_greatest_timestamp_not_the_last_saved(client: FlaskClient) -> None:
    newest = save(client, minimal(title="new")).get_json()["timestamp"]
    save(client, minimal(title="old re-sync", timestamp=newest - 60_000))
    latest = client.get("/api/v1/session/latest").get_json()
    assert latest["data"]["timestamp"] == newest and latest["data"]["title"] == "new"


def test_saves_in_quick_succession_get_distinct_increasing_timestamps(client: FlaskClient) -> None:
    stamps = [save(client, minimal(n=i)).get_json()["timestamp"] for i in range(30)]
    assert stamps == sorted(set(stamps))
    assert stored_count(client) == 30


def test_null_timestamp_means_assign_one(client: FlaskClient) -> None:
    saved = save(client, minimal(timestamp=None))
    assert saved.status_code == 200 and saved.get_json()["timestamp"] > 0


# -------------------------------------------------------------------------------------------- latest/get


def test_latest_when_empty(client: FlaskClient) -> None:
    got = client.get("/api/v1/session/latest")
    assert got.status_code == 404
    assert got.get_json() == {"success": False, "error": "No session found"}


@pytest.mark.parametrize("raw", ["abc", "12a", "-5", "1.5", "%20", "١٢٣", "9" * 17])
def test_get_with_bad_timestamp_is_400(client: FlaskClient, raw: str) -> None:
    got = client.get(f"/api/v1/session/{raw}")
    assert got.status_code == 400
    assert got.get_json()["success"] is False and "digits" in got.get_json()["error"]


def test_get_unknown_is_404(client: FlaskClient) -> None:
    got = client.get("/api/v1/session/123")
    assert got.status_code == 404 and got.get_json() == {"success": False, "error": "Session not found"}


# ------------------------------------------------------------------------------------------------- list


def test_list_pages_newest_first(client: FlaskClient) -> None:
    stamps = [save(client, minimal(n=i, analyzedEpisode={"episodeNumber": i, "title": f"E{i}", "scenes": [1]}))
              .get_json()["timestamp"] for i in range(5)]
    full = client.get("/api/v1/session/list").get_json()
    assert full["success"] is True and full["count"] == 5 and full["total"] == 5
    assert [s["timestamp"] for s in full["sessions"]] == stamps[::-1]
    first = full["sessions"][0]
    assert first["sessionKey"] == f"storyart:session:{stamps[-1]}"
    assert first["analyzedEpisode"] == {"episodeNumber": 4, "title": "E4", "scenes": [1]}
    assert first["scriptText"] and first["storyUuid"] == "u-1"
    page = client.get("/api/v1/session/list?limit=2&offset=1").get_json()
    assert page["count"] == 2 and page["total"] == 5
    assert [s["timestamp"] for s in page["sessions"]] == stamps[::-1][1:3]
    beyond = client.get("/api/v1/session/list?offset=10").get_json()
    assert beyond["count"] == 0 and beyond["sessions"] == [] and beyond["total"] == 5


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "limit=-1", "limit=", "offset=-1",
                                   "offset=x", "limit=1.5", "offset=" + "9" * 40, "limit=" + "1" * 5000])
def test_list_bad_paging_is_400(client: FlaskClient, query: str) -> None:
    got = client.get(f"/api/v1/session/list?{query}")
    assert got.status_code == 400 and got.get_json()["success"] is False


def test_a_bare_list_has_every_session_and_limit_pages(client: FlaskClient) -> None:
    """The StoryArt session browser sends a bare list and shows every card; other clients page."""
    for i in range(23):
        save(client, minimal(n=i))
    listed = client.get("/api/v1/session/list").get_json()
    assert listed["count"] == 23 and listed["total"] == 23 and len(listed["sessions"]) == 23
    assert [s["n"] for s in listed["sessions"]] == list(range(22, -1, -1))
    paged = client.get("/api/v1/session/list?limit=20&offset=20").get_json()
    assert paged["count"] == 3 and paged["total"] == 23


# ------------------------------------------------------------------------------------------ save errors


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, ["scriptText is missing", "episodeContext is missing", "storyUuid is missing",
              "analyzedEpisode is missing"]),
        (minimal(scriptText=""), ["scriptText must be a non-empty string"]),
        (minimal(scriptText=5, episodeContext=None, storyUuid=[], analyzedEpisode="x"),
         ["scriptText must be", "episodeContext must be a string", "storyUuid must be a string",
          "analyzedEpisode must be an object"]),
        (minimal(timestamp="123"), ["timestamp must be a positive integer"]),
        (minimal(timestamp=1.5), ["timestamp must be a positive integer"]),
        (minimal(timestamp=-1), ["timestamp must be a positive integer"]),
        (minimal(timestamp=0), ["timestamp must be a positive integer"]),
        (minimal(timestamp=True), ["timestamp must be a positive integer"]),
        (minimal(timestamp=int(time.time() * 1000) + 2 * 86_400_000), ["future"]),
    ],
)
def test_invalid_sessions_are_400_and_store_nothing(client: FlaskClient, body: dict, words: list[str]) -> None:
    got = save(client, body)
    assert got.status_code == 400
    payload = got.get_json()
    assert payload["success"] is False and set(payload) == {"success", "error"}
    for word in words:
        assert word in payload["error"]
    assert stored_count(client) == 0


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[]", b'"text"', b"null", b"42", b'{"scriptText": NaN}', b'{"a": Infinity}',
     b'{"a": -Infinity}', b'{"scriptText": "\\ud800"}', b'{"s": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000,
     b'{"a":' * 300 + b"1" + b"}" * 300, b'{"a": 1e400}', b"\xef\xbb\xbf{}"],
)
def test_bad_json_is_400_and_stores_nothing(client: FlaskClient, raw: bytes) -> None:
    got = save(client, raw)
    assert got.status_code == 400
    assert got.mimetype == "application/json" and got.get_json()["success"] is False
    assert stored_count(client) == 0


def test_nesting_a_browser_could_read_but_we_cannot_store_is_a_clear_400(client: FlaskClient) -> None:
    deep = orjson.dumps(minimal(analyzedEpisode="X")).replace(b'"X"', b'{"a":' * 400 + b"1" + b"}" * 400)
    got = save(client, deep)
    assert got.status_code == 400 and "nested too deeply" in got.get_json()["error"]


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "text/plain"},
                                     {"Content-Type": "application/x-www-form-urlencoded"},
                                     {"Content-Type": "multipart/form-data; boundary=x"}])
def test_body_not_declared_as_json_is_415_and_stores_nothing(client: FlaskClient, headers: dict) -> None:
    got = save(client, orjson.dumps(minimal()), headers=headers)
    assert got.status_code == 415
    assert got.get_json() == {"success": False,
                              "error": "The request body must be declared as JSON (Content-Type: application/json)."}
    assert stored_count(client) == 0


def test_json_with_charset_is_accepted(client: FlaskClient) -> None:
    got = save(client, minimal(), headers={"Content-Type": "application/json; charset=utf-8"})
    assert got.status_code == 200


def test_body_over_the_limit_is_413(make_app, session_10kb: bytes) -> None:
    client = make_app(max_content_length=4096).test_client()
    got = save(client, session_10kb)
    assert got.status_code == 413
    assert got.get_json() == {"success": False,
                              "error": "The request body is larger than the limit of 4096 bytes (MAX_CONTENT_LENGTH)."}
    assert stored_count(client) == 0


# ---------------------------------------------------------------------------------- framework errors


def test_unknown_path_is_json_404(client: FlaskClient) -> None:
    got = client.get("/nope")
    assert got.status_code == 404 and got.mimetype == "application/json"
    assert got.get_json() == {"success": False, "error": "No such endpoint: GET /nope."}


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/v1/session/save"), ("POST", "/api/v1/session/latest"),
                                              ("PUT", "/api/v1/session/123"), ("POST", "/health")])
def test_wrong_method_is_json_405(client: FlaskClient, method: str, path: str) -> None:
    got = client.open(path, method=method, headers=JSON)
    assert got.status_code == 405 and got.mimetype == "application/json"
    assert got.get_json()["error"] == f"Method {method} is not allowed for {path}."
    assert "Allow" in got.headers


def test_unexpected_exception_is_a_generic_json_500_with_request_id(make_app, caplog) -> None:
    app = make_app()

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail")

    got = app.test_client().get("/boom", headers={"X-Request-ID": "req-42"})
    assert got.status_code == 500 and got.mimetype == "application/json"
    assert got.get_json() == {"success": False, "error": "Internal server error (request id req-42)."}
    assert b"secret" not in got.data and b"Traceback" not in got.data
    assert "req-42" in caplog.text and "secret detail" in caplog.text


# ------------------------------------------------------------------------------------------------ health


def test_health(client: FlaskClient) -> None:
    got = client.get("/health")
    assert got.status_code == 200
    body = got.get_json()
    expected = ({"status": "healthy", "redis": "connected", "storage": "redis"} if mode(client) == "redis"
                else {"status": "healthy", "redis": "not configured", "storage": "memory"})
    assert {k: body[k] for k in ("status", "redis", "storage")} == expected
    assert body["success"] is True


def test_health_when_redis_is_configured_but_unreachable(make_app) -> None:
    from servers import free_port

    app = make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_connect_timeout=0.5)
    client = app.test_client()
    started = time.monotonic()
    body = client.get("/health").get_json()
    assert time.monotonic() - started < 5  # generous bound: never a socket timeout's worth of waiting
    assert body["status"] == "degraded" and body["redis"] == "disconnected" and body["storage"] == "memory"
    saved = save(client, minimal()).get_json()
    assert saved["storage"] == "memory"
    assert client.get("/api/v1/session/latest").get_json()["storage"] == "memory"


# -------------------------------------------------------------------------------------------------- CORS


@pytest.mark.parametrize("origin", ["http://localhost:3000", "http://localhost:5173", "http://127.0.0.1:8080",
                                    "https://localhost", "http://[::1]:3000"])
@pytest.mark.parametrize(("method", "path"), [("POST", "/api/v1/session/save"), ("GET", "/api/v1/session/latest")])
def test_preflight_from_local_origins_is_allowed(client: FlaskClient, origin: str, method: str, path: str) -> None:
    got = client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                        "Access-Control-Request-Headers": "content-type"})
    assert got.status_code == 200
    assert got.headers["Access-Control-Allow-Origin"] == origin
    assert got.headers["Access-Control-Allow-Credentials"] == "true"
    assert method in got.headers["Access-Control-Allow-Methods"]
    assert "content-type" in got.headers["Access-Control-Allow-Headers"].lower()


def test_actual_requests_from_local_origins_carry_cors_headers(client: FlaskClient) -> None:
    origin = {"Origin": "http://localhost:3000"}
    saved = client.post("/api/v1/session/save", data=orjson.dumps(minimal()), headers={**JSON, **origin})
    assert saved.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    latest = client.get("/api/v1/session/latest", headers={**JSON, **origin})
    assert latest.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "ETag" in latest.headers["Access-Control-Expose-Headers"]


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.example",
                                    "http://evil.example:3000", "null", "http://127.0.0.2:3000"])
def test_other_origins_get_no_allow_origin(client: FlaskClient, origin: str) -> None:
    preflight = client.options("/api/v1/session/save", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert "Access-Control-Allow-Origin" not in preflight.headers
    got = client.get("/api/v1/session/latest", headers={"Origin": origin})
    assert "Access-Control-Allow-Origin" not in got.headers


def test_cors_origins_replaces_the_default(make_app) -> None:
    client = make_app(cors_origins=("https://storyart.example",)).test_client()
    allowed = client.get("/health", headers={"Origin": "https://storyart.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://storyart.example"
    local = client.get("/health", headers={"Origin": "http://localhost:3000"})
    assert "Access-Control-Allow-Origin" not in local.headers


def test_cross_site_text_plain_post_stores_nothing(client: FlaskClient) -> None:
    got = client.post("/api/v1/session/save", data=orjson.dumps(minimal()),
                      headers={"Content-Type": "text/plain", "Origin": "https://evil.example"})
    assert got.status_code == 415
    assert stored_count(client) == 0


def test_every_response_is_json(client: FlaskClient) -> None:
    for got in (client.options("/api/v1/session/latest"), client.get("/health"), client.get("/x"),
                client.get("/api/v1/session/latest")):
        assert got.mimetype == "application/json"
        json.loads(got.data)


def test_a_bad_timestamp_is_named_with_the_missing_fields(client: FlaskClient) -> None:
    got = save(client, {"episodeContext": "", "storyUuid": "s", "analyzedEpisode": {}, "timestamp": "soon"})
    message = got.get_json()["error"]
    assert got.status_code == 400 and "scriptText is missing" in message and "timestamp must be" in message


def test_configured_ipv6_origin_is_allowed_exactly(make_app) -> None:
    client = make_app(cors_origins=("http://[::1]:5173",)).test_client()
    got = client.get("/health", headers={"Origin": "http://[::1]:5173"})
    assert got.headers["Access-Control-Allow-Origin"] == "http://[::1]:5173"
    assert "Access-Control-Allow-Origin" not in client.get("/health", headers={"Origin": "http://:5173"}).headers
