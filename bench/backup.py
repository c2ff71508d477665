"""Backups of many large sessions: time, size and memory.

    python bench/backup.py               # 50 x 3 MB; --count N, --size BYTES

It starts its own redis-server and `gunicorn app:app` (1 worker) on free 127.0.0.1 ports, saves `count`
realistic sessions (../shared/fixtures/make_session.py, each with other seeds), then measures:

* `GET /api/v1/backup`: the time, the file's size, and the worker's peak RSS over its RSS before;
* `flask --app app sessions backup` and `restore` (into an emptied Redis) as real processes: their time;
* in this process, the same backup built three ways: streamed (`backup.stream`, what the endpoint sends), into
  a `SpooledTemporaryFile` (memory up to 64 MB, then a disk file), and at deflate levels 1, 6 and 9: the peak
  of Python's allocations (tracemalloc), the time and the size.

One line per measurement; it asserts nothing (a restore's byte-for-byte check is in tests/test_backup.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from biglist import MAKER, session_of  # noqa: E402

import backup  # noqa: E402
from servers import PeakRss, RedisServer, ServiceProcess, request  # noqa: E402

FIRST = 1_700_000_000_000


def sessions(count: int, size: int) -> list[bytes]:
    """`count` different sessions of about `size` bytes (4 seeds, each saved under several timestamps)."""
    made = []
    for seed in range(4):
        if MAKER.is_file():
            body = subprocess.run([sys.executable, str(MAKER), "--bytes", str(size), "--seed", str(seed + 1)],
                                  capture_output=True, check=True).stdout.strip()
        else:
            body = session_of(size)
        made.append(orjson.loads(body))
    return [orjson.dumps({**made[i % 4], "storyUuid": f"bench-{i}", "timestamp": FIRST + i}) for i in range(count)]


def in_process(storage, label: str, build) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    size = build()
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"in process, {label}: {elapsed:.2f} s, {size / 1e6:.1f} MB file, peak allocations {peak / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--size", type=int, default=3_000_000)
    args = parser.parse_args()
    bodies = sessions(args.count, args.size)
    total = sum(map(len, bodies))
    with tempfile.TemporaryDirectory(prefix="storyart-bench-backup-") as folder:
        workdir = Path(folder)
        redis_server = RedisServer(workdir / "redis").start()
        env = {"REDIS_URL": redis_server.url, "WEB_CONCURRENCY": "1", "LOG_LEVEL": "WARNING",
               "LOCAL_STORE_PATH": str(workdir / "local.sqlite3")}
        server = ServiceProcess("gunicorn", env, workdir / "gunicorn.log")
        try:
            server.start()
            for body in bodies:
                request(server.port, "POST", "/api/v1/session/save", body, {"Content-Type": "application/json"})
            print(f"{args.count} sessions, {total / 1e6:.1f} MB in all")
            [worker] = server_workers(server)
            with PeakRss(worker) as rss:
                started = time.perf_counter()
                answer = request(server.port, "GET", "/api/v1/backup", timeout=300)
                elapsed = time.perf_counter() - started
            print(f"GET /api/v1/backup: {elapsed:.2f} s, status {answer.status}, {len(answer.body) / 1e6:.1f} MB file, "
                  f"worker peak RSS {rss.peak / 1e6:.1f} MB (+{rss.growth / 1e6:.1f} MB over its RSS before)")

            flask = [sys.executable, "-m", "flask", "--app", "app", "sessions"]
            cli_env = {**os.environ, **env}
            target = workdir / "cli.zip"
            for command in (["backup", str(target)], ["restore", str(target)]):
                if command[0] == "restore":
                    redis_server.client().flushall()
                started = time.perf_counter()
                done = subprocess.run([*flask, *command], cwd=ROOT, env=cli_env, capture_output=True, text=True)
                print(f"flask --app app sessions {command[0]}: {time.perf_counter() - started:.2f} s (the process "
                      f"included), exit {done.returncode}: {done.stdout.strip().splitlines()[-1]}")

            os.environ.update(env)  # the storage of this process: the same Redis
            from config import Config
            from storage import build_storage

            storage = build_storage(Config.from_env(dotenv_path=None))
            in_process(storage, "streamed (the endpoint's way)",
                       lambda: sum(len(chunk) for chunk in backup.stream(storage).chunks))
            in_process(storage, "into a SpooledTemporaryFile (64 MB in memory, then disk)",
                       lambda: spooled(storage))
            for level in (1, 6, 9):
                backup.COMPRESS_LEVEL = level
                in_process(storage, f"deflate level {level}",
                           lambda: sum(len(chunk) for chunk in backup.stream(storage).chunks))
            storage.close()
        finally:
            server.stop()
            redis_server.kill_all()


def spooled(storage) -> int:
    with tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024) as spool:
        for chunk in backup.stream(storage).chunks:
            spool.write(chunk)
        size = spool.tell()
        spool.seek(0)
        with zipfile.ZipFile(spool) as archive:
            archive.getinfo(backup.MANIFEST)
        return size


def server_workers(server: ServiceProcess) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(server.proc.pid).children()]


if __name__ == "__main__":
    main()
