"""Hostile input (docs/contract.md §1): whatever arrives, every answer is a 4xx JSON error, nothing is stored, and the
server keeps serving. A corpus through the test client on both storage modes, the cases only a real server
sees (chunked bodies, bodies over the limit, request lines and headers it cannot parse) against gunicorn and
`python app.py`, and property-based tests (hypothesis) on every endpoint."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from urllib.parse import quote

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocator import now_ms
from app import create_app
from config import Config
from servers import ServiceProcess
from stores.redis import INDEX_KEY

JSON = {"Content-Type": "application/json"}
VALID = {"scriptText": "INT. LAB - NIGHT", "episodeContext": "{}", "storyUuid": "u-1",
         "analyzedEpisode": {"episodeNumber": 1, "title": "Pilot", "scenes": []}}
DAY_MS = 86_400_000


def dumps(value: object) -> bytes:
    """Compact JSON by the standard library, which writes what orjson refuses (integers beyond 64 bits, NaN)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def valid(**changes: object) -> bytes:
    """A valid session with `changes`."""
    return dumps({**VALID, **changes})


def with_raw(field: str, raw: bytes) -> bytes:
    """A valid session with one more field whose JSON value is `raw`, verbatim (for what orjson won't write)."""
    return valid()[:-1] + b',"%s":%s}' % (field.encode(), raw)


def assert_json_error(status: int, mimetype: str, body: bytes, allowed: tuple[int, ...] = ()) -> dict:
    assert 400 <= status < 500 or status in allowed, (status, body[:300])
    assert mimetype == "application/json", (status, mimetype, body[:300])
    payload = orjson.loads(body)
    assert payload["success"] is False and isinstance(payload["error"], str) and payload["error"], payload
    assert set(payload) == {"success", "error"}
    return payload


def stored(client: FlaskClient) -> int:
    """Sessions stored anywhere, read behind the API's back: the local store and the public Redis index."""
    sessions = client.application.extensions["storyart"]
    count = sessions.local.count()[0]
    if sessions.redis is not None:
        count += sessions.redis.client.zcard(INDEX_KEY)
    return count


# ------------------------------------------------------------------------------------------------ corpus

