"""Load generators for the benchmark: `wrk` (the Debian package) when it is installed, else a generator of our
own that does not become the bottleneck, and the raw redis-py "floor".

Every generator returns a `Result`: requests completed within the run, its length, latency percentiles and
the number of failed requests (non-2xx answers, socket errors). A run with failures is reported, never
silently averaged in.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import redis


@dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    cpu_ms: float = float("nan")  # CPU (user + system) per request of the target's own processes
    redis_ms: float = float("nan")  # CPU per request of the redis-server the bench started

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Request:
    """One HTTP request, sent over and over by every client of a run."""

    url: str
    method: str = "GET"
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()


def percentile(sorted_values: list[float] | array, fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def summarize(latencies: list[float] | array, seconds: float, errors: int) -> Result:
    ordered = sorted(latencies)
    return Result(len(ordered), seconds, percentile(ordered, 0.50) * 1000, percentile(ordered, 0.99) * 1000, errors)


# ------------------------------------------------------------------------------------------------- wrk


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout + ""
    found = re.search(r"wrk\s+(\S+)", out)
    return f"wrk {found.group(1)}" if found else "wrk"


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not found:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(request: Request, clients: int, duration: float) -> Result:
    """`wrk -c clients` for `duration` seconds; POST bodies come from a file through a small Lua script."""
    with tempfile.TemporaryDirectory(prefix="storyart-wrk-") as tmp:
        lines = [f"wrk.method = {_lua_string(request.method)}"]
        for name, value in request.headers:
            lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
        if request.body is not None:
            body_path = Path(tmp) / "body"
            body_path.write_bytes(request.body)
            lines += [f"local f = assert(io.open({_lua_string(str(body_path))}, 'rb'))",
                      "wrk.body = f:read('*a')", "f:close()"]
        script = Path(tmp) / "request.lua"
        script.write_text("\n".join(lines) + "\n")
        threads = max(1, min(clients, 2))
        args = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{max(1, round(duration))}s", "--timeout", "20s",
                "--latency", "-s", str(script), request.url]
        out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return parse_wrk(out.stdout)


def parse_wrk(text: str) -> Result:
    requests = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.MULTILINE)
    if not (requests and p50 and p99):
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sockets:
        # Every request on gunicorn's sync workers ends with the server closing the connection; wrk counts
        # no read error for that, so a read error is a real failure.
        errors += sum(int(n) for n in sockets.groups())
    seconds = _wrk_ms(requests.group(2) + requests.group(3)) / 1000
    return Result(int(requests.group(1)), seconds, _wrk_ms(p50.group(1)), _wrk_ms(p99.group(1)), errors)


# ---------------------------------------------------------------------------------- our own generator


def _build_request(request: Request) -> tuple[str, int, bytes]:
    parts = urlsplit(request.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    head = [f"{request.method} {path} HTTP/1.1", f"Host: {parts.netloc}"]
    head += [f"{name}: {value}" for name, value in request.headers]
    if request.body is not None:
        head.append(f"Content-Length: {len(request.body)}")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (request.body or b"")
    return host, port, raw


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, bool]:
    """Read one response into `buffer` (grown as needed); (status, server closes the connection)."""
    view = memoryview(buffer)
    filled = 0
    while True:
        got = sock.recv_into(view[filled:])
        if not got:
            raise ConnectionError("connection closed before the response headers")
        filled += got
        end = buffer.find(b"\r\n\r\n", 0, filled)
        if end >= 0:
            break
        if filled == len(buffer):
            raise ConnectionError("response headers too large")
    lines = bytes(buffer[:end]).decode("latin-1").lower().split("\r\n")
    status = int(lines[0][9:12])
    length, closes, chunked = -1, False, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            closes = value.strip() == "close"
        elif name == "transfer-encoding":
            chunked = value.strip() == "chunked"
    if chunked:
        view.release()
        _read_chunked(sock, buffer, end + 4, filled)
        return status, closes
    if length < 0:
        raise ConnectionError("response without Content-Length")
    total = end + 4 + length
    if total > len(buffer):
        view.release()
        buffer.extend(bytes(total - len(buffer)))
        view = memoryview(buffer)
    while filled < total:
        got = sock.recv_into(view[filled:total])
        if not got:
            raise ConnectionError("connection closed in the middle of the body")
        filled += got
    view.release()
    return status, closes


def _read_chunked(sock: socket.socket, buffer: bytearray, start: int, filled: int) -> None:
    """Read a chunked body starting at `start` (`filled` bytes of `buffer` already read): what Go's net/http
    (PocketBase) sends when an answer outgrows its write buffer."""
    pos = start
    while True:
        while (eol := buffer.find(b"\r\n", pos, filled)) < 0:
            filled = _fill(sock, buffer, filled, filled + 1)
        size = int(bytes(buffer[pos:eol]).split(b";")[0], 16)
        pos = eol + 2 + size + 2  # the chunk and its CRLF; after the last (empty) chunk, the empty trailer line
        while filled < pos:
            filled = _fill(sock, buffer, filled, pos)
        if size == 0:
            return


def _fill(sock: socket.socket, buffer: bytearray, filled: int, want: int) -> int:
    """Receive more after `filled` bytes, the buffer grown to hold at least `want`; the new fill level."""
    if len(buffer) < want:
        buffer.extend(bytes(max(want, 2 * len(buffer)) - len(buffer)))
    with memoryview(buffer) as view:
        got = sock.recv_into(view[filled:])
    if not got:
        raise ConnectionError("connection closed in the middle of the body")
    return filled + got


def _client(host: str, port: int, raw: bytes, start: float, stop: float, conn) -> None:  # type: ignore[no-untyped-def]
    latencies = array("d")
    errors = 0
    buffer = bytearray(max(1 << 20, 2 * len(raw)))
    sock: socket.socket | None = None
    while time.time() < start:
        time.sleep(0.001)
    while True:
        began = time.perf_counter()
        if time.time() >= stop:
            break
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=20)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(raw)
            status, closes = _read_response(sock, buffer)
        except OSError:
            errors += 1
            if sock is not None:
                sock.close()
            sock = None
            continue
        if time.time() > stop:
            break  # finished after the end of the run: not counted, as wrk does
        latencies.append(time.perf_counter() - began)
        if not 200 <= status < 400:
            errors += 1
        if closes:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    conn.send((latencies.tobytes(), errors))
    conn.close()


def run_python(request: Request, clients: int, duration: float) -> Result:
    """One process per client, each a blocking keep-alive (or reconnecting) raw-socket loop that reads
    responses straight into a reusable buffer: a few microseconds of client CPU per request, so the
    service, not the generator, is what is measured."""
    host, port, raw = _build_request(request)
    context = multiprocessing.get_context("fork")
    start = time.time() + 0.3 + 0.02 * clients
    stop = start + duration
    pipes, procs = [], []
    for _ in range(clients):
        parent, child = context.Pipe(duplex=False)
        proc = context.Process(target=_client, args=(host, port, raw, start, stop, child), daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    latencies = array("d")
    errors = 0
    for parent in pipes:
        data, failed = parent.recv()
        latencies.frombytes(data)
        errors += failed
    for proc in procs:
        proc.join()
    return summarize(latencies, duration, errors)


def run_http(request: Request, clients: int, duration: float, generator: str) -> Result:
    return run_wrk(request, clients, duration) if generator == "wrk" else run_python(request, clients, duration)


# --------------------------------------------------------------------------------------------- floor


def run_redis_floor(url: str, op: str, key: str, value: bytes | None, clients: int, duration: float) -> Result:
    """The floor: raw redis-py GET (or SET) of the same bytes from `clients` threads of this process, one
    pooled connection each; what a Python service could do at best with no HTTP around it. Run it in a fresh
    process (`floor_in_subprocess`) so nothing else lives in its heap or competes for its GIL."""
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=clients, timeout=20)
    client = redis.Redis(connection_pool=pool)
    client.ping()
    per_thread = [array("d") for _ in range(clients)]
    errors = [0] * clients
    start = time.perf_counter() + 0.05
    stop = start + duration

    def work(index: int) -> None:
        latencies = per_thread[index]
        while time.perf_counter() < start:
            time.sleep(0.001)
        while True:
            began = time.perf_counter()
            if began >= stop:
                return
            try:
                ok = client.get(key) is not None if op == "get" else bool(client.set(key, value))
            except redis.RedisError:
                ok = False
            if time.perf_counter() > stop:
                return
            latencies.append(time.perf_counter() - began)
            if not ok:
                errors[index] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    cpu_before = _cpu_seconds()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu = _cpu_seconds() - cpu_before
    pool.disconnect()
    merged = array("d")
    for latencies in per_thread:
        merged.extend(latencies)
    result = summarize(merged, duration, sum(errors))
    return replace(result, cpu_ms=cpu * 1000 / max(1, result.requests))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# glibc's allocator, told to keep buffers of up to 32 MB in the heap instead of mapping and unmapping (and
# page-faulting) them on every 1 MB value: what gunicorn.conf.py does for the service's workers.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024), "MALLOC_TRIM_THRESHOLD_": str(64 * 1024 * 1024)}


def floor_in_subprocess(url: str, op: str, key: str, value: bytes | None, clients: int, duration: float,
                        tuned_malloc: bool = False) -> Result:
    """`run_redis_floor` in a fresh Python process (optionally with glibc's allocator tuned as the service's
    workers are), so the floor is measured the same way every time, whatever this process holds."""
    with tempfile.NamedTemporaryFile(prefix="storyart-floor-") as body:
        body.write(value or b"")
        body.flush()
        env = {**os.environ, **(TUNED_MALLOC if tuned_malloc else {})}
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        args = [sys.executable, "-m", "bench.loadgen", url, op, key, body.name, str(clients), str(duration)]
        done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"the Redis floor failed: {done.stderr.strip()[-2000:]}")
    return Result(**json.loads(done.stdout))


def _floor_main(argv: list[str]) -> None:
    url, op, key, body_path, clients, duration = argv
    value = Path(body_path).read_bytes() if op == "set" else None
    result = run_redis_floor(url, op, key, value, int(clients), float(duration))
    print(json.dumps(asdict(result)))


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    _floor_main(sys.argv[1:])
