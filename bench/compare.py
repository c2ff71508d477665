"""Compare two 3 MB sessions: the time of `compare.compare` (with parsing both) in this process, and of
`GET /api/v1/session/<a>/compare/<b>` against gunicorn with its own Redis, for two pairs:

* an edited pair: a session and a re-analysis of it (a tenth of the beats with new prompts, a beat removed,
  one added, one moved to another scene, 20 script lines rewritten, the episode title changed);
* an unrelated pair: two different sessions (every beat differs, the script entirely): the worst case.

    python bench/compare.py               # --size BYTES (default 3000000), --repeat N (default 20)

Sessions come from ../shared/fixtures/make_session.py (without it: the 1 MB fixture, padded, and only the edited
pair). It prints one line per
measurement (median and slowest of the repeats) and asserts nothing: it measures.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from biglist import MAKER, session_of  # noqa: E402

from compare import compare  # noqa: E402
from servers import RedisServer, ServiceProcess, request  # noqa: E402


def edited(body: bytes) -> bytes:
    """`body` as a re-analysis would change it (see the module's docstring)."""
    session = orjson.loads(body)
    scenes = session["analyzedEpisode"]["scenes"]
    beats = [beat for scene in scenes for beat in scene["beats"]]
    for beat in beats[::10]:
        beat["prompts"]["cinematic"]["prompt"] += ", rewritten"
    scenes[0]["beats"].pop()
    scenes[-1]["beats"].append({**beats[1], "beatId": "new-beat"})
    scenes[1]["beats"].append(scenes[2]["beats"].pop(0))
    lines = session["scriptText"].splitlines()
    for i in range(0, 200, 10):
        lines[i] = f"{lines[i]} (revised)"
    session["scriptText"] = "\n".join(lines)
    context = orjson.loads(session["episodeContext"])
    context["episode"]["episode_title"] += " (revised)"
    session["episodeContext"] = orjson.dumps(context).decode()
    return orjson.dumps(session)


def timed(call: Callable[[], object], repeat: int) -> tuple[float, float, object]:
    """(median ms, slowest ms, the last result)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=3_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    base = session_of(args.size)
    pairs = {"edited": (base, edited(base))}
    if MAKER.is_file():
        other = subprocess.run([sys.executable, str(MAKER), "--bytes", str(args.size), "--seed", "2"],
                               capture_output=True, check=True).stdout.strip()
        pairs["unrelated"] = (base, other)
    for name, (a, b) in pairs.items():
        median, slowest, report = timed(lambda a=a, b=b: compare(orjson.loads(a), orjson.loads(b)), args.repeat)
        print(f"in process, {name} pair ({len(a):,} and {len(b):,} bytes): median {median:.1f} ms, slowest "
              f"{slowest:.1f} ms; {len(report['beats']['changed'])} beats changed, "
              f"{report['scriptText']['linesAdded']} script lines added")
    with tempfile.TemporaryDirectory(prefix="storyart-bench-compare-") as folder:
        workdir = Path(folder)
        redis_server = RedisServer(workdir / "redis").start()
        server = ServiceProcess("gunicorn", {"REDIS_URL": redis_server.url, "WEB_CONCURRENCY": "1",
                                             "LOG_LEVEL": "WARNING"}, workdir / "gunicorn.log")
        try:
            server.start()
            for name, (a, b) in pairs.items():
                first, second = (_saved(server, body, offset) for offset, body in enumerate((a, b)))
                path = f"/api/v1/session/{first}/compare/{second}"
                median, slowest, answer = timed(lambda path=path: request(server.port, "GET", path), args.repeat)
                print(f"over HTTP (gunicorn, Redis), {name} pair: median {median:.1f} ms, slowest {slowest:.1f} ms; "
                      f"status {answer.status}, {len(answer.body):,} bytes answered")
        finally:
            server.stop()
            redis_server.kill_all()


def _saved(server: ServiceProcess, body: bytes, offset: int) -> int:
    session = orjson.loads(body)
    session["timestamp"] = 1_700_000_000_000 + offset
    answer = request(server.port, "POST", "/api/v1/session/save", orjson.dumps(session),
                     {"Content-Type": "application/json"})
    return answer.json()["timestamp"]


if __name__ == "__main__":
    main()
