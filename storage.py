"""Session storage: Redis first, then the service's own local store; the browser's `localStorage` is the last link.

`SessionStorage` is what the HTTP layer, the CLI and the server hooks talk to (and nothing below it): it saves to
Redis, falls back to the local store when Redis fails or refuses writes, reads the union of both (a pending local
copy wins), and a background thread in every process writes pending sessions back to Redis, each exactly once,
when Redis answers again. `build_storage` is the one factory that picks the backends (`stores/`) a `Config`
describes. The vocabulary callers need is re-exported here from `stores.base`. How timestamps are chosen:
`allocator.py`. The promises behind all of this are written down in `docs/contract.md`.
"""

from __future__ import annotations

import copy
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, NamedTuple, TypeVar

import orjson
import redis

from allocator import ONE_HOST, Allocator, Slot, now_ms
from config import Config, ConfigError
from payload import Draft, content_hash, head_of, summarize
from stores import memory, sqlite
from stores.base import (
    DEFAULT_OWNER,
    EVERY,
    INDEX_KEY,
    LOCAL,
    Event,
    Keep,
    Keys,
    Limits,
    Listing,
    LocalStore,
    Moved,
    NotASession,
    Outcome,
    Query,
    Record,
    SessionStore,
    Share,
    StorageBusy,
    StorageFull,
    StorageUnavailable,
    Stored,
    WhenFull,
    session_key,
)
from stores.redis import Adopted, RedisFacts, RedisStore

__all__ = ["DEFAULT_OWNER", "EVERY", "INDEX_KEY", "LOCAL", "Event", "NotASession", "Query", "RedisState",
           "SessionStorage", "Share", "StorageFull", "StorageUnavailable", "Stored", "WhenFull", "build_storage",
           "check_start_up", "session_key"]

log = logging.getLogger(__name__)

MOVE_PAUSE_S = 0.002
ROWS_PER_READ = 4  # summaries read from a store at once while a list is sent
# Whole sessions are read one at a time: an answer its client reads slowly (or not at all, until
# RESPONSE_SEND_TIMEOUT) then holds one session's bytes while it waits, not four (200 such answers: 1.0 GB, not 1.5).
BODIES_PER_READ = 1
REINDEX_CHECK_S = 10.0
T = TypeVar("T")

# --------------------------------------------------------------------------------------------- failover


class LocalReport(NamedTuple):
    """The local store as /health and the start-up line show it."""

    kind: str  # "sqlite" or "memory"
    location: str | None  # its file
    sessions: int | None  # None when the store cannot be asked now
    bytes: int | None


class RedisState(enum.Enum):
    NOT_CONFIGURED = "not configured"
    CONNECTED = "connected"
    READ_ONLY = "refusing writes"  # it answers, but refuses writes (a replica, maxmemory): reads still use it
    DOWN = "disconnected"


class _Link:
    """The state of the Redis link, shared by a storage and every user's view of it (`SessionStorage.space`)."""

    def __init__(self, state: RedisState) -> None:
        self.state = state
        self.lock = threading.Lock()
        self.spaces: dict[str, SessionStorage] = {}


