"""The durable local store, the default: one SQLite file (`LOCAL_STORE_PATH`) in WAL mode.

Every process on the host opens the same file: gunicorn's workers, `python app.py`, the next run of the service.
A save returns only after its transaction has committed, so a session the service acknowledged survives a
`kill -9` of any of them; with `synchronous=FULL` (the default) each commit is also flushed to the disk, so it
survives a power loss too (see docs/local-store.md).

Each thread borrows a connection for as long as it lives and hands it back when it ends, so a server that starts a
thread per connection (`python app.py`) reuses a few connections instead of leaking two descriptors per thread.
Writes take the file's write lock (`BEGIN IMMEDIATE`), which makes the
timestamp rule and the caps atomic across processes, and `exclusive()` hands that lock to the failover for a
write-back step or a delete. A live count of sessions and bytes is kept by triggers, so the caps cost nothing
to check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import orjson

from allocator import choose, now_ms
from config import ConfigError
from payload import Draft
from stores.base import (
    NEVER,
    Event,
    Facets,
    Keep,
    Limits,
    LocalStore,
    Origin,
    Pending,
    Query,
    Record,
    Share,
    StorageUnavailable,
    Stored,
    WhenFull,
    expiry,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_TIMEOUT_S = 3.0  # how long a write waits for another process's transaction before the save gets a 503
# How often a waiting writer asks for the write lock again. SQLite's own busy handler backs off to 100 ms
# between tries, so under load the writers that just let go win again and again: a waiting save starved for
# 3 s in the soak. Asking every millisecond (and a write-back pausing between moves) keeps the wait fair.
LOCK_POLL_S = 0.001
IDLE_CONNECTIONS = 8  # connections kept open for the next threads once theirs have ended; the rest are closed
PAGE_SIZE = 16384  # measured: a 1 MB session commits in 3.8 ms instead of 5.3 ms with 4 KiB pages, reads 20% faster
RECLAIM_SHARE = 4  # hand free pages back to the file system once they are over a quarter of the file ...
RECLAIM_PAGES = 1024  # ... and over 16 MiB: under steady churn the next saves reuse them anyway
RECLAIM_STEP = 256  # pages handed back after one commit (4 MiB: about 15 ms)

SESSIONS = """CREATE TABLE IF NOT EXISTS {name} (
    owner TEXT NOT NULL DEFAULT '',  -- whose space: '' the default user's, else the user's name, casefolded
    timestamp INTEGER NOT NULL,
    body BLOB NOT NULL,       -- the session JSON exactly as the API returns it
    summary BLOB NOT NULL,    -- its summary JSON (list views, ETags)
    expires_at INTEGER NOT NULL,  -- wall clock, ms
    origin TEXT NOT NULL,     -- who chose the timestamp: 'client' or 'service'
    save_id TEXT NOT NULL DEFAULT '',  -- the save's id, by which a write-back finds a copy Redis applied unconfirmed
    pinned INTEGER NOT NULL DEFAULT 0,  -- kept forever: its expires_at is storage.NEVER
    story_uuid TEXT,  -- the list's filters (`storage.Facets`), indexed below
    episode TEXT,
    title TEXT,  -- casefolded
    -- When the copy was acknowledged (ms), which orders it against a copy Redis holds; 0 in an older file:
    -- acknowledged before anything this version acknowledged.
    acked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, timestamp)
)"""
SCHEMA = (
    SESSIONS.format(name="sessions"),
    "CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at)",
    """CREATE TABLE IF NOT EXISTS state (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        last_assigned INTEGER NOT NULL,  -- the allocator's last value here (see allocator.py)
        sessions INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO state VALUES (0, 0, 0, 0)",
    """CREATE TRIGGER IF NOT EXISTS sessions_added AFTER INSERT ON sessions BEGIN
        UPDATE state SET sessions = sessions + 1, bytes = bytes + length(NEW.body);
    END""",
    """CREATE TRIGGER IF NOT EXISTS sessions_removed AFTER DELETE ON sessions BEGIN
        UPDATE state SET sessions = sessions - 1, bytes = bytes - length(OLD.body);
    END""",
    """CREATE TRIGGER IF NOT EXISTS sessions_replaced AFTER UPDATE OF body ON sessions BEGIN
        UPDATE state SET bytes = bytes - length(OLD.body) + length(NEW.body);
    END""",
    # Share links and the activity log: without Redis their home, with Redis what waits to be written back.
    """CREATE TABLE IF NOT EXISTS shares (
        owner TEXT NOT NULL, id TEXT NOT NULL, token_sha TEXT NOT NULL, record BLOB NOT NULL,
        opened INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (owner, id))""",
    "CREATE UNIQUE INDEX IF NOT EXISTS shares_by_token ON shares (token_sha)",
    """CREATE TABLE IF NOT EXISTS share_opens (  -- openings of shares only Redis holds, counted while it was away
        owner TEXT NOT NULL, id TEXT NOT NULL, opened INTEGER NOT NULL, batch TEXT NOT NULL,
        PRIMARY KEY (owner, id))""",
    # One b-tree, by owner and time: a save writes one more page for its event, not three (a table and two indexes).
    """CREATE TABLE IF NOT EXISTS activity (
        owner TEXT NOT NULL, at INTEGER NOT NULL, id TEXT NOT NULL, event BLOB NOT NULL, PRIMARY KEY (owner, at, id)
    ) WITHOUT ROWID""",
)

