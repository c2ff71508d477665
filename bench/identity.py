"""What naming the request's user costs: `latest` of a 10 KB session in single-user and in multi-user mode.

    .venv/bin/python bench/identity.py [--rounds N] [--duration S] [--no-api-token] [--generator python|wrk]

It starts, as bench/run.py does (its functions), a throwaway `redis-server` and the service under
`gunicorn -c gunicorn.conf.py app:app` with the documented defaults, once per mode, each on its own Redis database:

  A  single user: no users file, requests without `Authorization` (the default check only);
  B  multi-user: a USERS_FILE with 20 users, requests with one user's Bearer token, reading her own latest session
     (saved first with her token);
  C  single user with API_TOKEN set, requests with that Bearer token (skipped with --no-api-token).

Then, round after round, `GET /api/v1/session/latest` at 1 and at 8 clients against each mode in turn (the order
rotates each round), with bench/run.py's load generator (wrk if installed, else its multi-process one). The
machine may be shared: interleaved rounds put the same disturbance on every mode, and the ratios are taken
within a round. It prints req/s, p50 and the workers' CPU per request (medians over rounds), the ratio to A, and
an in-process micro-timing (timeit) of `Identity.caller` on a realistic environ in each mode, next to the time
of a whole request (1 / req/s at 1 client), and the CPU of a whole `latest` through the app in this process
(Flask's test client, alternating blocks): on a busy machine the HTTP req/s of a run swing by tens of percent, so
a few-percent difference shows in the CPU figures, not in req/s. It asserts nothing: it measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import timeit
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import orjson  # noqa: E402
from werkzeug.test import EnvironBuilder  # noqa: E402

from bench.loadgen import Request, Result, cpu_count, run_http, wrk_path, wrk_version  # noqa: E402
from bench.run import (  # noqa: E402
    BROWSER_HEADERS,
    FIXTURES,
    LATEST,
    SAVE,
    fmt,
    http,
    log,
    median,
    ratio_of,
    start_redis,
    start_service,
    table,
    tree_cpu_seconds,
)
from config import Config  # noqa: E402
from identity import Identity  # noqa: E402
from users import Users  # noqa: E402

FIXTURE = "session-10kb.json"
CLIENTS = (1, 8)
USERS = 20
READER = 7  # which of the users reads (any one: they are looked up by the hash of the token)
API_TOKEN = "bench-only-api-token-0123456789abcdef"  # a throwaway secret of this run's own service


@dataclass
class Mode:
    """One way of running the service: its settings and the header its requests carry."""

    key: str  # A, B, C
    label: str
    settings: dict[str, str]
    headers: tuple[tuple[str, str], ...] = ()  # beyond the browser's
    url: str = ""
    pid: int | None = None

    @property
    def request_headers(self) -> dict[str, str]:
        return dict(self.headers)


def make_users(path: Path) -> str:
    """A users file of USERS users made as `flask users add` makes them; the token of the one who reads."""
    users = Users.open(path)
    tokens = [users.add(f"writer{number:02d}")[1] for number in range(USERS)]
    return tokens[READER]


def modes(workdir: Path, api_token: bool) -> list[Mode]:
    absent = str(workdir / "no-users.json")  # never created: single-user mode
    token = make_users(workdir / "users.json")
    found = [
        Mode("A", "single user, no users file, no token", {"USERS_FILE": absent}),
        Mode("B", f"{USERS} users, one user's Bearer token", {"USERS_FILE": str(workdir / "users.json")},
             (("Authorization", f"Bearer {token}"),)),
    ]
    if api_token:
        found.append(Mode("C", "single user, API_TOKEN, its Bearer token",
                          {"USERS_FILE": absent, "API_TOKEN": API_TOKEN},
                          (("Authorization", f"Bearer {API_TOKEN}"),)))
    return found


def prepare(mode: Mode, fixture: bytes) -> None:
    """Save the fixture as this mode's caller, and check `latest` gives it back to her (and nobody else can)."""
    status, body = http("POST", mode.url + SAVE, fixture, headers=mode.request_headers)
    if status != 200:
        raise RuntimeError(f"mode {mode.key}: saving the fixture answered {status} {body[:200]!r}")
    status, body = http("GET", mode.url + LATEST, headers=mode.request_headers)
    data = orjson.loads(body).get("data") if status == 200 else None
    if data is None or {k: v for k, v in data.items() if k != "timestamp"} != orjson.loads(fixture):
        raise RuntimeError(f"mode {mode.key}: latest did not return the saved session (status {status})")
    if mode.headers and http("GET", mode.url + LATEST)[0] != 401:
        raise RuntimeError(f"mode {mode.key}: a request without a token was not refused")


