"""An answer after which the service closes the connection says `Connection: close` (gunicorn and `python
app.py`), so a client that keeps connections alive (a browser, a proxy, `requests.Session`) sends its next request
on a new one. Before, gunicorn announced keep-alive on a 413 and then closed: the next save on that connection
failed with "Remote end closed connection without response"."""

from __future__ import annotations

import http.client
import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import psutil
import pytest
from chaos import session

from devserver import IDLE_SECONDS
from servers import ServiceProcess, wait_for

pytestmark = pytest.mark.slow

LIMIT = 1_048_576  # MAX_CONTENT_LENGTH of the servers below
JSON = {"Content-Type": "application/json"}
SAVE = "/api/v1/session/save"


@pytest.fixture(scope="module", params=["gunicorn", "app"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    started = ServiceProcess(request.param, {"MAX_CONTENT_LENGTH": str(LIMIT)},
                             tmp_path_factory.mktemp("keepalive") / f"{request.param}.log").start()
    yield started
    started.stop()


def too_many_values(conn: http.client.HTTPConnection) -> None:
    conn.request("POST", SAVE, body=b'{"a":' * 100_000, headers=JSON)  # 500,000 bytes, under the limit


def over_the_limit(conn: http.client.HTTPConnection) -> None:
    conn.request("POST", SAVE, body=b"x" * (LIMIT + 1), headers=JSON)


def over_the_limit_chunked(conn: http.client.HTTPConnection) -> None:
    conn.request("POST", SAVE, body=iter([b"x" * 65536] * 17), headers=JSON)  # no length: sent chunked


def malformed_chunk(conn: http.client.HTTPConnection) -> None:
    conn.putrequest("POST", SAVE)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders(b"zz\r\nabc\r\n0\r\n\r\n")


def a_save(conn: http.client.HTTPConnection) -> None:
    conn.request("POST", SAVE, body=session("kept"), headers=JSON)


CASES = {"too many JSON values": (too_many_values, 413), "over the limit": (over_the_limit, 413),
         "over the limit, chunked": (over_the_limit_chunked, 413), "a malformed chunk": (malformed_chunk, 400),
         "a save (the control)": (a_save, 200)}


@pytest.mark.parametrize("case", CASES)
def test_the_next_request_on_a_kept_alive_connection_is_answered(server: ServiceProcess, case: str) -> None:
    send, status = CASES[case]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for _ in range(2):  # http.client opens a new connection after an answer that said close, else reuses it
            send(conn)
            answer = conn.getresponse()
            answer.read()
            assert answer.status == status
            conn.request("GET", "/health")
            health = conn.getresponse()
            assert health.status == 200 and health.read().startswith(b'{"success":true')
    finally:
        conn.close()


def test_python_app_py_keeps_a_browsers_connection_for_its_preflight_and_requests(
        service: Callable[..., ServiceProcess]) -> None:
    """A browser's CORS preflight, its save and the reads after it go over one connection to `python app.py`.

    It used to say `Connection: close` to every answer: each request (and each preflight) paid a new connection and
    a new thread. A connection kept between requests still does not hold up a graceful stop.
    """
    server = service("app")
    origin = {"Origin": "http://localhost:3000"}
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    saved = session("one-connection")
    steps = [("GET", "/health", None, {}), ("OPTIONS", SAVE, None, preflight),
             ("POST", SAVE, saved, {**origin, **JSON}), ("GET", "/api/v1/session/latest", None, origin),
             ("GET", "/api/v1/session/latest", None, origin)]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        ends = set()
        for method, path, body, headers in steps:
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            content = answer.read()
            assert answer.status == 200, (method, path, content)
            assert answer.getheader("Connection") is None, (method, path)
            assert conn.sock is not None, (method, path)  # http.client closes a connection its server said it would
            ends.add(conn.sock.getsockname())
            if headers.get("Origin"):
                assert answer.getheader("Access-Control-Allow-Origin") == origin["Origin"]
        assert orjson.loads(content)["data"]["storyUuid"] == "one-connection"  # the save's session
        assert len(ends) == 1  # one connection for them all

        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)  # the connection is idle now, kept for a next request
        assert server.proc.wait(15) == 0
        assert time.monotonic() - started < IDLE_SECONDS  # closed by the stop, not by its idle timeout
        assert conn.sock.recv(1) == b""  # the server closed it
    finally:
        conn.close()


def _hammer(port: int, stop: Any, answered: Any) -> None:
    """Send `GET /health` back to back over one kept-alive connection until `stop` is set; count the answers.

    The first request that fails (the server closed the connection and takes no new one) ends it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        while not stop.is_set():
            conn.request("GET", "/health")
            conn.getresponse().read()
            with answered.get_lock():
                answered.value += 1
    except OSError:
        pass
    conn.close()


def test_a_gunicorn_thread_keeps_no_connection_while_others_wait(service: Callable[..., ServiceProcess]) -> None:
    """Connections that send their next request at once do not keep a worker's threads from a newcomer.

    A thread serves the next request of its kept-alive connection itself when it follows at once, but only while
    the worker holds no more connections than threads: here two connections send back to back to a worker of two
    threads, and a third connection's requests are still answered at once.
    """
    server = service("gunicorn", WEB_CONCURRENCY="1", GUNICORN_THREADS="2")
    context = multiprocessing.get_context("fork")
    stop, answered = context.Event(), context.Value("l", 0)
    hammers = [context.Process(target=_hammer, args=(server.port, stop, answered), daemon=True) for _ in range(2)]
    for hammer in hammers:
        hammer.start()
    try:
        wait_for(lambda: answered.value > 200, what="the two connections' requests")
        for _ in range(5):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            started = time.monotonic()
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
            assert time.monotonic() - started < 1.0
            conn.close()
    finally:
        stop.set()
        for hammer in hammers:
            hammer.join(10)


def test_a_gunicorn_worker_whose_master_died_answers_nothing_after_its_stop(
        service: Callable[..., ServiceProcess]) -> None:
    """A worker whose master was killed stops taking requests, even on a connection that sends back to back.

    gthread notices the master is gone, waits for its connections and runs the stop hook (the last write-back, the
    storage closed). A thread serving one connection's requests one after another must not go on answering after
    that: no access line may follow the worker's "Worker exiting"."""
    server = service("gunicorn", WEB_CONCURRENCY="1", GUNICORN_THREADS="2", GUNICORN_CMD_ARGS="--graceful-timeout 3")
    worker = psutil.Process(server.proc.pid).children()[0]
    context = multiprocessing.get_context("fork")
    stop, answered = context.Event(), context.Value("l", 0)
    hammer = context.Process(target=_hammer, args=(server.port, stop, answered), daemon=True)
    hammer.start()
    try:
        wait_for(lambda: answered.value > 100, what="the connection's requests")
        server.proc.kill()  # the master, alone: its worker finds itself orphaned
        server.proc.wait()
        psutil.wait_procs([worker], timeout=20)
        assert not worker.is_running()
    finally:
        stop.set()
        hammer.join(10)
    log = server.log_path.read_text(errors="replace")
    assert "Worker exiting" in log
    after = log[log.index("Worker exiting"):]
    assert " GET /health 200 " not in after, after[:2000]
