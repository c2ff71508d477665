"""Soak: concurrent 1 MB saves and latest reads against gunicorn while Redis is killed (-9) and restarted.

    python bench/soak.py --duration 60          # the defaults: 8 clients, 2 outages of 3 s, 3 gunicorn workers
    python bench/soak.py --kill-service         # ... and gunicorn itself kill -9ed and restarted mid-outage

It starts its own `redis-server` (AOF fsynced on every write, so what Redis acknowledged survives kill -9) and
`gunicorn app:app` on free 127.0.0.1 ports, drives the clients for `--duration` seconds while a chaos thread
kills and restarts Redis `--outages` times (with `--kill-service`, it also kills gunicorn's master and workers
with SIGKILL in the middle of the first outage, while sessions wait in the local store, and starts it again),
then checks that every acknowledged timestamp reads back as the very session that was saved under it. It
prints requests, errors by status, acknowledged, lost, duplicates and the slowest response during an outage;
`--json` adds the same as one JSON line. Exit status 1 when anything acknowledged was lost or duplicated, or
any request got a 5xx or no answer (a connection refused while the service itself was down is counted apart).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from chaos import PERSISTENT, tagged  # noqa: E402

from servers import RedisServer, ServiceProcess, request, save_request  # noqa: E402

INDEX_KEY = "storyart:sessions:index"


@dataclass
class Call:
    kind: str  # "save" or "latest"
    started: float  # time.monotonic()
    elapsed: float
    status: int  # 0: no answer (connection error, timeout)
    timestamp: int | None = None
    tag: str | None = None
    storage: str | None = None
    error: str | None = None  # the error sentence of a 5xx
    retry_after: bool = False  # a 5xx that said when to retry (a 503 with Retry-After)


@dataclass
class Soak:
    port: int
    base: bytes
    read_ratio: float
    sources: list[str] | None = None  # client addresses, one per client in turn (behind a proxy routing by them)
    stop: threading.Event = field(default_factory=threading.Event)
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, number: int) -> None:
        rng = random.Random(number)
        source = self.sources[number % len(self.sources)] if self.sources else None
        sent = 0
        while not self.stop.is_set():
            if rng.random() < self.read_ratio:
                kind, tag = "latest", None
            else:
                kind, tag = "save", f"c{number}-{sent}"
                sent += 1
            started = time.monotonic()
            try:
                if kind == "save":
                    got = save_request(self.port, tagged(self.base, tag), source=source)
                else:
                    got = request(self.port, "GET", "/api/v1/session/latest", source=source)
                status = got.status
            except OSError:
                got, status = None, 0
            call = Call(kind, started, time.monotonic() - started, status, tag=tag)
            if status >= 500:
                call.error = got.body[:200].decode(errors="replace")
                call.retry_after = "retry-after" in got.headers
            if kind == "save" and status == 200:
                answer = got.json()
                call.timestamp, call.storage = answer["timestamp"], answer["storage"]
            with self.lock:
                self.calls.append(call)


def chaos(redis_server: RedisServer, service: ServiceProcess | None, duration: float, outages: int,
          outage_seconds: float, t0: float, stop: threading.Event, windows: list[tuple[float, float]],
          service_down: list[tuple[float, float]]) -> None:
    """Kill Redis (-9) `outages` times, evenly spread, and restart it on the same port and AOF; with a
    `service`, kill -9 it (master and workers) halfway through the first outage and start it again."""
    for k in range(outages):
        at = t0 + duration * (k + 1) / (outages + 1) - outage_seconds / 2
        if stop.wait(max(0.0, at - time.monotonic())):
            return
        down = time.monotonic()
        redis_server.kill()
        time.sleep(outage_seconds / 2)
        if service is not None and k == 0:
            killed = time.monotonic()
            service.kill_group()
            service.restart()
            service_down.append((killed, time.monotonic()))
        time.sleep(max(0.0, down + outage_seconds - time.monotonic()))
        redis_server.start(*PERSISTENT)  # returns once it answers (after loading the AOF)
        windows.append((down, time.monotonic()))


def stored_tags(redis_server: RedisServer) -> Counter:
    """How many sessions Redis holds per soak tag (read from the end of each value, where the tag is)."""
    client = redis_server.client()
    keys = [member for member in client.zrange(INDEX_KEY, 0, -1)]
    tails = []
    for start in range(0, len(keys), 200):
        with client.pipeline(transaction=False) as pipe:
            for key in keys[start : start + 200]:
                pipe.getrange(key, -120, -1)
            tails += pipe.execute()
    return Counter(tail.split(b'"soakTag":"')[-1].split(b'"')[0].decode() for tail in tails if b"soakTag" in tail)


def settle(port: int, patience: float) -> None:
    """Wait until the write-back has emptied the local store, so what is verified is what Redis holds (a
    pending copy could hide a session that the write-back then moved elsewhere)."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if request(port, "GET", "/health").json()["localStore"]["sessions"] == 0:
                return
        time.sleep(0.2)


