"""The development server (`python app.py`): werkzeug's threaded server.

It stops gracefully on SIGINT and SIGTERM, answers even what it cannot parse in the service's JSON error shape, closes
connections that wait for a request longer than `IDLE_SECONDS`, and drops an answer whose client takes none of its bytes
for RESPONSE_SEND_TIMEOUT seconds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import socket
import struct
import sys
import threading
from typing import Any

from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

from config import Config
from responses import error_body

log = logging.getLogger(__name__)

IDLE_SECONDS = 5.0  # as gunicorn's keepalive (gunicorn.conf.py): a connection waiting this long for a request closes


class SendDeadline(io.BufferedIOBase):
    """A connection's `wfile` that raises TimeoutError when a send makes no progress for `seconds`.

    Every `send` must get bytes taken within `seconds` (RESPONSE_SEND_TIMEOUT), as with nginx's send_timeout, else
    TimeoutError. werkzeug takes that for a dropped connection: the thread stops writing, closes the answer's
    iterable (and so lets go of its bytes) and ends; the connection is reset, so the kernel lets go of what the
    client never read too. Without it, a client that asked for the list of ten 1 MB sessions and read nothing kept a
    thread and several MB for as long as it stayed connected.
    """

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock, self.seconds = sock, seconds

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.sock.settimeout(self.seconds)  # each send below waits at most this long for room, then sends what fits
        try:
            while view:
                view = view[self.sock.send(view):]
        except TimeoutError:
            reset_on_close(self.sock)
            raise
        finally:
            self.sock.settimeout(None)  # reads (a request body) keep their own deadline (deadline.py)
        return len(data)

    def fileno(self) -> int:
        return self.sock.fileno()


def reset_on_close(sock: socket.socket) -> None:
    """Make closing the socket reset the connection (SO_LINGER 0).

    What the peer never read is discarded, instead of the kernel keeping it while it retries.
    """
    linger = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)


class _ConnectionHandler(WSGIRequestHandler):
    """Track in `server.idle` the connections that have not begun a request.

    Those are a browser's preconnect or a client that connected and said nothing; a stopping server closes them instead
    of waiting on them for ever.
    """

    def setup(self) -> None:
        super().setup()
        self.wfile = SendDeadline(self.connection, self.server.send_timeout)
        self.server.idle.add(self.connection)

    def handle_one_request(self) -> None:
        """Handle one request, closing the connection after `IDLE_SECONDS` without one.

        Each connection has its own thread, so idle ones block nobody, but a browser's preconnected sockets
        and kept-alive ones would keep theirs for ever: waiting for a request ends after `IDLE_SECONDS`.
        """
        self.connection.settimeout(IDLE_SECONDS)
        super().handle_one_request()

    def parse_request(self) -> bool:
        self.server.idle.discard(self.connection)  # a request has begun: it will be finished
        self.connection.settimeout(None)  # its body has REQUEST_BODY_TIMEOUT (deadline.py) instead
        return super().parse_request()

    def send_response(self, code: int, message: str | None = None) -> None:
        self.connection_said = False
        super().send_response(code, message)

    def send_header(self, keyword: str, value: str) -> None:
        """Send a header, but only one `Connection` header per answer.

        werkzeug adds its own `close` after the app's (drain.py, deadline.py send `Connection: close` for gunicorn's
        sake).
        """
        if keyword.lower() == "connection":
            if self.connection_said:
                return
            self.connection_said = True
        super().send_header(keyword, value)

    def connection_dropped(self, error: BaseException, environ: dict[str, Any] | None = None) -> None:
        if isinstance(error, TimeoutError) and environ is not None:
            log.warning("dropped the answer to %s %s: its client took none of it for %g s (RESPONSE_SEND_TIMEOUT)",
                        environ["REQUEST_METHOD"], repr(environ["PATH_INFO"])[1:-1], self.server.send_timeout)

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if not format.startswith("Request timed out"):  # an idle connection closed: routine, not an error
            super().log_error(format, *args)

    def finish(self) -> None:
        self.server.idle.discard(self.connection)
        super().finish()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer a request http.server cannot parse in the service's JSON error shape.

        http.server answers what it cannot parse (a request line over 64 KiB: 414, a header over 64 KiB
        or more than 100 of them: 431, a garbled request line: 400) itself, with an HTML page; this service
        answers JSON (docs/contract.md §1), with a status line even to what looked like an HTTP/0.9 request.
        """
        self.log_error("code %d, message %s", code, message)
        reason = self.responses.get(code, ("Error",))[0]
        body = error_body(f"{reason}: {message}." if message else f"{reason}.")
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def serve(app: Flask, config: Config) -> None:
    """Run the development server until SIGINT or SIGTERM, then stop gracefully.

    On SIGINT/SIGTERM it stops accepting, lets requests in flight finish (their threads are joined), then flushes
    memory-held sessions to Redis.
    """
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the app logs each request itself
    server = make_server(config.host, config.port, app, threaded=True, request_handler=_ConnectionHandler)
    server.daemon_threads = False  # so server_close() joins the requests in flight
    server.idle = set()
    server.send_timeout = config.send_timeout
    stopping, stopped = threading.Event(), threading.Event()

    def close_idle_connections() -> None:
        server.shutdown()
        while not stopped.wait(0.1):  # until the requests in flight are joined
            for connection in list(server.idle):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)  # its handler reads EOF and ends

    def stop(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            log.info("%s received: finishing requests in flight", signal.Signals(signum).name)
            threading.Thread(target=close_idle_connections, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    log.info("listening on http://%s:%d", config.host, config.port)
    app.extensions["storyart-backups"].start()  # the backup schedule, if BACKUP_SCHEDULE is set
    try:
        server.serve_forever()
    finally:
        server.server_close()
        stopped.set()
        app.extensions["storyart-backups"].stop()
        app.extensions["storyart"].close()
        log.info("stopped")
