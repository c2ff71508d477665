"""launcher.py, for real: it starts processes, we look at them with psutil, then stop it like a user would.

The backend is a stand-in app.py written into tmp_path (stdlib only, same /health contract as the real
service), the frontend a package.json whose `dev` script runs a tiny node HTTP server. When the real app.py
exists at the repository root, one test runs it end to end as well. Impostors answer /health as the service
would; run as root with setpriv, tests also start processes as other users (else they are skipped). Every
process a test starts is killed by a finalizer, whatever the test did; only 127.0.0.1 is used; deadlines only
guard against hangs.
"""

import atexit
import contextlib
import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

import launcher

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launcher.py"

DEADLINE = 30.0  # a guard against hanging, never a performance assertion
POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="sends POSIX signals")
INHERITS_SOCKETS = pytest.mark.skipif(os.name == "nt", reason="hands a listening socket on through pass_fds")
NEEDS_NPM = pytest.mark.skipif(not (shutil.which("npm") and shutil.which("node")),
                               reason="needs node and npm")
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
AS_ANOTHER_USER = ("setpriv", "--reuid=65533", "--regid=65533", "--clear-groups")

STAND_IN_APP = '''\
"""Stand-in for the service's app.py: serves /health like the real one, records its pid for cleanup."""
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

pids = Path(__file__).parent / "pids"
pids.mkdir(exist_ok=True)
(pids / str(os.getpid())).touch()
if os.environ.get("STAND_IN_FAIL"):
    print("stand-in: " + os.environ["STAND_IN_FAIL"], flush=True)
    sys.exit(2)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            status, body = 200, {"success": True, "status": "healthy", "service": "storyart-session",
                                 "pid": os.getpid()}
        else:
            status, body = 404, {"success": False, "error": "Not found"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


address = (os.environ.get("HOST", "127.0.0.1"), int(os.environ["REDIS_API_PORT"]))
server = ThreadingHTTPServer(address, Handler)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("stand-in serving on", server.server_address, flush=True)
try:
    server.serve_forever()
except (KeyboardInterrupt, SystemExit):
    pass
'''

IMPOSTOR = '''\
"""Not the service: answers /health as the service would, naming the pid written in the file `names` next to
it (default: its own pid), on the listening socket it inherited as file descriptor IMPOSTOR_FD."""
import json, os, socket
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

names = Path(__file__).with_name("names")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        pid = int(names.read_text()) if names.exists() else os.getpid()
        data = json.dumps({"success": True, "service": "storyart-session", "pid": pid}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=int(os.environ["IMPOSTOR_FD"]))
server.serve_forever()
'''

FAKE_DEV_SERVER = """\
// Stand-in for `vite`: serves on --port N (like `vite --port N`), or on FAKE_DEV_PORT when that is set.
const fs = require("fs");
const http = require("http");
const path = require("path");
fs.mkdirSync(path.join(__dirname, "pids"), { recursive: true });
fs.writeFileSync(path.join(__dirname, "pids", String(process.pid)), "");
const i = process.argv.indexOf("--port");
const port = Number(process.env.FAKE_DEV_PORT || (i >= 0 ? process.argv[i + 1] : 3000));
http.createServer((req, res) => {
  res.setHeader("Content-Type", "application/json");
  res.end(JSON.stringify({ fake: "vite", pid: process.pid }));
}).listen(port, "127.0.0.1", () => console.log(`fake dev server on ${port}`));
"""