def measure(mode: Mode, clients: int, duration: float, generator: str) -> Result:
    request = Request(mode.url + LATEST, "GET", None, BROWSER_HEADERS + mode.headers)
    before = tree_cpu_seconds(mode.pid)
    result = run_http(request, clients, duration, generator)
    cpu = tree_cpu_seconds(mode.pid) - before
    return Result(result.requests, result.seconds, result.p50_ms, result.p99_ms, result.errors,
                  cpu * 1000 / max(1, result.requests))


def micro_timing(mode: Mode, number: int) -> float:
    """Microseconds per `Identity.caller` call in this mode, in this process: the environ werkzeug builds for the
    benchmark's request (the browser's headers, the mode's token), the best of 5 timeit repeats."""
    config = Config.from_env(mode.settings, dotenv_path=None)
    identity = Identity(config, Users.open(config.users_file))
    environ = EnvironBuilder(path=LATEST, base_url="http://127.0.0.1:7802",
                             headers=[*BROWSER_HEADERS, *mode.headers]).get_environ()
    caller = identity.caller(environ, "GET", LATEST)
    if caller is None:
        raise RuntimeError(f"mode {mode.key}: the micro-timing's request names no user")
    best = min(timeit.repeat(lambda: identity.caller(environ, "GET", LATEST), number=number, repeat=5))
    return best / number * 1e6


def in_process(found: list[Mode], redis_port: int, workdir: Path, blocks: int,
               per_block: int) -> dict[str, list[float]]:
    """CPU microseconds per whole `latest` request through the app in this process (Flask's test client, no HTTP
    server or client to share the cores with), in blocks of `per_block` requests alternating between the modes
    (each on the same Redis database and session as its gunicorn service); the access log at INFO to /dev/null."""
    os.environ.setdefault("LOCAL_STORE_PATH", str(workdir / "import.sqlite3"))  # `app` builds one app on import
    from app import create_app

    clients = []
    with open(os.devnull, "w") as sink:
        for db, mode in enumerate(found):
            config = Config.from_env({"REDIS_URL": f"redis://127.0.0.1:{redis_port}/{db}",
                                      "LOCAL_STORE_PATH": str(workdir / f"in-process-{mode.key}.sqlite3"),
                                      **mode.settings}, dotenv_path=None)
            app = create_app(config)
            headers = {**dict(BROWSER_HEADERS), **mode.request_headers}
            client = app.test_client()
            if client.get(LATEST, headers=headers).status_code != 200:
                raise RuntimeError(f"mode {mode.key}: latest in process did not answer 200")
            clients.append((mode.key, client, headers, app))
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sink)
        cpu: dict[str, list[float]] = {mode.key: [] for mode in found}
        for block in range(blocks + 1):  # the first block warms up
            shift = block % len(clients)
            for key, client, headers, _ in clients[shift:] + clients[:shift]:
                began = time.process_time()
                for _ in range(per_block):
                    client.get(LATEST, headers=headers)
                if block:
                    cpu[key].append((time.process_time() - began) * 1e6 / per_block)
    for *_, app in clients:
        app.extensions["storyart"].close()
    return cpu


