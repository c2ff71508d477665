"""The gunicorn worker (gunicorn.conf.py): gthread, with unread answers parked in the poller, not a thread.

It is gthread, except that an answer its client does not read waits in the worker's poller instead of in one of its
threads, and is dropped after RESPONSE_SEND_TIMEOUT without progress.

gthread gives a request one of the worker's threads until its answer is written. A client that asks for a large
answer and reads nothing keeps that thread blocked in `send` for as long as it stays connected: 200 connections
asking for the list of ten 1 MB sessions took all 3 x 32 threads, and every other request queued behind them
(health checks timed out at 5 s). Here a thread hands the socket what it takes at once; when the socket stays full
for `WRITE_WAIT` the rest of the answer is *parked*: the connection waits in the poller for the client to read
(as a kept-alive one waits for its next request), and a thread takes the answer up again once the socket took
what was left. An answer whose socket takes none of its bytes for `send_timeout` seconds is dropped: the
connection is reset, and the answer's bytes and generator are released.

Whatever the app sends as `Connection: close` closes the connection and says so (gunicorn drops an app's
hop-by-hop headers and would announce keep-alive).

And a thread that answered on a kept-alive connection serves its next request itself when it follows at once
(`ParkingWorker.handle`), instead of handing the connection back to the poller in between.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import select
import selectors
import socket
import time
from collections import deque
from datetime import datetime
from typing import Any

from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.workers import gthread

from devserver import reset_on_close

log = logging.getLogger(__name__)

WRITE_WAIT = 0.02  # seconds a thread waits for a full socket to take more before it parks the answer
NEXT_REQUEST_WAIT = 0.002  # seconds a thread waits on its kept-alive connection for the next request
PARKED = object()  # a step's result: the client must read before the answer goes on


class Outbox:
    """A connection's socket for gunicorn's `Response` that keeps what the socket does not take at once.

    `sendall` hands the socket what it takes at once and keeps the rest (views of the caller's bytes, not copies) for
    `flush`.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending: deque[memoryview] = deque()
        self.progress = time.monotonic()  # when the socket last took bytes of this answer

    def sendall(self, data: bytes) -> None:
        self.pending.append(memoryview(data))
        self.flush()

    def flush(self) -> bool:
        """Send what the socket takes now, without waiting; True when nothing is left (OSError: the peer is gone)."""
        while self.pending:
            head = self.pending[0]
            try:
                sent = self.sock.send(head, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            self.progress = time.monotonic()
            if sent < len(head):
                self.pending[0] = head[sent:]
                return False
            self.pending.popleft()
        return True

    def flushed_within(self, seconds: float) -> bool:
        """Flush, waiting up to `seconds` for the socket to take everything."""
        deadline = time.monotonic() + seconds
        poll = None
        while not self.flush():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poll is None:
                poll = select.poll()
                poll.register(self.sock, select.POLLOUT)
            poll.poll(left * 1000)
        return True


class Reply:
    """One answer on its way, taken up by whichever worker thread is free once the client has read.

    It is gunicorn's `Response` writing into an `Outbox`, and the app's iterable. The app and its iterable run in the
    answer's own `contextvars.Context` (`context`): Flask's `stream_with_context` keeps the request's context in context
    variables while the answer is streamed, and they must go with the iterable to the next thread, not stay behind in
    the first.
    """

    def __init__(self, worker: ParkingWorker, req: Any, resp: wsgi.Response, environ: dict[str, Any],
                 body: Any, started: datetime, context: contextvars.Context) -> None:
        self.worker, self.req, self.resp, self.environ, self.body = worker, req, resp, environ, body
        self.started, self.context = started, context
        self.outbox: Outbox = resp.sock
        self.items = iter(body)
        self.ended = self.finished = False

    def step(self) -> bool | object:
        """Write the answer until it is out or the client stops reading; runs in one of the worker's threads.

        Returns whether the connection may stay open once the answer is out, or `PARKED` when the client has not read
        for `WRITE_WAIT`.
        """
        try:
            parked = self.context.run(self._write)
        except BaseException:
            self.finish()
            raise
        if parked:
            return PARKED
        self.finish()
        return not self.resp.should_close()

    def _write(self) -> bool:
        """Whether the client has to read before more can be written."""
        for item in self.items:
            self.resp.write(item)
            if self.outbox.pending and not self.outbox.flushed_within(WRITE_WAIT):
                return True
        if not self.ended:
            self.ended = True
            self.resp.close()  # a chunked answer's last chunk
        return not self.outbox.flushed_within(WRITE_WAIT)

    def finish(self) -> None:
        """Do what gunicorn does after every answer, written or dropped.

        That is the access log, the iterable's `close()`, the post_request hook.
        """
        if self.finished:
            return
        self.finished = True
        try:
            self.worker.log.access(self.resp, self.req, self.environ, datetime.now() - self.started)
        finally:
            try:
                self.context.run(getattr(self.body, "close", lambda: None))
            finally:
                try:
                    self.worker.cfg.post_request(self.worker, self.req, self.environ, self.resp)
                except Exception:
                    self.worker.log.exception("Exception in post_request hook")


class ParkingWorker(gthread.ThreadWorker):
    """gthread with parked answers (see the module's docstring)."""

    send_timeout = 60.0  # RESPONSE_SEND_TIMEOUT; gunicorn.conf.py sets it from the validated Config

    def init_process(self) -> None:
        self.parked: dict[gthread.TConn, None] = {}  # an ordered set, touched by the main thread only
        super().init_process()

    def handle(self, conn: gthread.TConn) -> bool | object:
        """gthread's, then the connection's next requests in the same thread while they follow at once.

        A kept-alive connection goes back to the poller after each answer, and its next request comes to a thread
        through the main thread: two hand-offs, a pipe write and a poll per request. While the worker holds no more
        connections than threads (so no other connection can be waiting for this thread) and the next request
        arrives within `NEXT_REQUEST_WAIT`, this thread serves it at once.
        """
        result = super().handle(conn)
        while (result is True and self.alive and self.nr_conns <= self.cfg.threads
               and (conn.parser.unreader.buf.getbuffer().nbytes or _readable_within(conn.sock, NEXT_REQUEST_WAIT))):
            result = super().handle(conn)
        return result

    def is_parent_alive(self) -> bool:
        """gthread's check, which also stops the worker's threads from taking a next request when the master is gone.

        gthread leaves its loop then without clearing `alive`; a thread serving a connection's requests one after
        another (`handle`) would go on answering after the stop hook closed the storage."""
        if super().is_parent_alive():
            return True
        self.alive = False
        return False

    def handle_request(self, req: Any, conn: gthread.TConn) -> bool | object:
        """gthread's, up to the app's answer; that is then written by a `Reply`."""
        environ: dict[str, Any] = {}
        resp = None
        try:
            self.cfg.pre_request(self, req)
            started = datetime.now()
            resp, environ = wsgi.create(req, conn.sock, conn.client, conn.server, self.cfg)
            environ["wsgi.multithread"] = True
            self.nr += 1
            if self.nr >= self.max_requests:
                if self.alive:
                    self.log.info("Autorestarting worker after current request.")
                    self.alive = False
                resp.force_close()
            if not self.alive or not self.cfg.keepalive or len(self.keepalived_conns) >= self.max_keepalived:
                resp.force_close()
            resp.sock = Outbox(conn.sock)
            context = contextvars.copy_context()
            body = context.run(self.wsgi, environ, _honouring_close(resp))
        except BaseException:
            with contextlib.suppress(Exception):
                self.cfg.post_request(self, req, environ, resp)
            raise
        conn.reply = Reply(self, req, resp, environ, body, started, context)
        return self._step(conn)

    def _step(self, conn: gthread.TConn) -> bool | object:
        reply = conn.reply
        try:
            result = reply.step()
        except OSError:
            raise
        except (Exception, SystemExit):
            if not reply.resp.headers_sent:
                raise  # gthread answers 500
            self.log.exception("Error handling request")
            util.close_graceful(conn.sock)
            raise StopIteration() from None
        if result is not PARKED:
            conn.reply = None
        return result

    def _keepalive_after(self, conn: gthread.TConn, keepalive: Any) -> Any:
        return keepalive if keepalive is PARKED else super()._keepalive_after(conn, keepalive)

    def finish_request(self, conn: gthread.TConn, fs: Any) -> None:
        """On the main thread, after a thread's turn: a parked answer waits in the poller for the client to read."""
        if not fs.cancelled() and fs.exception() is None and fs.result() is PARKED:
            self.parked[conn] = None
            self.poller.register(conn.sock, selectors.EVENT_WRITE, lambda _sock: self._writable(conn))
        else:
            super().finish_request(conn, fs)

    def _writable(self, conn: gthread.TConn) -> None:
        """The client read: send what waited, and once the socket took all of it, hand the answer to a thread."""
        try:
            flushed = conn.reply.outbox.flush()
        except OSError:
            self._drop(conn, "the client went away")
            return
        if flushed:
            self.poller.unregister(conn.sock)
            del self.parked[conn]
            fs = self.tpool.submit(self._resume, conn)
            fs.add_done_callback(lambda done: self.method_queue.defer(self.finish_request, conn, done))

    def _resume(self, conn: gthread.TConn) -> bool | object:
        """A parked answer's next turn, in a thread; errors end the connection as in gthread's `handle`."""
        try:
            result = self._step(conn)
            return result if result is PARKED else self._keepalive_after(conn, result)
        except StopIteration:
            pass
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception:
            self.log.exception("Error handling request")
        return False

    def murder_keepalived(self, force: bool = False) -> None:
        """Close expired kept-alive connections and stalled parked answers.

        gthread's sweep of expired kept-alive connections (each turn of the main loop), and of parked answers
        whose socket took nothing for `send_timeout` seconds (all of them when the worker stops).
        """
        super().murder_keepalived(force)
        stalled = time.monotonic() - self.send_timeout
        for conn in list(self.parked):
            if conn.reply.outbox.progress < stalled:
                self._drop(conn, f"its client took none of it for {self.send_timeout:g} s (RESPONSE_SEND_TIMEOUT)")
            elif force:
                self._drop(conn, "the worker stopped before its client read it")

    def _drop(self, conn: gthread.TConn, why: str) -> None:
        """Reset the connection of a parked answer and release the answer."""
        self.poller.unregister(conn.sock)
        del self.parked[conn]
        self.nr_conns -= 1
        reply, conn.reply = conn.reply, None
        reset_on_close(conn.sock)
        util.close(conn.sock)
        log.warning("dropped the answer to %s %s: %s", reply.req.method, repr(reply.req.path)[1:-1], why)
        try:
            reply.finish()
        except Exception:
            self.log.exception("Error closing a dropped answer")


def _honouring_close(resp: wsgi.Response) -> Any:
    """`resp.start_response`, closing the connection after an answer whose headers say `Connection: close`."""

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if any(name.lower() == "connection" and value.strip().lower() == "close" for name, value in headers):
            resp.force_close()
        return resp.start_response(status, headers, exc_info)

    return start_response



def _readable_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the socket has bytes to read (or its peer closed) within `seconds`."""
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(seconds * 1000))
