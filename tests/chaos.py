"""Fault-injection helpers shared by the fault tests and `bench/soak.py`: a port that blackholes TCP connects,
a client that uploads a save in pieces (so a test can signal the server mid-upload), and unique sessions.
Everything talks to 127.0.0.1 only."""

from __future__ import annotations

import http.client
import socket
import sys
import time

import orjson

from servers import Response

PERSISTENT = ("--appendonly", "yes", "--appendfsync", "always")
"""redis-server flags under which a write Redis acknowledged survives kill -9 (the AOF is fsynced before the
reply), so a restart on the same directory brings back everything the service stored there."""


def session(tag: str, **extra: object) -> bytes:
    """A small valid session whose `storyUuid` names it."""
    return orjson.dumps({"scriptText": f"script {tag}", "episodeContext": "{}", "storyUuid": tag,
                         "analyzedEpisode": {"episodeNumber": 1, "title": tag, "scenes": []}, **extra})


def tagged(base: bytes, tag: str) -> bytes:
    """`base` (a compact JSON object) with one more field naming it, so every save is distinguishable."""
    return b'%s,"soakTag":"%s"}' % (base[:-1], tag.encode())


class Blackhole:
    """A port on 127.0.0.1 where TCP connects *time out* instead of being refused.

    A port nobody listens on answers a SYN with RST at once (connection refused). To make a connect hang on
    loopback, listen with a backlog of 0 and fill the accept queue with one connection that is never
    accepted: Linux then drops further SYNs, so the client retransmits until its connect timeout.
    """

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(8):
            probe = socket.socket()
            probe.settimeout(0.3)
            try:
                probe.connect(("127.0.0.1", self.port))
            except TimeoutError:
                probe.close()
                return  # a connect timed out: the port blackholes
            self.fillers.append(probe)
        self.close()
        raise RuntimeError(f"could not make port {self.port} blackhole connects on {sys.platform}")

    def close(self) -> None:
        for sock in self.fillers:
            sock.close()
        self.listener.close()

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class SlowUpload:
    """A save whose body goes out in pieces on its own connection: `send(fraction)` then `finish()`."""

    def __init__(self, port: int, body: bytes) -> None:
        self.body, self.sent = body, 0
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall(b"POST /api/v1/session/save HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                          % len(body))

    def send(self, fraction: float) -> None:
        """Send the body up to `fraction` of its length."""
        upto = int(len(self.body) * fraction)
        self.sock.sendall(self.body[self.sent : upto])
        self.sent = max(self.sent, upto)

    def finish(self, pieces: int = 4, pause: float = 0.1) -> Response:
        """Send the rest in `pieces` with `pause` between them, then read the whole answer."""
        step = max(1, (len(self.body) - self.sent) // pieces + 1)
        while self.sent < len(self.body):
            time.sleep(pause)
            self.sock.sendall(self.body[self.sent : self.sent + step])
            self.sent += step
        try:
            answer = http.client.HTTPResponse(self.sock)
            answer.begin()
            return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
        finally:
            self.sock.close()


def timed(call, *args, **kwargs) -> tuple[float, object]:  # noqa: ANN001 - any callable
    started = time.perf_counter()
    result = call(*args, **kwargs)
    return time.perf_counter() - started, result
