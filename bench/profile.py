"""Where a request's time goes: the service in process (Flask's test client, no HTTP server), sampled.

    .venv/bin/python bench/profile.py [--embedded] [--requests N] [--top K]

It builds the app with the documented defaults (with Redis: a throwaway `redis-server` on a free port; with
`--embedded`: the SQLite local store in a temporary folder, `LOCAL_STORE_SYNC=FULL`), warms it up, times each
case without a profiler (wall and CPU ms per request: the difference is waiting, on Redis or on an fsync), then
runs it again while `py-spy` samples this process's CPU from outside (1 kHz, not pausing it: no cost per Python
call, unlike a tracing profiler) and sums each sample into the innermost step it can name: a library (redis-py;
logging; flask-cors; werkzeug; Flask; the test client, which is not the service's cost) or a function of the
service (its own time, which includes the C calls it makes: orjson, hashlib, sqlite3). Cases: `latest` of a 10 KB
session, a save of 10 KB, a save of 1 MB, `latest` of that 1 MB session (the fixtures in tests/fixtures). The
access log runs at its documented level (INFO) into /dev/null: formatting it is measured, a terminal is not.
py-spy needs to attach to this process (root, or kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# `app` builds its module-level app from the environment on import: keep that one's store out of the checkout.
os.environ.setdefault("LOCAL_STORE_PATH", str(Path(tempfile.mkdtemp(prefix="storyart-profile-")) / "import.sqlite3"))

from app import create_app  # noqa: E402
from config import Config  # noqa: E402
from servers import RedisServer  # noqa: E402  (the test suite's throwaway redis-server)

FIXTURES = ROOT / "tests" / "fixtures"
HEADERS = {"Content-Type": "application/json", "Origin": "http://localhost:3000"}  # what the browser sends
# (text in a frame's file path, the step it names): the first that matches names the frame; the innermost named
# frame of a sample gets its time.
LIBRARIES = (
    ("/redis/_parsers/", "redis-py: reading answers"),
    ("/redis/", "redis-py"),
    ("/logging/", "logging (access log)"),
    ("/flask_cors/", "flask-cors"),
    ("/werkzeug/test.py", "test client (not the service)"),
    ("/flask/testing.py", "test client (not the service)"),
    ("/werkzeug/", "werkzeug (request, response, routing)"),
    ("/flask/", "Flask (dispatch, contexts)"),
)


def step_of(frame: str) -> str | None:
    """The step a py-spy frame (`function (path:line)`) names, if any."""
    function, _, where = frame.partition(" (")
    path = where.rpartition(":")[0].replace("\\", "/")
    for text, step in LIBRARIES:
        if text in path:
            return f"{step}: {function.rpartition('.')[2]}" if text == "/redis/" else step
    if path.startswith(str(ROOT)) and "/tests/" not in path and "/bench/" not in path:
        return f"{Path(path).relative_to(ROOT)}:{function}"
    return None


def steps(raw: str, thread: str, loop: str) -> Counter[str]:
    """Samples per step, from py-spy's raw output (`thread;frame;frame... count`), of this thread's stacks inside
    `loop`: each goes to the innermost nameable frame on its stack."""
    totals: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        inside = [f.partition(" (")[0].rpartition(".")[2] == loop for f in frames]
        if thread not in frames[0] or True not in inside:
            continue
        named = "other"
        for frame in frames[inside.index(True) + 1:]:
            named = step_of(frame) or named
        totals[named] += int(count)
    return totals


def sampled(requests: Callable[[], None]) -> str:
    """py-spy's raw output for one run of `requests` (the function named `measured_loop`, so that its samples
    can be told apart from the start-up's)."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory(prefix="storyart-py-spy-") as tmp:
        out = Path(tmp) / "raw.txt"
        spy = subprocess.Popen([binary, "record", "--pid", str(os.getpid()), "--rate", "1000",
                                "--threads", "--nonblocking", "--full-filenames", "--format", "raw", "--output",
                                str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.5)  # py-spy attaches
        if spy.poll() is not None:
            raise SystemExit(f"bench: py-spy could not attach: {spy.stderr.read().decode()[-500:]}")
        requests()
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        return out.read_text()


@contextmanager
def service(embedded: bool) -> Iterator[Callable[..., object]]:
    """A test client of the app as documented, on Redis or on the SQLite store; the access log to /dev/null."""
    with tempfile.TemporaryDirectory(prefix="storyart-profile-") as tmp:
        redis = None if embedded else RedisServer(Path(tmp) / "redis").start()
        try:
            config = replace(Config(), redis_url=None if redis is None else redis.url,
                             local_store_path=Path(tmp) / "sessions.sqlite3")
            app = create_app(config)
            with open(os.devnull, "w") as sink:
                for handler in logging.getLogger().handlers:
                    if isinstance(handler, logging.StreamHandler):
                        handler.setStream(sink)
                yield app.test_client()
                app.extensions["storyart"].close()
        finally:
            if redis is not None:
                redis.kill_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench/profile.py")
    parser.add_argument("--embedded", action="store_true", help="no Redis: the SQLite local store")
    parser.add_argument("--requests", type=int, default=2000, help="10 KB requests per case (1 MB: a 40th)")
    parser.add_argument("--top", type=int, default=8, help="steps listed per case (the rest summed)")
    args = parser.parse_args(argv)
    small, big = (FIXTURES / "session-10kb.json").read_bytes(), (FIXTURES / "session-1mb.json").read_bytes()
    print(f"mode: {'SQLite local store (LOCAL_STORE_SYNC=FULL)' if args.embedded else 'Redis'}; "
          f"Python {sys.version.split()[0]}; Flask test client, in process")
    with service(args.embedded) as client:
        def save(body: bytes) -> Callable[[], object]:
            return lambda: client.post("/api/v1/session/save", data=body, headers=HEADERS)

        assert client.post("/api/v1/session/save", data=small, headers=HEADERS).status_code == 200
        cases = (("latest 10 KB", lambda: client.get("/api/v1/session/latest", headers=HEADERS), args.requests),
                 ("save 10 KB", save(small), args.requests),
                 ("save 1 MB", save(big), max(1, args.requests // 40)),
                 # the latest session is 1 MB from here on
                 ("latest 1 MB", lambda: client.get("/api/v1/session/latest", headers=HEADERS),
                  max(1, args.requests // 10)))
        for name, request, count in cases:
            for _ in range(max(10, count // 10)):  # warm-up
                request()
            began, cpu_began = time.perf_counter(), time.process_time()
            for _ in range(count):
                request()
            wall_ms = (time.perf_counter() - began) * 1000 / count
            cpu_ms = (time.process_time() - cpu_began) * 1000 / count  # this process's CPU: Redis's is not in it
            def measured_loop(request: Callable[[], object] = request, count: int = count) -> None:
                for _ in range(count):
                    request()

            totals = steps(sampled(measured_loop), "MainThread", "measured_loop")
            samples = sum(totals.values()) or 1
            print(f"\n{name}: {wall_ms:.3f} ms per request, {cpu_ms:.3f} ms of it on this process's CPU ({count} "
                  f"requests, no profiler); the CPU's shares ({samples} samples in a second run; ms: share x CPU):")
            shown = totals.most_common(args.top)
            for step, n in shown:
                print(f"  {n / samples:6.1%}  {cpu_ms * n / samples:7.3f} ms  {step}")
            rest = samples - sum(n for _, n in shown)
            print(f"  {rest / samples:6.1%}  {cpu_ms * rest / samples:7.3f} ms  (everything else)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
