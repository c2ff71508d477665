"""gunicorn settings for `gunicorn app:app` (gunicorn reads this file from the working directory).

Everything comes from the same validated `Config` as the app, so a bad variable stops the master with one
line before any worker starts, and the bind address is always HOST:REDIS_API_PORT (127.0.0.1 by default),
never 0.0.0.0 by accident.
"""

import ctypes
import sys

from gunicorn import util
from gunicorn.workers import gthread

from config import Config, ConfigError, exits_on_config_error
from responses import error_body
from storage import check_start_up
from worker import ParkingWorker

with exits_on_config_error():
    _config = Config.from_env()

_host = f"[{_config.host}]" if ":" in _config.host else _config.host
bind = [f"{_host}:{_config.port}"]

# The worker model: gthread, 32 threads per worker, in every storage mode: idle and kept-alive connections wait
# in its poller and cost no thread, a body gets REQUEST_BODY_TIMEOUT (deadline.py), and an answer its client does not
# read waits in the poller too (worker.py). Why, and what was measured against sync workers and gevent:
# docs/benchmarks.md and docs/deploy.md. Only the volatile memory store without Redis runs one worker: a second
# worker would hold sessions the first cannot see.
if _config.redis_configured or _config.local_store == "sqlite":
    workers = _config.workers or 3
else:
    with exits_on_config_error():
        if _config.workers > 1:
            raise ConfigError("WEB_CONCURRENCY: LOCAL_STORE=memory without REDIS_URL runs one worker (each worker "
                              "would keep its own sessions)")
    workers = 1
threads = _config.threads or 32
# gthread whose answers a client does not read wait in the poller, not in a thread, for at most
# RESPONSE_SEND_TIMEOUT without progress (worker.py): 200 connections that asked for the list of ten 1 MB sessions
# and read nothing held all 3 x 32 threads, and every other request waited behind them.
ParkingWorker.send_timeout = _config.send_timeout
worker_class = "worker.ParkingWorker" if threads > 1 else "sync"
keepalive = 5  # seconds an idle connection (a browser's preconnect, a kept-alive one) stays open
# gunicorn's gthread worker lets a new connection wait in a thread up to 5 s for its first bytes before parking it
# in the poller: 50 idle connections then took every thread for 5 s. 0.1 s is ample for a client that sends.
gthread.DEFAULT_WORKER_DATA_TIMEOUT = 0.1
# A worker's threads share one GIL, and Python makes a thread that holds it let go every 5 ms when another waits:
# 1 MB saves then hand it back and forth mid-parse. A thread keeps it 50 ms instead (a save's CPU work is 5-10 ms,
# and I/O lets go anyway); measured in docs/benchmarks.md. Inherited by every worker.
sys.setswitchinterval(0.05)

# The start-up refusals (an unusable store file, a Redis that cannot keep sessions safely) stop the master with
# one line before any worker boots; the SQLite store's schema is created here, so the workers find it in place.
with exits_on_config_error():
    check_start_up(_config)

timeout = 60  # a 50 MB body on a slow link still fits
graceful_timeout = 30  # SIGTERM: requests in flight get this long to finish
control_socket_disable = True  # one control socket per user would collide between instances
forwarded_allow_ips = "127.0.0.1,::1" if _config.trusted_proxy_hops else ""
accesslog = None  # the app writes its own access log line (request id, status, bytes, ms)
loglevel = _config.log_level.lower()


def _write_json_error(sock, status_int, reason, mesg):
    """Answer what gunicorn's own parser refuses in the service's JSON error shape.

    gunicorn answers what it cannot parse (a request line over 4094 bytes: 414, too many or too large
    headers: 431, a bad request line, header or chunk: 400) itself, before the app sees it, with an HTML
    page. Every answer of this service is JSON (docs/contract.md §1), so it writes the same error shape instead.
    """
    body = error_body(f"{reason}: {mesg}." if mesg else f"{reason}.")
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


util.write_error = _write_json_error  # workers call util.write_error(...) at the time of the error


def _keep_session_buffers_in_the_heap():
    """Have glibc serve buffers up to 32 MB from the heap, not fresh mmap pages.

    glibc gives an allocation above its (dynamic, 128 KB-32 MB) mmap threshold fresh pages from the kernel and
    hands them back on free, so every 1 MB session read page-faulted ~150-900 fresh pages: about 1 ms of CPU per
    request, more than the JSON work. Serve buffers up to 32 MB from the heap instead (orjson's parser reserves
    ~8x the body, 24 MB for a 3 MB session, of which it touches what it uses), and give free heap back to the
    kernel only beyond 64 MB. Set in the master before it forks, so every worker inherits it.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    mallopt(m_trim_threshold, 64 * 1024 * 1024)


_keep_session_buffers_in_the_heap()


def post_worker_init(worker):  # noqa: ARG001 - gunicorn's hook signature
    """Each worker runs the backup schedule (BACKUP_SCHEDULE; the workers' claims let one take each due time)."""
    app_module = sys.modules.get("app")
    if app_module is not None:
        app_module.app.extensions["storyart-backups"].start()


def worker_exit(server, worker):  # noqa: ARG001 - gunicorn's hook signature
    """Stop the worker's backup schedule, try one last write-back of pending sessions, and say what is left.

    Runs after the worker's last request.
    """
    app_module = sys.modules.get("app")
    if app_module is not None:
        app_module.app.extensions["storyart-backups"].stop()
        app_module.app.extensions["storyart"].close()
