"""The development server (`python app.py`): werkzeug's threaded server, with HTTP/1.1 keep-alive.

It keeps a connection for the next request (a browser's CORS preflight and its request, a page's polls), stops
gracefully on SIGINT and SIGTERM, answers even what it cannot parse in the service's JSON error shape, closes
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
from collections.abc import Iterator
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


class _Body:
    """A request's `wsgi.input` that knows whether the body has been read to its end.

    Only then can the connection carry a next request: what is left of a body would be read as its request line.
    """

    def __init__(self, stream: Any, environ: dict[str, Any]) -> None:
        self.stream, declared = stream, environ.get("CONTENT_LENGTH", "")
        self.chunked = bool(environ.get("wsgi.input_terminated"))  # werkzeug decodes it; a read of b"" is its end
        valid = not self.chunked and (declared.isdigit() or not declared)  # else the connection ends after it
        self.left: int | None = int(declared or 0) if valid else None
        self.ended = self.left == 0

    def _count(self, data: bytes, size: int | None) -> bytes:
        if self.left is not None:
            self.left -= len(data)
            self.ended = self.left <= 0
        elif self.chunked and not data and size != 0:
            self.ended = True
        return data

    def read(self, size: int | None = -1) -> bytes:
        return self._count(self.stream.read(size), size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._count(self.stream.readline(size), size)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class _ConnectionHandler(WSGIRequestHandler):
    """Keep connections alive between requests; track in `server.idle` those waiting for one.

    Those are a browser's preconnect, a kept-alive connection between requests or a client that connected and said
    nothing; a stopping server closes them instead of waiting on them for ever.
    """

    protocol_version = "HTTP/1.1"
    # The headers and the body go out in two sends; on a kept connection Nagle's algorithm held the second until the
    # client's delayed ACK came (40 ms: 22 requests/s for one client). TCP_NODELAY sends each at once.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.wfile = SendDeadline(self.connection, self.server.send_timeout)

    def handle_one_request(self) -> None:
        """Handle one request, closing the connection after `IDLE_SECONDS` without one.

        Each connection has its own thread, so idle ones block nobody, but a browser's preconnected sockets
        and kept-alive ones would keep theirs for ever: waiting for a request ends after `IDLE_SECONDS`.
        """
        self.server.idle.add(self.connection)
        self.connection.settimeout(IDLE_SECONDS)
        super().handle_one_request()

    def parse_request(self) -> bool:
        self.server.idle.discard(self.connection)  # a request has begun: it will be finished
        self.connection.settimeout(None)  # its body has REQUEST_BODY_TIMEOUT (deadline.py) instead
        return super().parse_request()

    def run_wsgi(self) -> None:
        """Answer one request with the app, keeping the connection when HTTP/1.1 allows it.

        werkzeug's own says `Connection: close` to every answer, then waits 10 ms for more of the body (which would
        swallow a kept-alive client's next request): every request paid a new connection, a new thread and that wait.
        Here the connection is kept unless the client or the app said close, the request was not HTTP/1.1, a body
        was left unread, the answer failed or the server is stopping; an answer after which it closes says so.
        """
        if self.headers.get("Expect", "").lower().strip(" \t") == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.environ = environ = self.make_environ()
        body = environ["wsgi.input"] = _Body(environ["wsgi.input"], environ)
        started: list[Any] = []  # [status, headers] as the app last set them
        sent = chunked = False

        def write(data: bytes) -> None:
            nonlocal sent, chunked
            if not sent:
                sent = True
                chunked = self._send_head(*started, environ["REQUEST_METHOD"], body)
            if data:
                if chunked:
                    self.wfile.write(b"%x\r\n" % len(data))
                self.wfile.write(data)
                if chunked:
                    self.wfile.write(b"\r\n")

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if exc_info and sent:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return write

        answer = None
        try:
            answer = self.server.app(environ, start_response)
            for data in answer:
                write(data)
            if not sent:
                write(b"")
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (ConnectionError, TimeoutError) as error:
            self.close_connection = True
            self.connection_dropped(error, environ)
        except Exception:
            self.close_connection = True
            log.exception("error on %s %s", environ["REQUEST_METHOD"], repr(environ["PATH_INFO"])[1:-1])
            if not sent:
                self.send_error(500)
        finally:
            if hasattr(answer, "close"):
                answer.close()

    def _send_head(self, status: str, headers: list[tuple[str, str]], method: str, body: _Body) -> bool:
        """Send the status line and headers; whether the body goes chunked (no length given)."""
        code, _, reason = status.partition(" ")
        self.send_response(int(code), reason)
        close = self.close_connection or self.request_version != "HTTP/1.1" or not body.ended or self.server.stopping
        length = False
        for key, value in headers:
            if key.lower() == "connection":  # drain.py and deadline.py say close (for gunicorn's sake too)
                close = close or value.lower() == "close"
                continue
            length = length or key.lower() == "content-length"
            self.send_header(key, value)
        chunked = not length and method != "HEAD" and not 100 <= int(code) < 200 and int(code) not in (204, 304)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if close:
            self.send_header("Connection", "close")  # http.server then ends the connection after this answer
        self.end_headers()
        return chunked

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
    server.stopping = False
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
            server.stopping = True  # answers from now on say `Connection: close`
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