TRUNCATED = valid()[:-7]
SAVE_BODIES = {
    "empty": b"",
    "whitespace": b" \r\n\t ",
    "one brace": b"{",
    "truncated session": TRUNCATED,
    "truncated mid-escape": b'{"scriptText":"abc\\u12',
    "array": b"[]",
    "string": b'"a session"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    "array of a session": b"[" + valid() + b"]",
    "100000-deep arrays": b"[" * 100_000 + b"]" * 100_000,
    "100000-deep objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "100000 unclosed": b"[" * 100_000,
    "deep inside a valid session": with_raw("deep", b"[" * 5000 + b"]" * 5000),
    "300-deep (JSON.parse reads it, we cannot store it)": with_raw("deep", b'{"a":' * 300 + b"1" + b"}" * 300),
    "NaN": with_raw("x", b"NaN"),
    "Infinity": with_raw("x", b"Infinity"),
    "-Infinity": with_raw("x", b"-Infinity"),
    "NaN as scriptText": b'{"scriptText":NaN}',
    "1e400": with_raw("x", b"1e400"),
    "-1e400": with_raw("x", b"-1e400"),
    "400-digit integer": with_raw("x", b"1" + b"0" * 400),
    "lone high surrogate": with_raw("x", b'"\\ud800"'),
    "lone low surrogate": with_raw("x", b'"\\udc00"'),
    "lone surrogate in scriptText": valid(scriptText="X").replace(b'"X"', b'"\\udbff"'),
    "reversed surrogate pair": with_raw("x", b'"\\udc00\\ud800"'),
    "invalid UTF-8 byte": with_raw("x", b'"\xff"'),
    "overlong UTF-8": with_raw("x", b'"\xc0\xaf"'),
    "UTF-8 encoded surrogate": with_raw("x", b'"\xed\xa0\x80"'),
    "truncated UTF-8": with_raw("x", b'"\xe2\x82"'),
    "UTF-16 body": valid().decode().encode("utf-16"),
    "BOM": b"\xef\xbb\xbf" + valid(),
    "NUL byte outside strings": valid()[:-1] + b"\x00}",
    "control character in a string": with_raw("x", b'"a\x01b"'),
    "single quotes": b"{'scriptText': 'x'}",
    "trailing comma": valid()[:-1] + b",}",
    "comment": b"/* hi */" + valid(),
    "two objects": valid() + valid(),
    "missing fields": b"{}",
    "wrong types": dumps({"scriptText": 1, "episodeContext": [], "storyUuid": {}, "analyzedEpisode": "x"}),
    "empty scriptText": valid(scriptText=""),
    "null analyzedEpisode": valid(analyzedEpisode=None),
}
BAD_TIMESTAMPS = {
    "string": "123", "float": 1.5, "negative": -1, "zero": 0, "true": True, "array": [1], "object": {"ms": 1},
    "1e20 float": 1e20, "2**64": 2**64, "2**63": 2**63, "two days ahead": "future", "empty string": "",
}
BAD_PATHS = ["abc", "12a", "-5", "+5", "1.5", "1e5", "0x10", "%20", "%2012", "12%20", "%00", "١٢٣", "９",
             "9" * 17, "9" * 5000, "%F0%9F%8E%AC", "%ff", "..%2f..%2fetc", "NaN", "Infinity", "null"]
BAD_QUERIES = ["limit=0", "limit=101", "limit=-1", "limit=1.5", "limit=1e2", "limit=%00", "limit=١", "limit=",
               "limit=" + "1" * 5000, "offset=" + "9" * 100_000, "offset=-1", "offset=0x1", "limit=%ff",
               "limit=+1", "limit= 1"]
CONTENT_TYPES = [None, "", "text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/jsonx", "application/json-patch+json",
                 "application/ld+json", "text/json", "json", "application", "*/*", "application/json/x",
                 "\x00application/json"]


@pytest.mark.parametrize("name", SAVE_BODIES)
def test_bad_bodies_are_400_and_store_nothing(client: FlaskClient, name: str) -> None:
    got = client.post("/api/v1/session/save", data=SAVE_BODIES[name], headers=JSON)
    assert got.status_code == 400, (name, got.data[:300])
    assert_json_error(got.status_code, got.mimetype, got.data)
    assert stored(client) == 0
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("name", BAD_TIMESTAMPS)
def test_bad_timestamps_are_400_and_store_nothing(client: FlaskClient, name: str) -> None:
    value = BAD_TIMESTAMPS[name]
    if value == "future":
        value = now_ms() + 2 * DAY_MS
    got = client.post("/api/v1/session/save", data=valid(timestamp=value), headers=JSON)
    payload = assert_json_error(got.status_code, got.mimetype, got.data)
    assert got.status_code == 400 and "timestamp" in payload["error"], payload
    assert stored(client) == 0


@pytest.mark.parametrize("raw", BAD_PATHS)
def test_bad_path_parameters_are_400(client: FlaskClient, raw: str) -> None:
    got = client.get(f"/api/v1/session/{raw}")
    assert_json_error(got.status_code, got.mimetype, got.data)
    assert got.status_code in (400, 404)


@pytest.mark.parametrize("query", BAD_QUERIES)
def test_bad_query_values_are_400(client: FlaskClient, query: str) -> None:
    got = client.get(f"/api/v1/session/list?{query}")
    assert got.status_code == 400, (query, got.data[:200])
    assert_json_error(got.status_code, got.mimetype, got.data)


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_bodies_not_declared_as_json_are_415(client: FlaskClient, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    got = client.post("/api/v1/session/save", data=valid(), headers=headers)
    assert got.status_code == 415, (content_type, got.data)
    assert_json_error(got.status_code, got.mimetype, got.data)
    assert stored(client) == 0


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/api/v1/session/save"), ("PATCH", "/api/v1/session/save"), ("DELETE", "/api/v1/session/save"),
    ("GET", "/api/v1/session/save"), ("POST", "/api/v1/session/123"), ("POST", "/api/v1/session/list"),
    ("TRACE", "/health"), ("GET", "/api/v1/session"), ("GET", "/api/v2/session/latest"),
    ("GET", "/api/v1/session/latest/extra"), ("GET", "/" + "a" * 10_000), ("POST", "/api/v1/session/save/"),
    ("GET", "/api//v1/session/latest"), ("POST", "/api/v1//session/save"), ("GET", "/api/v1/session//123"),
    ("GET", "/api/v1/session/%2F123"),
])
def test_wrong_methods_and_paths_are_json_4xx(client: FlaskClient, method: str, path: str) -> None:
    got = client.open(path, method=method, data=valid(), headers=JSON)
    assert got.status_code in (404, 405), (method, path, got.status_code)
    assert_json_error(got.status_code, got.mimetype, got.data)
    assert stored(client) == 0


