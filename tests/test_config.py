"""Configuration (docs/contract.md §4): defaults, `.env` under the real environment, one clear line for a bad value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import Config, ConfigError
from servers import ROOT


def test_defaults() -> None:
    config = Config.from_env({}, dotenv_path=None)
    assert config == Config()
    assert (config.host, config.port, config.redis_url, config.session_ttl_seconds) == ("127.0.0.1", 7802, None, 604800)
    assert config.max_content_length == 50 * 1024 * 1024 and not config.redis_configured
    assert (config.redis_max_connections, config.redis_pool_timeout) == (16, 10.0)
    assert not config.redis_require_replicas


def test_the_local_store_caps_hold_a_teams_day_of_outage() -> None:
    """5,000 sessions and 4 GiB on disk (docs/decisions.md); the memory store, in each worker's RAM, 512 MiB."""
    assert Config.from_env({}, None).local_max_sessions == 5000
    assert Config.from_env({}, None).local_max_bytes == 4 * 1024**3
    memory = Config.from_env({"LOCAL_STORE": "memory"}, None)
    assert (memory.local_max_sessions, memory.local_max_bytes) == (5000, 512 * 1024**2)
    assert Config.from_env({"LOCAL_STORE": "memory", "LOCAL_STORE_MAX_BYTES": "2048"}, None).local_max_bytes == 2048


def test_everything_is_read() -> None:
    config = Config.from_env({
        "REDIS_URL": "redis://10.0.0.5:6380/2", "HOST": "0.0.0.0", "REDIS_API_PORT": "9000", "APP_ENV": "Production",
        "SESSION_TTL_SECONDS": "60", "MAX_CONTENT_LENGTH": "2048", "CORS_ORIGINS": "https://a.example, http://b:1/",
        "LOG_LEVEL": "debug", "MEMORY_MAX_SESSIONS": "3", "MEMORY_MAX_BYTES": "4096", "REDIS_CONNECT_TIMEOUT": "0.5",
        "REDIS_SOCKET_TIMEOUT": "3", "REDIS_RETRY_INTERVAL": "1.5", "REDIS_MAX_CONNECTIONS": "4",
        "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "4", "TRUSTED_PROXY_HOPS": "1",
        "BACKUP_DIR": "/srv/storyart-backups", "BACKUP_KEEP": "30",
    }, dotenv_path=None)
    assert config == Config(
        redis_url="redis://10.0.0.5:6380/2", host="0.0.0.0", port=9000, app_env="production", session_ttl_seconds=60,
        max_content_length=2048, cors_origins=("https://a.example", "http://b:1"), log_level="DEBUG",
        local_max_sessions=3, local_max_bytes=4096, redis_connect_timeout=0.5, redis_socket_timeout=3.0,
        redis_retry_interval=1.5, redis_max_connections=4, workers=2, threads=4, trusted_proxy_hops=1,
        backup_dir=Path("/srv/storyart-backups"), backup_keep=30)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1", "[::1]", "localhost", "storyart.internal"])
def test_listen_addresses(host: str) -> None:
    assert Config.from_env({"HOST": host}, None).host == host.strip("[]")


def test_redis_host_and_port_make_a_url() -> None:
    assert Config.from_env({"REDIS_HOST": "cache", "REDIS_PORT": "6390"}, None).redis_url == "redis://cache:6390/0"
    assert Config.from_env({"REDIS_PORT": "6390"}, None).redis_url == "redis://127.0.0.1:6390/0"


def test_node_env_is_the_fallback_for_app_env() -> None:
    assert Config.from_env({"NODE_ENV": "production"}, None).app_env == "production"
    assert Config.from_env({"NODE_ENV": "production", "APP_ENV": "staging"}, None).app_env == "staging"


