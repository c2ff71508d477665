"""Start the StoryArt session service and the StoryArt frontend together, and stop both cleanly.

start-storyart.ps1 only prepares the virtual environment and then runs this file, so that every decision
about ports, child processes and shutdown lives here, in Python, where it can be tested.

    python launcher.py [--port 7802] [--frontend-dir DIR] [--frontend-port N] [--no-frontend] [--no-browser]

Exit codes: 0 after Ctrl+C, SIGTERM or SIGHUP (a requested stop), 1 when start-up fails or a child exits on
its own, 2 for bad command-line arguments.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import webbrowser
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

try:
    import psutil
except ModuleNotFoundError:  # The one dependency outside the standard library: say how to get it.
    sys.exit("launcher.py needs psutil: run `python -m pip install -r requirements.txt` "
             "(start-storyart.ps1 does it for you).")

SERVICE_NAME = "storyart-session"
DEFAULT_PORT = 7802
DEFAULT_HOST = "127.0.0.1"
# StoryArt's vite.config serves on 3000; 5173 is Vite's own default, used when the config does not say.
FRONTEND_PORTS = (3000, 5173)
HEALTH_PATH = "/health"
LOOPBACKS = ("127.0.0.1", "::1")
POLL_SECONDS = 0.2
PROBE_TIMEOUT = 3.0  # /health of an earlier instance may wait up to a Redis connect timeout.
STOP_GRACE_SECONDS = 5.0
PORT_RELEASE_SECONDS = 10.0
TAIL_LINES = 20
IS_WINDOWS = os.name == "nt"

# Never send requests for 127.0.0.1 through an HTTP(S)_PROXY from the environment.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_OUTPUT_LOCK = threading.Lock()


class LauncherError(Exception):
    """A start-up failure, explained to the user in one line (no traceback)."""


class StopRequested(Exception):
    """Ctrl+C or SIGTERM arrived: unwind to the cleanup that stops every child."""


@dataclass
class Child:
    """A process the launcher started, with what is needed to report on it and to stop its whole tree."""

    name: str
    popen: subprocess.Popen[bytes]
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    known: dict[int, psutil.Process] = field(default_factory=dict)
    reader: threading.Thread | None = None

    def refresh_tree(self) -> None:
        """Remember every descendant seen so far: one whose parent already died is no longer findable."""
        try:
            root = psutil.Process(self.popen.pid)
            for proc in [root, *root.children(recursive=True)]:
                self.known.setdefault(proc.pid, proc)
        except psutil.Error:
            pass

    def last_output(self) -> str:
        """The last lines the child printed, to explain why it failed."""
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"


def say(message: str) -> None:
    """Print one launcher line; children's output is interleaved, so tag and flush it."""
    with contextlib.suppress(OSError), _OUTPUT_LOCK:  # a closed terminal must not abort the cleanup
        print(f"[storyart] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Command line


def port_number(text: str) -> int:
    """argparse type for a TCP port, so a typo is reported before anything starts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {value}")
    return value


def default_port(env: dict[str, str]) -> int:
    """REDIS_API_PORT when set (the service reads the same variable), else 7802."""
    text = env.get("REDIS_API_PORT", "").strip()
    if not text:
        return DEFAULT_PORT
    try:
        return port_number(text)
    except argparse.ArgumentTypeError as exc:
        raise LauncherError(f"REDIS_API_PORT is not usable: {exc}") from None


def build_parser(env: dict[str, str]) -> argparse.ArgumentParser:
    """The options that start-storyart.ps1 maps its parameters onto (its test checks they exist)."""
    parser = argparse.ArgumentParser(
        prog="launcher.py",
        description="Start the StoryArt session service and the StoryArt frontend; Ctrl+C stops both.",
    )
    parser.add_argument("--port", type=port_number, default=None,
                        help=f"port of the session service (default: REDIS_API_PORT or {DEFAULT_PORT})")
    parser.add_argument("--frontend-dir", default=env.get("STORYART_FRONTEND_DIR") or None,
                        help="StoryArt frontend folder with package.json (default: STORYART_FRONTEND_DIR)")
    parser.add_argument("--frontend-port", type=port_number, default=None,
                        help="port for `npm run dev` (passed on as `-- --port N`); "
                             "default: whichever of 3000 and 5173 the dev server takes")
    parser.add_argument("--no-frontend", action="store_true", help="start only the session service")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    parser.add_argument("--app-dir", type=Path, default=Path(__file__).resolve().parent,
                        help="folder holding the service's app.py (default: this file's folder)")
    parser.add_argument("--backend-timeout", type=float, default=30.0,
                        help="seconds to wait for /health (default: 30)")
    parser.add_argument("--frontend-timeout", type=float, default=90.0,
                        help="seconds to wait for the dev server (default: 90; a first Vite start is slow)")
    return parser


def parse_args(argv: list[str] | None, env: dict[str, str]) -> argparse.Namespace:
    """Parse argv; the port defaults to REDIS_API_PORT only here, so a bad value is reported cleanly."""
    args = build_parser(env).parse_args(argv)
    if args.port is None:
        args.port = default_port(env)
    return args


# ---------------------------------------------------------------------------------------------------------
# Probing ports


def probe_host(bind_host: str) -> str:
    """The address to reach a server bound to HOST from this machine (wildcards mean loopback)."""
    if bind_host in ("", "0.0.0.0", "localhost"):
        return DEFAULT_HOST
    if bind_host in ("::", "[::]"):
        return "::1"
    return bind_host.strip("[]")


def url_host(host: str) -> str:
    """Host as written in a URL: IPv6 addresses need brackets."""
    return f"[{host}]" if ":" in host else host


def is_listening(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float) -> tuple[int, bytes] | None:
    """Status and body of a GET, any status included; None when nothing answered HTTP in time."""
    try:
        with _HTTP.open(url, timeout=timeout) as response:
            return response.status, response.read(1_000_000)
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError):  # URLError, timeouts, resets, non-HTTP answers
        return None


def read_health(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> dict[str, Any] | None:
    """The /health JSON object when the port answers 200 with one, else None."""
    answer = http_get(f"http://{url_host(host)}:{port}{HEALTH_PATH}", timeout)
    if answer is None or answer[0] != 200:
        return None
    try:
        body = json.loads(answer[1])
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def earlier_instance_pid(health: dict[str, Any] | None) -> int | None:
    """The pid an earlier StoryArt session service reports about itself; None for anything else."""
    if not health or health.get("service") != SERVICE_NAME:
        return None
    pid = health.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def listening_processes(port: int) -> list[psutil.Process]:
    """Processes with a TCP socket listening on port (empty when the OS will not tell)."""
    pids: set[int] = set()
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                pids.add(conn.pid)
    except psutil.AccessDenied:  # macOS without root: ask each process we are allowed to inspect.
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                       for c in proc.net_connections(kind="tcp")):
                    pids.add(proc.pid)
    procs = []
    for pid in sorted(pids):
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    return procs


def describe_holder(port: int) -> str:
    """'name (pid N)' of whatever listens on port, for the one-line refusal."""
    names = []
    for proc in listening_processes(port):
        try:
            names.append(f"{proc.name()} (pid {proc.pid})")
        except psutil.Error:
            names.append(f"pid {proc.pid}")
    return ", ".join(names) if names else "an unknown process"


def same_user(proc: psutil.Process) -> bool:
    """True when proc runs as the user running the launcher: only such a process is ours to stop."""
    if IS_WINDOWS:
        return proc.username() == psutil.Process().username()
    return proc.uids().real == os.getuid()


def runs_this_service(cmdline: list[str], cwd: Path, app_dir: Path) -> bool:
    """True for `python ... app.py` with app_dir's app.py, or `gunicorn ... app:app` run in app_dir.

    These are the ways the launcher and the README start the service; app_dir must be resolved.
    """
    if not cmdline:
        return False
    app = app_dir / "app.py"
    if "python" in Path(cmdline[0]).name.lower() and any((cwd / arg).resolve() == app for arg in cmdline[1:]):
        return True
    return cwd == app_dir and "app:app" in cmdline and any(Path(arg).name == "gunicorn" for arg in cmdline)


def holds_listener(proc: psutil.Process, port: int) -> bool:
    """True when proc has a TCP socket listening on port.

    Asked of the process itself: psutil.net_connections() names one process per socket, while a gunicorn
    master and its workers, or any process and the children it handed the socket on to, share it.
    """
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
               for c in proc.net_connections(kind="tcp"))


def instance_mismatch(proc: psutil.Process, port: int, app_dir: Path) -> str | None:
    """Why proc is not an instance of this service that the launcher may stop, None when it is.

    app_dir must be resolved; psutil errors propagate.
    """
    if not same_user(proc):
        return "runs as another user"
    if not holds_listener(proc, port):
        return "does not hold the port"
    if not runs_this_service(proc.cmdline(), Path(proc.cwd()).resolve(), app_dir):
        return f"does not run app.py or gunicorn app:app from {app_dir}"
    return None


def instance_root(proc: psutil.Process, port: int, app_dir: Path) -> psutil.Process:
    """The process to stop for proc, a verified instance: its topmost ancestor that is a verified one too.

    /health reports the serving process; under gunicorn that is a worker, which its master would respawn.
    """
    root = proc
    for parent in proc.parents():
        try:
            if instance_mismatch(parent, port, app_dir) is not None:
                break
        except psutil.Error:
            break
        root = parent
    return root


def verified_instance(pid: int, port: int, app_dir: Path) -> psutil.Process:
    """The earlier instance to stop when port's /health names pid; LauncherError unless it is verifiably one.

    Anything on the port can answer with any pid, so the answer only says where to look: pid must run as
    this user, hold the listening socket and run this service from app_dir. Otherwise nothing is stopped.
    """
    app_dir = app_dir.resolve()
    try:
        proc = psutil.Process(pid)
        reason = instance_mismatch(proc, port, app_dir)
        if reason is None:
            return instance_root(proc, port, app_dir)
    except psutil.Error as exc:
        reason = f"could not be checked ({type(exc).__name__})"
    raise LauncherError(f"Port {port} is already in use by {describe_holder(port)}, which claims to be a StoryArt "
                        f"session service (pid {pid}) but {reason}; stop it yourself or choose another port.")


# ---------------------------------------------------------------------------------------------------------
# Stopping process trees


def stop_processes(
    procs: Iterable[psutil.Process], grace: float = STOP_GRACE_SECONDS, signalled: Iterable[int] = ()
) -> list[psutil.Process]:
    """Terminate (except those already signalled), wait up to grace, kill the survivors.

    Returns whatever still would not die. One polite signal each: a service may treat a second one as
    "quit now" and skip its graceful shutdown.
    """
    procs = [p for p in procs if _alive(p)]
    skip = set(signalled)
    for proc in procs:
        if proc.pid not in skip:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
    alive = _wait_gone(procs, grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return _wait_gone(alive, grace)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until none of procs is alive; returns those still alive at the deadline.

    A zombie counts as gone: it holds no port and only waits for its parent (psutil.wait_procs would
    wait on it in vain when the parent is another process, as an earlier instance's launcher is).
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie holds no resources, only awaits its parent)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_earlier_instance(pid: int, host: str, port: int, app_dir: Path) -> None:
    """Stop an earlier StoryArt session service (and its children) and wait until it frees the port."""
    root = verified_instance(pid, port, app_dir)
    tree = [root]
    with contextlib.suppress(psutil.Error):  # already gone: waiting for the port tells
        tree += root.children(recursive=True)
    say(f"Port {port} is held by an earlier StoryArt session service (pid {root.pid}); stopping it.")
    if stop_processes(tree):
        raise LauncherError(f"Could not stop the earlier StoryArt session service (pid {root.pid}) "
                            f"on port {port}.")
    deadline = time.monotonic() + PORT_RELEASE_SECONDS
    while is_listening(host, port):
        if time.monotonic() > deadline:
            raise LauncherError(f"Port {port} is still in use by {describe_holder(port)} "
                                f"after stopping the earlier StoryArt session service (pid {root.pid}).")
        time.sleep(POLL_SECONDS)


def claim_port(host: str, port: int, app_dir: Path) -> None:
    """Make sure the service can bind port: free it from an earlier instance, refuse for anything else."""
    if not is_listening(host, port):
        return
    pid = earlier_instance_pid(read_health(host, port))
    if pid is None:
        raise LauncherError(f"Port {port} is already in use by {describe_holder(port)}; "
                            "stop it or choose another port (-Port / --port).")
    stop_earlier_instance(pid, host, port, app_dir)


# ---------------------------------------------------------------------------------------------------------
# Starting children


def group_options() -> dict[str, Any]:
    """Popen options giving a child its own process group.

    The terminal's Ctrl+C then reaches only the launcher, which stops each whole tree in order; without it
    npm prints errors for the interrupted script and, on Windows, npm.cmd asks "Terminate batch job?".
    """
    if IS_WINDOWS:
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def pump_output(child: Child, stream: Any) -> None:
    """Echo a child's output line by line with its name, keeping the last lines for error reports."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip()
        child.tail.append(line)
        with contextlib.suppress(Exception), _OUTPUT_LOCK:  # Never stop draining: a full pipe blocks it.
            print(f"[{child.name}] {line}", flush=True)
    stream.close()


def start_child(
    name: str, command: list[str], cwd: Path, env: dict[str, str], children: list[Child]
) -> Child:
    """Start command in its own process group, stdout and stderr merged and echoed.

    The child joins children right away so that the cleanup finds it whatever happens next; its stdin
    is closed so that it never competes with the launcher for the terminal.
    """
    popen = subprocess.Popen(
        command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, **group_options(),
    )
    child = Child(name=name, popen=popen)
    children.append(child)
    child.refresh_tree()
    child.reader = threading.Thread(target=pump_output, args=(child, popen.stdout), daemon=True)
    child.reader.start()
    return child


def backend_env(env: dict[str, str], host: str, port: int) -> dict[str, str]:
    """Environment for app.py: our port and host win over any .env file, output unbuffered UTF-8."""
    return {**env, "REDIS_API_PORT": str(port), "HOST": host, "PYTHONUNBUFFERED": "1",
            "PYTHONIOENCODING": "utf-8"}


def wait_until(
    child: Child, timeout: float, what: str, ready: Callable[[], Any], check_stop: Callable[[], None]
) -> Any:
    """Poll ready() until it returns something truthy; fail if the child exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        check_stop()
        child.refresh_tree()
        result = ready()
        if result:
            return result
        code = child.popen.poll()
        if code is not None:
            _join_reader(child)
            raise LauncherError(f"The {child.name} exited with code {code} before {what}. "
                                f"Last output:\n{child.last_output()}")
        if time.monotonic() > deadline:
            raise LauncherError(f"The {child.name} was not {what} after {timeout:g} s. "
                                f"Last output:\n{child.last_output()}")
        time.sleep(POLL_SECONDS)


def wait_for_backend(
    child: Child, host: str, port: int, timeout: float, check_stop: Callable[[], None]
) -> None:
    """Wait until /health answers 200, and make sure it is our child answering, not an intruder."""
    health = wait_until(child, timeout, f"answering {HEALTH_PATH} on port {port}",
                        lambda: read_health(host, port, timeout=1.0), check_stop)
    pid = health.get("pid")
    child.refresh_tree()
    if isinstance(pid, int) and pid not in child.known:
        raise LauncherError(f"Port {port} is answered by another process (pid {pid}), not by the service "
                            "started here; stop it and try again.")


def backend_command(app_dir: Path) -> list[str]:
    """The service's own development server, in this interpreter (the venv's)."""
    app = app_dir / "app.py"
    if not app.is_file():
        raise LauncherError(f"No app.py in {app_dir}; run the launcher from the session service's folder.")
    return [sys.executable, str(app)]


def check_frontend_dir(frontend_dir: str | None) -> Path:
    """The frontend folder, checked before anything starts so a typo never leaves a backend behind."""
    if not frontend_dir:
        raise LauncherError("No frontend folder given: pass -FrontendDir / --frontend-dir, set "
                            "STORYART_FRONTEND_DIR, or use -NoFrontend / --no-frontend.")
    if IS_WINDOWS:  # Windows PowerShell 5.1 passes "C:\My Dir\" on as C:\My Dir" (the \" reads as a quote)
        frontend_dir = frontend_dir.rstrip('"')
    path = Path(frontend_dir).expanduser().resolve()
    if not path.is_dir():
        raise LauncherError(f"Frontend folder not found: {path}")
    package_json = path / "package.json"
    if not package_json.is_file():
        raise LauncherError(f"No package.json in the frontend folder {path}")
    try:
        package = json.loads(package_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LauncherError(f"Cannot read {package_json}: {exc}") from None
    scripts = package.get("scripts") if isinstance(package, dict) else None
    if not isinstance(scripts, dict) or "dev" not in scripts:
        raise LauncherError(f"{package_json} has no \"dev\" script for `npm run dev`.")
    needs_modules = bool(package.get("dependencies") or package.get("devDependencies"))
    if needs_modules and not (path / "node_modules").is_dir():
        say(f"Warning: {path} has no node_modules; run `npm install` there if `npm run dev` fails.")
    return path


def find_npm() -> str:
    """Full path of npm (npm.cmd on Windows, which shutil.which finds through PATHEXT)."""
    npm = shutil.which("npm")
    if not npm:
        raise LauncherError("npm was not found on PATH; install Node.js, or use -NoFrontend / --no-frontend.")
    return npm


def frontend_command(npm: str, port: int | None) -> list[str]:
    """`npm run dev`, with `-- --port N` only when a port was asked for (Vite understands it)."""
    command = [npm, "run", "dev"]
    return command if port is None else [*command, "--", "--port", str(port)]


def frontend_env(env: dict[str, str]) -> dict[str, str]:
    """BROWSER=none keeps Vite from opening a tab of its own: the launcher opens exactly one."""
    return {**env, "BROWSER": "none"}


def answers_http(port: int) -> bool:
    """True when a web server answers on port via IPv4 or IPv6 loopback (Vite may bind ::1 only)."""
    return any(http_get(f"http://{url_host(h)}:{port}/", timeout=2.0) is not None for h in LOOPBACKS)


def port_taken(port: int) -> bool:
    """True when something listens on port on IPv4 or IPv6 loopback."""
    return any(is_listening(h, port) for h in LOOPBACKS)


def listening_ports(child: Child) -> set[int] | None:
    """TCP ports the child's process tree listens on; None when the OS will not tell for some process."""
    ports: set[int] = set()
    for proc in list(child.known.values()):
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.AccessDenied:
            return None
        except psutil.Error:
            continue  # gone meanwhile
        ports.update(c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN)
    return ports


