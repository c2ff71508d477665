"""Behind a real nginx: gunicorn (TRUSTED_PROXY_HOPS=1) behind nginx running `deploy/nginx-storyart.conf`
itself (only the listen address, the upstream address and client_max_body_size swapped), on free 127.0.0.1
ports, with its own prefix, pid, logs and temp dirs under pytest's tmp dir: nothing system-wide is touched.

The client connects from 127.0.0.2 so the service's access log can tell the real client from the proxy.
The last tests check, without nginx, the draining of refused bodies that lets nginx relay the service's 413."""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.test import EnvironBuilder

from drain import DRAIN_MAX_EXCESS
from servers import ROOT, Response, ServiceProcess, debian_binary, free_port, request, wait_for

DEPLOY_CONF = ROOT / "deploy" / "nginx-storyart.conf"
CLIENT = "127.0.0.2"  # any 127.0.0.0/8 address is local; this one is not the proxy's
APP_LIMIT = 2 * 1024 * 1024  # MAX_CONTENT_LENGTH of the gunicorn behind nginx
NGINX_LIMIT = "3m"  # client_max_body_size of the nginx in front: larger, so both layers' 413 can be seen
BROWSER = "http://localhost:3000"


def site_config(listen_port: int, upstream_ports: list[int]) -> str:
    """The deploy file with the test's ports (one upstream server line per host) and body limit; anything else
    in it runs as written."""
    text = DEPLOY_CONF.read_text(encoding="utf-8")
    servers = "\n    ".join(f"server 127.0.0.1:{port};" for port in upstream_ports)
    for old, new in (("listen 80;", f"listen 127.0.0.1:{listen_port};"),
                     ("server 127.0.0.1:7802;", servers),
                     ("client_max_body_size 50m;", f"client_max_body_size {NGINX_LIMIT};")):
        assert text.count(old) == 1, f"{DEPLOY_CONF.name} should contain `{old}` exactly once"
        text = text.replace(old, new)
    return text


class Nginx:
    """`nginx -p <prefix> -c <conf> -e <log> -g 'daemon off;'` in the foreground, as a child of the test."""

    def __init__(self, prefix: Path, *upstream_ports: int) -> None:
        self.prefix, self.port = prefix, free_port()
        self.binary = debian_binary("nginx", "/usr/sbin/nginx")
        (prefix / "temp").mkdir(parents=True, exist_ok=True)
        (prefix / "storyart.conf").write_text(site_config(self.port, list(upstream_ports)), encoding="utf-8")
        temp_paths = "\n".join(f"    {kind}_temp_path {prefix}/temp/{kind};"
                               for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # As root, nginx's workers would run as `nobody`, who cannot enter pytest's private tmp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n    access_log {prefix}/access.log;\n{temp_paths}\n"
            f"    include {prefix}/storyart.conf;\n}}\n", encoding="utf-8")
        self.args = [self.binary, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"),
                     "-e", str(prefix / "error.log"), "-g", "daemon off;"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        checked = subprocess.run([*self.args, "-t"], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._listening, what=f"nginx on port {self.port}")
        return self

    def _listening(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.error_log()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then the master exits
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         source: str = CLIENT) -> Response:
    """One request on its own connection from `source` (a browser on another machine, as far as nginx sees)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def post_json(port: int, path: str, body: bytes, **headers: str) -> Response:
    return call(port, "POST", path, body, {"Content-Type": "application/json", **headers})


def logged_client(server: ServiceProcess, request_id: str) -> str:
    """The client address the service's access log gives for the request with this id."""
    pattern = re.compile(rf"storyart\.access: {re.escape(request_id)} .* (\S+)$", re.M)
    wait_for(lambda: pattern.search(server.log()), what=f"the access log line of {request_id}", timeout=10)
    return pattern.search(server.log()).group(1)


def oversized(size: int) -> bytes:
    return b'{"scriptText":"%s","episodeContext":"","storyUuid":"u","analyzedEpisode":{}}' % (b"x" * size)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, ServiceProcess]]:
    workdir = tmp_path_factory.mktemp("proxy")
    app = ServiceProcess("gunicorn", {"TRUSTED_PROXY_HOPS": "1", "MAX_CONTENT_LENGTH": str(APP_LIMIT)},
                         workdir / "gunicorn.log")
    nginx = Nginx(workdir / "nginx", app.port)
    try:
        app.start()
        nginx.start()
        yield nginx, app
    finally:
        nginx.stop()
        app.stop()


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_access_log_names_the_client_behind_nginx_even_when_it_spoofs(stack) -> None:
    nginx, app = stack
    assert call(nginx.port, "GET", "/health", headers={"X-Request-ID": "via-nginx"}).status == 200
    assert logged_client(app, "via-nginx") == CLIENT
    spoofed = {"X-Request-ID": "via-nginx-spoofed", "X-Forwarded-For": "203.0.113.9"}
    assert call(nginx.port, "GET", "/health", headers=spoofed).status == 200
    assert logged_client(app, "via-nginx-spoofed") == CLIENT  # nginx appends the peer; one hop is trusted


