"""Filtered list pages over many sessions: what the history page asks for after a large import.

    python bench/filters.py                  # 100,000 sessions, Redis mode and the SQLite local store
    python bench/filters.py --count 2000     # a quick look

It starts its own redis-server and `gunicorn app:app` on free 127.0.0.1 ports, imports `--count` tiny sessions
(100 stories, 10 episodes, titles with a rare word in one in a thousand) through the import endpoint, then
times each filtered page (`view=summary&limit=20`, the median of 5 requests) and prints one line per query.
It asserts nothing: it measures. (The local store is seeded with LOCAL_STORE_SYNC=NORMAL: the same reads,
without a flush to the disk per imported session.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from servers import RedisServer, ServiceProcess, request  # noqa: E402

QUERIES = {
    "no filter": "",
    "storyUuid (1% match)": "storyUuid=story-7",
    "episode (10% match)": "episode=3",
    "q, a rare word (0.1%)": "q=LIGHTHOUSE",
    "q, a common word (100%)": "q=episode",
    "storyUuid + episode + q": "storyUuid=story-7&episode=7&q=episode",
}
BATCH = 1000


def sessions(count: int) -> list[list[dict]]:
    items = [{"scriptText": f"INT. ROOM - DAY {i}", "episodeContext": "", "storyUuid": f"story-{i % 100}",
              "analyzedEpisode": {"episodeNumber": i % 10, "scenes": [],
                                  "title": f"Episode {i}" + (" Lighthouse" if i % 1000 == 0 else "")}}
             for i in range(count)]
    return [items[i : i + BATCH] for i in range(0, count, BATCH)]


def seed(server: ServiceProcess, count: int) -> float:
    started = time.perf_counter()
    for batch in sessions(count):
        got = request(server.port, "POST", "/api/v1/session/import", orjson.dumps(batch),
                      {"Content-Type": "application/json"}, timeout=120)
        report = orjson.loads(got.body)
        assert report["complete"] and report["imported"] == len(batch), report.get("error")
    return time.perf_counter() - started


def page_time(server: ServiceProcess, query: str) -> tuple[float, int]:
    """(median seconds, total matches) of `query`'s first summary page."""
    times, total = [], 0
    for _ in range(5):
        started = time.perf_counter()
        got = request(server.port, "GET", f"/api/v1/session/list?view=summary&limit=20&{query}", timeout=120)
        times.append(time.perf_counter() - started)
        total = orjson.loads(got.body)["total"]
    return statistics.median(times), total


def run(mode: str, count: int, workdir: Path) -> None:
    env = {"LOG_LEVEL": "WARNING", "WEB_CONCURRENCY": "1", "LOCAL_STORE_MAX_SESSIONS": str(count + 1000),
           "IMPORT_TIME_LIMIT_SECONDS": "600"}
    redis_server = None
    if mode == "redis":
        redis_server = RedisServer(workdir / "redis").start()
        env["REDIS_URL"] = redis_server.url
    else:
        env["LOCAL_STORE_SYNC"] = "NORMAL"
    server = ServiceProcess("gunicorn", env, workdir / f"gunicorn-{mode}.log")
    try:
        server.start()
        seeded = seed(server, count)
        print(f"{mode}: imported {count:,} sessions in {seeded:.1f} s ({count / seeded:,.0f}/s)", flush=True)
        for name, query in QUERIES.items():
            seconds, total = page_time(server, query)
            print(f"{mode}: {name:<26} {seconds * 1000:8.1f} ms  ({total:,} match)", flush=True)
    finally:
        server.stop()
        if redis_server is not None:
            redis_server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--mode", choices=["redis", "sqlite", "both"], default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in (["redis", "sqlite"] if args.mode == "both" else [args.mode]):
            run(mode, args.count, Path(tmp))


if __name__ == "__main__":
    main()