def test_dotenv_fills_in_but_never_overrides_the_environment(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("REDIS_API_PORT=7900\nSESSION_TTL_SECONDS=120\n# comment\nLOG_LEVEL=warning\n")
    config = Config.from_env({"SESSION_TTL_SECONDS": "30"}, dotenv_path=dotenv)
    assert (config.port, config.session_ttl_seconds, config.log_level) == (7900, 30, "WARNING")


@pytest.mark.parametrize(("name", "value"), [
    ("REDIS_API_PORT", "abc"), ("REDIS_API_PORT", "70000"), ("SESSION_TTL_SECONDS", "1.5"),
    ("SERVICE_HOSTS", "0"), ("SERVICE_HOST_INDEX", "1"),
    ("SESSION_TTL_SECONDS", "-5"), ("MAX_CONTENT_LENGTH", "1e9"), ("LOG_LEVEL", "loud"),
    ("REDIS_URL", "http://x"), ("REDIS_URL", "redis://host:6379/db"), ("REDIS_PORT", "x"),
    ("CORS_ORIGINS", "localhost:3000"), ("CORS_ORIGINS", "*"), ("MEMORY_MAX_SESSIONS", "0"),
    ("REDIS_CONNECT_TIMEOUT", "soon"),
    ("TRUSTED_PROXY_HOPS", "-1"), ("REDIS_URL", "redis://127.0.0.1:abc/0"), ("REDIS_URL", "redis://127.0.0.1:99999/0"),
    ("REDIS_URL", "redis://127.0.0.1:6379/0?socket_timeout=abc"), ("HOST", "local host"), ("HOST", "-bad-"),
    ("BACKUP_KEEP", "0"), ("BACKUP_KEEP", "many"), ("BACKUP_DIR", "a\0b"), ("BACKUP_DIR", str(ROOT / "app.py")),
    ("REDIS_POOL_TIMEOUT", "0"), ("REDIS_POOL_TIMEOUT", "forever"), ("REDIS_REQUIRE_REPLICAS", "2"),
    ("USERS_FILE", "a\0b"), ("USERS_FILE", str(ROOT)), ("AUTH_PROXY_HEADER", "X User"),
    ("AUTH_PROXY_HEADER", "X-User:"), ("AUTH_PROXY_HEADER", "Authorization"), ("USER_MAX_SESSIONS", "-1"),
    ("USER_MAX_BYTES", "lots"), ("SHARE_MAX_SECONDS", "59"), ("ACTIVITY_KEEP_DAYS", "0"),
])
def test_a_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env({name: value}, dotenv_path=None)
    message = str(raised.value)
    assert message.startswith(f"{name}: ") and "\n" not in message and repr(value) in message


def test_the_settings_of_users_shares_and_activity() -> None:
    defaults = Config.from_env({}, None)
    assert (defaults.users_file, defaults.auth_proxy_header, defaults.user_max_sessions, defaults.user_max_bytes,
            defaults.share_max_seconds, defaults.activity_keep_days) == (
        Path("instance/users.json"), None, 0, 0, 30 * 86_400, 90)
    config = Config.from_env({"USERS_FILE": "/srv/storyart/users.json", "AUTH_PROXY_HEADER": "X-Forwarded-User",
                              "TRUSTED_PROXY_HOPS": "1", "USER_MAX_SESSIONS": "200", "USER_MAX_BYTES": "1000000",
                              "SHARE_MAX_SECONDS": "60", "ACTIVITY_KEEP_DAYS": "7"}, None)
    assert (config.users_file, config.auth_proxy_header, config.user_max_sessions, config.user_max_bytes,
            config.share_max_seconds, config.activity_keep_days) == (
        Path("/srv/storyart/users.json"), "X-Forwarded-User", 200, 1_000_000, 60, 7)


def test_a_proxy_header_needs_trusted_proxies() -> None:
    """Any client can send any header: believed only from the proxies TRUSTED_PROXY_HOPS counts."""
    with pytest.raises(ConfigError) as raised:
        Config.from_env({"AUTH_PROXY_HEADER": "X-Forwarded-User"}, None)
    assert str(raised.value) == ("AUTH_PROXY_HEADER: set, but TRUSTED_PROXY_HOPS is 0 (any client could name any "
                                 "user); set TRUSTED_PROXY_HOPS to the proxies in front of the service")


@pytest.mark.parametrize("command", [["app.py"], ["-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]])
@pytest.mark.parametrize(("name", "value", "line"), [
    ("REDIS_API_PORT", "not-a-port", "REDIS_API_PORT: expected a number, got 'not-a-port'"),
    ("REDIS_URL", "redis://user:pw@[::1/0", "REDIS_URL: Invalid IPv6 URL, got 'redis://user:***@[::1/0'"),
    ("CORS_ORIGINS", "*", "CORS_ORIGINS: '*' (any origin) is refused: any web page could then read and delete the "
                          "sessions; list the StoryArt frontend's exact origins, e.g. http://localhost:3000"),
])
def test_start_up_with_a_bad_value_stops_with_one_line(command: list[str], name: str, value: str, line: str) -> None:
    env = {**os.environ, name: value}
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"storyart: configuration error: {line}"]


def test_gunicorn_refuses_several_workers_on_the_memory_store_without_redis() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")} | {"WEB_CONCURRENCY": "3",
                                                                                  "LOCAL_STORE": "memory"}
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "WEB_CONCURRENCY" in done.stderr


def test_env_example_lists_every_variable_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    names = {line.split("=", 1)[0].lstrip("# ").strip() for line in text.splitlines() if "=" in line}
    source = (ROOT / "config.py").read_text()
    import re

    read = set(re.findall(r'"([A-Z][A-Z_]+)"', source)) - {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL",
                                                                  "SQLITE", "MEMORY", "FULL", "NORMAL"}
    assert read <= names, read - names
    defaults = Config.from_env({}, dotenv_path=None)
    assert f"REDIS_API_PORT={defaults.port}" in text and f"SESSION_TTL_SECONDS={defaults.session_ttl_seconds}" in text
    assert f"LOCAL_STORE_MAX_SESSIONS={defaults.local_max_sessions}\n" in text
    assert f"LOCAL_STORE_MAX_BYTES={defaults.local_max_bytes}\n" in text
    assert f"REDIS_POOL_TIMEOUT={defaults.redis_pool_timeout:g}\n" in text


@pytest.mark.parametrize("kind", ["app", "gunicorn"])
@pytest.mark.parametrize("problem", ["directory", "folder is a file", "not a folder"])
def test_an_unusable_local_store_path_stops_start_up_with_one_line(tmp_path, kind: str, problem: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    path = {"directory": tmp_path, "folder is a file": blocker / "sessions.sqlite3",
            "not a folder": blocker / "deeper" / "sessions.sqlite3"}[problem]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")} | {"LOCAL_STORE_PATH": str(path),
                                                                                  "REDIS_API_PORT": "1"}
    args = ["app.py"] if kind == "app" else ["-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("storyart: configuration error: LOCAL_STORE_PATH: "), lines
    assert str(path.parent if problem != "directory" else path) in lines[0] or str(blocker) in lines[0]


def port_with_bus() -> int:
    """A free port whose port + 10000 is free too."""
    import socket

    for port in range(21000 + os.getpid() % 1000 * 20, 55000, 7):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["app", "gunicorn"])
@pytest.mark.parametrize(("flags", "named"), [(("--maxmemory-policy", "allkeys-lru"), "allkeys-lru"),
                                              (("--cluster-enabled", "yes"), "Cluster")])
def test_a_redis_that_can_drop_sessions_stops_start_up(kind, flags, named, own_redis, tmp_path) -> None:
    extra, port = (), None
    if "--cluster-enabled" in flags:  # a cluster node also listens on its port + 10000 (the cluster bus)
        extra, port = ("--cluster-config-file", str(tmp_path / "nodes.conf")), port_with_bus()
    redis_server = own_redis(*flags, *extra, port=port)
    env = {**os.environ, "REDIS_URL": redis_server.url, "LOCAL_STORE_PATH": str(tmp_path / "s.sqlite3"),
           "REDIS_API_PORT": "1"}
    args = ["app.py"] if kind == "app" else ["-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("storyart: configuration error: REDIS_URL: ") and named in lines[0]


@pytest.mark.slow
def test_allowed_eviction_and_no_persistence_are_said_out_loud(service, own_redis) -> None:
    from servers import request

    redis_server = own_redis("--maxmemory-policy", "volatile-lru")  # the suite's Redis persists nothing
    server = service("app", REDIS_URL=redis_server.url, REDIS_ALLOW_EVICTION="1")
    warnings = request(server.port, "GET", "/health").json()["warnings"]
    assert any("volatile-lru" in w for w in warnings) and any("persists nothing" in w for w in warnings)
    assert "can silently drop sessions" in server.log() and "persists nothing" in server.log()