# Columns added since the first version of the file: `_create` adds what an older file lacks and fills the
# facets in from the summaries; a file from before users existed is rebuilt with `owner` (`_add_owners`).
ADDED_COLUMNS = {
    "save_id": "TEXT NOT NULL DEFAULT ''",  # files of the first days had none
    "pinned": "INTEGER NOT NULL DEFAULT 0",
    "story_uuid": "TEXT",
    "episode": "TEXT",
    "title": "TEXT",
    "acked": "INTEGER NOT NULL DEFAULT 0",
}
# Covering indexes: a filtered list is counted and cut from an index alone, never from the rows, whose small
# columns sit behind the body's overflow pages. (`+expires_at` in the queries keeps SQLite from choosing the
# expiry index instead.)
INDEXES = (
    "CREATE INDEX IF NOT EXISTS sessions_by_story ON sessions (owner, story_uuid, timestamp, expires_at)",
    "CREATE INDEX IF NOT EXISTS sessions_by_episode ON sessions (owner, episode, timestamp, expires_at)",
    "CREATE INDEX IF NOT EXISTS sessions_by_title ON sessions (owner, timestamp, expires_at, title)",
    "CREATE INDEX IF NOT EXISTS sessions_by_save ON sessions (save_id)",  # a retried import finds its first copy
)

# A save replaces whatever holds its timestamp, acknowledged after it (even should the clock step back); a pinned
# session stays pinned.
UPSERT = """INSERT INTO sessions (owner, timestamp, body, summary, expires_at, origin, save_id, story_uuid, episode,
    title, acked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (owner, timestamp) DO UPDATE SET body = excluded.body, summary = excluded.summary,
    expires_at = CASE WHEN pinned THEN expires_at ELSE excluded.expires_at END, origin = excluded.origin,
    save_id = excluded.save_id, story_uuid = excluded.story_uuid, episode = excluded.episode, title = excluded.title,
    acked = max(excluded.acked, sessions.acked + 1)"""


def _add_owners(db: sqlite3.Connection) -> None:
    """Rebuild a file from before users existed with an `owner` column.

    Its sessions become the default user's; SQLite cannot change a primary key in place, so the table is copied
    (the triggers go with the old table and `_create` makes them again; the counts in `state` stay right)."""
    columns = ", ".join(row[1] for row in db.execute("PRAGMA table_info(sessions)"))
    db.execute(SESSIONS.format(name="sessions_owned"))
    db.execute(f"INSERT INTO sessions_owned ({columns}) SELECT {columns} FROM sessions")
    db.execute("DROP TABLE sessions")
    db.execute("ALTER TABLE sessions_owned RENAME TO sessions")
    for statement in SCHEMA:
        db.execute(statement)