@pytest.mark.slow
def test_without_trusted_hops_a_spoofed_forwarded_for_is_ignored(service) -> None:
    direct = service("gunicorn")  # TRUSTED_PROXY_HOPS=0, the default
    spoofed = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    for source, request_id in (("127.0.0.1", "direct-1"), (CLIENT, "direct-2")):
        assert call(direct.port, "GET", "/health", headers={**spoofed, "X-Request-ID": request_id},
                    source=source).status == 200
        assert logged_client(direct, request_id) == source


@pytest.mark.slow
def test_a_1mb_session_passes_nginx_and_reads_back_byte_exact(stack, session_1mb: bytes) -> None:
    nginx, _app = stack
    saved = post_json(nginx.port, "/api/v1/session/save", session_1mb)
    assert saved.status == 200, saved.body
    ts = saved.json()["timestamp"]
    stored = session_1mb[:-1] + b',"timestamp":%d}' % ts
    for path in (f"/api/v1/session/{ts}", "/api/v1/session/latest"):
        got = call(nginx.port, "GET", path)
        assert got.status == 200 and got.headers["content-type"] == "application/json"
        assert got.body == b'{"success":true,"data":%s,"storage":"memory"}' % stored
    assert call(nginx.port, "GET", f"/api/v1/session/{ts}/export").body == stored


@pytest.mark.slow
def test_over_nginx_limit_nginx_answers_a_json_413_the_browser_can_read(stack) -> None:
    nginx, app = stack
    got = post_json(nginx.port, "/api/v1/session/save", oversized(4 * 1024 * 1024), Origin=BROWSER,
                    **{"X-Request-ID": "too-big-for-nginx"})
    assert got.status == 413 and got.headers["server"].startswith("nginx")
    assert got.headers["content-type"] == "application/json"
    assert got.json()["success"] is False and "client_max_body_size" in got.json()["error"]
    assert got.headers["access-control-allow-origin"] == BROWSER
    assert got.headers["access-control-allow-credentials"] == "true"
    assert "too-big-for-nginx" not in app.log()  # refused by nginx, never reached the service
    stranger = post_json(nginx.port, "/api/v1/session/save", oversized(4 * 1024 * 1024),
                         Origin="https://evil.example")
    assert stranger.status == 413 and "access-control-allow-origin" not in stranger.headers


