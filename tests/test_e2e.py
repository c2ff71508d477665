"""End to end: the real service processes (`python app.py`, `gunicorn app:app`) over real sockets."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest

from servers import ROOT, request, save_request

pytestmark = pytest.mark.slow


def readme_curl_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(curl .*?)```", text, re.S)
    assert block, "README has no curl block"
    return [line for line in block.group(1).replace("\\\n", " ").splitlines() if line.startswith("curl ")]


def test_readme_curl_checks_work_verbatim_against_python_app_py(service) -> None:
    """The README's commands, word for word but for the port: the default 7802 may be taken by another service
    (or another test run) on this machine, which would then answer in this one's place."""
    server = service("app")
    commands = readme_curl_commands()
    assert [c.split()[-1].strip("'\"") for c in commands] == [
        "http://localhost:7802/health", "http://localhost:7802/api/v1/session/save",
        "http://localhost:7802/api/v1/session/latest"]
    commands = [c.replace("localhost:7802", f"127.0.0.1:{server.port}") for c in commands]
    if shutil.which("curl"):
        outputs = [subprocess.run(shlex.split(c), capture_output=True, check=True, timeout=30).stdout
                   for c in commands]
    else:  # the same requests, from the same text, without curl
        save_body = shlex.split(commands[1])[shlex.split(commands[1]).index("-d") + 1].encode()
        outputs = [request(server.port, "GET", "/health").body, save_request(server.port, save_body).body,
                   request(server.port, "GET", "/api/v1/session/latest").body]
    health, saved, latest = (orjson.loads(o) for o in outputs)
    assert health["status"] == "healthy" and health["storage"] == "memory"
    assert saved["success"] is True and saved["storage"] == "memory"
    assert latest["success"] is True and latest["data"]["timestamp"] == saved["timestamp"]


def concurrent_saves(port: int, count: int, threads: int = 16) -> list[int]:
    def one(i: int) -> int:
        body = orjson.dumps({"scriptText": f"script {i}", "episodeContext": "{}", "storyUuid": f"u{i}",
                             "analyzedEpisode": {"episodeNumber": i, "title": "T", "scenes": []}})
        got = save_request(port, body)
        assert got.status == 200, got.body
        return got.json()["timestamp"]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


@pytest.mark.parametrize("kind", ["gunicorn", "app"])
def test_200_concurrent_saves_get_200_distinct_readable_sessions(kind, service, redis_server, redis_db) -> None:
    env = {"REDIS_URL": redis_server.url}
    if kind == "gunicorn":
        env["WEB_CONCURRENCY"] = "2"
    server = service(kind, **env)
    stamps = concurrent_saves(server.port, 200)
    assert len(set(stamps)) == 200
    for i, ts in enumerate(stamps):
        got = request(server.port, "GET", f"/api/v1/session/{ts}")
        assert got.status == 200 and got.json()["data"]["scriptText"] == f"script {i}"
    assert request(server.port, "GET", "/api/v1/session/list?limit=1").json()["total"] == 200
    assert request(server.port, "GET", "/api/v1/session/latest").json()["data"]["timestamp"] == max(stamps)


def test_gunicorn_in_memory_mode_is_consistent(service, session_1mb: bytes) -> None:
    server = service("gunicorn")
    stamps = concurrent_saves(server.port, 40, threads=8)
    latest = request(server.port, "GET", "/api/v1/session/latest").json()
    assert latest["storage"] == "memory" and latest["data"]["timestamp"] == max(stamps)
    saved = save_request(server.port, session_1mb).json()
    got = request(server.port, "GET", "/api/v1/session/latest")
    assert got.body == b'{"success":true,"data":%s,"storage":"memory"}' % (
        session_1mb[:-1] + b',"timestamp":%d}' % saved["timestamp"])


def test_browser_flow_cors_on_a_real_server(service, redis_server, redis_db) -> None:
    server = service("gunicorn", REDIS_URL=redis_server.url)
    for origin in ("http://localhost:3000", "http://localhost:5173"):
        for method, path in (("POST", "/api/v1/session/save"), ("GET", "/api/v1/session/latest")):
            pre = request(server.port, "OPTIONS", path, headers={
                "Origin": origin, "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "content-type"})
            assert pre.status == 200 and pre.headers["access-control-allow-origin"] == origin
        saved = request(server.port, "POST", "/api/v1/session/save", orjson.dumps(
            {"scriptText": "s", "episodeContext": "", "storyUuid": "u", "analyzedEpisode": {}}),
            {"Content-Type": "application/json", "Origin": origin})
        assert saved.status == 200 and saved.headers["access-control-allow-origin"] == origin
    evil = request(server.port, "OPTIONS", "/api/v1/session/save", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in evil.headers


def raw_exchange(port: int, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("kind", ["gunicorn", "app"])
def test_oversized_body_is_refused_before_it_is_read(kind, service) -> None:
    server = service(kind, MAX_CONTENT_LENGTH="1048576")
    head = (b"POST /api/v1/session/save HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 104857600\r\nConnection: close\r\n\r\n")
    answer = raw_exchange(server.port, head, b"{")  # declares 100 MB, sends one byte: nothing waits for the rest
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413")
    assert orjson.loads(body)["success"] is False
