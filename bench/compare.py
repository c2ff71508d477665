"""Compare two 3 MB sessions: the time of `compare.compare` (with parsing both) in this process, and of
`GET /api/v1/session/<a>/compare/<b>` against gunicorn with its own Redis, for two pairs:

* an edited pair: a session and a re-analysis of it (a tenth of the beats with new prompts, a beat removed,
  one added, one moved to another scene, 20 script lines rewritten, the episode title changed);
* an unrelated pair: two different sessions (every beat differs, the script entirely): the worst case.

    python bench/compare.py               # --size BYTES (default 3000000), --repeat N (default 20)
    python bench/compare.py --bombs       # the compare bombs below, with probes of other requests meanwhile

`--bombs` measures pairs built to be expensive, against gunicorn with one worker (every request meets the
compares in the same process): a 313 KB script of 80,000 short lines repeated in another order on each side,
two 590 KB sessions whose scripts are such lines, two unrelated 17.8 MB sessions, and the costliest pairs within
the default COMPARE_MAX_BYTES: two unrelated 8.3 MB sessions, and 130,000 empty beats a side. For each pair: one
compare alone (its time and the worker's RSS growth), then `--clients` clients comparing it back to back for
`--seconds` (a 503 waits its Retry-After) while a prober asks for `/health` and `/api/v1/session/latest` (a
10 KB session) in turn, one after the other: their slowest answers, and how many took over a second. Each pair
gets a fresh service, so a compare still running from the pair before cannot slow it.

Sessions come from ../shared/fixtures/make_session.py (without it: the 1 MB fixture, padded, and only the edited
pair). It prints one line per
measurement (median and slowest of the repeats) and asserts nothing: it measures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from biglist import MAKER, session_of  # noqa: E402

from compare import compare  # noqa: E402
from servers import PeakRss, RedisServer, ServiceProcess, request  # noqa: E402

FIXTURE_10KB = ROOT / "tests" / "fixtures" / "session-10kb.json"


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
    parser.add_argument("--bombs", action="store_true", help="measure the compare bombs instead")
    parser.add_argument("--clients", type=int, default=6, help="clients comparing at once in --bombs (default 6)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long they compare (default 10)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a --bombs client waits (default 60)")
    parser.add_argument("--pairs", default="script80k,590kb,17.8mb,8.3mb,beats", help="the --bombs pairs to measure")
    args = parser.parse_args()
    if args.bombs:
        bombs(args.pairs.split(","), args.clients, args.timeout, args.seconds)
        return
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


def short_lines(count: int, seed: int, kinds: int = 120) -> str:
    """`count` lines of 3 characters, `kinds` different ones in a random order: each line is common enough to
    make a line diff match it everywhere, and rare enough (under 1%) that difflib does not skip it as junk."""
    rng = random.Random(seed)
    lines = [f"{chr(97 + i % 26)}{i // 26:02d}" for i in range(kinds)]
    return "\n".join(rng.choice(lines) for _ in range(count))


def bomb_pairs(names: list[str]) -> dict[str, tuple[bytes, bytes]]:
    """The pairs of `--bombs` (see the module's docstring), by name."""
    small = orjson.loads(FIXTURE_10KB.read_bytes())
    makers = {
        "script80k": lambda seed: orjson.dumps({**small, "scriptText": short_lines(80_000, seed)}),
        "590kb": lambda seed: orjson.dumps({**small, "scriptText": short_lines(116_000, seed)}),
        "17.8mb": lambda seed: _made(17_800_000, seed),
        "8.3mb": lambda seed: _made(8_300_000, seed),
        "beats": lambda seed: orjson.dumps({**small, "scriptText": str(seed),
                                            "analyzedEpisode": {"scenes": [{"beats": [{}] * 130_000}]}}),
    }
    return {name: (makers[name](1), makers[name](2)) for name in names}


def bombs(names: list[str], clients: int, timeout: float, seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="storyart-bench-bombs-") as folder:
        workdir = Path(folder)
        redis_server = RedisServer(workdir / "redis").start()
        try:
            for name, (a, b) in bomb_pairs(names).items():
                redis_server.client().flushall()
                server = ServiceProcess("gunicorn", {"REDIS_URL": redis_server.url, "WEB_CONCURRENCY": "1",
                                                     "LOG_LEVEL": "WARNING"}, workdir / f"gunicorn-{name}.log")
                try:
                    server.start()
                    _bomb(server, name, a, b, clients, timeout, seconds)
                finally:
                    server.stop(timeout=5)
        finally:
            redis_server.kill_all()


def _bomb(server: ServiceProcess, name: str, a: bytes, b: bytes, clients: int, timeout: float,
          seconds: float) -> None:
    first, second = (_saved(server, body, offset) for offset, body in enumerate((a, b)))
    _saved(server, FIXTURE_10KB.read_bytes(), 10)  # the latest: the probe's /latest reads 10 KB, not a bomb
    path = f"/api/v1/session/{first}/compare/{second}"
    label = f"{name} ({len(a) / 1e6:.2f} + {len(b) / 1e6:.2f} MB)"

    def one() -> tuple[float, str]:
        started = time.perf_counter()
        try:
            status = str(request(server.port, "GET", path, timeout=timeout).status)
        except TimeoutError:
            status = "timeout"
        return time.perf_counter() - started, status

    with PeakRss(server.proc.pid, interval=0.01) as rss:
        took, status = one()
    print(f"{label}: alone {took:.2f} s, status {status}, worker RSS +{rss.growth / 2**20:.0f} MB", flush=True)
    stop = threading.Event()
    probes: list[float] = []
    results: list[tuple[float, str]] = []

    def probe() -> None:
        for number in range(1_000_000):
            if stop.is_set():
                return
            started = time.perf_counter()
            request(server.port, "GET", "/health" if number % 2 else "/api/v1/session/latest", timeout=timeout)
            probes.append(time.perf_counter() - started)

    def client(deadline: float) -> None:
        while time.monotonic() < deadline:
            results.append(one())
            if results[-1][1] == "503":
                stop.wait(1)  # its Retry-After

    prober = threading.Thread(target=probe, daemon=True)
    with PeakRss(server.proc.pid, interval=0.01) as rss:
        prober.start()
        deadline = time.monotonic() + seconds
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, [deadline] * clients))
        stop.set()
        prober.join()
    answered = [(took, status) for took, status in results if status != "503"]
    statuses = sorted({status for _, status in answered})
    print(f"{label}: {clients} clients for {seconds:.0f} s, {len(answered)} compares answered {statuses} (slowest "
          f"{max(t for t, _ in answered):.2f} s), {len(results) - len(answered)} busy (503); worker RSS "
          f"+{rss.growth / 2**20:.0f} MB; {len(probes)} probes, median {statistics.median(probes) * 1000:.0f} ms, "
          f"slowest {max(probes) * 1000:.0f} ms, {sum(p > 1 for p in probes)} over 1 s", flush=True)


def _made(size: int, seed: int) -> bytes:
    if not MAKER.is_file():  # the 1 MB fixture, padded: a pair differs in its padding
        session = orjson.loads(session_of(1_000_000))
        session["padding"] = str(seed) * (size - 1_000_000)
        return orjson.dumps(session)
    made = subprocess.run([sys.executable, str(MAKER), "--bytes", str(size), "--seed", str(seed)],
                          capture_output=True, check=True)
    return made.stdout.strip()


def _saved(server: ServiceProcess, body: bytes, offset: int) -> int:
    session = orjson.loads(body)
    session["timestamp"] = 1_700_000_000_000 + offset
    answer = request(server.port, "POST", "/api/v1/session/save", orjson.dumps(session),
                     {"Content-Type": "application/json"})
    return answer.json()["timestamp"]


if __name__ == "__main__":
    main()
