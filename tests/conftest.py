from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

# The module-level `app` that importing app.py builds keeps its local store out of the working tree.
os.environ.setdefault("LOCAL_STORE_PATH", str(Path(tempfile.mkdtemp(prefix="storyart-tests-")) / "import.sqlite3"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from app import create_app  # noqa: E402
from config import Config  # noqa: E402
from servers import RedisServer, ServiceProcess  # noqa: E402
from stores import memory as store_memory  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def session_1mb() -> bytes:
    return (FIXTURES / "session-1mb.json").read_bytes()


@pytest.fixture(scope="session")
def session_10kb() -> bytes:
    return (FIXTURES / "session-10kb.json").read_bytes()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill_all()


@pytest.fixture
def redis_db(redis_server: RedisServer):
    """The shared test Redis, emptied before each test (restarted first if a test left it dead)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """Build apps on a fresh SQLite file of this test (or the emptied module-level memory store with
    `local_store="memory"`); their storage is closed after the test. Apps of one test share the file, as
    the workers of one host do."""
    apps: list[Flask] = []
    store_memory.MEMORY.clear()

    def build(**settings: object) -> Flask:
        settings.setdefault("local_store_path", tmp_path / "sessions.sqlite3")
        settings.setdefault("users_file", tmp_path / "users.json")  # no users: single-user mode
        app = create_app(dataclasses.replace(Config(), **settings))
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["storyart"].close()
    store_memory.MEMORY.clear()


@pytest.fixture(params=["redis", "sqlite", "memory"])
def client(request: pytest.FixtureRequest, make_app: Callable[..., Flask]) -> FlaskClient:
    """A test client on each storage mode: the contract is the same on all."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        request.getfixturevalue("redis_db")
        app = make_app(redis_url=server.url)
    else:
        app = make_app(local_store=request.param)
    return app.test_client()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start the real service (`python app.py` or gunicorn); every one is stopped after the test."""
    started: list[ServiceProcess] = []

    def start(kind: str = "app", **env: str) -> ServiceProcess:
        proc = ServiceProcess(kind, env, tmp_path / f"{kind}-{len(started)}.log")
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers of this test's own (`own_redis(*flags, port=...)`); all are killed afterwards."""
    started: list[RedisServer] = []

    def start(*flags: str, port: int | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(started)}", port).start(*flags)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill_all()
