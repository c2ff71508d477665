"""Memory bombs (docs/contract.md §1: every error a 4xx JSON answer that changes nothing): a body of many tiny
JSON values (`[[0],[0],...]`) costs ~35 times its size once parsed, a 33 MB one over 1 GB per worker, so a save
or an import refuses a body with more values than `payload.value_limit` allows with a 413, before it is parsed.
The count itself is checked against the parsed structure and a reference lexer, the limit through the API on
every storage mode, and the memory on a real gunicorn, where real 1 MB and 3 MB sessions still save."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hostile import stored

import payload
from servers import PeakRss, request

JSON = {"Content-Type": "application/json"}
VALID = {"scriptText": "INT. LAB - NIGHT", "episodeContext": "{}", "storyUuid": "u-1",
         "analyzedEpisode": {"episodeNumber": 1, "title": "Pilot", "scenes": []}}
MIB = 1024 * 1024


def session_with(field: str, raw: bytes, **changes: object) -> bytes:
    """A valid session with one more field whose JSON is `raw`, verbatim."""
    return orjson.dumps({**VALID, **changes})[:-1] + b',"%s":%s}' % (field.encode(), raw)


def tiny_lists(count: int) -> bytes:
    """`[[0],[0],...]`: `count` one-element arrays, 2 counted values each (`[` and `,`), 4 bytes each."""
    return b"[" + b"[0]," * (count - 1) + b"[0]]"


def structure_count(value: Any) -> int:
    """What `count_values` counts, from the parsed value: one per container, per member's `:`, and per `,`."""
    if isinstance(value, list):
        return 1 + max(len(value) - 1, 0) + sum(structure_count(v) for v in value)
    if isinstance(value, dict):
        return 1 + 2 * len(value) - (1 if value else 0) + sum(structure_count(v) for v in value.values())
    return 0


def lexer_count(body: bytes) -> int:
    """A plain byte-by-byte lexer: `\\\\` and `\\"` are escapes anywhere (as JSON has them inside strings),
    a quote toggles a string, and `[{,:` outside strings count."""
    count, inside, i = 0, False, 0
    while i < len(body):
        byte = body[i : i + 1]
        if byte == b"\\" and body[i + 1 : i + 2] in (b"\\", b'"'):
            i += 2
            continue
        if byte == b'"':
            inside = not inside
        elif not inside and byte in (b"[", b"{", b",", b":"):
            count += 1
        i += 1
    return count


# ------------------------------------------------------------------------------------------------ the count

TRICKY = ['a\\"b', "\\\\", '\\\\\\"', ",:[{", '"', '""', "\\", '\\\\"x,', "\u2028", '"\\"', "", "{}[],:"]
json_text = st.text(alphabet=st.sampled_from(list('"\\,:[]{} ax\u00e9\n')), max_size=12) | st.sampled_from(TRICKY)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) \
    | json_text
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(json_text, inner, max_size=5), max_leaves=40)


def test_the_count_of_real_sessions_is_their_structure(session_1mb: bytes) -> None:
    assert payload.count_values(session_1mb) == structure_count(orjson.loads(session_1mb)) == 23_795
    assert payload.count_values(session_1mb, chunk=7) == 23_795
    tricky = json.dumps({"k,:": [TRICKY, {'x"y': TRICKY}], "": "", "e": [], "o": {}}).encode()
    assert payload.count_values(tricky) == structure_count(orjson.loads(tricky)) == 38


@given(json_values, st.integers(min_value=1, max_value=64), st.booleans())
@settings(max_examples=300, deadline=None)
def test_the_count_is_the_structure_of_any_json(value: object, chunk: int, ascii_only: bool) -> None:
    body = json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":") if chunk % 2 else None).encode()
    assert payload.count_values(body, chunk=chunk) == structure_count(value), body


@given(st.binary(max_size=200) | st.lists(st.sampled_from([b'"', b"\\", b",", b"[", b"{", b":", b"a", b"]"]),
                                          max_size=60).map(b"".join),
       st.integers(min_value=1, max_value=16))