def verify(port: int, acknowledged: list[Call], patience: float) -> list[Call]:
    """The acknowledged saves that do not read back as themselves; asked again while the number missing keeps
    falling, for up to `patience` seconds without progress."""
    pending = list(acknowledged)
    progressed = time.monotonic()
    while True:
        missing = []
        for call in pending:
            got = request(port, "GET", f"/api/v1/session/{call.timestamp}")
            tail = b',"soakTag":"%s","timestamp":%d},"storage":' % (call.tag.encode(), call.timestamp)
            if got.status != 200 or tail not in got.body[-200:]:
                missing.append(call)
        if len(missing) < len(pending):
            progressed = time.monotonic()
        if not missing or time.monotonic() - progressed > patience:
            return missing
        pending = missing
        time.sleep(0.5)


def run(args: argparse.Namespace) -> dict:
    base = (ROOT / "tests" / "fixtures" / "session-1mb.json").read_bytes()
    workdir = Path(tempfile.mkdtemp(prefix="storyart-soak-"))
    redis_server = RedisServer(workdir / "redis").start(*PERSISTENT)
    # 8 clients saving 1 MB sessions back to back put ~100 a second into the local store during an outage: far
    # beyond any real StoryArt use, so the soak lifts the local store's caps (500 sessions by default)
    env = {"REDIS_URL": redis_server.url, "REDIS_RETRY_INTERVAL": str(args.retry_interval),
           "WEB_CONCURRENCY": str(args.workers), "LOG_LEVEL": "INFO", "LOCAL_STORE_MAX_SESSIONS": "100000",
           "LOCAL_STORE_MAX_BYTES": str(8 << 30)}
    service = ServiceProcess("gunicorn", env, workdir / "gunicorn.log")
    windows: list[tuple[float, float]] = []
    try:
        service.start()
        soak = Soak(service.port, base, args.read_ratio)
        clients = [threading.Thread(target=soak.client, args=(n,)) for n in range(args.clients)]
        t0 = time.monotonic()
        service_down: list[tuple[float, float]] = []
        breaker = threading.Thread(target=chaos, args=(
            redis_server, service if args.kill_service else None, args.duration, args.outages, args.outage_seconds,
            t0, soak.stop, windows, service_down))
        for thread in [*clients, breaker]:
            thread.start()
        soak.stop.wait(args.duration)
        soak.stop.set()
        for thread in [*clients, breaker]:
            thread.join()
        if redis_server.proc is None or redis_server.proc.poll() is not None:
            redis_server.start(*PERSISTENT)

        calls = soak.calls
        acknowledged = [c for c in calls if c.kind == "save" and c.status == 200]
        settle(service.port, patience=args.retry_interval * 5 + 30)
        lost = verify(service.port, acknowledged, patience=args.retry_interval * 5 + 10)
        stamps = Counter(c.timestamp for c in acknowledged)
        stored = stored_tags(redis_server)
        acked_tags = {c.tag for c in acknowledged}
        during = [c for c in calls if any(c.started < end and c.started + c.elapsed > down
                                          for down, end in windows)]
        refused = [c for c in calls if c.status == 0 and any(
            c.started < end and c.started + c.elapsed > down for down, end in service_down)]
        # A read the service cannot answer completely while Redis is away (nothing newer in the local store) is
        # a 503 with Retry-After by design: the browser keeps its localStorage copy instead of "no session".
        honest = [c for c in calls if c.kind == "latest" and c.status == 503 and any(
            c.started < end + 1 and c.started + c.elapsed > down for down, end in windows)]
        errors = Counter(f"{c.kind} {c.status or 'no answer'}" for c in calls if c.status != 200)
        result = {
            "seconds": args.duration,
            "clients": args.clients,
            "workers": args.workers,
            "outages": [round(end - down, 2) for down, end in windows],
            "requests": len(calls),
            "saves": sum(c.kind == "save" for c in calls),
            "latest_reads": sum(c.kind == "latest" for c in calls),
            "errors_by_status": dict(sorted(errors.items())),
            "server_errors": sum(1 for c in calls if c.status >= 500 or c.status == 0) - len(refused) - len(honest),
            "reads_unavailable_during_outages": len(honest),
            "service_killed": [round(end - down, 2) for down, end in service_down],
            "refused_while_the_service_was_down": len(refused),
            "acknowledged": len(acknowledged),
            "acknowledged_to_memory": sum(c.storage == "memory" for c in acknowledged),
            "lost": len(lost),
            "lost_examples": [f"{c.tag}@{c.timestamp}" for c in lost[:5]],
            "server_error_examples": sorted({f"{c.kind} {c.status}: {c.error}" for c in calls if c.error})[:5],
            "timestamps_given_twice": sum(n - 1 for n in stamps.values() if n > 1),
            "duplicates_in_redis": sum(n - 1 for n in stored.values() if n > 1),
            "stored_without_an_answer": sum(1 for tag in stored if tag not in acked_tags),
            "requests_during_outages": len(during),
            "slowest_during_outage_s": round(max((c.elapsed for c in during), default=0.0), 3),
            "over_1s_during_outages": sum(c.elapsed > 1 for c in during),
            "slowest_s": round(max((c.elapsed for c in calls), default=0.0), 3),
        }
    finally:
        service.stop()
        redis_server.kill_all()
    result["shutdown_log"] = [line for line in service.log().splitlines() if "shutdown:" in line]
    if args.keep:
        result["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)  # the AOF alone is about 1 GB a minute
    return result


def report(result: dict) -> str:
    errors = ", ".join(f"{status}: {n}" for status, n in result["errors_by_status"].items()) or "none"
    killed = (f"; refused while gunicorn was down (kill -9, restart took {result['service_killed']} s): "
              f"{result['refused_while_the_service_was_down']}") if result["service_killed"] else ""
    return "\n".join([
        f"soak: {result['seconds']:g} s, {result['clients']} clients, gunicorn with {result['workers']} workers, "
        f"Redis killed (-9) and restarted {len(result['outages'])} times (down {result['outages']} s)",
        f"requests:     {result['requests']} ({result['saves']} saves of 1 MB, "
        f"{result['latest_reads']} latest reads; {result['requests_during_outages']} during outages)",
        f"errors:       {errors} (5xx or no answer: {result['server_errors']}{killed}; latest 503 with "
        f"Retry-After while Redis was away and the local store held nothing: "
        f"{result['reads_unavailable_during_outages']})",
        *(f"              {example}" for example in result["server_error_examples"]),
        f"acknowledged: {result['acknowledged']} ({result['acknowledged_to_memory']} of them to memory)",
        f"lost:         {result['lost']} {result['lost_examples'] or ''}".rstrip(),
        f"duplicates:   {result['duplicates_in_redis']} in Redis ({result['stored_without_an_answer']} stored whose "
        f"client got no answer: the service was killed before it could reply); "
        f"timestamps given twice: {result['timestamps_given_twice']}",
        f"slowest:      {result['slowest_during_outage_s']:.3f} s during an outage "
        f"({result['over_1s_during_outages']} responses over 1 s), {result['slowest_s']:.3f} s overall",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--outages", type=int, default=2, help="Redis kills and restarts (default 2)")
    parser.add_argument("--outage-seconds", type=float, default=3.0, help="how long Redis stays dead (3)")
    parser.add_argument("--read-ratio", type=float, default=0.5, help="share of latest reads (default 0.5)")
    parser.add_argument("--workers", type=int, default=3, help="gunicorn workers (default 3)")
    parser.add_argument("--retry-interval", type=float, default=1.0, help="REDIS_RETRY_INTERVAL (default 1)")
    parser.add_argument("--kill-service", action="store_true",
                        help="also kill -9 gunicorn (master and workers) mid-outage and restart it")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (AOF, gunicorn log)")
    args = parser.parse_args(argv)
    result = run(args)
    print(report(result))
    for line in result["shutdown_log"]:
        print(f"gunicorn: {line}")
    if "workdir" in result:
        print(f"work directory: {result['workdir']}")
    if args.json:
        print(orjson.dumps(result).decode())
    failed = result["lost"] or result["server_errors"] or result["duplicates_in_redis"] \
        or result["timestamps_given_twice"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