def test_a_body_just_over_the_limit_is_413(make_app) -> None:
    client = make_app(max_content_length=4096).test_client()
    body = valid(scriptText="x" * 4096)[: 4096 + 1]
    got = client.post("/api/v1/session/save", data=body, headers=JSON)
    assert got.status_code == 413
    assert_json_error(got.status_code, got.mimetype, got.data)
    fits = valid(scriptText="x" * (4096 - len(valid(scriptText=""))))
    assert len(fits) == 4096 and client.post("/api/v1/session/save", data=fits, headers=JSON).status_code == 200


# ---------------------------------------------------------------------------------- on a real server

LIMIT = 65_536


@pytest.fixture(scope="module", params=["gunicorn", "app"])
def real_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One server process per kind for the module (memory mode, a 64 KiB body limit)."""
    server = ServiceProcess(request.param, {"MAX_CONTENT_LENGTH": str(LIMIT)},
                            tmp_path_factory.mktemp("hostile") / f"{request.param}.log").start()
    yield server
    server.stop()


def exchange(port: int, data: bytes, half_close: bool = False) -> tuple[int, str, bytes]:
    """Send raw bytes and read the answer as a client does (up to its Content-Length, or to the end of a
    chunked body or of the connection): (status, content type, body). Status 0: no status line at all."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading everything: read what it said
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
            complete = complete_answer(answer)
            if complete is not None:
                return complete
    return complete_answer(answer, eof=True)


def complete_answer(answer: bytes, eof: bool = False) -> tuple[int, str, bytes] | None:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        return (0, "", answer) if eof else None
    if not sep:
        return (int(head.split()[1]), "", b"") if eof else None
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    mimetype = headers.get(b"content-type", b"").split(b";")[0].decode()
    status = int(lines[0].split()[1])
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        return (status, mimetype, body[:length]) if len(body) >= length or eof else None
    if headers.get(b"transfer-encoding") == b"chunked":
        return (status, mimetype, dechunk(body)) if body.endswith(b"0\r\n\r\n") or eof else None
    return (status, mimetype, body) if eof else None


def dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size, _, rest = data.partition(b"\r\n")
        size_int = int(size.split(b";")[0], 16)
        if size_int == 0:
            break
        out.append(rest[:size_int])
        data = rest[size_int + 2 :]
    return b"".join(out)