@settings(max_examples=300, deadline=None)
def test_the_count_of_any_bytes_is_what_a_lexer_counts(body: bytes, chunk: int) -> None:
    assert payload.count_values(body, chunk=chunk) == lexer_count(body), body


def test_the_count_stops_soon_after_the_limit() -> None:
    body = b'["' + b'","' * 1_000_000 + b'"]'  # a million strings, a million commas
    assert payload.count_values(body) == 1_000_001
    assert 1000 < payload.count_values(body, stop_above=1000) <= 1000 + payload._CHUNK


# ---------------------------------------------------------------------------------- through the API

LIMIT_BYTES = 4 * MIB  # a 4 MiB body limit: at most 262,144 values
LIMIT = LIMIT_BYTES // 16


@pytest.fixture(params=["redis", "sqlite", "memory"])
def small(request: pytest.FixtureRequest, make_app: Callable[..., Flask]) -> FlaskClient:
    """A test client on each storage mode, with a 4 MiB body limit."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        request.getfixturevalue("redis_db")
        return make_app(redis_url=server.url, max_content_length=LIMIT_BYTES).test_client()
    return make_app(local_store=request.param, max_content_length=LIMIT_BYTES).test_client()


def assert_refused(got: Any, limit: int) -> None:
    assert got.status_code == 413, got.data[:300]
    assert got.mimetype == "application/json"
    answer = orjson.loads(got.data)
    assert set(answer) == {"success", "error"} and answer["success"] is False
    assert answer["error"] == (f"The request body has more than {limit:,} JSON values, the most accepted (one per "
                               "16 bytes of MAX_CONTENT_LENGTH); a real session has far fewer."), answer


def padded(count: int) -> bytes:
    """A valid session of exactly `count` counted values: VALID's own and an array of zeros."""
    base = structure_count(VALID) + 3  # the field's `,` and `:`, and its array's `[`
    body = session_with("pad", b"[" + b",".join([b"0"] * (count - base + 1)) + b"]")
    assert structure_count(orjson.loads(body)) == count
    return body


