"""Give every request body a deadline, so a client that sends its body a byte at a time cannot keep a thread.

A request reaches the app once its headers are in; the view then reads the body, and the thread serving it
(one of gunicorn's threads, or the connection's own under `python app.py`) waits for as long as the client
takes. `BodyDeadline` allows `REQUEST_BODY_TIMEOUT` seconds from that moment until the body's last byte is read
(a chunked body's end; for a body the app does not read, until it answers). When they are up, one watchdog
thread per process shuts the read side of the connection, the blocked read ends at once, and whatever the app
made of the short body is replaced by a JSON 408 on a connection that then closes.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from responses import error_body

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Watch:
    """One body's deadline, and whether it expired or the body is in.

    `expired` is set once the watchdog cut the read side, `done` once the body was read or the app answered (a save
    whose body arrived in time is never answered with a 408).
    """

    __slots__ = ("deadline", "sock", "expired", "done")

    def __init__(self, deadline: float, sock: socket.socket) -> None:
        self.deadline, self.sock = deadline, sock
        self.expired = self.done = False


class Watchdog:
    """A heap of deadlines and one daemon thread that sleeps until the nearest one.

    The thread starts on first use in each process, so after gunicorn's fork too.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._pid: int | None = None

    def watch(self, sock: socket.socket, seconds: float) -> Watch:
        watch = Watch(time.monotonic() + seconds, sock)
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._heap = os.getpid(), []
                threading.Thread(target=self._run, name="storyart-body-deadline", daemon=True).start()
            heapq.heappush(self._heap, (watch.deadline, next(self._order), watch))
            self._lock.notify()
        return watch

    def finish(self, watch: Watch) -> None:
        with self._lock:
            watch.done = True  # its entry leaves the heap when its time comes

    def _run(self) -> None:
        with self._lock:
            while True:
                if not self._heap:
                    self._lock.wait()
                    continue
                deadline, _, watch = self._heap[0]
                now = time.monotonic()
                if deadline > now:
                    self._lock.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                if not watch.done:
                    watch.expired = True
                    with contextlib.suppress(OSError):
                        watch.sock.shutdown(socket.SHUT_RD)  # the read waiting on it returns at once


WATCHDOG = Watchdog()


class BodyDeadline:
    """WSGI middleware: a request with a body must be answered within `seconds`, or its read side is cut."""

    def __init__(self, app: WSGIApp, seconds: float, watchdog: Watchdog = WATCHDOG) -> None:
        self.app, self.seconds, self.watchdog = app, seconds, watchdog

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        has_body = environ.get("CONTENT_LENGTH", "0") not in ("", "0") or "HTTP_TRANSFER_ENCODING" in environ
        if not has_body or not isinstance(sock, socket.socket):
            return self.app(environ, start_response)
        watch = self.watchdog.watch(sock, self.seconds)
        declared = environ.get("CONTENT_LENGTH", "")
        environ["wsgi.input"] = _Input(environ["wsgi.input"], int(declared) if declared.isdigit() else None,
                                       lambda: self.watchdog.finish(watch))

        late = error_body(f"The request body did not arrive within {self.seconds:g} s (REQUEST_BODY_TIMEOUT).")

        def answered(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            self.watchdog.finish(watch)
            if watch.expired:  # the app saw a body cut short: say why instead (its other headers stay)
                status = "408 Request Timeout"
                headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "connection")]
                headers += [("Content-Length", str(len(late))), ("Connection", "close")]
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        try:
            result = self.app(environ, answered)
        finally:
            self.watchdog.finish(watch)
        if not watch.expired:
            return result
        with contextlib.suppress(Exception):
            getattr(result, "close", lambda: None)()
        return [late]


class _Input:
    """A `wsgi.input` that calls `done()` once the body is in.

    That is `left` bytes (the declared Content-Length) read, or, for a chunked body (`left` None), its end met. So a
    body that arrived in time is never answered with a 408, however long the app then works on it (a large import).
    """

    def __init__(self, stream: Any, left: int | None, done: Callable[[], None]) -> None:
        self.stream, self.left, self.done = stream, left, done

    def _count(self, data: bytes, to_end: bool) -> bytes:
        if self.left is not None:
            self.left -= len(data)
        if to_end or (self.left is not None and self.left <= 0):
            self.done()
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self._count(self.stream.read(), to_end=True)
        data = self.stream.read(size)
        return self._count(data, to_end=not data and size > 0)  # b"" for a size 0 is no end

    def readline(self, size: int | None = -1) -> bytes:
        data = self.stream.readline() if size is None or size < 0 else self.stream.readline(size)
        return self._count(data, to_end=not data and size != 0)

    def __iter__(self) -> Iterable[bytes]:
        return iter(self.readline, b"")
