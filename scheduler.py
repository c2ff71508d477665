"""The backup schedule the service keeps itself, and the record of the last backup.

The schedule is `BACKUP_SCHEDULE` (docs/backups.md); `/health` and the history page show the record.

Every serving process (each gunicorn worker, `python app.py`) runs one thread that sleeps until the next due time
of the cron expression, in the machine's time zone, and then claims that due time; only the claim's winner
takes the backup (`offsite.take`), so each due time gets exactly one backup across all workers and hosts:

* on this host, by inserting the due time (the primary key) into a small SQLite file beside the local store,
  `<LOCAL_STORE_PATH>-backups`, which every worker shares (one insert wins);
* across hosts, by `SET storyart:backup:lease:<due ms> <owner> NX PX <two periods + 1 h>` in Redis (in one
  script with the cursor below). While Redis is away the host's own claim stands alone: a backup then refuses
  anyway (it would miss what Redis holds) and says so in its outcome.

The highest due time ever claimed is the cursor (`storyart:backup:cursor` in Redis, the file's largest due time
here). At start-up, a due time later than the cursor that has already passed was missed (the machine slept, the
service was stopped): it is claimed and taken once, whatever number of due times went by. A first start with a
schedule only sets the cursor. A thread never sleeps longer than `SLICE_S` without looking at the wall clock,
so a machine that slept with the service running takes the newest due time it slept through on waking.

Without `BACKUP_SCHEDULE` no thread starts, and the record still serves the `sessions backup` command's outcome.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from croniter import croniter

from config import Config
from offsite import Outcome, summary, take
from storage import SessionStorage

log = logging.getLogger(__name__)

LEASE_PREFIX = "storyart:backup:lease:"
CURSOR_KEY = "storyart:backup:cursor"
LAST_KEY = "storyart:backup:last"
SLICE_S = 30.0  # the longest wait without a look at the wall clock
STOP_WAIT_S = 20.0  # how long closing waits for a backup in progress (gunicorn's graceful_timeout is 30 s)
KEEP_CLAIMS = 1000  # due times kept in the host's file (the cursor needs only the largest)
class Ledger:
    """This host's backup claims and last outcome, in one SQLite file every process shares.

    The file is `<LOCAL_STORE_PATH>-backups` (created on the first claim or record; /health only reads it when it
    exists).
    """

    SCHEMA = ("CREATE TABLE IF NOT EXISTS claims (due INTEGER PRIMARY KEY, owner TEXT NOT NULL, at INTEGER NOT NULL)",
              "CREATE TABLE IF NOT EXISTS last (id INTEGER PRIMARY KEY CHECK (id = 1), outcome TEXT NOT NULL)")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():  # a connection never crosses a fork
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            for statement in self.SCHEMA:
                db.execute(statement)
            self._db, self._pid = db, os.getpid()
        return self._db

    def claim(self, due: int, owner: str) -> bool:
        """Whether this process is the first on the host to claim `due`."""
        with self._lock:
            db = self._conn()
            won = db.execute("INSERT OR IGNORE INTO claims VALUES (?, ?, ?)",
                             (due, owner, int(time.time() * 1000))).rowcount == 1
            if won:
                db.execute("DELETE FROM claims WHERE due < (SELECT due FROM claims ORDER BY due DESC LIMIT 1 "
                           "OFFSET ?)", (KEEP_CLAIMS,))
            return won

    def cursor(self) -> int | None:
        with self._lock:
            return self._conn().execute("SELECT max(due) FROM claims").fetchone()[0]

    def record(self, outcome: dict[str, Any]) -> None:
        with self._lock:
            self._conn().execute("INSERT OR REPLACE INTO last VALUES (1, ?)", (orjson.dumps(outcome).decode(),))

    def last(self) -> dict[str, Any] | None:
        if self._db is None and not self.path.exists():
            return None
        with self._lock:
            row = self._conn().execute("SELECT outcome FROM last").fetchone()
        return orjson.loads(row[0]) if row else None

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None


class Scheduler:
    """The backup schedule of one process, and the record of the last backup for every process.

    The schedule is started by the server that serves the app: gunicorn's `post_worker_init`, `python app.py`'s `serve`.
    """

    def __init__(self, config: Config, storage: SessionStorage) -> None:
        self.config = config
        self.storage = storage
        self.ledger = Ledger(config.local_store_path.with_name(f"{config.local_store_path.name}-backups"))
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record

    def record(self, outcome: Outcome) -> None:
        """Keep the outcome for /health: in this host's file and, for every host, in Redis (when it answers)."""
        shown = outcome.record()
        try:
            self.ledger.record(shown)
        except sqlite3.Error as error:
            log.warning("the backup's outcome could not be kept in %s: %s", self.ledger.path, error)
        self.storage.shared(lambda r: r.set(LAST_KEY, orjson.dumps(shown)))  # else the host's file has it

    def last(self) -> dict[str, Any] | None:
        """The newest recorded outcome, of any host (Redis) or this one (its file)."""
        found = []
        with contextlib.suppress(sqlite3.Error):
            found.append(self.ledger.last())
        in_use = self.config.backup_schedule or self.config.backup_s3 or any(found)  # else no Redis round trip
        raw = self.storage.shared(lambda r: r.get(LAST_KEY)) if in_use else None
        with contextlib.suppress(orjson.JSONDecodeError):
            found.append(orjson.loads(raw) if raw else None)
        shown = [outcome for outcome in found if isinstance(outcome, dict) and isinstance(outcome.get("at"), str)]
        return max(shown, key=lambda outcome: outcome["at"], default=None)

    def next_due(self) -> int | None:
        """The next due time (ms), when a schedule is set."""
        return _next(self.config.backup_schedule, time.time()) if self.config.backup_schedule else None

    # -- the schedule

    def start(self) -> None:
        """Start this process's schedule thread (nothing without BACKUP_SCHEDULE; once per process)."""
        if not self.config.backup_schedule or (self._thread is not None and self._thread.is_alive()):
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="storyart-backup-schedule", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, letting a backup in progress finish for up to `STOP_WAIT_S`."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
            if self._thread.is_alive():
                log.warning("stopping while a scheduled backup is still running: it ends with this process")
        self.ledger.close()

    def _run(self) -> None:
        expression = self.config.backup_schedule
        assert expression is not None
        owner = f"{socket.gethostname()}:{os.getpid()}"
        log.info("backup schedule %r: next backup at %s", expression, _local(_next(expression, time.time())))
        self._guarded(lambda: self._catch_up(expression, owner))
        while not self._stopping.is_set():
            due = _next(expression, time.time())
            while (left := due / 1000 - time.time()) > 0:
                if self._stopping.wait(min(left, SLICE_S)):
                    return
            newest = max(due, _previous(expression, time.time()))  # after a sleep: the newest one passed
            self._guarded(lambda newest=newest: self._claim(newest, owner, expression) and self._take(newest))

    def _guarded(self, step: Any) -> None:
        """Run one step; whatever goes wrong is logged and the schedule goes on."""
        try:
            step()
        except Exception:  # noqa: BLE001 - one bad round must not end the schedule
            log.exception("the backup schedule met an error; it goes on")

    def _catch_up(self, expression: str, owner: str) -> None:
        """At start-up: take a due time missed while the service was not running, once."""
        previous = _previous(expression, time.time())
        cursor = self._cursor()
        if cursor is None:  # the first start with a schedule: nothing was missed, but the next start must know
            self._claim(previous, owner, expression)
        elif cursor < previous and self._claim(previous, owner, expression):
            log.info("the backup due at %s was missed while the service was not running: taking it now",
                     _local(previous))
            self._take(previous)

    def _cursor(self) -> int | None:
        cursors = [self.ledger.cursor()]
        raw = self.storage.shared(lambda r: r.get(CURSOR_KEY))
        with contextlib.suppress(ValueError):
            cursors.append(int(raw) if raw else None)
        return max((c for c in cursors if c is not None), default=None)

    def _claim(self, due: int, owner: str, expression: str) -> bool:
        """Whether this process takes the backup due at `due` (ms): first on this host, then among hosts."""
        if not self.ledger.claim(due, owner):
            return False
        if not self.storage.redis_configured:
            return True
        period = _next(expression, _next(expression, due / 1000) / 1000) - _next(expression, due / 1000)
        claimed = self.storage.claim(f"{LEASE_PREFIX}{due}", CURSOR_KEY, owner, 2 * period + 3_600_000, due)
        if claimed is None:
            log.warning("Redis does not answer: the backup due at %s is claimed on this host only", _local(due))
            return True
        return bool(claimed)

    def _take(self, due: int) -> None:
        outcome = take(self.config, self.storage, due=due)
        self.record(outcome)
        if outcome.written is not None:
            log.info("scheduled backup for %s: %s", _local(due), summary(outcome))
        if outcome.error:
            log.error("scheduled backup for %s failed: %s", _local(due), outcome.error)


def _next(expression: str, after: float) -> int:
    """The first due time after `after` (seconds), in ms, in the machine's time zone."""
    return round(croniter(expression, datetime.fromtimestamp(after).astimezone()).get_next(float) * 1000)


def _previous(expression: str, now: float) -> int:
    return round(croniter(expression, datetime.fromtimestamp(now).astimezone()).get_prev(float) * 1000)


def _local(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")