class SessionStorage:
    """Redis first, the local store when Redis is absent, failing or refusing writes; reads see both.

    The storage the factory builds is the default user's; `space(owner)` is the same storage as another user
    sees it (docs/contract.md §6)."""

    def __init__(self, local: LocalStore, redis_store: RedisStore | None, ttl_seconds: int,
                 retry_interval: float, *, allow_eviction: bool = False, slot: Slot = ONE_HOST) -> None:
        self.local = local
        self.redis = redis_store
        self.ttl_ms = ttl_seconds * 1000
        self.retry_interval = retry_interval
        self.allocator = Allocator(local.clock_path, slot)
        self.owner = DEFAULT_OWNER
        self._link = _Link(RedisState.CONNECTED if redis_store is not None else RedisState.NOT_CONFIGURED)
        self._stopping = threading.Event()
        self._reported: set[int] = set()  # timestamps of records that are not sessions, logged once
        self._index_checked = -REINDEX_CHECK_S
        self._reconcile_error: str | None = None  # what Redis answered the last reconcile round, logged once
        self.allow_eviction = allow_eviction  # an eviction policy only warns (REDIS_ALLOW_EVICTION)
        self.redis_warnings: list[str] = []  # what is wrong with the configured Redis, for /health
        self._inspected = False
        self._worker: threading.Thread | None = None
        if redis_store is not None:
            self._worker = threading.Thread(target=self._recover_loop, name="storyart-write-back", daemon=True)
            self._worker.start()

    def space(self, owner: str) -> SessionStorage:
        """This storage in one user's space.

        The same stores, Redis link, failover and background thread, every operation on `owner`'s sessions only:
        another user's timestamps are sessions that do not exist."""
        if owner == self.owner:
            return self
        view = self._link.spaces.get(owner)  # made once per user and process: no lock on the way of a request
        if view is not None:
            return view
        with self._link.lock:
            view = self._link.spaces.get(owner)
            if view is None:
                view = copy.copy(self)
                view.owner, view.local, view._reported = owner, self.local.scoped(owner), set()
                view.redis = self.redis.scoped(owner) if self.redis is not None else None
                self._link.spaces[owner] = view
        return view

    @property
    def keys(self) -> Keys:
        """This space's Redis key names (the default user's: the public layout)."""
        return Keys.of(self.owner)

    # -- state

    @property
    def redis_state(self) -> RedisState:
        return self._link.state

    @property
    def saves_go_to(self) -> str:
        return "redis" if self._link.state is RedisState.CONNECTED else LOCAL

    def _redis_failed(self, error: redis.RedisError) -> None:
        """Mark Redis as failed.

        Skip Redis until the background thread finds it again. An error Redis answered with (READONLY,
        OOM, too few replicas) only stops saves: what it holds stays readable, also when it was down before
        (a new master that has no replica yet)."""
        state = RedisState.READ_ONLY if isinstance(error, redis.ResponseError) else RedisState.DOWN
        with self._link.lock:
            if self._link.state is RedisState.CONNECTED:
                log.error("Redis unavailable (%s: %s); saving to the local %s store and retrying every %gs",
                          type(error).__name__, error, self.local.kind, self.retry_interval)
            elif self._link.state is RedisState.DOWN and state is RedisState.READ_ONLY:
                log.warning("Redis answers again, but takes no saves yet (%s: %s)", type(error).__name__, error)
            if self._link.state is not RedisState.DOWN or state is RedisState.READ_ONLY:
                self._link.state = state

    @property
    def warnings(self) -> list[str]:
        """What /health warns about: the configured Redis's problems, and saves that no replica confirms now."""
        unreplicated = self.redis.unreplicated if self.redis is not None else None
        return self.redis_warnings + ([f"Redis: saves are not replicated ({unreplicated}): a failover now would "
                                       "lose the sessions saved meanwhile"] if unreplicated else [])

    # -- what callers above ask of the parts (they never reach past this class)

    @property
    def redis_configured(self) -> bool:
        return self.redis is not None

    @property
    def redis_master(self) -> str | None:
        """The `host:port` saves go to (with Sentinel, the master it named last); None without Redis."""
        return self.redis.master if self.redis is not None else None

    @property
    def replicated(self) -> bool | None:
        """With `REDIS_WAIT_REPLICAS`, whether saves reach that many replicas now; None when none are asked for."""
        if self.redis is None or not self.redis.replication.replicas:
            return None
        return self.redis.unreplicated is None and self._link.state is RedisState.CONNECTED

    @property
    def in_this_process_only(self) -> bool:
        """Whether sessions are visible to this process only.

        Whether the sessions live only in this process (the memory store without Redis): another process,
        such as a CLI command, would see none of them."""
        return self.redis is None and self.local.kind == "memory"

    def local_report(self) -> LocalReport:
        try:
            held, held_bytes = self.local.count()
        except StorageUnavailable:
            held = held_bytes = None
        return LocalReport(self.local.kind, self.local.location, held, held_bytes)

    def reindex(self) -> Adopted | None:
        """Rebuild the Redis index from the session keys.

        Index every session key Redis holds (SCAN, in batches; safe while the service runs); None without
        Redis (the local store keeps its own index). Raises `redis.RedisError` when Redis cannot be reached."""
        return self.redis.reindex() if self.redis is not None else None

    def claim(self, lease_key: str, cursor_key: str, owner: str, lease_ms: int, due: int) -> bool | None:
        """Claim a due time among every host sharing the Redis (the backup schedule's lease).

        True when `owner` took it, False when another process had; None when there is no Redis or it cannot be
        asked now."""
        return self.shared(lambda _: self.redis.claim(lease_key, cursor_key, owner, lease_ms, due))

    def shared(self, call: Callable[[redis.Redis], T]) -> T | None:
        """Run a call on the shared Redis, if it can be asked now.

        `call` on the Redis every host shares, for what hosts coordinate beyond sessions (the backup schedule's
        claims and record); None when there is no Redis or it cannot be asked now, and the caller goes on with
        what this host knows."""
        if self.redis is None or self._link.state is RedisState.DOWN:
            return None
        try:
            return call(self.redis.client)
        except redis.RedisError:
            return None

    def _readable(self) -> bool:
        return self.redis is not None and self._link.state is not RedisState.DOWN

    # -- operations

    def save(self, draft: Draft, *, when_full: WhenFull | None = None, event: Event | None = None) -> tuple[int, str]:
        """Save a session to the first store that commits it.

        Store and return (timestamp, where). Raises `StorageUnavailable` (or `StorageFull`) when no store
        could commit it: then nothing was acknowledged. An import or a restore passes `WhenFull.REFUSE`: what
        it was asked to keep never makes room by evicting other sessions."""
        now = now_ms()
        proposal = self.allocator.propose(now) if draft.timestamp is None else now
        if self.redis is not None and self._link.state is RedisState.CONNECTED:
            try:
                timestamp = self.redis.save(draft, now=now, ttl_ms=self.ttl_ms, proposal=proposal, event=event)
            except redis.RedisError as error:
                self._redis_failed(error)
            else:
                if draft.timestamp is None:
                    self.allocator.observe(timestamp)
                if draft.timestamp is not None and self._pending() and self.local.exists(timestamp):
                    with self.local.exclusive():  # an older pending copy must not be written back over it
                        self.local.delete(timestamp)
                return timestamp, "redis"
        timestamp = self.local.save(draft, now=now, ttl_ms=self.ttl_ms, proposal=proposal, when_full=when_full,
                                    event=event)
        if draft.timestamp is None:
            self.allocator.observe(timestamp)
        return timestamp, LOCAL

    def _pending(self) -> bool:
        """Whether the local store may hold a session a read must see: always without Redis (it is the store).

        With Redis it holds only pending sessions, usually none: its count, kept current across every thread and
        process sharing it (`stores.sqlite.SqliteStore.count`), spares each read a query of the local store."""
        return self.redis is None or self.local.count()[0] > 0

    def _from_redis(self, call: Callable[[RedisStore], T]) -> T | None:
        """Run a call on Redis, or return None when Redis is unavailable.

        `call(redis)`, or None when Redis is absent, known to be down, or fails now. `StorageBusy` (no free
        connection) is raised, not taken for a Redis that fails."""
        if not self._readable():
            return None
        try:
            return call(self.redis)
        except redis.RedisError as error:
            self._redis_failed(error)
            return None

    def _first(self, read: Callable[[SessionStore], T | None], *, ask_local: bool = True) -> T | None:
        """What `read` finds in the local store (when `ask_local`), else in Redis.

        A pending local copy wins. Raises `StorageUnavailable` rather than answer None for what an unreachable
        Redis may hold."""
        found = read(self.local) if ask_local else None
        if found is None and self.redis is not None:
            found = self._from_redis(read)
            if found is None and not self._readable():
                raise self._unreadable()
        return found

    def _unreadable(self) -> StorageUnavailable:
        return StorageUnavailable("Redis is unreachable, and the session may be there")

    def get(self, timestamp: int) -> Stored | None:
        """Read one session, the local store first.

        A pending local copy first (it was acknowledged after any copy in Redis this host saw; one another
        host saved since is sorted out by the write-back), then Redis. Raises
        `StorageUnavailable` rather than answer "not found" for a session an unreachable Redis may hold, and
        `NotASession` for a record that is not one."""
        found = self._first(lambda store: store.get(timestamp), ask_local=self._pending())
        if found is None:
            return None
        checked = self._checked(found)
        if checked is None:
            raise NotASession(f"The record stored under {timestamp} is not a session (not a JSON object).")
        return checked

    def expiry_of(self, timestamp: int) -> int | None:
        """When a session expires (`NEVER`: it does not), the local store first; None when there is none.

        Raises `StorageUnavailable` when only an unreachable Redis could say."""
        return self._first(lambda store: store.expiry_of(timestamp), ask_local=self._pending())

    def usage(self) -> tuple[int, int]:
        """(sessions, bytes) this space holds, from the sessions' summaries: what its quotas count.

        While Redis is away, what the local store holds: a save then counts against what can be counted rather
        than wait for Redis (docs/decisions.md, "Quotas")."""
        listing = self.listing(Query(limit=EVERY), summaries=True)
        size = sum(orjson.loads(row.body).get("sizeBytes", 0) for row in listing.rows)
        return listing.total, size

    def held(self, timestamps: list[int]) -> tuple[set[int], bool]:
        """Tell which timestamps hold a session in either store.

        (which of `timestamps` hold a session in either store, whether a configured Redis was asked). The local
        store is asked first: a session the write-back moves meanwhile is in Redis by the time Redis is asked."""
        held = {ts for ts in timestamps if self.local.exists(ts)}
        if self.redis is None:
            return held, True
        remote = self._from_redis(lambda r: r.existing([ts for ts in timestamps if ts not in held]))
        return held | (remote or set()), remote is not None

    def latest(self) -> tuple[Stored | None, bool]:
        """(the newest session of both stores, whether an unreachable Redis may hold a newer one)."""
        local = self.local.latest() if self._pending() else None
        remote = self._from_redis(lambda r: r.latest()) if self.redis is not None else None
        if remote is None and self._readable() and self._index_lost():
            remote = self._from_redis(lambda r: r.latest())
        partial = self.redis is not None and not self._readable()
        found = [s for s in (local, remote) if s is not None]
        if not found and partial:
            raise self._unreadable()
        newest = max(found, key=lambda s: (s.timestamp, s.storage == LOCAL)) if found else None
        checked = self._checked(newest) if newest is not None else None
        if newest is not None and checked is None:  # not a session: the newest one that is
            listing = self.listing(Query(limit=EVERY))
            checked, partial = next(listing.rows, None), partial or listing.partial
        return checked, partial

    def _index_lost(self) -> bool:
        """Whether Redis lost its index and needs a rebuild.

        Whether Redis has sessions but lost its index, then rebuilt; asked at most every `REINDEX_CHECK_S`
        (an empty Redis, the usual case on a new install, costs one SCAN step that often)."""
        now = time.monotonic()
        if now < self._index_checked + REINDEX_CHECK_S:
            return False
        self._index_checked = now
        if not self._from_redis(lambda r: r.index_lost()):
            return False
        adopted = self._from_redis(lambda r: r.reindex())
        if adopted is None:
            return False
        log.warning("the Redis index %s was empty while sessions existed: rebuilt it with %s session(s)",
                    INDEX_KEY, adopted.sessions)
        return bool(adopted.sessions)

    def listing(self, query: Query, summaries: bool = False) -> Listing:
        """List sessions newest first across both stores.

        Sessions (or their summaries) newest first. The matching timestamps are found first (merged by
        timestamp while sessions are pending, a copy in both stores counted once, the local one winning);
        then the rows are read in batches (`ROWS_PER_READ`, `BODIES_PER_READ`) as the caller iterates."""
        local_total, local_stamps = self.local.timestamps(query)
        remote = None
        if self.redis is not None and (self._readable() or not local_total):
            remote = self._from_redis(lambda r: r.timestamps(query))
            if remote is not None and not remote[0] and self._index_lost():
                remote = self._from_redis(lambda r: r.timestamps(query))
        listing = Listing(local_total, iter(()), partial=self.redis is not None and remote is None)
        if remote is None:
            page, local_set = local_stamps[query.offset : query.offset + query.limit], set(local_stamps)
        else:
            remote_total, remote_stamps = remote
            local_set = set(local_stamps)
            listing.total = local_total + remote_total - len(local_set.intersection(remote_stamps))
            merged = sorted(local_set.union(remote_stamps), reverse=True)
            page = merged[query.offset : query.offset + query.limit]
        listing.rows = self._rows(page, local_set, summaries, listing)
        return listing

    def _rows(self, page: list[int], local: set[int], summaries: bool, listing: Listing) -> Iterator[Stored]:
        """Read one page's sessions in batches.

        `page`'s sessions, read a batch at a time. A session listed in the local store may have been written
        back since the list was made: the write-back removes it there only once Redis holds it, so what the local
        store no longer has is asked of Redis. Every listed session is then read, skipped (not a session), gone
        (deleted or expired meanwhile: no store holds it) or `missed` (a store holds it, yet it could not be
        read: the list says it is partial, and a backup refuses)."""
        size = ROWS_PER_READ if summaries else BODIES_PER_READ
        for start in range(0, len(page), size):
            batch = page[start : start + size]
            found = {row.timestamp: row for row in self.local.rows([ts for ts in batch if ts in local], summaries)}
            wanted = [ts for ts in batch if ts not in found]
            if wanted and self.redis is not None:
                try:
                    rows = self._from_redis(lambda r, stamps=wanted: r.rows(stamps, summaries))
                except StorageBusy:  # the answer has begun: it ends here, saying it is incomplete
                    rows = None
                if rows is None:
                    listing.partial = True
                    if not local.issuperset(wanted):  # the rest of what Redis holds cannot be read either
                        return
                found.update((row.timestamp, row) for row in rows or ())
            lost = [ts for ts in wanted if ts not in found]
            if lost:
                held, asked = self.held(lost)
                listing.missed += len(held)
                listing.partial = listing.partial or bool(held) or not asked
            for ts in batch:
                row = found.get(ts)
                checked = row if row is None or summaries else self._checked(row)
                if row is not None and checked is None:
                    listing.skipped += 1
                elif checked is not None:
                    yield checked

    def _checked(self, found: Stored) -> Stored | None:
        """Return a session row if its bytes are valid, checking them when needed.

        `found` if its bytes are the ones this service recorded (their hash is the summary's), else checked
        now: a JSON object gets a fresh summary (stored for next time); anything else is not a session (None,
        logged once per process)."""
        hashed = head_of(found.body, found.timestamp)
        if found.summary and orjson.loads(found.summary).get("etag") == content_hash(hashed):
            return found
        try:
            session = orjson.loads(found.body)
        except orjson.JSONDecodeError:
            session = None
        if not isinstance(session, dict):
            if found.timestamp not in self._reported:
                self._reported.add(found.timestamp)
                log.warning("the record under %s is not a session (not a JSON object); it is skipped",
                            self.keys.session_key(found.timestamp))
            return None
        summary = summarize(session, len(found.body), hashed)
        if found.storage == "redis":
            self._from_redis(lambda r: r.store_summary(found.timestamp, summary))
        return found._replace(summary=summary)

    def delete(self, timestamp: int, *, event: Event | None = None) -> bool:
        """Delete a session from every store, recording `event` with it.

        Delete everywhere, or not at all: with Redis configured but away, a copy there would come back. Redis
        keeps a tombstone of the delete, so a copy another host acknowledged before it and still holds is
        dropped when that host writes it back (`stores.redis.RedisStore.delete`)."""
        return self._everywhere("the session cannot be deleted", lambda store: store.delete(timestamp, event=event))

    def pin(self, timestamp: int, pinned: bool, *, event: Event | None = None) -> bool:
        """Pin or unpin a session in every store, recording `event` with it.

        Pin or unpin everywhere, or not at all (a copy left unchanged in Redis would undo it). A pending copy
        is written back with its pin; one that is not pinned leaves the pin Redis has. Raises `NotASession`,
        as `get` does, for a record another tool wrote that is not a session: it is not kept forever."""
        if pinned and self.get(timestamp) is None:
            return False
        now = now_ms()
        return self._everywhere(f"the session cannot be {'pinned' if pinned else 'unpinned'}",
                                lambda store: store.pin(timestamp, pinned, now=now, ttl_ms=self.ttl_ms, event=event))

    # -- share links and the activity log of this space (docs/contract.md §6)

    def _to_first(self, write: Callable[[SessionStore], None]) -> None:
        """Apply `write` to Redis while saves go there, else (or when it fails now) to the local store."""
        if self.redis is not None and self._link.state is RedisState.CONNECTED:
            try:
                return write(self.redis)
            except redis.RedisError as error:
                self._redis_failed(error)
        return write(self.local)

    def add_share(self, share: Share, event: Event) -> None:
        """Store a new share link, with its event, in the first store that takes it."""
        self._to_first(lambda store: store.add_share(share, event))

    def shares(self) -> tuple[list[Share], bool]:
        """(this space's shares, newest first; whether an unreachable Redis may hold more)."""
        found = {share.id: share for share in self.local.shares()}
        remote = self._from_redis(lambda r: r.shares()) if self.redis is not None else []
        for share in remote or ():
            held = found.get(share.id)
            found[share.id] = share if held is None else replace(held, opened=held.opened + share.opened)
        return sorted(found.values(), key=lambda share: share.created_at, reverse=True), remote is None

    def find_share(self, token_sha: str) -> Share | None:
        """The share of this space with this token's SHA-256 (revoked or expired too), or None.

        Raises `StorageUnavailable` when only an unreachable Redis could say."""
        return self._first(lambda store: store.find_share(token_sha))

    def revoke_share(self, share_id: str, event: Event) -> bool:
        """Revoke a share everywhere at once (or not at all: 503 while a configured Redis is away)."""
        return self._everywhere("the share cannot be revoked", lambda store: store.revoke_share(share_id, event))

    def share_opened(self, share: Share, event: Event) -> None:
        """Count an opening of a share with its event, in the first store that takes it."""
        self._to_first(lambda store: store.share_opened(share, event))

    def events(self, before: int, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """(this space's activity before `before`, newest first, at most `limit`; whether Redis was unreadable).

        A change made in both stores (a delete of a session pending here and held in Redis) recorded its event in
        both, under one id: it is listed once."""
        local = self.local.events(before, limit)
        remote = self._from_redis(lambda r: r.events(before, limit)) if self.redis is not None else []
        merged = {}
        for event in [*(remote or ()), *local]:
            parsed = orjson.loads(event)
            merged[parsed["id"]] = parsed
        return sorted(merged.values(), key=lambda e: (e["at"], e["id"]), reverse=True)[:limit], remote is None

    def _write_back_people(self) -> int:
        """Move the shares, share openings and activity a local store kept while Redis was away to Redis.

        In one step of the local store's write lock, as a session's move: each is applied once however often a
        move cut short is repeated (share and openings by their markers, events by their ids)."""
        with self.local.exclusive():
            pending = self.local.pending_people()
            if not pending:
                return 0
            for share in pending.shares:
                self.redis.scoped(share.owner).restore_share(share, f"share-{share.id}")
            for owner, share_id, count, batch in pending.opens:
                self.redis.scoped(owner).add_openings(share_id, count, f"opens-{batch}")
            by_owner: dict[str, list[tuple[int, bytes]]] = {}
            for owner, at, _, event in pending.events:
                by_owner.setdefault(owner, []).append((at, event))
            for owner, events in by_owner.items():
                self.redis.scoped(owner).add_events(events)
            self.local.settle(pending)
        return len(pending.shares) + len(pending.opens) + len(pending.events)

    def _everywhere(self, done: str, change: Callable[[SessionStore], bool]) -> bool:
        """Apply a change to both stores atomically.

        `change` applied to Redis and the local store, inside the local store's write lock (so a write-back
        of the same session cannot slip in between); True when either held the session. Raises
        `StorageUnavailable` when a configured Redis cannot be reached, before changing anything."""
        if self.redis is None:
            with self.local.exclusive():
                return change(self.local)
        unreachable = f"Redis is unreachable, so {done} everywhere"
        if self._link.state is RedisState.DOWN and self.check(when_down=True) is RedisState.DOWN:  # rare: ask now
            raise StorageUnavailable(unreachable)
        with self.local.exclusive():
            try:
                in_redis = change(self.redis)
            except redis.RedisError as error:
                self._redis_failed(error)
                raise StorageUnavailable(unreachable) from error
            return change(self.local) or in_redis

    def check(self, *, when_down: bool = False) -> RedisState:
        """Probe the health of the stores.

        Health probe: ping Redis, unless it is known to be down (no wait on a dead Redis) and `when_down` is
        not asked for; a Redis that answers again counts as connected at once (the background thread writes
        the pending sessions back)."""
        if self.redis is not None and (when_down or self._link.state is not RedisState.DOWN):
            try:
                self.redis.ping()
            except redis.RedisError as error:
                self._redis_failed(error)
            else:
                with self._link.lock:
                    if self._link.state is RedisState.DOWN:
                        self._link.state = RedisState.CONNECTED
        return self._link.state

    # -- recovery

    def write_back(self) -> int:
        """Move every pending session to Redis, oldest first; returns how many were moved.

        Each move runs inside the local store's write lock: the session is read, written to Redis (same
        timestamp, remaining TTL, index entry and summary) and removed, so whichever process gets there first
        moves it and the others find it gone. A process killed halfway leaves it pending; the next move writes
        the same bytes again, which changes nothing. An expired session is dropped, not revived. Which copy
        wins when Redis holds another one, or a delete, under the timestamp: `stores.redis.RedisStore.write_back`
        (contract.md §2, "Which copy wins").
        """
        moved = 0
        while True:
            with self.local.exclusive():
                record = self.local.oldest()
                if record is None:
                    break
                now = now_ms()
                if record.expires_at > now:
                    self._log_move(record, self.redis.scoped(record.owner).write_back(record, now=now))
                    moved += 1
                    if moved == 1:  # Redis takes writes: new saves go there while the rest follows
                        self._accepting()
                self.local.scoped(record.owner).delete(record.timestamp)
            time.sleep(MOVE_PAUSE_S)  # between moves the lock is free: a save waiting for it gets its turn
        return moved

    def _accepting(self) -> None:
        """Redis took a write (or answers again and nothing is pending): saves go to it again."""
        with self._link.lock:
            was, self._link.state = self._link.state, RedisState.CONNECTED
        if was is RedisState.READ_ONLY:
            log.warning("Redis accepts writes again")

    @staticmethod
    def _log_move(record: Record, result: Moved) -> None:
        if result.outcome is Outcome.SUPERSEDED:
            log.info("write-back: session %d was saved again since; the later copy stays", record.timestamp)
        elif result.outcome is Outcome.DELETED:
            log.info("write-back: session %d was deleted after this copy was saved; it is dropped", record.timestamp)
        elif result.outcome is Outcome.RENUMBERED:
            log.warning("write-back: Redis already held another session %d; this one is now %d",
                        record.timestamp, result.timestamp)
        if result.removed is not None:
            log.info("write-back: session %d was stored in Redis as %d too, by a save whose answer was lost; "
                     "that unconfirmed copy is removed", record.timestamp, result.removed)

    def inspect_redis(self, facts: RedisFacts | None = None) -> None:
        """Check a Redis's configuration once it answers.

        Check the configured Redis once it answers (at start-up, or when it first does): every problem is
        logged loudly and kept for /health. (What refuses start-up was refused by `build_storage` already.)"""
        refuse, warn = (facts or self.redis.facts()).problems(self.allow_eviction)
        self._inspected = True
        self.redis_warnings = [f"Redis: {problem}" for problem in refuse + warn]
        for warning in self.redis_warnings:
            log.error("%s", warning)

    def recover(self) -> int:
        """Run one recovery round: reconnect Redis and write pending sessions back.

        One round of the background thread: ping Redis; when it answers, count it as reachable again (reads,
        deletes and new saves use it at once) and write every pending session back, which also tells whether
        a Redis that refused writes takes them again. Returns how many moved; raises what Redis or the local
        store raised."""
        self.redis.ping()
        if not self._inspected:
            self.inspect_redis()
        pending = self.local.count()[0]
        with self._link.lock:
            if self._link.state is RedisState.DOWN:
                self._link.state = RedisState.CONNECTED
                log.warning("Redis is reachable again; writing back %d pending session(s)", pending)
        moved = self.write_back() if pending else 0
        people = self._write_back_people()
        self._accepting()
        if moved:
            log.warning("write-back: %d session(s) moved from the local store to Redis", moved)
        if people:
            log.warning("write-back: %d share link(s), share openings and activity events moved to Redis", people)
        return moved

    def _recover_loop(self) -> None:
        """Run the background thread's rounds.

        Every `retry_interval`, while Redis is away, sessions are pending (left by this process, another
        worker, or an earlier run) or saves are not replicated (the ping tells when replicas are back): `recover`;
        else a round of `reconcile`."""
        while not self._stopping.wait(self.retry_interval):
            try:
                if self._link.state is not RedisState.CONNECTED or self.local.count()[0] or self.redis.unreplicated \
                        or self.local.pending_people():
                    self.recover()
                else:
                    self.reconcile()
            except redis.RedisError as error:
                self._redis_failed(error)
            except StorageUnavailable as error:  # the local store is busy or failing: try again next round
                log.warning("write-back postponed: %s", error)

    def reconcile(self) -> None:
        """Run one reconcile round of Redis's index and filters.

        One round of bringing Redis's index and list filters in step with the session keys other tools write
        (`stores.redis.Reconciler`; one process of all sharing the Redis does it). An error Redis answers with (an
        ACL without SCAN, a replica or a full Redis refusing writes) is logged once and changes nothing else: the
        next save finds out what it means for saves. Raises a lost connection."""
        try:
            done = self.redis.reconciler.round(lease_ms=round((3 * self.retry_interval + 1) * 1000))
        except redis.ResponseError as error:
            if str(error) != self._reconcile_error:
                self._reconcile_error = str(error)
                log.warning("reconcile: Redis refused it (%s); keys other tools write without the index are not "
                            "listed until it accepts", error)
            return
        except redis.RedisError:
            raise
        except Exception:  # whatever a round meets, the thread that also writes sessions back must go on
            log.exception("reconcile: the round failed; the next one tries again")
            return
        self._reconcile_error = None
        if done is not None and (done.indexed or done.recorded):
            log.info("reconcile: %d session key(s) another tool wrote indexed, %d summary(ies) recorded anew "
                     "(%d keys checked, %.1f MB read)", done.indexed, done.recorded, done.checked, done.read / 1e6)

    def index_every_key(self) -> None:
        """Index every session key Redis holds before a backup.

        Index every session key the Redis index lacks (another tool wrote it without the index), now: a full
        pass over the keys, before a backup lists the index, so it never misses a live session key. Raises
        `StorageUnavailable` when a configured Redis cannot be read, or refuses writes (full, a replica) while
        some session key is not indexed."""
        unreachable = StorageUnavailable("Redis is unreachable, so a backup would miss the sessions it holds")
        if self.redis is None:
            return
        if not self._readable():
            raise unreachable
        try:
            adopted = self.redis.reindex()
        except redis.ResponseError as error:  # it refuses writes: a backup is still whole if nothing is missing
            missing = self._from_redis(lambda r: r.unindexed())
            if missing is None:
                raise unreachable from error
            if missing:
                raise StorageUnavailable(f"{missing} session key(s) another tool wrote are not in the index, and "
                                         f"Redis refuses to add them ({error}), so a backup would miss them") from None
            return
        except redis.RedisError as error:
            self._redis_failed(error)
            raise unreachable from error
        if adopted.indexed:
            log.warning("indexed %d session key(s) another tool wrote without %s", adopted.indexed,
                        INDEX_KEY)

    def close(self) -> None:
        """Shut storage down and report what is still pending.

        Stop the background thread and try one last write-back, then say what is left: with the SQLite
        store it waits for the next start (which writes it back); with the memory store it ends here."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout=self.retry_interval + 5)
        if self.redis is not None:
            moved, error = 0, None
            try:
                if self.local.count()[0] or self.local.pending_people():
                    self.redis.ping()
                    moved = self.write_back()
                    self._write_back_people()
            except (redis.RedisError, StorageUnavailable) as exc:
                error = exc
            left = self.local.count()[0]
            fate = "lost with this process" if self.local.kind == "memory" else "kept in the local store"
            log.log(logging.WARNING if left or error else logging.INFO,
                    "shutdown: wrote %d session(s) back to Redis; %d pending session(s) %s%s", moved, left, fate,
                    f" ({error})" if error else "")
            self.redis.close()
        elif self.local.kind == "memory" and self.local.count()[0]:
            log.warning("shutdown: %d session(s) held only in memory end with this process", self.local.count()[0])
        self.local.close()
        self.allocator.close()  # the clock file's descriptor


def _open_backends(config: Config) -> tuple[LocalStore, RedisStore | None, RedisFacts | None]:
    """Open the backends a config describes.

    The backends a `Config` describes, opened, with what the Redis said of itself (None when it does not answer
    now: it is inspected when it does). The start-up refusals live here: an unusable local store file or a Redis
    that cannot keep sessions safely raises `ConfigError` naming the setting, with everything closed again."""
    limits = Limits(config.local_max_sessions, config.local_max_bytes,
                    WhenFull.REFUSE if config.redis_configured else WhenFull.EVICT_OLDEST)
    keep = None if config.redis_configured else Keep(config.activity_keep_days)  # with Redis, all waits for it
    if config.local_store == "memory":
        local: LocalStore = memory.MEMORY
        local.configure(limits, keep)
    else:
        local = sqlite.SqliteStore.open(config.local_store_path, limits, synchronous=config.local_store_sync,
                                        keep=keep)
    if not config.redis_configured:
        return local, None, None
    redis_store = RedisStore.from_config(config)
    facts = None
    try:
        facts = redis_store.facts()
    except redis.RedisError as error:  # not reachable now (or a TLS handshake failed): inspected when it answers
        log.warning("Redis does not answer at start-up (%s: %s)%s; the local store takes saves until it does",
                    type(error).__name__, error, redis_store.hint(error))
    refuse = facts.problems(config.redis_allow_eviction)[0] if facts else []
    if refuse:
        redis_store.close()
        local.close()
        raise ConfigError(f"{config.redis_setting}: this Redis cannot keep sessions safely: {refuse[0]}")
    return local, redis_store, facts


def check_start_up(config: Config) -> None:
    """Run the start-up checks without serving.

    The start-up refusals for a process that serves nothing itself (gunicorn's master, before any worker
    boots): open the backends as `build_storage` would, then close them. Creates the SQLite store's schema, so
    the workers find it in place. Raises `ConfigError`."""
    local, redis_store, _ = _open_backends(config)
    if redis_store is not None:
        redis_store.close()  # the workers open their own connections
    local.close()


def build_storage(config: Config) -> SessionStorage:
    """Build the storage a config describes.

    The storage a `Config` describes: the one place that picks backends. Raises `ConfigError` as
    `check_start_up` does."""
    local, redis_store, facts = _open_backends(config)
    storage = SessionStorage(local, redis_store, config.session_ttl_seconds, config.redis_retry_interval,
                             allow_eviction=config.redis_allow_eviction,
                             slot=Slot(config.service_host_index, config.service_hosts))
    if facts is not None:
        storage.inspect_redis(facts)
    return storage