def chunked(body: bytes, size: int = 4096) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def post(body: bytes, *headers: bytes) -> bytes:
    return (b"POST /api/v1/session/save HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body)


def get_line(target: bytes, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return (b"GET %s %s\r\nHost: 127.0.0.1\r\nConnection: close\r\n" % (target, version)
            + b"".join(h + b"\r\n" for h in headers) + b"\r\n")


OVER = valid(scriptText="x" * LIMIT)[: LIMIT + 1]  # one byte over the limit
AT_LIMIT = valid(scriptText="y" * (LIMIT - len(valid(scriptText=""))))
CT = b"Content-Type: application/json"
WIRE = {
    "over the limit with Content-Length": (post(OVER, CT, b"Content-Length: %d" % len(OVER)), (413,)),
    "over the limit, chunked": (post(chunked(OVER), CT, b"Transfer-Encoding: chunked"), (413,)),
    "far over the limit, chunked": (post(chunked(OVER * 3), CT, b"Transfer-Encoding: chunked"), (413,)),
    "Content-Length far over the limit": (post(b"{", CT, b"Content-Length: 104857600"), (413,)),
    "invalid chunk size": (post(b"zz\r\nabc\r\n0\r\n\r\n", CT, b"Transfer-Encoding: chunked"), (400,)),
    "chunk longer than declared": (post(b"2\r\nabcdef\r\n0\r\n\r\n", CT, b"Transfer-Encoding: chunked"), (400,)),
    "truncated body": (post(TRUNCATED[:50], CT, b"Content-Length: %d" % len(TRUNCATED)), (400,)),
    "non-numeric Content-Length": (post(valid(), CT, b"Content-Length: abc"), (400,)),
    "negative Content-Length": (post(valid(), CT, b"Content-Length: -5"), (400,)),
    "text/plain, chunked": (post(chunked(valid()), b"Content-Type: text/plain", b"Transfer-Encoding: chunked"),
                            (415,)),
    "no content type, chunked": (post(chunked(valid()), b"Transfer-Encoding: chunked"), (415,)),
    "5000-character query value": (get_line(b"/api/v1/session/list?limit=" + b"1" * 5000), (400, 414)),
    "100000-character query value": (get_line(b"/api/v1/session/list?offset=" + b"9" * 100_000), (400, 414)),
    "100000-character path": (get_line(b"/api/v1/session/" + b"1" * 100_000), (400, 414)),
    "invalid UTF-8 in the path": (get_line(b"/api/v1/session/\xff\xfe"), (400, 404)),
    "NUL in the path": (get_line(b"/api/v1/session/1%002"), (400, 404)),
    "a 70 KB header": (get_line(b"/health", b"X-Big: " + b"a" * 70_000), (400, 431)),
    "200 headers": (get_line(b"/health", *(b"X-H%d: 1" % i for i in range(200))), (400, 431)),
    "garbage request line": (b"GARBAGE\r\n\r\n", (400,)),
    "bad HTTP version": (get_line(b"/health", version=b"HTTP/9.9"), (400, 505)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", WIRE)
def test_wire_level_garbage_gets_a_json_4xx_and_the_server_keeps_serving(real_server, name: str) -> None:
    data, statuses = WIRE[name]
    before = orjson.loads(exchange(real_server.port, get_line(b"/health"))[2])["memorySessions"]
    status, mimetype, body = exchange(real_server.port, data, half_close=name == "truncated body")
    allowed = (505,) if 505 in statuses else ()
    assert_json_error(status, mimetype, body, allowed)
    assert status in statuses, (name, status, body[:200])
    health_status, _, health_body = exchange(real_server.port, get_line(b"/health"))
    assert health_status == 200 and orjson.loads(health_body)["memorySessions"] == before, "something was stored"


@pytest.mark.slow
def test_chunked_bodies_up_to_the_limit_are_read_whole(real_server) -> None:
    """The control for the chunked cases above: at the limit exactly, a chunked body is saved in full."""
    status, _, body = exchange(real_server.port, post(chunked(AT_LIMIT, 1000), CT, b"Transfer-Encoding: chunked"))
    assert status == 200, body
    ts = orjson.loads(body)["timestamp"]
    status, _, body = exchange(real_server.port, get_line(b"/api/v1/session/%d" % ts))
    assert status == 200 and orjson.loads(body)["data"]["scriptText"] == "y" * (LIMIT - len(valid(scriptText="")))


# ------------------------------------------------------------------------------------------- properties


@pytest.fixture(scope="module", params=["memory", "redis"])
def hostile_app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    path = tmp_path_factory.mktemp("hostile") / "sessions.sqlite3"
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        server.client().flushall()
        config = Config(redis_url=server.url, local_store_path=path)
    else:
        config = Config(local_store_path=path)
    app = create_app(config)
    yield app
    app.extensions["storyart"].close()


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


def is_session(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    ok = (isinstance(value.get("scriptText"), str) and value["scriptText"] != ""
          and isinstance(value.get("episodeContext"), str) and isinstance(value.get("storyUuid"), str)
          and isinstance(value.get("analyzedEpisode"), dict))
    ts = value.get("timestamp")
    return ok and (ts is None or (type(ts) is int and 0 < ts <= now_ms() + DAY_MS))


def save_and_check(app: Flask, body: bytes, headers: dict | None = None) -> None:
    """The property: a 4xx JSON error and nothing stored, unless the body is a valid session (then 200)."""
    client = app.test_client()
    got = client.post("/api/v1/session/save", data=body, headers=JSON if headers is None else headers)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if got.status_code == 200:
        assert (headers is None or headers.get("Content-Type", "").startswith("application/json")) \
            and is_session(parsed), body[:200]
        local = app.extensions["storyart"].local
        while (record := local.oldest()) is not None:
            local.delete(record.timestamp)
        if app.extensions["storyart"].redis is not None:
            app.extensions["storyart"].redis.client.flushdb()
        return
    assert_json_error(got.status_code, got.mimetype, got.data)
    assert stored(client) == 0


@given(st.binary(max_size=300))
@PROPERTY
def test_any_bytes_as_a_save(hostile_app: Flask, body: bytes) -> None:
    save_and_check(hostile_app, body)


@given(json_values)
@PROPERTY
def test_any_json_as_a_save(hostile_app: Flask, value: object) -> None:
    save_and_check(hostile_app, dumps(value))


@given(st.dictionaries(st.sampled_from([*VALID, "timestamp", "extra"]), json_values, max_size=6))
@PROPERTY
def test_objects_near_a_session_as_a_save(hostile_app: Flask, fields: dict) -> None:
    save_and_check(hostile_app, dumps(fields))


@given(st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=12),
                 st.booleans(), st.lists(st.integers(), max_size=2), st.just(now_ms() + 2 * DAY_MS)))
@PROPERTY
def test_any_timestamp(hostile_app: Flask, timestamp: object) -> None:
    save_and_check(hostile_app, valid(timestamp=timestamp))


@given(st.lists(st.sampled_from([b"\\ud800", b"\\udfff", b"\xff", b"\xc3", b"\xed\xb0\x80", b"NaN", b"\x00",
                                 b'"', b"\\", b"\\u", b"\\x41", b"\\uZZZZ", b"\n", b"\xf4\x90\x80\x80",
                                 b"a", b"\xe2\x80\xa8", b"\\ud83c\\udfac"]), min_size=1, max_size=8))
@PROPERTY
def test_string_escapes_and_bytes_inside_a_session(hostile_app: Flask, pieces: list[bytes]) -> None:
    save_and_check(hostile_app, with_raw("x", b'"' + b"".join(pieces) + b'"'))


@given(st.text(max_size=40) | st.from_regex(r"\A[0-9]{0,30}\Z"))
@PROPERTY
def test_any_path_parameter(hostile_app: Flask, raw: str) -> None:
    got = hostile_app.test_client().get("/api/v1/session/" + quote(raw, safe=""))
    if got.status_code == 200:
        return  # the empty segment routes elsewhere, e.g. a stored timestamp; not an error case
    assert_json_error(got.status_code, got.mimetype, got.data)
    ascii_digits = raw.isascii() and raw.isdigit() and len(raw) <= 16
    if raw and "/" not in raw and raw not in ("save", "import", "latest", "list"):
        assert got.status_code == (404 if ascii_digits else 400), (raw, got.status_code)


@given(st.sampled_from(["limit", "offset"]), st.text(max_size=30) | st.integers().map(str))
@PROPERTY
def test_any_query_value(hostile_app: Flask, name: str, value: str) -> None:
    got = hostile_app.test_client().get("/api/v1/session/list?" + name + "=" + quote(value, safe=""))
    low, high = (1, 100) if name == "limit" else (0, 10**9)
    if value.isascii() and value.isdigit() and len(value) <= 10 and low <= int(value) <= high:
        assert got.status_code == 200
    else:
        assert got.status_code == 400, (name, value)
        assert_json_error(got.status_code, got.mimetype, got.data)


@given(st.text(max_size=40))
@PROPERTY
def test_any_content_type(hostile_app: Flask, content_type: str) -> None:
    try:
        content_type.encode("latin-1")
    except UnicodeEncodeError:
        return  # not sendable as a header
    if "\n" in content_type or "\r" in content_type:
        return
    save_and_check(hostile_app, valid(), {"Content-Type": content_type})


def test_the_server_still_serves_after_the_properties(hostile_app: Flask) -> None:
    client = hostile_app.test_client()
    saved = client.post("/api/v1/session/save", data=valid(), headers=JSON)
    assert saved.status_code == 200
    assert client.get("/api/v1/session/latest").get_json()["data"]["timestamp"] == saved.get_json()["timestamp"]