# ---------------------------------------------------------------------------------------------------------
# Helpers


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(port: int, path: str = "/") -> dict[str, Any] | None:
    """JSON body of GET http://127.0.0.1:port/path, None when nothing answers."""
    try:
        with _HTTP.open(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def survivors(procs: list[psutil.Process]) -> list[str]:
    """Descriptions of the processes in procs still alive after a grace period for them to be reaped."""
    psutil.wait_procs([p for p in procs if alive(p)], timeout=5)
    out = []
    for proc in procs:
        if alive(proc):
            try:
                out.append(f"{proc.pid} {proc.cmdline()}")
            except psutil.Error:
                out.append(str(proc.pid))
    return out


@dataclass
class Run:
    """A launcher started as a subprocess, its output going to a file."""

    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def tree(self) -> list[psutil.Process]:
        """The launcher's descendants right now."""
        try:
            return psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.Error:
            return []

    def wait_for(self, what: str, check: Callable[[], Any]) -> Any:
        """Poll check() until truthy; fail with the launcher's output if it exits or the deadline passes."""
        deadline = time.monotonic() + DEADLINE
        while True:
            result = check()
            if result:
                return result
            if self.popen.poll() is not None:
                pytest.fail(f"launcher exited ({self.popen.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {DEADLINE} s:\n{self.output()}")
            time.sleep(0.1)

    def wait_running(self) -> None:
        """Wait until the launcher has started everything and only supervises."""
        self.wait_for("'StoryArt is running'", lambda: "StoryArt is running" in self.output())

    def finish(self) -> int:
        """Wait for the launcher to exit and return its exit code."""
        try:
            return self.popen.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launcher did not exit within {DEADLINE} s:\n{self.output()}")


@dataclass
class Cleanup:
    """Everything a test started, killed at teardown with its descendants and recorded pid files."""

    popens: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pid_dirs: list[Path] = field(default_factory=list)

    def kill_all(self) -> None:
        procs: list[psutil.Process] = []
        for popen in self.popens:
            try:
                root = psutil.Process(popen.pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.Error:
                pass
        for pid_dir in self.pid_dirs:
            for pid_file in pid_dir.glob("pids/*"):
                try:
                    proc = psutil.Process(int(pid_file.name))
                    if str(pid_dir) in " ".join([proc.cwd(), *proc.cmdline()]):
                        procs.append(proc)
                except (psutil.Error, ValueError):
                    pass
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=5)
        for popen in self.popens:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=5)


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    c = Cleanup()
    yield c
    c.kill_all()


@pytest.fixture
def app_dir(tmp_path: Path, cleanup: Cleanup) -> Path:
    """A folder with the stand-in app.py."""
    folder = tmp_path / "service"
    folder.mkdir()
    (folder / "app.py").write_text(STAND_IN_APP, encoding="utf-8")
    cleanup.pid_dirs.append(folder)
    return folder


@pytest.fixture
def shared_app_dir(cleanup: Cleanup) -> Iterator[Path]:
    """A folder with the stand-in app.py that other users may run too (tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="storyart-launcher-")).resolve()
    try:
        folder.chmod(0o755)
        (folder / "app.py").write_text(STAND_IN_APP, encoding="utf-8")
        (folder / "app.py").chmod(0o644)
        (folder / "pids").mkdir()
        (folder / "pids").chmod(0o777)
        cleanup.pid_dirs.append(folder)
        yield folder
    finally:
        cleanup.kill_all()  # before the pid files go
        shutil.rmtree(folder, ignore_errors=True)


def make_frontend(folder: Path, cleanup: Cleanup, dev: str = "node server.js") -> Path:
    """A frontend folder whose `npm run dev` runs dev (default: the fake dev server)."""
    folder.mkdir()
    (folder / "package.json").write_text(
        json.dumps({"name": "fake-storyart", "private": True, "scripts": {"dev": dev}}), encoding="utf-8"
    )
    (folder / "server.js").write_text(FAKE_DEV_SERVER, encoding="utf-8")
    cleanup.pid_dirs.append(folder)
    return folder


@pytest.fixture
def frontend_dir(tmp_path: Path, cleanup: Cleanup) -> Path:
    return make_frontend(tmp_path / "frontend", cleanup)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would point the service or launcher elsewhere."""
    drop = ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_API_PORT", "HOST", "STORYART_FRONTEND_DIR",
            "STAND_IN_FAIL", "FAKE_DEV_PORT", "APP_ENV", "NODE_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


