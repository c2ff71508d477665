"""TLS to Redis (docs/deploy.md, "TLS and ACL users"): a `rediss://` REDIS_URL with redis-py's own query options
(`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`), against a real `redis-server --port 0 --tls-port ...` that
requires client certificates, with certificates the suite makes (trustme). A file that cannot be used stops
start-up naming it; a certificate the server or the service refuses is a Redis that does not answer: the service
runs on its local store and says why in its log."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaos import session

from config import Config, ConfigError
from servers import ROOT, RedisServer, SentinelServer, TlsFiles, redis_tls_missing, request, save_request


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis that speaks TLS only and requires a client certificate signed by the suite's CA."""
    missing = redis_tls_missing()
    if missing:
        pytest.skip(missing)
    server = RedisServer(tmp_path_factory.mktemp("redis-tls"), tls=tls).start("--tls-auth-clients", "yes")
    yield server
    server.kill_all()


@pytest.mark.slow
def test_sessions_are_saved_and_read_over_tls_with_a_client_certificate(tls_redis, service) -> None:
    tls_redis.client().flushall()
    server = service("app", REDIS_URL=tls_redis.url)
    answer = save_request(server.port, session("over-tls")).json()
    assert answer["storage"] == "redis"
    latest = request(server.port, "GET", "/api/v1/session/latest").json()
    assert latest["storage"] == "redis" and latest["data"]["storyUuid"] == "over-tls"
    assert tls_redis.client().exists(answer["sessionKey"])
    state = request(server.port, "GET", "/health").json()
    assert (state["redis"], state["redisMaster"]) == ("connected", f"127.0.0.1:{tls_redis.port}")


@pytest.mark.slow
def test_a_rediss_url_reaches_the_sentinels_and_the_master_over_tls(tls, tls_redis, service, tmp_path) -> None:
    sentinel = SentinelServer(tmp_path / "sentinel", tls_redis.port, tls=tls).start()
    try:
        server = service("app", REDIS_SENTINELS=f"127.0.0.1:{sentinel.port}", REDIS_SENTINEL_MASTER=sentinel.name,
                         REDIS_URL=f"rediss:///0?{tls.query()}", REDIS_WAIT_REPLICAS="0")  # this master has no replica
        assert save_request(server.port, session("via-sentinel")).json()["storage"] == "redis"
        state = request(server.port, "GET", "/health").json()
        assert (state["redis"], state["redisMaster"]) == ("connected", f"127.0.0.1:{tls_redis.port}")
    finally:
        sentinel.kill_all()


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["no client certificate", "a CA that did not sign the server's"])
def test_a_refused_certificate_is_a_redis_that_does_not_answer(problem, tls, tls_redis, service, tmp_path) -> None:
    if problem == "no client certificate":
        query, said = f"ssl_ca_certs={tls.ca}", "add ssl_certfile and ssl_keyfile to REDIS_URL"
    else:
        query, said = TlsFiles.create(tmp_path / "other").query(), "CERTIFICATE_VERIFY_FAILED"
    server = service("app", REDIS_URL=f"rediss://127.0.0.1:{tls_redis.port}/0?{query}")
    assert "Redis does not answer at start-up" in server.log() and said in server.log()
    assert request(server.port, "GET", "/health/ready").status == 503
    assert save_request(server.port, session("kept-locally")).json()["storage"] == "memory"
    assert request(server.port, "GET", "/health").json()["redis"] == "disconnected"


def test_an_unusable_ca_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    env = {**os.environ, "REDIS_URL": f"rediss://127.0.0.1:6380/0?ssl_ca_certs={missing}", "REDIS_API_PORT": "1",
           "LOCAL_STORE_PATH": str(tmp_path / "s.sqlite3")}
    done = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0] == (f"storyart: configuration error: REDIS_URL: ssl_ca_certs: cannot load CA certificates from "
                        f"'{missing}' (No such file or directory)")


def test_tls_options_are_read_from_the_url(tls: TlsFiles) -> None:
    url = f"rediss://u:p@cache:6380/1?{tls.query()}&ssl_cert_reqs=required"
    assert Config.from_env({"REDIS_URL": url}, None).redis_url == url


@pytest.mark.parametrize(("query", "message"), [
    ("ssl_ca_certs={tls.server_key}", "REDIS_URL: ssl_ca_certs: cannot load CA certificates from"),
    ("ssl_ca_certs={tls.ca}&ssl_keyfile={tls.client_key}", "REDIS_URL: ssl_keyfile needs ssl_certfile"),
    ("ssl_certfile={tls.client_cert}&ssl_keyfile={tls.server_key}",
     "REDIS_URL: ssl_certfile: cannot load the client certificate"),
    ("ssl_certfile={tls.ca}", "REDIS_URL: ssl_certfile: cannot load the client certificate"),
    ("ssl_ca_path={tls.ca}", "REDIS_URL: ssl_ca_path:"),
    ("ssl_cert_reqs=maybe", "REDIS_URL: ssl_cert_reqs must be none, optional or required"),
    ("redis ssl_ca_certs={tls.ca}", "REDIS_URL: ssl_ca_certs needs a rediss:// URL"),
])
def test_a_tls_file_or_option_that_cannot_work_is_one_line_naming_it(tls: TlsFiles, query: str, message: str) -> None:
    scheme, _, query = query.rpartition(" ")
    url = f"{scheme or 'rediss'}://127.0.0.1:6380/0?{query.format(tls=tls)}"
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"REDIS_URL": url}, dotenv_path=None)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value), raised.value
