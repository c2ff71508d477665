"""Idle and slow clients with no proxy in front (docs/deploy.md: Slow and idle clients): 50 connections that send
nothing and 20 that send a save's body a byte at a time, held open against the real server, while a normal
client must still be answered within a second; the slow uploads then get a JSON 408 at REQUEST_BODY_TIMEOUT and
are closed, the idle connections are closed after the keep-alive time, and nothing they sent is stored."""

from __future__ import annotations

import time

import orjson
import pytest
from chaos import session
from loiter import Crowd

from servers import request, save_request

pytestmark = pytest.mark.slow

BODY_TIMEOUT = 2.5  # REQUEST_BODY_TIMEOUT of the server under test (60 s by default)
IDLE_CLOSE = 5.0  # gunicorn.conf.py keepalive, devserver.IDLE_SECONDS


def answered_within(port: int, seconds: float) -> list[float]:
    """A normal client's requests (a health check, a save and a read of it) every 0.2 s for `seconds`: how long
    each round took; every answer must be right."""
    rounds, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        assert request(port, "GET", "/health", timeout=10).status == 200
        saved = save_request(port, session("normal"))
        assert saved.status == 200, saved.body
        got = request(port, "GET", f"/api/v1/session/{saved.json()['timestamp']}", timeout=10)
        assert got.status == 200 and got.json()["data"]["storyUuid"] == "normal"
        rounds.append(time.monotonic() - started)
        time.sleep(0.2)
    return rounds


# gunicorn.conf.py gives every storage mode the same worker model (gthread); with Redis it runs 3 workers, with
# the volatile memory store one, which must then hold every connection itself.
@pytest.mark.parametrize(("kind", "store"), [("app", "sqlite"), ("gunicorn", "redis"), ("gunicorn", "memory")])
def test_idle_and_slow_clients_do_not_keep_others_waiting(kind, store, service, request_redis) -> None:
    env = {"REQUEST_BODY_TIMEOUT": str(BODY_TIMEOUT), "LOCAL_STORE": "memory" if store == "memory" else "sqlite"}
    if store == "redis":
        env["REDIS_URL"] = request_redis()
    server = service(kind, **env)
    with Crowd(server.port, idle=50, slow=20, pause=0.3) as crowd:
        rounds = answered_within(server.port, BODY_TIMEOUT + 0.5)
        assert len(rounds) >= 5 and max(rounds) < 1.0, rounds  # the requirement: answered within a second
        deadline = time.monotonic() + IDLE_CLOSE + 2
        while time.monotonic() < deadline and len(crowd.closed(True)) + len(crowd.closed(False)) < 70:
            time.sleep(0.1)
        slow, idle = crowd.closed(True), crowd.closed(False)
        assert len(slow) == 20 and len(idle) == 50, (len(slow), len(idle))
    for client in slow:
        assert client.sent >= 3  # it really was uploading when the deadline came
        assert client.status == 408, client.answer[-300:]
        assert b"\r\nconnection: close\r\n" in client.answer.lower(), client.answer[:300]  # and closed, as it says
        body = orjson.loads(client.answer.split(b"\r\n\r\n", 1)[1])
        assert body == {"success": False,
                        "error": f"The request body did not arrive within {BODY_TIMEOUT:g} s (REQUEST_BODY_TIMEOUT)."}
        assert BODY_TIMEOUT - 0.1 < client.closed_after < BODY_TIMEOUT + 1.5, client.closed_after
    assert all(client.answer == b"" for client in idle)  # closed without a word: nothing was asked
    listed = request(server.port, "GET", "/api/v1/session/list?view=summary&limit=100").json()
    assert {s["storyUuid"] for s in listed["sessions"]} == {"normal"}  # no cut-off body was stored


@pytest.fixture
def request_redis(redis_db, redis_server):
    """The suite's Redis, emptied, for a test that only needs its URL."""
    return lambda: redis_server.url