def find_frontend_port(child: Child, candidates: list[int], busy: set[int]) -> int | None:
    """The dev server's port, once it answers HTTP.

    Preferably a port its own process tree listens on: a candidate first, else any (Vite moves on to the
    next free port when its own is taken). Where the OS hides the tree's sockets, a candidate that was
    free before the start. Probing only these also keeps polling fast where a refused connection is slow.
    """
    own = listening_ports(child)
    if own is None:
        ordered = [p for p in candidates if p not in busy]
    else:
        ordered = [p for p in candidates if p in own] + sorted(own - set(candidates))
    return next((p for p in ordered if answers_http(p)), None)


# ---------------------------------------------------------------------------------------------------------
# Stopping children


def stop_children(children: list[Child]) -> None:
    """Stop every child with its whole process tree, gracefully first, leaving no orphan."""
    for child in children:
        child.refresh_tree()
    everything = [proc for child in children for proc in child.known.values()]
    signalled = {pid for child in children for pid in _signal_group(child, graceful=True)}
    survivors = stop_processes(everything, signalled=signalled)
    for child in children:
        _signal_group(child, graceful=False)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=STOP_GRACE_SECONDS)  # reap it: no zombie left behind
        _join_reader(child)
    for proc in survivors:
        say(f"Warning: could not stop pid {proc.pid}.")