@functools.cache
def readable_launcher() -> Path:
    """A copy of launcher.py, with the one package it needs beside it (psutil), that another user can read
    wherever the checkout and its virtualenv sit (a clone in a folder only its owner may enter is usual)."""
    folder = Path(tempfile.mkdtemp(prefix="storyart-launcher-script-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    shutil.copyfile(LAUNCHER, folder / LAUNCHER.name)
    shutil.copytree(Path(psutil.__file__).parent, folder / "psutil")
    for path in (folder, *folder.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder / LAUNCHER.name


def launch(
    tmp_path: Path, cleanup: Cleanup, *args: str, env: dict[str, str] | None = None, user: tuple[str, ...] = ()
) -> Run:
    """Start launcher.py with args (always --no-browser), as user (a setpriv prefix) when given."""
    log = tmp_path / f"launcher-{len(cleanup.popens)}.log"
    script = readable_launcher() if user else LAUNCHER
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*user, sys.executable, str(script), "--no-browser", *args], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, env=env or clean_env(), cwd=tmp_path,
        )
    cleanup.popens.append(popen)
    return Run(popen, log)


def wait_for_health(popen: subprocess.Popen[bytes], port: int, what: str) -> None:
    """Wait until popen answers /health on port."""
    deadline = time.monotonic() + DEADLINE
    while get_json(port, "/health") is None:
        assert popen.poll() is None, f"the {what} could not start"
        assert time.monotonic() < deadline, f"the {what} never answered /health"
        time.sleep(0.1)


def start_earlier_instance(
    app_dir: Path, port: int, cleanup: Cleanup, user: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """Run the stand-in service directly (as user, a setpriv prefix), as an earlier session would have left it."""
    popen = subprocess.Popen([*user, sys.executable, str(app_dir / "app.py")], cwd=app_dir,
                             env=clean_env(REDIS_API_PORT=str(port)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cleanup.popens.append(popen)
    wait_for_health(popen, port, "earlier instance")
    return popen


def listening_socket() -> socket.socket:
    """A socket listening on a free 127.0.0.1 port, for an impostor to inherit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def start_sleeper(cleanup: Cleanup, user: tuple[str, ...] = (), holding: socket.socket | None = None
                  ) -> subprocess.Popen[bytes]:
    """An unrelated process (a would-be victim), optionally holding a copy of a listening socket."""
    fds = () if holding is None else (holding.fileno(),)
    popen = subprocess.Popen([*user, sys.executable, "-c", "import time; time.sleep(120)"], pass_fds=fds)
    cleanup.popens.append(popen)
    return popen


def start_impostor(
    script: Path, sock: socket.socket, cleanup: Cleanup, user: tuple[str, ...] = (), cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Run IMPOSTOR as script on sock (inherited), claiming to be the service with its own pid for now."""
    script.write_text(IMPOSTOR, encoding="utf-8")
    script.chmod(0o644)  # readable by the user it runs as
    env = clean_env(IMPOSTOR_FD=str(sock.fileno()))
    popen = subprocess.Popen([*user, sys.executable, str(script)], cwd=cwd, env=env, pass_fds=(sock.fileno(),),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cleanup.popens.append(popen)
    wait_for_health(popen, sock.getsockname()[1], "impostor")
    return popen


def _can_switch_users() -> bool:
    """True when this test run may start processes as other users (root, with setpriv)."""
    if os.name == "nt" or os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    return subprocess.run([*AS_NOBODY, sys.executable, "-c", ""], capture_output=True).returncode == 0


OTHER_USERS = pytest.mark.skipif(not _can_switch_users(),
                                 reason="needs root and setpriv to start processes as other users")


def recorded_pids(folder: Path) -> list[int]:
    return [int(p.name) for p in folder.glob("pids/*")]


def refusal(run: Run, port: int) -> str:
    """The launcher's refusal to claim port: exit code 1 and one line of output, nothing stopped first."""
    code = run.finish()
    out = run.output()
    assert code == 1, out
    assert out.splitlines() == [out.strip()], f"not one line:\n{out}"
    assert out.startswith(f"[storyart] Error: Port {port} is already in use by "), out
    return out


# ---------------------------------------------------------------------------------------------------------
# Small pieces


def test_earlier_instance_is_recognised_only_by_service_name_and_pid() -> None:
    assert launcher.earlier_instance_pid({"service": "storyart-session", "pid": 42}) == 42
    assert launcher.earlier_instance_pid({"service": "storyart-session"}) is None
    assert launcher.earlier_instance_pid({"service": "storyart-session", "pid": "42"}) is None
    assert launcher.earlier_instance_pid({"service": "storyart-session", "pid": True}) is None
    assert launcher.earlier_instance_pid({"service": "other", "pid": 42}) is None
    assert launcher.earlier_instance_pid(None) is None


def test_default_port_comes_from_redis_api_port() -> None:
    assert launcher.parse_args([], {}).port == 7802
    assert launcher.parse_args([], {"REDIS_API_PORT": "7900"}).port == 7900
    assert launcher.parse_args(["--port", "7901"], {"REDIS_API_PORT": "7900"}).port == 7901
    with pytest.raises(launcher.LauncherError, match="REDIS_API_PORT"):
        launcher.parse_args([], {"REDIS_API_PORT": "seventy"})
    with pytest.raises(SystemExit):
        launcher.parse_args(["--port", "70000"], {})


def test_frontend_dir_defaults_to_the_environment() -> None:
    assert launcher.parse_args([], {"STORYART_FRONTEND_DIR": "/x/storyart"}).frontend_dir == "/x/storyart"
    assert launcher.parse_args([], {}).frontend_dir is None


def test_frontend_command_passes_a_port_only_when_asked() -> None:
    assert launcher.frontend_command("npm", None) == ["npm", "run", "dev"]
    assert launcher.frontend_command("npm", 3100) == ["npm", "run", "dev", "--", "--port", "3100"]


def test_wildcard_hosts_are_probed_on_loopback() -> None:
    assert launcher.probe_host("0.0.0.0") == "127.0.0.1"
    assert launcher.probe_host("127.0.0.1") == "127.0.0.1"
    assert launcher.probe_host("::") == "::1"
    assert launcher.url_host("::1") == "[::1]"


@pytest.mark.parametrize(
    ("own", "expected"),
    [
        ({3000}, 3000),  # its own candidate port
        ({5173, 3000}, 3000),  # candidates in order
        ({3001}, 3001),  # Vite moved on: a port of its own that was not asked for
        (set(), None),  # listening nowhere yet: 5173 answering is somebody else
        (None, 5173),  # the OS hides its sockets: a candidate that was free before (3000 was busy)
    ],
)
def test_frontend_port_prefers_the_trees_own_ports(
    monkeypatch: pytest.MonkeyPatch, own: set[int] | None, expected: int | None
) -> None:
    monkeypatch.setattr(launcher, "listening_ports", lambda child: own)
    monkeypatch.setattr(launcher, "answers_http", lambda port: True)
    assert launcher.find_frontend_port(None, [3000, 5173], busy={3000}) == expected


def test_a_free_port_has_no_holder() -> None:
    assert launcher.describe_holder(free_port()) == "an unknown process"


# ---------------------------------------------------------------------------------------------------------
# The real thing


@POSIX_ONLY
@NEEDS_NPM
@pytest.mark.parametrize(
    "signame", ["SIGINT", "SIGTERM", "SIGHUP"], ids=["ctrl-c", "sigterm", "terminal-closed"]
)
def test_starts_both_and_a_stop_signal_leaves_no_process(
    tmp_path: Path, cleanup: Cleanup, app_dir: Path, frontend_dir: Path, signame: str
) -> None:
    port, frontend_port = free_port(), free_port()
    run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--frontend-dir", str(frontend_dir),
                 "--port", str(port), "--frontend-port", str(frontend_port))
    health = run.wait_for("/health", lambda: get_json(port, "/health"))
    page = run.wait_for("the frontend", lambda: get_json(frontend_port))
    run.wait_running()

    tree = run.tree()
    pids = {p.pid for p in tree}
    assert health["service"] == "storyart-session"
    assert health["pid"] in pids, "the backend answering /health is not the launcher's child"
    assert page["pid"] in pids, "the frontend answering is not in the launcher's tree"
    assert len(tree) >= 3  # python app.py, npm, node (plus the shell npm runs the script with)

    run.popen.send_signal(getattr(signal, signame))
    assert run.finish() == 0, run.output()
    assert survivors(tree) == [], run.output()
    assert not launcher.is_listening("127.0.0.1", port)
    assert not launcher.is_listening("127.0.0.1", frontend_port)
    assert "Stopped." in run.output()


@POSIX_ONLY
@NEEDS_NPM
def test_a_child_that_dies_takes_the_other_down(
    tmp_path: Path, cleanup: Cleanup, app_dir: Path, frontend_dir: Path
) -> None:
    port, frontend_port = free_port(), free_port()
    run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--frontend-dir", str(frontend_dir),
                 "--port", str(port), "--frontend-port", str(frontend_port))
    run.wait_running()
    tree = run.tree()
    backend_pid = get_json(port, "/health")["pid"]

    os.kill(backend_pid, signal.SIGKILL)
    assert run.finish() == 1
    assert "backend exited" in run.output()
    assert survivors(tree) == [], run.output()


@NEEDS_NPM
def test_finds_a_dev_server_that_took_another_port(
    tmp_path: Path, cleanup: Cleanup, app_dir: Path, frontend_dir: Path
) -> None:
    """Vite moves on to the next free port when its own is taken: the launcher follows it via psutil."""
    port, asked, taken = free_port(), free_port(), free_port()
    run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--frontend-dir", str(frontend_dir),
                 "--port", str(port), "--frontend-port", str(asked), env=clean_env(FAKE_DEV_PORT=str(taken)))
    run.wait_running()
    assert f"Frontend ready: http://localhost:{taken}/" in run.output()


def test_refuses_a_port_held_by_a_foreign_process(tmp_path: Path, cleanup: Cleanup, app_dir: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--no-frontend", "--port", str(port))
        code = run.finish()
    me = psutil.Process()
    assert code == 1
    assert f"Port {port} is already in use by {me.name()} (pid {me.pid})" in run.output()
    assert recorded_pids(app_dir) == [], "the backend must not start when the port is taken"


class _OtherService(http.server.BaseHTTPRequestHandler):
    """Answers /health like some other service that happens to report a pid."""

    victim = 0
    service = "something-else"

    def do_GET(self) -> None:
        body = json.dumps({"status": "healthy", "service": self.service, "pid": self.victim}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_never_stops_another_service_that_answers_health(
    tmp_path: Path, cleanup: Cleanup, app_dir: Path
) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    cleanup.popens.append(sleeper)
    handler = type("Handler", (_OtherService,), {"victim": sleeper.pid})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--no-frontend", "--port", str(port))
        assert run.finish() == 1
    finally:
        server.shutdown()
        server.server_close()
    assert f"Port {port} is already in use by" in run.output()
    assert sleeper.poll() is None, "a pid reported by another service must never be stopped"


def test_never_stops_a_pid_that_does_not_hold_the_port(
    tmp_path: Path, cleanup: Cleanup, app_dir: Path
) -> None:
    """An answer that claims to be this service but names some other process's pid stops nothing."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    cleanup.popens.append(sleeper)
    handler = type("Handler", (_OtherService,), {"victim": sleeper.pid, "service": "storyart-session"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--no-frontend", "--port", str(port))
        assert run.finish() == 1
    finally:
        server.shutdown()
        server.server_close()
    me = psutil.Process()
    assert f"in use by {me.name()} (pid {me.pid}), which claims to be" in run.output()
    assert sleeper.poll() is None


@INHERITS_SOCKETS
@pytest.mark.parametrize(
    ("victim_holds_the_socket", "reason"),
    [(False, "does not hold the port"), (True, "does not run app.py or gunicorn app:app from")],
    ids=["victim-elsewhere", "victim-shares-socket"],
)
def test_an_impostor_naming_another_process_stops_nothing(
    tmp_path: Path, cleanup: Cleanup, app_dir: Path, victim_holds_the_socket: bool, reason: str
) -> None:
    """Anyone can answer /health with the service's name and any pid; even a victim holding a copy of the
    listening socket (it inherited it, as any child can) is not thereby the service."""
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        impostor = start_impostor(tmp_path / "impostor.py", sock, cleanup)
        # Started last, so psutil.net_connections() (on Linux one pid per socket, the highest) names the victim.
        victim = start_sleeper(cleanup, holding=sock if victim_holds_the_socket else None)
    (tmp_path / "names").write_text(str(victim.pid), encoding="utf-8")
    assert get_json(port, "/health")["pid"] == victim.pid
    run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--no-frontend", "--port", str(port))
    out = refusal(run, port)
    assert f"which claims to be a StoryArt session service (pid {victim.pid}) but {reason}" in out
    assert victim.poll() is None, "the process an impostor named was stopped"
    assert impostor.poll() is None
    assert recorded_pids(app_dir) == []


@INHERITS_SOCKETS
def test_an_impostor_naming_itself_stops_nothing(tmp_path: Path, cleanup: Cleanup, app_dir: Path) -> None:
    """Same user, owns the socket, even runs a file called app.py from the service's folder as working
    directory: it is still not the service's app.py, so it is left running."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        impostor = start_impostor(elsewhere / "app.py", sock, cleanup, cwd=app_dir)
    run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--no-frontend", "--port", str(port))
    out = refusal(run, port)
    assert f"(pid {impostor.pid}) but does not run app.py or gunicorn app:app from {app_dir}" in out
    assert impostor.poll() is None


@OTHER_USERS
def test_another_users_instance_is_not_stopped(tmp_path: Path, cleanup: Cleanup, shared_app_dir: Path) -> None:
    """The service itself, run by another user: same command line and socket, but not the launcher's to stop."""
    port = free_port()
    theirs = start_earlier_instance(shared_app_dir, port, cleanup, user=AS_NOBODY)
    run = launch(tmp_path, cleanup, "--app-dir", str(shared_app_dir), "--no-frontend", "--port", str(port))
    out = refusal(run, port)
    assert f"(pid {theirs.pid}) but runs as another user" in out
    assert theirs.poll() is None


@OTHER_USERS
def test_another_users_impostor_cannot_name_a_victim_to_an_unprivileged_launcher(
    tmp_path: Path, cleanup: Cleanup, shared_app_dir: Path
) -> None:
    """The reported attack: the launcher's user cannot see who holds the port (another user's socket has no
    pid for it), so the pid in the answer must not be believed."""
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        start_impostor(shared_app_dir / "impostor.py", sock, cleanup, user=AS_ANOTHER_USER)
    victim = start_sleeper(cleanup, user=AS_NOBODY)
    (shared_app_dir / "names").write_text(str(victim.pid), encoding="utf-8")
    (shared_app_dir / "names").chmod(0o644)
    run = launch(tmp_path, cleanup, "--app-dir", str(shared_app_dir), "--no-frontend", "--port", str(port),
                 user=AS_NOBODY)
    out = refusal(run, port)
    assert f"in use by an unknown process, which claims to be a StoryArt session service (pid {victim.pid}) but " \
           "does not hold the port" in out
    assert victim.poll() is None, "the launcher stopped a process on an impostor's word"


@POSIX_ONLY
def test_replaces_an_earlier_instance(tmp_path: Path, cleanup: Cleanup, app_dir: Path) -> None:
    port = free_port()
    earlier = start_earlier_instance(app_dir, port, cleanup)

    run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--no-frontend", "--port", str(port))
    run.wait_running()
    try:
        earlier.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the earlier instance was not stopped:\n{run.output()}")
    health = get_json(port, "/health")
    assert health is not None and health["pid"] != earlier.pid
    assert health["pid"] in {p.pid for p in run.tree()}
    assert f"earlier StoryArt session service (pid {earlier.pid})" in run.output()

    tree = run.tree()
    run.popen.send_signal(signal.SIGINT)
    assert run.finish() == 0, run.output()
    assert survivors(tree) == []


@POSIX_ONLY
def test_replaces_an_earlier_gunicorn_instance(tmp_path: Path, cleanup: Cleanup) -> None:
    """/health names a worker; the master (gunicorn app:app run in the service's folder) is what is stopped."""
    port = free_port()
    master = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT,
                              env=clean_env(REDIS_API_PORT=str(port), LOCAL_STORE="memory"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cleanup.popens.append(master)
    wait_for_health(master, port, "gunicorn instance")
    workers = psutil.Process(master.pid).children()
    assert get_json(port, "/health")["pid"] in {w.pid for w in workers}

    run = launch(tmp_path, cleanup, "--no-frontend", "--port", str(port), env=clean_env(LOCAL_STORE="memory"))
    run.wait_running()
    assert f"earlier StoryArt session service (pid {master.pid}); stopping it" in run.output()
    assert master.poll() is not None and survivors(workers) == [], run.output()
    assert get_json(port, "/health")["pid"] in {p.pid for p in run.tree()}

    tree = run.tree()
    run.popen.send_signal(signal.SIGINT)
    assert run.finish() == 0, run.output()
    assert survivors(tree) == []


def test_missing_frontend_folder_starts_nothing(tmp_path: Path, cleanup: Cleanup, app_dir: Path) -> None:
    port = free_port()
    missing = tmp_path / "no-such-frontend"
    run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--frontend-dir", str(missing),
                 "--port", str(port))
    assert run.finish() == 1
    assert f"Frontend folder not found: {missing}" in run.output()
    assert recorded_pids(app_dir) == []
    assert not launcher.is_listening("127.0.0.1", port)


def test_frontend_folder_without_package_json(tmp_path: Path, cleanup: Cleanup, app_dir: Path) -> None:
    empty = tmp_path / "empty-frontend"
    empty.mkdir()
    run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--frontend-dir", str(empty),
                 "--port", str(free_port()))
    assert run.finish() == 1
    assert f"No package.json in the frontend folder {empty}" in run.output()
    assert recorded_pids(app_dir) == []


def test_no_frontend_folder_given(tmp_path: Path, cleanup: Cleanup, app_dir: Path) -> None:
    run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--port", str(free_port()))
    assert run.finish() == 1
    assert "No frontend folder given" in run.output()


@NEEDS_NPM
def test_a_failing_dev_server_stops_the_backend(tmp_path: Path, cleanup: Cleanup, app_dir: Path) -> None:
    broken = make_frontend(tmp_path / "broken", cleanup,
                           dev="node -e \"console.log('vite: not found'); process.exit(3)\"")
    port = free_port()
    run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--frontend-dir", str(broken),
                 "--port", str(port), "--frontend-port", str(free_port()))
    assert run.finish() == 1
    out = run.output()
    assert "The frontend exited with code" in out
    assert "vite: not found" in out  # the child's last lines explain why
    backends = [psutil.Process(pid) for pid in recorded_pids(app_dir) if psutil.pid_exists(pid)]
    assert survivors(backends) == []
    assert not launcher.is_listening("127.0.0.1", port)


def test_a_backend_that_cannot_start_is_reported(tmp_path: Path, cleanup: Cleanup, app_dir: Path) -> None:
    run = launch(tmp_path, cleanup, "--app-dir", str(app_dir), "--no-frontend", "--port", str(free_port()),
                 env=clean_env(STAND_IN_FAIL="REDIS_URL is not a redis:// URL"))
    assert run.finish() == 1
    out = run.output()
    assert "The backend exited with code 2 before answering /health" in out
    assert "stand-in: REDIS_URL is not a redis:// URL" in out


@POSIX_ONLY
@pytest.mark.skipif(not (ROOT / "app.py").is_file(), reason="the real app.py is not on this branch yet")
def test_end_to_end_with_the_real_service(tmp_path: Path, cleanup: Cleanup) -> None:
    """The real app.py, on its in-memory store (no Redis configured), started and stopped by the launcher."""
    port = free_port()
    run = launch(tmp_path, cleanup, "--no-frontend", "--port", str(port))
    health = run.wait_for("/health", lambda: get_json(port, "/health"))
    run.wait_running()
    assert health["service"] == "storyart-session"
    if not (ROOT / ".env").exists():  # a developer's .env may configure Redis; the launcher honours it
        assert health["storage"] == "memory"
    tree = run.tree()
    assert health["pid"] in {p.pid for p in tree}

    run.popen.send_signal(signal.SIGINT)
    assert run.finish() == 0, run.output()
    assert survivors(tree) == []
    assert not launcher.is_listening("127.0.0.1", port)
