"""Off-site backups of many large sessions: the time and peak memory of a backup and of a restore from the store.

    python bench/offsite.py               # 50 x 3 MB; --count N, --size BYTES, --maker PATH, --runs N

It starts its own redis-server and SeaweedFS (tests/s3server.py) on free 127.0.0.1 ports, saves `count`
realistic sessions (`make_session.py` of the shared fixtures, as bench/backup.py makes them) into Redis, then runs
each command as a real process and samples its resident memory (the peak over its run):

* `flask --app app sessions backup` without a store (BACKUP_DIR only): what a backup cost before;
* the same with BACKUP_S3_URL: the ZIP, its upload, the read-back of the whole object, the checksum file;
* `flask --app app sessions restore --latest` from the store into an emptied Redis: the download (hashed as it
  arrives), then the restore of every session.

One line per measurement (the median of `runs`); it asserts nothing (tests/test_offsite.py checks the bytes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from s3server import S3Server  # noqa: E402

from bench import backup as bench_backup  # noqa: E402  (its `sessions`)
from servers import PeakRss, RedisServer  # noqa: E402

FLASK = [sys.executable, "-m", "flask", "--app", "app", "sessions"]


def measured(env: dict[str, str], *command: str) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, the last line of stdout) of one command run as its own process."""
    started = time.perf_counter()
    proc = subprocess.Popen([*FLASK, *command], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    with PeakRss(proc.pid, interval=0.005) as rss:
        out, err = proc.communicate(timeout=600)
    elapsed = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}: {err.strip()}")
    return elapsed, rss.peak, out.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--size", type=int, default=3_000_000)
    parser.add_argument("--maker", type=Path, default=bench_backup.MAKER, help="make_session.py of the fixtures")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    bench_backup.MAKER = args.maker
    bodies = bench_backup.sessions(args.count, args.size)
    with tempfile.TemporaryDirectory(prefix="storyart-bench-offsite-") as folder:
        workdir = Path(folder)
        redis_server = RedisServer(workdir / "redis").start()
        s3 = S3Server(workdir / "s3").start()
        try:
            env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BACKUP_"))},
                   "REDIS_URL": redis_server.url, "LOG_LEVEL": "WARNING", "LOCAL_STORE_PATH": str(workdir / "l.db"),
                   "BACKUP_KEEP": "100"}
            os.environ.update(env)
            from app import create_app
            from config import Config
            from offsite import Facts, Store

            app = create_app(Config.from_env(dotenv_path=None))
            client = app.test_client()
            for body in bodies:
                assert client.post("/api/v1/session/save", data=body, content_type="application/json").status_code \
                    == 200
            app.extensions["storyart"].close()
            print(f"{args.count} sessions, {sum(map(len, bodies)) / 1e6:.1f} MB in all; median of {args.runs} runs")
            local = {**env, "BACKUP_DIR": str(workdir / "local")}
            offsite = {**env, "BACKUP_DIR": str(workdir / "offsite"), **s3.env("bench")}
            cases = (("backup, BACKUP_DIR only", local, ["backup"]),
                     ("backup, then off-site (upload + read-back)", offsite, ["backup"]),
                     ("restore --latest from the store into an emptied Redis", offsite, ["restore", "--latest"]))
            results: dict[str, list[tuple[float, int, str]]] = {label: [] for label, _, _ in cases}
            for _ in range(args.runs):  # interleaved, so a change in the machine's load touches every case alike
                for label, run_env, command in cases:
                    if command[0] == "restore":
                        redis_server.client().flushall()
                    results[label].append(measured(run_env, *command))
            for label, runs in results.items():
                seconds = statistics.median(r[0] for r in runs)
                peak = statistics.median(r[1] for r in runs)
                print(f"{label}: {seconds:.2f} s, peak RSS {peak / 1e6:.0f} MB\n    {runs[-1][2]}")
            store = Store(Config.from_env(offsite, dotenv_path=None).backup_s3)
            path = max((workdir / "offsite").iterdir())
            facts = Facts.of(path)
            for label, step in (("upload + read-back + checksum file", lambda: store.upload(path, facts)),
                                ("download, hashed (a restore's fetch)",
                                 lambda: store.fetch(store.key(path.name), workdir / "fetched.zip"))):
                started = time.perf_counter()
                step()
                print(f"in process, {label} of {facts.bytes / 1e6:.1f} MB: {time.perf_counter() - started:.2f} s")
        finally:
            s3.kill()
            redis_server.kill_all()


if __name__ == "__main__":
    main()