def _signal_group(child: Child, graceful: bool) -> set[int]:
    """Signal the child's process group, which also reaches descendants orphaned from the tree.

    Returns the pids that got the graceful signal. On Windows that is the whole tree: CTRL_BREAK goes to
    the group, and psutil's terminate() would be TerminateProcess, which is not graceful at all.
    """
    try:
        if IS_WINDOWS:
            if graceful and child.popen.poll() is None:
                os.kill(child.popen.pid, signal.CTRL_BREAK_EVENT)
                return set(child.known)
            return set()
        os.killpg(child.popen.pid, signal.SIGTERM if graceful else signal.SIGKILL)
    except OSError:
        return set()  # group already empty
    return {pid for pid in child.known if _pgid(pid) == child.popen.pid}


def _pgid(pid: int) -> int | None:
    """Process group of pid, None once it is gone."""
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _join_reader(child: Child) -> None:
    """Let the output thread print what the child wrote last."""
    if child.reader is not None:
        child.reader.join(timeout=2.0)


# ---------------------------------------------------------------------------------------------------------
# Running


class StopSignal:
    """Turns Ctrl+C / SIGTERM into a flag checked between steps, so cleanup is never cut short."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.name = ""

    def install(self) -> None:
        """Handle SIGINT, SIGTERM, SIGHUP (terminal closed) and, on Windows, SIGBREAK from now on.

        The children run in their own process groups, so a closed terminal's SIGHUP reaches only the
        launcher: it must stop them rather than die and leave them behind.
        """
        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if not self.event.is_set():
            self.name = signal.Signals(signum).name
        self.event.set()

    def check(self) -> None:
        """Raise StopRequested once a stop signal has arrived."""
        if self.event.is_set():
            raise StopRequested(self.name)

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early (with StopRequested) when a stop signal arrives."""
        self.event.wait(seconds)
        self.check()


