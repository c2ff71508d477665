"""REQUEST_BODY_TIMEOUT at the WSGI layer (deadline.py), on real sockets: a chunked body that is in by the
deadline is answered by the app however long the app then works on it, and one that is not gets the 408. (The
servers' side, with slow raw clients, is in test_slow_clients.py.)"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import orjson
import pytest

from deadline import BodyDeadline, Watchdog

SECONDS = 0.1


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the server's end, the client's end) of one real connection."""
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def slow_app(environ: dict, start_response) -> list[bytes]:
    """Reads the whole body, then works past the deadline (what a large import does), then answers."""
    body = environ["wsgi.input"].read()
    time.sleep(SECONDS * 4)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [orjson.dumps({"received": len(body)})]


def call(server: socket.socket) -> tuple[str, bytes]:
    answered: list[str] = []
    environ = {"gunicorn.socket": server, "HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input": server.makefile("rb")}
    body = b"".join(BodyDeadline(slow_app, SECONDS, Watchdog())(environ, lambda status, *_: answered.append(status)))
    return answered[0], body


def test_a_chunked_body_in_by_the_deadline_is_answered_by_the_app(connection) -> None:
    server, client = connection
    client.sendall(b"x" * 1000)
    client.shutdown(socket.SHUT_WR)  # the body's end
    assert call(server) == ("200 OK", b'{"received":1000}')


def test_a_chunked_body_still_arriving_at_the_deadline_is_408(connection) -> None:
    server, client = connection
    client.sendall(b"x" * 10)  # and nothing more
    status, body = call(server)
    assert status == "408 Request Timeout"
    assert orjson.loads(body) == {"success": False, "error": f"The request body did not arrive within {SECONDS:g} s "
                                                             "(REQUEST_BODY_TIMEOUT)."}