def report(found: list[Mode], results: dict[int, dict[str, list[Result]]], micro: dict[str, float],
           cpu: dict[str, list[float]], context: list[str]) -> str:
    base = found[0].key
    rows = []
    for clients, by_mode in results.items():
        for mode in found:
            runs = by_mode[mode.key]
            failed = sum(r.errors for r in runs)
            ratio = ratio_of(by_mode, mode.key, base) if mode.key != base else float("nan")
            cpu_ratio = median([a.cpu_ms / b.cpu_ms for a, b in zip(runs, by_mode[base], strict=True) if b.cpu_ms])
            rows.append([f"{clients}" if mode is found[0] else "", mode.key + (f" ({failed} FAILED)" if failed else ""),
                         fmt(median([r.rps for r in runs])), fmt(median([r.p50_ms for r in runs]), 2),
                         fmt(median([r.cpu_ms for r in runs]), 3), "" if mode.key == base else f"{ratio:.3f}",
                         "" if mode.key == base else f"{cpu_ratio:.3f}"])
    out = [*context, "", *(f"  {m.key}: {m.label}" for m in found), ""]
    out.append(table(rows, ["clients", "mode", "req/s", "p50 ms", "cpu ms/req", f"req/s vs {base}",
                            f"cpu vs {base}"], set(range(2, 7))))
    out += ["req/s, p50, cpu ms/req (all gunicorn workers' CPU per request): medians over rounds; vs: median of the",
            "per-round ratios (same round).", ""]
    rows = []
    for mode in found:
        whole_us = 1e6 / median([r.rps for r in results[1][mode.key]])
        cpu_us = 1e3 * median([r.cpu_ms for r in results[1][mode.key]])
        rows.append([mode.key, f"{micro[mode.key]:.2f}", f"{whole_us:.0f}", f"{micro[mode.key] / whole_us:.2%}",
                     f"{cpu_us:.0f}", f"{micro[mode.key] / cpu_us:.2%}"])
    out.append(table(rows, ["mode", "Identity.caller us", "request us (1/req/s, 1 client)", "share",
                            "worker CPU us/request", "share"], {1, 2, 3, 4, 5}))
    out.append("Identity.caller: timeit in this process (best of 5), on the environ werkzeug builds for the request.")
    rows = []
    for mode in found:
        ratios = [b / a for a, b in zip(cpu[base], cpu[mode.key], strict=True)]
        rows.append([mode.key, f"{median(cpu[mode.key]):.1f}", "" if mode.key == base else f"{median(ratios):.3f}"])
    out += ["", f"In process (Flask test client, no HTTP), {len(cpu[base])} alternating blocks per mode:"]
    out.append(table(rows, ["mode", "CPU us per latest", f"vs {base} (median of per-block ratios)"], {1, 2}))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench/identity.py")
    parser.add_argument("--rounds", type=int, default=6, help="rounds over every mode and client count (default 6)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measured run (default 4)")
    parser.add_argument("--no-api-token", action="store_true", help="skip mode C (API_TOKEN, single user)")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                        help="HTTP load generator: wrk when installed (auto), or bench/run.py's own")
    parser.add_argument("--calls", type=int, default=20_000, help="Identity.caller calls per timeit repeat")
    parser.add_argument("--blocks", type=int, default=30, help="in-process blocks of 200 requests per mode (30)")
    parser.add_argument("--json", type=Path, help="write the results here too (default bench/results/identity-*.json)")
    args = parser.parse_args(argv)
    generator = ("wrk" if wrk_path() else "python") if args.generator == "auto" else args.generator
    if generator == "wrk" and not wrk_path():
        raise SystemExit("bench: wrk is not installed (apt-get install wrk), or use --generator python")
    fixture = (FIXTURES / FIXTURE).read_bytes()
    results: dict[int, dict[str, list[Result]]] = {c: {} for c in CLIENTS}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="storyart-bench-identity-") as tmp:
        workdir = Path(tmp)
        redis_port, redis_version, _ = start_redis(stack, workdir)
        found = modes(workdir, not args.no_api_token)
        for db, mode in enumerate(found):
            mode.url, proc = start_service(stack, workdir, f"storyart-{mode.key}",
                                           f"redis://127.0.0.1:{redis_port}/{db}", mode.settings)
            mode.pid = proc.proc.pid
            prepare(mode, fixture)
        context = [
            f"The identity check, {time.strftime('%Y-%m-%d %H:%M')}: GET {LATEST} of a 10 KB session, {redis_version} "
            f"on loopback, gunicorn as gunicorn.conf.py documents, one service per mode; "
            f"load: {wrk_version() if generator == 'wrk' else 'the bench multi-process socket generator'}; "
            f"{args.rounds} rounds x {args.duration:g} s per run, modes alternating (order rotates each round); "
            f"{cpu_count()} CPU(s) shared with the client, Redis and other work on the machine."]
        log(context[0])
        log("warming up ...")
        for mode in found:
            for clients in CLIENTS:
                measure(mode, clients, 1.0, generator)
        for round_no in range(args.rounds):
            shift = round_no % len(found)
            for clients in CLIENTS:
                for mode in found[shift:] + found[:shift]:
                    result = measure(mode, clients, args.duration, generator)
                    results[clients].setdefault(mode.key, []).append(result)
                    log(f"round {round_no + 1}/{args.rounds}  {clients} client(s)  mode {mode.key}  "
                        f"{result.rps:8.1f} req/s  p50 {result.p50_ms:6.2f} ms  cpu {result.cpu_ms:.3f} ms/req"
                        f"{f'  ({result.errors} FAILED)' if result.errors else ''}")
        micro = {mode.key: micro_timing(mode, args.calls) for mode in found}
        log("in process ...")
        cpu = in_process(found, redis_port, workdir, args.blocks, 200)
    text = report(found, results, micro, cpu, context)
    print(text)
    out = args.json or ROOT / "bench" / "results" / time.strftime("identity-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "context": context, "modes": {m.key: m.label for m in found}, "identity_caller_us": micro,
        "in_process_cpu_us": cpu,
        "results": {str(c): {k: [asdict(r) for r in rs] for k, rs in by.items()} for c, by in results.items()},
        "table": text}, indent=1))
    log(f"results written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
