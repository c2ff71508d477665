"""Let a refused upload read its 413 at once, and still see it instead of a connection reset.

The service refuses a body over `MAX_CONTENT_LENGTH` before reading it (docs/contract.md §1). If the worker then
closes the connection while the peer is still sending, the kernel answers the unread bytes with a reset, and a
reverse proxy that is still streaming the buffered body upstream (nginx: `writev() failed (32: Broken pipe)
while sending request to upstream`) turns the service's JSON 413 into its own 502. Measured behind nginx with
a 2.5 MB body over a 2 MB limit: 9 of 30 requests got the 502.

`DrainRefusedBody` sends the 413 first, saying `Connection: close`, then (when the server closes the response)
reads and discards what the peer still sends, in small chunks never held in memory, bounded in bytes (`max_excess`
over the limit; a larger declared body is not waited for at all) and in time (`max_seconds`: a peer that stalls
or trickles is dropped).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

DRAIN_MAX_EXCESS = 16 * 1024 * 1024
DRAIN_MAX_SECONDS = 2.0
CHUNK = 64 * 1024

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class DrainRefusedBody:
    """WSGI middleware that drains a refused request body after a 413 has been sent.

    It drains the unread body only when it is at most `max_excess` bytes over `limit` (the app's MAX_CONTENT_LENGTH),
    for at most `max_seconds`.
    """

    def __init__(self, app: WSGIApp, limit: int, max_excess: int = DRAIN_MAX_EXCESS,
                 max_seconds: float = DRAIN_MAX_SECONDS) -> None:
        self.app, self.limit, self.max_excess, self.max_seconds = app, limit, max_excess, max_seconds

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        refused = False

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal refused
            refused = status.startswith("413")
            if refused:  # the connection ends after this answer (`_ThenDrain.close`): the answer says so
                headers = [(k, v) for k, v in headers if k.lower() != "connection"] + [("Connection", "close")]
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        result = self.app(environ, capture)
        return _ThenDrain(result, environ, self._left_to_drain(environ), self.max_seconds) if refused else result

    def _left_to_drain(self, environ: dict[str, Any]) -> int:
        """How many bytes to drain: a declared body's, if not too large; a chunked one's, up to `max_excess`.

        A chunked body's end is not known here, so it is drained until the peer, having read its 413, closes,
        within the same bounds in bytes and time."""
        if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            return self.max_excess
        try:
            declared = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            return 0
        return declared if 0 <= declared <= self.limit + self.max_excess else 0


class _ThenDrain:
    """The 413's body as the server sends it; on `close()` (after the answer went out), the drain."""

    def __init__(self, body: Iterable[bytes], environ: dict[str, Any], left: int, max_seconds: float) -> None:
        self.body, self.environ, self.left, self.max_seconds = body, environ, left, max_seconds
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        self.sock = sock if isinstance(sock, socket.socket) else None  # the connection, when the server says

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            getattr(self.body, "close", lambda: None)()
        if self.left > 0:
            self._drain()
        if self.sock is not None:
            # What is left of a refused body must not be read as the next request of a kept-alive connection
            # (gunicorn's threaded workers keep it): the connection ends here, its answer already sent.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def _drain(self) -> None:
        """Drain the body from the connection's socket, else from `wsgi.input`.

        The socket is used when the server says which: each `recv` returns whatever has arrived, so the deadline holds
        however slowly the peer trickles.
        """
        sock = self.sock
        read = sock.recv if sock is not None else self.environ["wsgi.input"].read
        left, deadline = self.left, time.monotonic() + self.max_seconds
        try:
            while left > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if sock is not None:
                    sock.settimeout(remaining)
                chunk = read(min(CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
        except Exception:  # the peer went away or stalled: nothing left to be polite to
            return
