"""Clients that hold connections without finishing a request, as raw sockets on 127.0.0.1: idle ones (a
browser's preconnected socket: connected, nothing sent) and slow-body ones (a save whose headers arrive at once
and whose body then comes one byte at a time). Shared by tests/test_slow_clients.py and bench/slowclients.py."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Loiterer:
    sock: socket.socket
    slow: bool  # sends a body a byte at a time; else idle
    answer: bytes = b""
    closed_after: float | None = None  # seconds after connecting when the server closed (or reset) it
    sent: int = 0

    @property
    def status(self) -> int | None:
        """The status code the server answered with, if it did."""
        if not self.answer.startswith(b"HTTP/1."):
            return None
        return int(self.answer.split(b" ", 2)[1])


@dataclass
class Crowd:
    """`with Crowd(port, idle=50, slow=20) as crowd:` holds the connections for the block, while one thread
    sends each slow client one more byte of its body every `pause` seconds (of `declared` bytes, more than it
    will ever send) and records what the server answers and when it closes each connection."""

    port: int
    idle: int = 50
    slow: int = 20
    declared: int = 100_000
    pause: float = 0.5
    loiterers: list[Loiterer] = field(default_factory=list)

    def __enter__(self) -> Crowd:
        self.started = time.monotonic()
        self._stop = threading.Event()
        head = (b"POST /api/v1/session/save HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n{" % self.declared)
        for number in range(self.idle + self.slow):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            loiterer = Loiterer(sock, slow=number >= self.idle)
            if loiterer.slow:
                sock.sendall(head)
            sock.setblocking(False)
            self.loiterers.append(loiterer)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for loiterer in self.loiterers:
            selector.register(loiterer.sock, selectors.EVENT_READ, loiterer)
        next_byte = time.monotonic() + self.pause
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.05):
                self._read(key.data, selector)
            if time.monotonic() >= next_byte:
                next_byte += self.pause
                for loiterer in self.loiterers:
                    if loiterer.slow and loiterer.closed_after is None and not loiterer.answer:
                        with contextlib.suppress(OSError):
                            loiterer.sent += loiterer.sock.send(b" ")
        selector.close()

    def _read(self, loiterer: Loiterer, selector: selectors.BaseSelector) -> None:
        try:
            data = loiterer.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        loiterer.answer += data
        if not data:
            loiterer.closed_after = time.monotonic() - self.started
            selector.unregister(loiterer.sock)

    def closed(self, slow: bool) -> list[Loiterer]:
        return [one for one in self.loiterers if one.slow is slow and one.closed_after is not None]

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for loiterer in self.loiterers:
            loiterer.sock.close()