def open_browser(url: str) -> None:
    """Open url in the default browser; a failure is only worth a line, the servers keep running."""
    try:
        if not webbrowser.open(url):
            say(f"Could not open a browser; open {url} yourself.")
    except (webbrowser.Error, OSError) as exc:
        say(f"Could not open a browser ({exc}); open {url} yourself.")


def supervise(children: list[Child], stop: StopSignal) -> int:
    """Wait until a stop signal (exit 0) or until a child exits on its own (exit 1)."""
    while True:
        for child in children:
            child.refresh_tree()
            code = child.popen.poll()
            if code is not None:
                _join_reader(child)
                say(f"The {child.name} exited with code {code}; stopping everything. Last output:\n"
                    f"{child.last_output()}")
                return 1
        stop.sleep(0.5)


def start_all(args: argparse.Namespace, env: dict[str, str], children: list[Child], stop: StopSignal) -> str:
    """Check everything, start the service and the frontend, and return the URL to show the user."""
    host = env.get("HOST") or DEFAULT_HOST
    local = probe_host(host)
    frontend_dir = None if args.no_frontend else check_frontend_dir(args.frontend_dir)
    npm = None if args.no_frontend else find_npm()
    command = backend_command(args.app_dir)
    claim_port(local, args.port, args.app_dir)
    stop.check()

    backend = start_child("backend", command, args.app_dir, backend_env(env, host, args.port), children)
    wait_for_backend(backend, local, args.port, args.backend_timeout, stop.check)
    health_url = f"http://{url_host(local)}:{args.port}{HEALTH_PATH}"
    say(f"Session service ready: {health_url} (pid {backend.popen.pid})")
    if frontend_dir is None or npm is None:
        return health_url

    if args.port != DEFAULT_PORT:
        say(f"Note: the StoryArt frontend calls http://localhost:{DEFAULT_PORT} "
            "unless it is configured otherwise.")
    candidates = [args.frontend_port] if args.frontend_port else list(FRONTEND_PORTS)
    busy = {p for p in candidates if port_taken(p)}
    for port in sorted(busy):
        say(f"Warning: port {port} is already in use by {describe_holder(port)}; "
            "the dev server will pick another port.")
    frontend = start_child("frontend", frontend_command(npm, args.frontend_port), frontend_dir,
                           frontend_env(env), children)
    port = wait_until(frontend, args.frontend_timeout, "serving on port " + " or ".join(map(str, candidates)),
                      lambda: find_frontend_port(frontend, candidates, busy), stop.check)
    url = f"http://localhost:{port}/"
    say(f"Frontend ready: {url} (pid {frontend.popen.pid})")
    return url


def run(args: argparse.Namespace, env: dict[str, str], stop: StopSignal) -> int:
    """Start everything, wait, and stop every child whatever happened."""
    children: list[Child] = []
    try:
        url = start_all(args, env, children, stop)
        if not args.no_browser:
            open_browser(url)
        say(f"StoryArt is running at {url}. Press Ctrl+C to stop.")
        return supervise(children, stop)
    except StopRequested as exc:
        say(f"{exc} received.")
        return 0
    except LauncherError as exc:
        say(f"Error: {exc}")
        return 1
    finally:
        if children:
            say("Stopping the " + " and the ".join(c.name for c in children) + "...")
            stop_children(children)
            say("Stopped.")


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit code."""
    with contextlib.suppress(AttributeError, ValueError):  # never die on a console lacking a character
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    env = dict(os.environ)
    stop = StopSignal()
    stop.install()
    try:
        args = parse_args(argv, env)
        return run(args, env, stop)
    except LauncherError as exc:
        say(f"Error: {exc}")
        return 1
    except (StopRequested, KeyboardInterrupt):
        return 0


if __name__ == "__main__":
    sys.exit(main())
