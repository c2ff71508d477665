"""Big lists: the time and a worker's peak memory for lists of many multi-MB sessions, and three concurrent
pages of them (which once timed out on Redis and reported "no sessions").

    python bench/biglist.py                      # 50 x 3 MB and 100 x 5 MB, gunicorn with 1 worker, its own Redis

It starts its own redis-server and `gunicorn app:app` on free 127.0.0.1 ports, saves realistic sessions made
by ../shared/fixtures/make_session.py (or the 1 MB fixture, padded, when that is not there), and prints one
line per measurement. It asserts nothing: it measures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from chaos import tagged  # noqa: E402

from servers import PeakRss, RedisServer, ServiceProcess, request, save_request  # noqa: E402

MAKER = ROOT.parent / "shared" / "fixtures" / "make_session.py"


def session_of(size: int) -> bytes:
    if MAKER.is_file():
        made = subprocess.run([sys.executable, str(MAKER), "--bytes", str(size)], capture_output=True, check=True)
        return made.stdout.strip()
    base = orjson.loads((ROOT / "tests" / "fixtures" / "session-1mb.json").read_bytes())
    base["padding"] = "x" * max(0, size - 1_000_000)
    return orjson.dumps(base)


def measured(server: ServiceProcess, paths: list[str]) -> tuple[float, int, list[dict]]:
    """(seconds, the highest RSS of the service's processes while `paths` were read concurrently, the answers)."""
    with PeakRss(server.proc.pid) as rss:
        started = time.perf_counter()
        with ThreadPoolExecutor(len(paths)) as pool:
            answers = list(pool.map(lambda p: orjson.loads(request(server.port, "GET", p, timeout=120).body), paths))
        elapsed = time.perf_counter() - started
    return elapsed, rss.peak, answers


def run(count: int, size: int, workdir: Path) -> None:
    redis_server = RedisServer(workdir / f"redis-{count}").start()
    server = ServiceProcess("gunicorn", {"REDIS_URL": redis_server.url, "WEB_CONCURRENCY": "1",
                                         "LOG_LEVEL": "WARNING"}, workdir / f"gunicorn-{count}.log")
    try:
        server.start()
        body = session_of(size)
        for i in range(count):
            assert save_request(server.port, tagged(body, f"big-{i}")).status == 200
        idle = max(w.memory_info().rss for w in psutil.Process(server.proc.pid).children())
        mb = len(body) / 1e6
        for label, paths in ((f"bare list of {count} x {mb:.1f} MB", ["/api/v1/session/list"]),
                             (f"list?limit=100 of {count} x {mb:.1f} MB", ["/api/v1/session/list?limit=100"]),
                             (f"3 concurrent list?limit=50 of {mb:.1f} MB", ["/api/v1/session/list?limit=50"] * 3)):
            elapsed, peak, answers = measured(server, paths)
            counts = [a["count"] for a in answers]
            partial = any(a.get("partial") for a in answers)
            print(f"{label:<40} {elapsed:6.2f} s  peak worker RSS {peak >> 20:5d} MB (idle {idle >> 20} MB)  "
                  f"count {counts}{'  PARTIAL' if partial else ''}", flush=True)
    finally:
        server.stop()
        redis_server.kill_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="50x3000000,100x5000000",
                        help="COUNTxBYTES,... (default 50 x 3 MB, 100 x 5 MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="storyart-biglist-") as tmp:
        for spec in args.sets.split(","):
            count, size = (int(float(x)) for x in spec.split("x"))
            run(count, size, Path(tmp))


if __name__ == "__main__":
    main()
