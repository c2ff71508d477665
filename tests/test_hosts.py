"""Who may call the service: the `Host` check that keeps DNS-rebinding pages out, and CORS preflights for
endpoints this service does not have (the later StoryArt server's), on real processes and the test client."""

from __future__ import annotations

import pytest
from chaos import session

from app import host_allowed
from servers import request

JSON = {"Content-Type": "application/json"}
LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


@pytest.mark.parametrize(("host", "allowed"), [
    ("localhost:7802", True), ("127.0.0.1", True), ("[::1]:7802", True), ("[::1]", True), ("LocalHost:3000", True),
    ("evil.example:7802", False), ("localhost.evil.example", False), ("127.0.0.1.evil.example", False),
    ("[::1]evil", False), ("localhost:99999", False), ("localhost:abc", False), ("", False),
])
def test_host_names(host: str, allowed: bool) -> None:
    assert host_allowed(host, LOOPBACK) is allowed


def test_configured_names_and_suffixes() -> None:
    assert host_allowed("storyart.example.org:443", (*LOOPBACK, "storyart.example.org"))
    assert host_allowed("a.b.example.org", (*LOOPBACK, ".example.org"))
    assert not host_allowed("example.org.evil", (*LOOPBACK, ".example.org"))
    assert host_allowed("anything:1", ("*",))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["app", "gunicorn"])
def test_a_rebound_name_can_neither_read_nor_write(kind, service) -> None:
    """What a DNS-rebinding page does: same-origin requests to 127.0.0.1 that carry its own name in Host."""
    server = service(kind)
    stored = request(server.port, "POST", "/api/v1/session/save", session("mine"), {**JSON, "Host": "localhost"})
    assert stored.status == 200
    attempts = (("GET", "/api/v1/session/latest", None), ("GET", "/api/v1/session/list", None),
                ("POST", "/api/v1/session/save", session("theirs")),
                ("DELETE", f"/api/v1/session/{stored.json()['timestamp']}", None), ("GET", "/health", None))
    for method, path, body in attempts:
        got = request(server.port, method, path, body, {**JSON, "Host": f"evil.example:{server.port}"})
        assert got.status == 400 and got.headers["content-type"] == "application/json", (method, path)
        assert got.json()["success"] is False and "ALLOWED_HOSTS" in got.json()["error"]
    listed = request(server.port, "GET", "/api/v1/session/list", headers={"Host": f"127.0.0.1:{server.port}"}).json()
    assert [s["storyUuid"] for s in listed["sessions"]] == ["mine"]  # nothing written, nothing deleted
    assert request(server.port, "GET", "/health", headers={"Host": f"[::1]:{server.port}"}).status == 200


@pytest.mark.slow
def test_allowed_hosts_adds_the_proxy_name(service) -> None:
    server = service("app", ALLOWED_HOSTS="storyart.example.org")
    assert request(server.port, "GET", "/health", headers={"Host": "storyart.example.org"}).status == 200
    assert request(server.port, "GET", "/health", headers={"Host": "localhost"}).status == 200
    assert request(server.port, "GET", "/health", headers={"Host": "other.example.org"}).status == 400


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}


def test_an_unknown_api_path_passes_its_preflight_for_allowed_origins_only(make_app) -> None:
    client = make_app().test_client()
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173"):
        got = client.options("/api/v1/pipeline/episodes/run", headers={"Origin": origin, **PREFLIGHT})
        assert got.status_code == 200 and got.headers["Access-Control-Allow-Origin"] == origin
        assert "POST" in got.headers["Access-Control-Allow-Methods"] and got.is_json
        followed = client.post("/api/v1/pipeline/episodes/run", json={}, headers={"Origin": origin})
        assert followed.status_code == 404 and followed.headers["Access-Control-Allow-Origin"] == origin
        assert followed.get_json() == {"success": False,
                                       "error": "No such endpoint: POST /api/v1/pipeline/episodes/run."}
    refused = client.options("/api/v1/pipeline/episodes/run", headers={"Origin": "http://evil.example", **PREFLIGHT})
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert client.options("/not-api", headers={"Origin": "http://localhost:3000", **PREFLIGHT}).status_code == 404