@pytest.mark.slow
def test_over_the_service_limit_under_nginx_limit_the_service_json_413_comes_through(stack) -> None:
    """nginx streams the buffered body upstream while the service refuses it unread: without draining,
    the worker's close resets the connection mid-write and nginx answers 502 instead (about 1 in 3)."""
    nginx, _app = stack
    preflight = call(nginx.port, "OPTIONS", "/api/v1/session/save", headers={
        "Origin": BROWSER, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status == 200 and preflight.headers["access-control-allow-origin"] == BROWSER
    body = oversized(APP_LIMIT + 500_000)
    statuses = []
    for attempt in range(12):
        got = post_json(nginx.port, "/api/v1/session/save", body, Origin=BROWSER)
        statuses.append(got.status)
        if got.status == 413:
            assert got.headers["content-type"] == "application/json" and "x-request-id" in got.headers
            assert got.json() == {"success": False, "error": f"The request body is larger than the limit of "
                                                            f"{APP_LIMIT} bytes (MAX_CONTENT_LENGTH)."}
            assert got.headers["access-control-allow-origin"] == BROWSER, attempt
    assert statuses == [413] * 12, statuses


@pytest.mark.slow
def test_nginx_answers_json_502_when_the_service_is_down(tmp_path: Path) -> None:
    nginx = Nginx(tmp_path / "nginx", free_port()).start()  # nothing listens upstream
    try:
        got = call(nginx.port, "GET", "/api/v1/session/latest", headers={"Origin": BROWSER})
        assert got.status == 502 and got.headers["content-type"] == "application/json"
        assert got.json()["success"] is False and got.headers["access-control-allow-origin"] == BROWSER
    finally:
        nginx.stop()


def test_the_deploy_page_links_the_tested_nginx_config_instead_of_a_copy() -> None:
    """docs/deploy.md sends the reader to the very file these tests run; a pasted copy could drift from it."""
    page = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert "](../deploy/nginx-storyart.conf)" in page and (ROOT / "docs" / "../deploy/nginx-storyart.conf").samefile(
        DEPLOY_CONF)
    assert "```nginx" not in page, "docs/deploy.md pastes an nginx configuration: link deploy/nginx-storyart.conf"
    conf = DEPLOY_CONF.read_text(encoding="utf-8")
    for line in ("client_max_body_size 50m;", "hash $remote_addr consistent;", "proxy_read_timeout 60s;",
                 "proxy_request_buffering on;", "error_page 413", "error_page 502", "error_page 504"):
        assert line in conf, f"docs/deploy.md describes {line!r}, which the nginx file no longer has"


@pytest.mark.parametrize(("size", "drained"), [(4096, True), (1024 + DRAIN_MAX_EXCESS + 1, False)])
def test_a_refused_body_is_drained_only_when_moderately_oversized(make_app, size: int, drained: bool) -> None:
    app = make_app(max_content_length=1024)
    stream = io.BytesIO(b" " * size)
    environ = EnvironBuilder(path="/api/v1/session/save", method="POST", content_type="application/json",
                             content_length=size).get_environ()
    environ["wsgi.input"] = stream
    statuses: list[str] = []
    answer = app.wsgi_app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    body = b"".join(answer)
    assert statuses == ["413 REQUEST ENTITY TOO LARGE"] and b'"success":false' in body
    assert stream.tell() == 0  # the whole 413 is out before a byte of the refused body is read
    answer.close()  # what the server does once the answer is sent
    assert stream.tell() == (size if drained else 0)


def slow_client(port: int, declared: int, pieces: list[bytes], pause: float) -> tuple[float, bytes, float]:
    """Declare `declared` bytes, send `pieces` with `pause` between them (while reading whatever comes back):
    (seconds until the status line arrived, the answer, seconds until the server closed the connection)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(False)
    head = (b"POST /api/v1/session/save HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % declared)
    started, answered, closed, answer = time.monotonic(), None, None, b""
    queue = [head, *pieces]
    next_send = started
    try:
        while time.monotonic() - started < 10 and closed is None:
            if queue and time.monotonic() >= next_send:
                with contextlib.suppress(OSError):
                    sock.send(queue.pop(0))
                next_send = time.monotonic() + pause
            readable, _, _ = select.select([sock], [], [], 0.02)
            if readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    closed = time.monotonic() - started
                answer += data
                if answered is None and b"\r\n" in answer:
                    answered = time.monotonic() - started
    finally:
        sock.close()
    return answered if answered is not None else 99.0, answer, closed if closed is not None else 99.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["app", "gunicorn"])
def test_a_declared_oversized_body_gets_its_413_at_once(kind, service) -> None:
    """10 MB declared over a 1 MB limit and nothing sent: the JSON 413 within a second, then the server lets
    the silent peer go within the drain's time bound."""
    server = service(kind, MAX_CONTENT_LENGTH=str(1 << 20))
    answered, answer, closed = slow_client(server.port, 10 << 20, [], 0)
    assert answered < 1.0, answered
    assert answer.startswith(b"HTTP/1.1 413") and b'"success":false' in answer
    assert closed < 4.0, closed


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["app", "gunicorn"])
def test_a_trickled_oversized_body_gets_its_413_at_once_and_is_dropped(kind, service) -> None:
    server = service(kind, MAX_CONTENT_LENGTH=str(1 << 20))
    answered, answer, closed = slow_client(server.port, 2 << 20, [b" " * 1000] * 40, 0.2)
    assert answered < 1.0, answered
    assert answer.startswith(b"HTTP/1.1 413")
    assert closed < 4.0, closed  # not the 8 s the trickle would take
    assert request(server.port, "GET", "/health").status == 200


def test_an_accepted_body_is_read_once_and_nothing_more_is_drained(make_app) -> None:
    app = make_app()
    payload = b'{"scriptText":"s","episodeContext":"","storyUuid":"u","analyzedEpisode":{}}'
    stream = io.BytesIO(payload + b"trailing bytes that are not part of the request")
    environ = EnvironBuilder(path="/api/v1/session/save", method="POST", content_type="application/json",
                             content_length=len(payload)).get_environ()
    environ["wsgi.input"] = stream
    statuses: list[str] = []
    b"".join(app.wsgi_app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    assert statuses == ["200 OK"] and stream.tell() == len(payload)