class SqliteStore(LocalStore):
    kind = "sqlite"

    def __init__(self, path: Path, limits: Limits, synchronous: str = "FULL", keep: Keep | None = None) -> None:
        self.path = path
        self.keep = keep  # how much activity to keep: only without Redis (None: it all waits for Redis)
        self.location = str(path)
        self.clock_path = path.with_name(f"{path.name}-clock")
        self.limits = limits
        self.synchronous = synchronous
        self._local = threading.local()
        self._pool = _Pool()
        self._group = _Group()  # the saves waiting for the next group commit of this process (`_grouped`)

    @classmethod
    def open(cls, path: str | Path, limits: Limits, synchronous: str = "FULL", keep: Keep | None = None) -> SqliteStore:
        """Open or create the SQLite store.

        Open (or create) the store, or raise `ConfigError` naming the path. A file that is not a usable
        SQLite database is never discarded: it is moved aside, the move is logged, and a new store starts."""
        path = Path(path).absolute()
        _check_usable(path)
        store = cls(path, limits, synchronous, keep)
        try:
            store._create()
        except (sqlite3.OperationalError, StorageUnavailable) as error:  # the latter: from a transaction
            store.close()
            raise ConfigError(f"LOCAL_STORE_PATH: cannot open {path}: {error}") from None
        except sqlite3.DatabaseError as error:
            store.close()
            aside = _move_aside(path)
            log.error("local store %s is not a usable SQLite database (%s): moved it to %s and started a new one",
                      path, error, aside)
            store = cls(path, limits, synchronous, keep)
            store._create()
        return store

    # -- connections and transactions

    def _db(self) -> sqlite3.Connection:
        """This thread's connection: borrowed from the pool on first use, handed back when the thread ends."""
        lease = getattr(self._local, "lease", None)
        if lease is None or lease.pid != os.getpid():  # a connection never crosses a fork
            lease = self._local.lease = self._pool.lease(self._connect)
        return lease.db

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=LOCK_POLL_S, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA synchronous = {self.synchronous}")
        # Debian's SQLite zeroes every deleted page (secure_delete=ON): 2.5 ms to delete a 1 MB session.
        # FAST zeroes what costs no extra I/O; the rest of a deleted session's bytes stay in free pages until
        # reused or handed back (`_reclaim`).
        db.execute("PRAGMA secure_delete = FAST")
        db.execute("PRAGMA journal_size_limit = 16777216")  # the WAL file shrinks back after a burst
        return db

    def _create(self) -> None:
        """Set up a new SQLite file.

        Set the file up once (page size, incremental vacuum, WAL, the schema); every later open, by any
        process, finds it so and only waits its turn for the schema check."""
        db = self._db()
        if _patiently(lambda: db.execute("PRAGMA journal_mode").fetchone()[0]) != "wal":
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # these two take effect on a new file only
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            _patiently(lambda: db.execute("PRAGMA journal_mode = WAL").fetchone())
        with self._write() as db:
            for statement in SCHEMA:
                db.execute(statement)
            have = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
            missing = [name for name in ADDED_COLUMNS if name not in have]
            for name in missing:
                db.execute(f"ALTER TABLE sessions ADD COLUMN {name} {ADDED_COLUMNS[name]}")
            if "story_uuid" in missing:
                db.executemany("UPDATE sessions SET story_uuid = ?, episode = ?, title = ? WHERE timestamp = ?",
                               [(*Facets.of(orjson.loads(summary)), ts)
                                for ts, summary in db.execute("SELECT timestamp, summary FROM sessions")])
            if "owner" not in have:
                _add_owners(db)
            for statement in INDEXES:
                db.execute(statement)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """Open a write transaction.

        A write transaction holding the file's write lock; nested uses join the open one. Any database
        error becomes `StorageUnavailable` and nothing is changed."""
        db = self._db()
        if db.in_transaction:
            yield db
            return
        try:
            _begin(db)
        except sqlite3.Error as error:
            raise _unavailable(error) from error
        self._local.counted = None  # this thread's own commit leaves `data_version` as it was
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as error:
            self._local.freed = False
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error):
                raise _unavailable(error) from error
            raise
        if getattr(self._local, "freed", False):
            with contextlib.suppress(sqlite3.Error):  # only space is at stake: a failure here waits for next time
                self._shrink(db)

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run a read, waiting out SQLite's busy moments.

        A read: WAL readers never wait for writers, so only the rare moments SQLite itself is busy (a WAL
        reset, a recovery) are waited out."""
        try:
            return _patiently(lambda: self._db().execute(sql, params).fetchall())
        except sqlite3.Error as error:
            raise _unavailable(error) from error

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._write():
            yield

    # -- writes

    def save(self, draft: Draft, *, now: int, ttl_ms: int, proposal: int, when_full: WhenFull | None = None,
             event: Event | None = None) -> int:
        """Store a session; with `synchronous=FULL` committed together with the saves of other threads (`_grouped`)."""
        def work(db: sqlite3.Connection) -> int:
            return self._save_in(db, draft, now, ttl_ms, proposal, when_full, event)

        if self.synchronous == "FULL" and not self._db().in_transaction:
            return self._grouped(work)
        with self._write() as db:  # inside a transaction this thread holds (a write-back step): part of it
            return work(db)

    def _grouped(self, work: Callable[[sqlite3.Connection], int]) -> int:
        """Run a write in the next group commit of this process, and return once that commit is on disk.

        Writes that arrive while a commit is under way wait for it to end; then one of them commits all of them in
        one transaction and one fsync (each in a savepoint of its own: one that fails is undone alone and raises
        its own error), instead of one fsync each (3.8 ms here). Each write sees the ones before it in the batch,
        so the timestamp rule and the caps hold as if they had come one by one."""
        job = _Job(work)
        group = self._group
        with group.lock:
            if group.pid != os.getpid():  # a forked child: whatever the parent's threads were doing is not ours
                group.queue, group.leading, group.pid = [], False, os.getpid()
            group.queue.append(job)
            job.leads = not group.leading
            group.leading = True
        while not job.finished:
            if job.leads:
                self._commit_group(group)
            else:
                job.event.wait()
                job.event.clear()
        if job.error is not None:
            raise job.error
        return job.result

    def _commit_group(self, group: _Group) -> None:
        """Commit every write queued now in one transaction, then hand the lead to a write queued meanwhile."""
        with group.lock:
            batch, group.queue = group.queue, []
        try:
            self._commit_batch(batch)
        except Exception as error:  # noqa: BLE001 - whatever it was, no write of the batch is acknowledged
            for job in batch:
                if job.error is None:
                    job.error, job.result = StorageUnavailable(f"the local store cannot commit ({error})"), None
        finally:
            with group.lock:
                following = group.queue[0] if group.queue else None
                group.leading = following is not None
                if following is not None:
                    following.leads = True
            for job in batch:
                job.finished = True
                job.event.set()
            if following is not None:
                following.event.set()

    def _commit_batch(self, batch: list[_Job]) -> None:
        """Run `batch` in one transaction, a savepoint each.

        Each job gets its result once it is committed, or its error. A job that fails is undone alone; should SQLite
        have rolled back the whole transaction with it (a full disk, an I/O error), the jobs before it run again in
        a new one."""

        db = self._db()
        waiting = batch
        while waiting:
            self._local.counted = None
            try:
                _begin(db)
            except sqlite3.Error as error:
                for job in waiting:
                    job.error = _unavailable(error)
                return
            applied: list[_Job] = []
            again: list[_Job] = []
            alone = len(waiting) == 1  # no savepoint needed: a failure rolls back the transaction, its own
            for index, job in enumerate(waiting):
                try:
                    if not alone:
                        db.execute("SAVEPOINT grouped")
                    job.result = job.work(db)
                    if not alone:
                        db.execute("RELEASE grouped")
                    applied.append(job)
                except Exception as error:  # noqa: BLE001 - the job's own failure, raised in its own thread
                    job.error = _unavailable(error) if isinstance(error, sqlite3.Error) else error
                    if alone:
                        break
                    if not self._undone(db):  # the transaction is gone, or cannot be trusted: the others again
                        again, applied = applied + waiting[index + 1 :], []
                        break
            if applied:
                try:
                    db.execute("COMMIT")
                except sqlite3.Error as error:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    for job in applied:
                        job.error, job.result = _unavailable(error), None
                else:
                    if getattr(self._local, "freed", False):
                        with contextlib.suppress(sqlite3.Error):  # only space is at stake, as in `_write`
                            self._shrink(db)
            elif db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            self._local.freed = False
            waiting = again

    @staticmethod
    def _undone(db: sqlite3.Connection) -> bool:
        """Undo the failed job's savepoint; False when the transaction is gone (SQLite rolled it back) or broken."""
        if not db.in_transaction:
            return False
        try:
            db.execute("ROLLBACK TO grouped")
            db.execute("RELEASE grouped")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            return False
        return True

    def _save_in(self, db: sqlite3.Connection, draft: Draft, now: int, ttl_ms: int, proposal: int,
                 when_full: WhenFull | None, event: Event | None) -> int:
        """The save itself, with its event, inside a write transaction on `db`."""
        self._purge_expired(db, now)
        timestamp, origin = draft.timestamp, Origin.CLIENT
        if timestamp is None:
            for earlier, body in db.execute("SELECT timestamp, body FROM sessions WHERE save_id = ? AND owner = ?",
                                            (draft.save_id, self.owner)):
                if body == draft.render(earlier):  # this very save was applied before (a retried import)
                    return earlier
            last = db.execute("SELECT last_assigned FROM state").fetchone()[0]
            taken = "SELECT 1 FROM sessions WHERE owner = ? AND timestamp = ?"
            timestamp, clock = choose(proposal, last,
                                      lambda ts: bool(db.execute(taken, (self.owner, ts)).fetchone()), now,
                                      f"The local store's last assigned timestamp ({self.path})")
            db.execute("UPDATE state SET last_assigned = ?", (clock,))
            origin = Origin.SERVICE
        body = draft.render(timestamp)
        self._make_room(db, timestamp, len(body), when_full)
        db.execute(UPSERT, (self.owner, timestamp, body, draft.summary, expiry(now, ttl_ms), origin.value,
                            draft.save_id, *Facets.of(orjson.loads(draft.summary)), now))
        self._record(db, event, timestamp)
        return timestamp

    def pin(self, timestamp: int, pinned: bool, *, now: int, ttl_ms: int, event: Event | None = None) -> bool:
        with self._write() as db:
            changed = db.execute("UPDATE sessions SET expires_at = CASE WHEN pinned = ?1 THEN expires_at ELSE ?2 END, "
                                 "pinned = ?1 WHERE owner = ?5 AND timestamp = ?3 AND expires_at > ?4",
                                 (int(pinned), NEVER if pinned else expiry(now, ttl_ms), timestamp, now, self.owner))
            return self._record(db, event, timestamp, changed.rowcount > 0)

    def _make_room(self, db: sqlite3.Connection, timestamp: int, size: int, when_full: WhenFull | None) -> None:
        """Evict the oldest unpinned sessions as `Limits.victims` says.

        Only the saving user's own, never the one being replaced: one person's saves never evict another's
        sessions (docs/decisions.md, "People")."""
        held = db.execute("SELECT sessions, bytes FROM state").fetchone()
        old = db.execute("SELECT length(body) FROM sessions WHERE owner = ? AND timestamp = ?",
                         (self.owner, timestamp)).fetchone()
        others = db.execute("SELECT timestamp, length(body) FROM sessions WHERE owner = ? AND timestamp != ? "
                            "AND NOT pinned ORDER BY timestamp", (self.owner, timestamp))
        victims = self.limits.victims(held=held, size=size, replaced=old[0] if old else None, oldest=others,
                                      when_full=when_full)
        if victims:
            db.executemany("DELETE FROM sessions WHERE owner = ? AND timestamp = ?",
                           [(self.owner, victim) for victim in victims])
            self._reclaim()

    def _purge_expired(self, db: sqlite3.Connection, now: int) -> None:
        if db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount:
            self._reclaim()

    def _reclaim(self) -> None:
        """Note that pages were freed: after the commit, `_shrink` may hand some back."""
        self._local.freed = True

    def _shrink(self, db: sqlite3.Connection) -> None:
        """Return free pages to the file system.

        Once free pages pass a quarter of the file and 16 MiB, hand 4 MiB of them back to the file system (a
        bounded step, so no save waits long behind it); under steady churn the next saves reuse them instead.
        Runs after the commit: Python's sqlite3 steps a pragma once, so the vacuum runs as its own script."""
        self._local.freed = False
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        if free >= RECLAIM_PAGES and free * RECLAIM_SHARE >= db.execute("PRAGMA page_count").fetchone()[0]:
            db.executescript(f"PRAGMA incremental_vacuum({RECLAIM_STEP})")

    def delete(self, timestamp: int, *, event: Event | None = None) -> bool:
        with self._write() as db:
            deleted = db.execute("DELETE FROM sessions WHERE owner = ? AND timestamp = ?",
                                 (self.owner, timestamp)).rowcount > 0
            if deleted:
                self._reclaim()
            return self._record(db, event, timestamp, deleted)

    # -- share links and the activity log

    def _record(self, db: sqlite3.Connection, event: Event | None, timestamp: int | None = None,
                done: bool = True) -> bool:
        """Record `event` in the transaction of the change it records, when that change was `done`; returns `done`.

        Without Redis the log keeps `keep` (its age and size, pruned here); with Redis it is what waits to be
        written back, all of it."""
        if event is not None and done:
            db.execute("INSERT OR IGNORE INTO activity VALUES (?, ?, ?, ?)",
                       (self.owner, event.at, event.id, event.render(timestamp)))
            if self.keep is not None and self.keep.due():
                beyond = db.execute("SELECT at FROM activity WHERE owner = ? ORDER BY at DESC LIMIT 1 OFFSET ?",
                                    (self.owner, self.keep.most)).fetchone()
                db.execute("DELETE FROM activity WHERE owner = ? AND at < ?",
                           (self.owner, max(event.at - self.keep.ms, beyond[0] + 1 if beyond else 0)))
        return done

    def add_share(self, share: Share, event: Event) -> None:
        with self._write() as db:
            db.execute("INSERT INTO shares (owner, id, token_sha, record, opened) VALUES (?, ?, ?, ?, ?)",
                       (self.owner, share.id, share.token_sha, share.record(), share.opened))
            self._record(db, event, share.timestamp)

    def shares(self) -> list[Share]:
        return [Share.of(record, opened) for record, opened in
                self._read("SELECT record, opened FROM shares WHERE owner = ?", (self.owner,))]

    def find_share(self, token_sha: str) -> Share | None:
        rows = self._read("SELECT record, opened FROM shares WHERE owner = ? AND token_sha = ?",
                          (self.owner, token_sha))
        return Share.of(*rows[0]) if rows else None

    def revoke_share(self, share_id: str, event: Event) -> bool:
        with self._write() as db:
            rows = db.execute("SELECT record FROM shares WHERE owner = ? AND id = ?", (self.owner, share_id)).fetchall()
            if not rows:
                return False
            share = Share.of(rows[0][0])
            if not share.revoked:
                db.execute("UPDATE shares SET record = ? WHERE owner = ? AND id = ?",
                           (replace(share, revoked=True).record(), self.owner, share_id))
                self._record(db, event, share.timestamp)
            return True

    def share_opened(self, share: Share, event: Event) -> None:
        with self._write() as db:
            if not db.execute("UPDATE shares SET opened = opened + 1 WHERE owner = ? AND id = ?",
                              (self.owner, share.id)).rowcount:  # a share only Redis holds: counted apart
                db.execute("INSERT INTO share_opens VALUES (?, ?, 1, ?) ON CONFLICT (owner, id) DO UPDATE "
                           "SET opened = opened + 1", (self.owner, share.id, secrets.token_hex(8)))
            self._record(db, event, share.timestamp)

    def events(self, before: int, limit: int) -> list[bytes]:
        return [event for (event,) in self._read("SELECT event FROM activity WHERE owner = ? AND at < ? "
                                                  "ORDER BY at DESC, id DESC LIMIT ?", (self.owner, before, limit))]

    def pending_people(self) -> Pending:
        return Pending([Share.of(record, opened) for record, opened in self._read("SELECT record, opened FROM shares")],
                       self._read("SELECT owner, id, opened, batch FROM share_opens"),
                       self._read("SELECT owner, at, id, event FROM activity ORDER BY at"))

    def settle(self, pending: Pending) -> None:
        with self._write() as db:
            db.executemany("DELETE FROM shares WHERE owner = ? AND id = ?",
                           [(share.owner, share.id) for share in pending.shares])
            db.executemany("DELETE FROM share_opens WHERE owner = ? AND id = ?",
                           [(owner, share_id) for owner, share_id, _, _ in pending.opens])
            db.executemany("DELETE FROM activity WHERE owner = ? AND at = ? AND id = ?",
                           [(owner, at, event_id) for owner, at, event_id, _ in pending.events])

    # -- reads

    def get(self, timestamp: int) -> Stored | None:
        rows = self._read("SELECT body, summary, pinned FROM sessions WHERE owner = ? AND timestamp = ? "
                          "AND +expires_at > ?", (self.owner, timestamp, now_ms()))
        return self._stored(timestamp, *rows[0]) if rows else None

    def _stored(self, timestamp: int, value: bytes, summary: bytes, pinned: int) -> Stored:
        return Stored(timestamp, value, self.storage, summary, bool(pinned))

    def exists(self, timestamp: int) -> bool:
        return bool(self._read("SELECT 1 FROM sessions WHERE owner = ? AND timestamp = ? AND +expires_at > ?",
                               (self.owner, timestamp, now_ms())))

    def expiry_of(self, timestamp: int) -> int | None:
        rows = self._read("SELECT expires_at FROM sessions WHERE owner = ? AND timestamp = ? AND +expires_at > ?",
                          (self.owner, timestamp, now_ms()))
        return rows[0][0] if rows else None

    def latest(self) -> Stored | None:
        rows = self._read("SELECT timestamp, body, summary, pinned FROM sessions WHERE owner = ? AND +expires_at > ? "
                          "ORDER BY timestamp DESC LIMIT 1", (self.owner, now_ms()))
        return self._stored(*rows[0]) if rows else None

    def _matching(self, query: Query) -> tuple[int, list[int]]:
        """(how many match, the page's timestamps newest first), from the covering indexes."""
        where, params = "owner = ? AND timestamp BETWEEN ? AND ? AND +expires_at > ?", \
            [self.owner, query.low, query.high, now_ms()]
        for column, value in (("story_uuid", query.story_uuid), ("episode", query.episode)):
            if value is not None:
                where += f" AND {column} = ?"
                params.append(value)
        if query.text is not None:
            where += " AND instr(title, ?) > 0"
            params.append(query.text.casefold())
        total = self._read(f"SELECT count(*) FROM sessions WHERE {where}", tuple(params))[0][0]
        stamps = self._read(f"SELECT timestamp FROM sessions WHERE {where} ORDER BY timestamp DESC LIMIT ? OFFSET ?",
                            (*params, query.limit, query.offset))
        return total, [ts for (ts,) in stamps]

    def timestamps(self, query: Query) -> tuple[int, list[int]]:
        return self._matching(query.widened())

    def rows(self, timestamps: list[int], summaries: bool = False) -> list[Stored]:
        found: dict[int, Stored] = {}
        column = "summary" if summaries else "body"
        for start in range(0, len(timestamps), 500):
            batch = timestamps[start : start + 500]
            marks = ",".join("?" * len(batch))
            for ts, *row in self._read(f"SELECT timestamp, {column}, summary, pinned FROM sessions "
                                       f"WHERE owner = ? AND timestamp IN ({marks}) AND +expires_at > ?",
                                       (self.owner, *batch, now_ms())):
                found[ts] = self._stored(ts, *row)
        return [found[ts] for ts in timestamps if ts in found]

    def oldest(self) -> Record | None:
        rows = self._read("SELECT timestamp, body, summary, expires_at, origin, save_id, pinned, acked, owner "
                          "FROM sessions ORDER BY timestamp LIMIT 1")
        if not rows:
            return None
        timestamp, body, summary, expires_at, origin, save_id, pinned, acked, owner = rows[0]
        return Record(timestamp, body, summary, expires_at, Origin(origin), save_id, bool(pinned), acked, owner)

    def count(self) -> tuple[int, int]:
        """(sessions, bytes) held, read again only when a commit changed the file since this thread last read them.

        Storage asks it on every request with Redis (is anything pending?): `PRAGMA data_version` changes with every
        commit of another connection (other threads', other processes'), and this thread's own commits drop its copy,
        so the answer is always current, at half the cost of the query (a read of the shared WAL index)."""
        db = self._db()
        if db.in_transaction:  # the copy does not know this transaction's own changes
            return self._counted()
        try:
            version = _patiently(lambda: db.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as error:
            raise _unavailable(error) from error
        known = getattr(self._local, "counted", None)
        if known is None or known[0] != version:
            known = self._local.counted = (version, self._counted())
        return known[1]

    def _counted(self) -> tuple[int, int]:
        sessions, nbytes = self._read("SELECT sessions, bytes FROM state")[0]
        return sessions, nbytes

    def close(self) -> None:
        self._pool.close()
        self._local = threading.local()


class _Job:
    """One write waiting in a group commit (`SqliteStore._grouped`), and what became of it."""

    __slots__ = ("work", "event", "leads", "finished", "result", "error")

    def __init__(self, work: Callable[[sqlite3.Connection], int]) -> None:
        self.work = work
        self.event = threading.Event()
        self.leads = False  # this job's thread commits the next batch
        self.finished = False  # its batch is over: `result` is committed, or `error` says why not
        self.result: int | None = None
        self.error: Exception | None = None


class _Group:
    """The group commit of one process: the writes queued for the next batch, and whether a thread leads one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: list[_Job] = []
        self.leading = False
        self.pid = os.getpid()


class _Lease:
    """A pooled connection lent to one thread.

    A connection lent to one thread; when the thread ends its thread-local values are dropped, and the
    finalizer hands the connection back to the pool."""

    __slots__ = ("db", "pid", "__weakref__")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.pid = db, os.getpid()


class _Pool:
    """The SQLite connection pool of one process.

    The connections of one process: lent to threads, kept idle (up to `IDLE_CONNECTIONS`) between them,
    and all closed by `close()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._open: set[sqlite3.Connection] = set()
        self._pid = os.getpid()

    def lease(self, connect: Callable[[], sqlite3.Connection]) -> _Lease:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's connections are not ours to use or close
                self._idle, self._open, self._pid = [], set(), os.getpid()
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = connect()
            with self._lock:
                self._open.add(db)
        lease = _Lease(db)
        weakref.finalize(lease, self._give_back, db, lease.pid)
        return lease

    def _give_back(self, db: sqlite3.Connection, pid: int) -> None:
        """Runs when a thread that held `db` has ended: keep it for the next thread, or close it."""
        with self._lock:
            if pid != self._pid or db not in self._open:  # another process's, or closed by `close()` already
                return
            if not db.in_transaction and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(db)
                return
            self._open.discard(db)
        with contextlib.suppress(sqlite3.Error):
            db.close()

    def close(self) -> None:
        with self._lock:
            connections, self._open, self._idle = self._open, set(), []
        for db in connections:
            with contextlib.suppress(sqlite3.Error):
                db.close()


def _busy(error: sqlite3.Error) -> bool:
    return "locked" in str(error) or "busy" in str(error)


def _patiently(step: Callable[[], T]) -> T:
    """Run a step, retrying while SQLite is busy.

    `step()`, asked again every `LOCK_POLL_S` while SQLite says another connection is busy, for up to
    `BUSY_TIMEOUT_S`."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return step()
        except sqlite3.OperationalError as error:
            if not _busy(error) or time.monotonic() > deadline:
                raise
            time.sleep(LOCK_POLL_S)


def _begin(db: sqlite3.Connection) -> None:
    """`BEGIN IMMEDIATE`: take the write lock, patiently."""
    _patiently(lambda: db.execute("BEGIN IMMEDIATE"))


def _unavailable(error: sqlite3.Error) -> StorageUnavailable:
    message = str(error)
    if _busy(error):
        return StorageUnavailable("the local store is busy (another process holds it too long)")
    return StorageUnavailable(f"the local store cannot commit ({message})")


def _check_usable(path: Path) -> None:
    """`ConfigError` naming the path when the store cannot live there."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"LOCAL_STORE_PATH: cannot create the folder {folder}: {error.strerror}") from None
    if path.is_dir():
        raise ConfigError(f"LOCAL_STORE_PATH: {path} is a directory; name a file in it instead")
    if not folder.is_dir():
        raise ConfigError(f"LOCAL_STORE_PATH: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.R_OK | os.W_OK)):
        raise ConfigError(f"LOCAL_STORE_PATH: {path} is not writable by this user")


def _move_aside(path: Path) -> Path:
    """Rename the file (and its WAL and shared-memory files) to `<name>.corrupt-<UTC time>`."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm", "-clock"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            source.rename(f"{aside}{suffix}")
    return aside
