"""gunicorn settings for `gunicorn app:app` (gunicorn reads this file from the working directory).

Everything comes from the same validated `Config` as the app, so a bad variable stops the master with one
line before any worker starts, and the bind address is always HOST:REDIS_API_PORT (127.0.0.1 by default),
never 0.0.0.0 by accident.
"""

import ctypes
import sys

from gunicorn import util
from gunicorn.workers import gthread

from config import Config, ConfigError
from responses import error_body
from worker import ParkingWorker

try:
    _config = Config.from_env()
except ConfigError as _error:
    print(f"storyart: configuration error: {_error}", file=sys.stderr)
    sys.exit(2)

_host = f"[{_config.host}]" if ":" in _config.host else _config.host
bind = [f"{_host}:{_config.port}"]

# The worker model: gthread, 32 threads per worker, in every storage mode. The StoryArt page may talk to the service
# directly (no proxy), and browsers keep preconnected idle sockets: with 3 sync workers three idle connections
# froze the service until the worker timeout killed them, again and again; eight connections that sent one byte
# froze the 1 x 8 gthread setup for as long as they stayed open. gthread parks idle and kept-alive connections in
# its poller (`keepalive` seconds, then closed), so they cost no thread; a request that has begun holds a thread
# until it is answered, and a body gets REQUEST_BODY_TIMEOUT (deadline.py), so 32 threads per worker take 20
# byte-a-second uploads with room to spare. Measured with 50 idle and 20 slow-body connections open
# (tests/test_slow_clients.py): other clients' health check + save + read answered within 0.01-0.08 s (sync: 15 s
# and more, 3 x 4 gthread: 30 s). 1 MB throughput against what ran before, same session each, bench/run.py
# --variant, 5 and 3 rounds x 3 s, 8 clients, req/s and CPU ms per request (README: Slow and idle clients):
#   Redis, 3 sync -> 3 x 32: latest 283 -> 476 req/s (1.94 -> 2.08 ms), save 52 -> 62 (9.3 -> 10.0 ms); again:
#   latest 123 -> 308 (2.77 -> 2.75), save 32 -> 60 (12.0 -> 12.8): keep-alive outweighs the shared GIL.
#   SQLite, 3 x 4 -> 3 x 32: latest 543 -> 428 (1.79 -> 1.72), save 59 -> 47 (12.7 -> 15.4); again: latest
#   479 -> 593 (1.78 -> 1.87), save 83 -> 85 (11.9 -> 14.0): req/s within the machine's noise, saves cost
#   10-20% more CPU (more writers at once per worker). Run 3, a quiet machine, with the switch interval below:
#   Redis latest 663 -> 617 (-7%), save 119 -> 114 (-4%); SQLite latest 898 -> 848 (-6%), save 104 -> 98 (-6%).
# gevent, also measured, did as well on 1 MB requests, but it turns the SQLite store's per-thread connections
# into one per connection (never closed) and every lock into a greenlet's. Only the volatile memory store
# without Redis runs one worker: a second worker would hold sessions the first cannot see.
if _config.redis_configured or _config.local_store == "sqlite":
    workers = _config.workers or 3
else:
    if _config.workers > 1:
        print("storyart: configuration error: WEB_CONCURRENCY: LOCAL_STORE=memory without REDIS_URL runs one "
              "worker (each worker would keep its own sessions)", file=sys.stderr)
        sys.exit(2)
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
# 8 clients' 1 MB saves then hand it back and forth mid-parse, costing 1 MB saves 15% of their req/s against the
# 3 sync workers (bench/run.py --variant, same run: 112.7 vs 132.1 req/s; CPU 11.7 vs 8.8 ms per save). Letting
# a thread keep it 50 ms (a save's CPU work is 5-10 ms, and I/O lets go anyway) brought it to 126.1 (-4.5%);
# the idle and slow clients' test still answers others in well under a second. Inherited by every worker.
sys.setswitchinterval(0.05)

if _config.local_store == "sqlite":
    # Create (or check) the store file in the master, so an unusable path stops start-up with one line before
    # any worker boots, and the workers find the schema in place.
    from stores.base import Limits
    from stores.sqlite import SqliteStore

    try:
        SqliteStore.open(_config.local_store_path, Limits()).close()
    except ConfigError as _error:
        print(f"storyart: configuration error: {_error}", file=sys.stderr)
        sys.exit(2)

if _config.redis_configured:
    # A Redis that cannot keep sessions safely (a cluster node, an eviction policy) stops the master with one
    # line too; one that is unreachable now is checked by each worker when it first answers.
    from redis import RedisError

    from stores.redis import RedisStore

    _store = RedisStore.from_config(_config)  # through the Sentinels when they are configured
    try:
        _refuse, _ = _store.facts().problems(_config.redis_allow_eviction)
    except RedisError:
        _refuse = []
    finally:
        _store.close()  # the workers open their own connections
    if _refuse:
        print(f"storyart: configuration error: {_config.redis_setting}: this Redis cannot keep sessions safely: "
              f"{_refuse[0]}", file=sys.stderr)
        sys.exit(2)

timeout = 60  # a 50 MB body on a slow link still fits
graceful_timeout = 30  # SIGTERM: requests in flight get this long to finish
control_socket_disable = True  # one control socket per user would collide between instances
forwarded_allow_ips = "127.0.0.1,::1" if _config.trusted_proxy_hops else ""
accesslog = None  # the app writes its own access log line (request id, status, bytes, ms)
loglevel = _config.log_level.lower()


def _write_json_error(sock, status_int, reason, mesg):
    """gunicorn answers what it cannot parse (a request line over 4094 bytes: 414, too many or too large
    headers: 431, a bad request line, header or chunk: 400) itself, before the app sees it, with an HTML
    page. Every answer of this service is JSON (docs/contract.md §1), so it writes the same error shape instead."""
    body = error_body(f"{reason}: {mesg}." if mesg else f"{reason}.")
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


util.write_error = _write_json_error  # workers call util.write_error(...) at the time of the error


def _keep_session_buffers_in_the_heap():
    """glibc gives an allocation above its (dynamic, 128 KB-32 MB) mmap threshold fresh pages from the kernel and
    hands them back on free, so every 1 MB session read page-faulted ~150-900 fresh pages: about 1 ms of CPU per
    request, more than the JSON work. Serve buffers up to 32 MB from the heap instead (orjson's parser reserves
    ~8x the body, 24 MB for a 3 MB session, of which it touches what it uses), and give free heap back to the
    kernel only beyond 64 MB. Set in the master before it forks, so every worker inherits it."""
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
    """After a worker's last request: stop its backup schedule, try one last write-back of pending sessions,
    and say what is left."""
    app_module = sys.modules.get("app")
    if app_module is not None:
        app_module.app.extensions["storyart-backups"].stop()
        app_module.app.extensions["storyart"].close()