BOMBS = {
    "tiny arrays": tiny_lists(LIMIT // 2 + 1),
    "tiny objects": b"[" + b",".join([b'{"a":0}'] * (LIMIT // 3 + 1)) + b"]",
    "nested arrays": b"[" + b",".join([b"[[[[0]]]]"] * (LIMIT // 5 + 1)) + b"]",
    "strings inside a valid session": session_with("s", b'["' + b'","' * LIMIT + b'"]'),
    "a valid session one value over the limit": padded(LIMIT + 1),
}


@pytest.mark.parametrize("name", BOMBS)
@pytest.mark.parametrize("endpoint", ["save", "import"])
def test_bodies_of_too_many_values_are_413_and_store_nothing(small: FlaskClient, endpoint: str, name: str) -> None:
    body = BOMBS[name] if endpoint == "save" or not BOMBS[name].startswith(b"{") else b"[" + BOMBS[name] + b"]"
    assert len(body) <= LIMIT_BYTES
    assert_refused(small.post(f"/api/v1/session/{endpoint}", data=body, headers=JSON), LIMIT)
    assert stored(small) == 0
    assert small.get("/health").status_code == 200


def test_an_import_counts_all_its_sessions_together(small: FlaskClient) -> None:
    """Each session alone is well under the limit; together they are over it: the whole body is refused."""
    one = padded(LIMIT // 3)
    assert small.post("/api/v1/session/save", data=one, headers=JSON).status_code == 200
    assert_refused(small.post("/api/v1/session/import", data=b"[%s]" % b",".join([one] * 4), headers=JSON), LIMIT)
    assert stored(small) == 1


def test_a_session_of_exactly_the_limit_is_saved(small: FlaskClient) -> None:
    got = small.post("/api/v1/session/save", data=padded(LIMIT), headers=JSON)
    assert got.status_code == 200, got.data[:300]
    assert stored(small) == 1


def test_real_sessions_and_imports_filling_the_body_limit_are_accepted(small: FlaskClient, session_1mb: bytes) -> None:
    """A real session has a value per ~40 bytes, so a body of them as large as the limit fits, also when it is
    full of JSON inside strings (a real `episodeContext` is a JSON document) that a quick count would see."""
    assert small.post("/api/v1/session/save", data=session_1mb, headers=JSON).status_code == 200
    real = orjson.loads(session_1mb)
    three = [{**real, "timestamp": 1_700_000_000_000 + i} for i in range(3)]
    got = small.post("/api/v1/session/import", data=orjson.dumps(three), headers=JSON)
    assert got.status_code == 200 and got.get_json()["imported"] == 3, got.data[:300]
    dense = orjson.dumps([[0, {"a": [1, 2]}]] * 60_000).decode()  # 420,000 `[{,:` in a string
    body = orjson.dumps({**real, "episodeContext": dense})
    assert len(body) < LIMIT_BYTES and sum(body.count(c) for c in b"[{,:") > LIMIT
    got = small.post("/api/v1/session/save", data=body, headers=JSON)
    assert got.status_code == 200, got.data[:300]
    assert stored(small) == 5


# ---------------------------------------------------------------------------------- on a real server


def three_mb_session(session_1mb: bytes) -> bytes:
    """A real 3 MB session, made at test time from the 1 MB one: three times its script, context and scenes."""
    real = orjson.loads(session_1mb)
    episode = real["analyzedEpisode"]
    body = orjson.dumps({**real, "scriptText": real["scriptText"] * 3, "episodeContext": real["episodeContext"] * 3,
                         "analyzedEpisode": {**episode, "scenes": episode["scenes"] * 3}})
    assert 2_900_000 < len(body) < 3_100_000
    return body


BOMB_33MB = 8_250_000  # one-element arrays: 33 MB, 16.5 million values, over 1 GB per worker once parsed
REAL_BOMBS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "save: 33 MB of tiny arrays": ("save", lambda: tiny_lists(BOMB_33MB)),
    "save: 33 MB of tiny arrays inside a valid session": ("save", lambda: session_with("bomb", tiny_lists(BOMB_33MB))),
    "import: a session of 33 MB of tiny arrays": ("import",
                                                  lambda: b"[%s]" % session_with("bomb", tiny_lists(BOMB_33MB))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_BOMBS)
def test_a_33_mb_bomb_is_refused_on_gunicorn_before_it_costs_memory(service, name: str) -> None:
    endpoint, make = REAL_BOMBS[name]
    body = make()
    server = service("gunicorn", LOG_LEVEL="WARNING")  # the defaults: a 50 MB body limit, 3 workers
    with PeakRss(server.proc.pid, interval=0.005) as rss:
        got = request(server.port, "POST", f"/api/v1/session/{endpoint}", body, JSON, timeout=120)
    grew = f"a worker grew by {rss.growth / MIB:.0f} MB"
    assert got.status == 413, (grew, got.body[:300])
    assert got.headers["content-type"] == "application/json"
    assert got.json() == {"success": False, "error": "The request body has more than 3,276,800 JSON values, the "
                          "most accepted (one per 16 bytes of MAX_CONTENT_LENGTH); a real session has far fewer."}
    assert rss.growth < 200 * MIB, grew
    health = request(server.port, "GET", "/health").json()
    assert health["localStore"]["sessions"] == 0, health
    assert request(server.port, "GET", "/api/v1/session/latest").status == 404


@pytest.mark.slow
def test_real_1_mb_and_3_mb_sessions_still_save_on_gunicorn(service, session_1mb: bytes) -> None:
    server = service("gunicorn", LOG_LEVEL="WARNING")
    for body in (session_1mb, three_mb_session(session_1mb)):
        got = request(server.port, "POST", "/api/v1/session/save", body, JSON, timeout=60)
        assert got.status == 200, got.body[:300]
        back = request(server.port, "GET", f"/api/v1/session/{got.json()['timestamp']}", timeout=60)
        assert back.json()["data"] == {**orjson.loads(body), "timestamp": got.json()["timestamp"]}
