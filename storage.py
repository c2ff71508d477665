"""Session storage: Redis first, then the service's own local store; the browser's `localStorage` is the last link.

Read top to bottom:

* the shared vocabulary: `Stored` (a session or summary as read), `Record` (a session as a local store holds
  it), `Query` (a list page), `Listing` (a list answer, read while it is sent), and the errors the HTTP layer
  turns into 503s;
* `SessionStore`, the interface every backend implements, and `LocalStore`, what the local stores add for
  failover. The backends live one per module: `store_redis.py` (the public Redis layout and its scripts),
  `store_sqlite.py` (the durable default local store, one file shared by every process on the host) and
  `store_memory.py` (the volatile, per-process choice, `LOCAL_STORE=memory`);
* `SessionStorage`, what the HTTP layer talks to: it saves to Redis, falls back to the local store when Redis
  fails or refuses writes, reads the union of both (a pending local copy wins), and a background thread in
  every process writes pending sessions back to Redis, each exactly once, when Redis answers again.

Sessions are stored as the exact bytes the API returns: `head + b"<ms>}"` (see `payload.Draft`), so reads
splice them into responses without parsing. How timestamps are chosen: `allocator.py`. The promises behind all
of this are written down in `docs/contract.md`.
"""

from __future__ import annotations

import abc
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import orjson
import redis

from allocator import ONE_HOST, Allocator, Slot, now_ms
from config import LOCAL_MAX_BYTES, LOCAL_MAX_SESSIONS, Config, ConfigError
from payload import Draft, content_hash, summarize

if TYPE_CHECKING:
    from store_redis import RedisFacts, RedisStore

log = logging.getLogger("storyart.storage")

KEY_PREFIX = "storyart:session:"
LOCAL = "memory"  # the wire name of the local fallback in `storage` fields, whichever local store it is
MOVE_PAUSE_S = 0.002
ROWS_PER_READ = 4  # summaries read from a store at once while a list is sent
# Whole sessions are read one at a time: an answer its client reads slowly (or not at all, until
# RESPONSE_SEND_TIMEOUT) then holds one session's bytes while it waits, not four (200 such answers: 1.0 GB, not 1.5).
BODIES_PER_READ = 1
EVERY = 2**31  # `Query.limit` of a list that asked for no limit
NEVER = 2**62  # the `expires_at` of a session that does not expire (pinned, or SESSION_TTL_SECONDS=0)
REINDEX_CHECK_S = 10.0

T = TypeVar("T")


def session_key(timestamp: int) -> str:
    return f"{KEY_PREFIX}{timestamp}"


def expiry(now: int, ttl_ms: int) -> int:
    """When a session saved (or unpinned) at `now` expires: `NEVER` with no TTL (SESSION_TTL_SECONDS=0)."""
    return now + ttl_ms if ttl_ms else NEVER


class Stored(NamedTuple):
    timestamp: int
    body: bytes  # the session JSON, or its summary JSON where a summary was asked for
    storage: str  # "redis" or "memory" (the local store): where this copy was read from
    summary: bytes | None = None  # the summary JSON next to a body, when the store has one
    pinned: bool = False  # kept forever until unpinned


class Origin(enum.Enum):
    """Who chose a session's timestamp: it decides what a write-back does when Redis holds another session
    under it (see `store_redis.RedisStore.write_back`)."""

    CLIENT = "client"  # the client's identity for the session: a later save of it replaces it
    SERVICE = "service"  # assigned here: two sessions that met under it are both kept


@dataclass(frozen=True, slots=True)
class Record:
    """A session as a local store holds it, with what a write-back needs to recreate it in Redis."""

    timestamp: int
    body: bytes
    summary: bytes
    expires_at: int  # wall clock, ms; `NEVER` when it does not expire
    origin: Origin
    save_id: str = ""  # the save's id (`payload.Draft.save_id`)
    pinned: bool = False
    acked: int = 0  # when this copy was acknowledged (wall clock, ms): what orders it against other copies; 0: unknown

    @property
    def draft(self) -> Draft:
        return Draft(self.body[: -len(str(self.timestamp)) - 1], self.timestamp, self.summary, self.save_id)


class Outcome(enum.Enum):
    """What a write-back did with a pending session."""

    STORED = "stored"  # Redis holds it under its timestamp now
    SUPERSEDED = "superseded"  # Redis holds a copy of that client timestamp acknowledged later: that one stays
    RENUMBERED = "renumbered"  # Redis held another session under its (service-assigned) timestamp: both kept
    ALREADY = "already"  # a save of these bytes under this save id was applied before: nothing stored again
    DELETED = "deleted"  # the timestamp was deleted after this copy was acknowledged: the copy is dropped


class Moved(NamedTuple):
    outcome: Outcome
    timestamp: int  # where the session is in Redis now (for SUPERSEDED: where the later copy is)
    removed: int | None = None  # a copy of this very save Redis applied but never confirmed, removed from there


@dataclass
class Listing:
    """A list answer: `rows` is an iterator that reads the sessions in small batches while the answer is sent,
    so no reply from a store is large and a worker's memory does not grow with the page. `partial` and
    `skipped` are final once `rows` is exhausted."""

    total: int  # how many sessions match
    rows: Iterator[Stored]  # newest first
    partial: bool = False  # Redis could not be read (at the start or midway), or `missed`: there may be more
    skipped: int = 0  # records that are not sessions (another tool wrote something else under the key)
    missed: int = 0  # listed sessions that were not read though a store still holds them (see `SessionStorage._rows`)


class StorageUnavailable(Exception):
    """The operation cannot be done safely now; the client should retry later (503 with Retry-After)."""


class StorageFull(StorageUnavailable):
    """No store can take this session now."""


class StorageBusy(StorageUnavailable):
    """Every Redis connection of this process stayed in use for `REDIS_POOL_TIMEOUT`: Redis is fine, this process
    is busy. Only this request is refused (503 with Retry-After): nothing counts Redis as down or sends saves
    to the local store, and nothing was sent to Redis."""


class NotASession(Exception):
    """The record stored under a timestamp is not a JSON object (another tool wrote something else there)."""


class WhenFull(enum.Enum):
    """What a local store does when a save would pass its caps."""

    EVICT_OLDEST = "evict"  # it is the only store (no Redis): the oldest sessions make room, and that is logged
    REFUSE = "refuse"  # it holds sessions waiting for Redis: none is dropped; the save gets 503 instead


@dataclass(frozen=True, slots=True)
class Limits:
    max_sessions: int = LOCAL_MAX_SESSIONS
    max_bytes: int = LOCAL_MAX_BYTES["SQLITE"]
    when_full: WhenFull = WhenFull.EVICT_OLDEST

    def victims(self, *, held: tuple[int, int], size: int, replaced: int | None, oldest: Iterable[tuple[int, int]],
                when_full: WhenFull | None = None) -> list[int]:
        """The sessions to evict so that one of `size` bytes fits, given (sessions, bytes) `held` now, the size of
        the copy it replaces (None for a new one) and the unpinned sessions other than it, oldest first, as
        (timestamp, bytes). Raises `StorageFull` when it cannot fit, or would need evicting where `when_full`
        (the caller's policy, else the store's) refuses."""
        if size > self.max_bytes:
            raise StorageFull("the session is larger than LOCAL_STORE_MAX_BYTES")
        over_count = held[0] + (0 if replaced is not None else 1) - self.max_sessions
        over_bytes = held[1] - (replaced or 0) + size - self.max_bytes
        if over_count <= 0 and over_bytes <= 0:
            return []
        if self.when_full is WhenFull.REFUSE:
            raise StorageFull("the local store is full of sessions waiting for Redis")
        if when_full is WhenFull.REFUSE:
            raise StorageFull(f"the local store is at its caps (LOCAL_STORE_MAX_SESSIONS={self.max_sessions}, "
                              f"LOCAL_STORE_MAX_BYTES={self.max_bytes}), and an import or restore never evicts "
                              "a session to make room")
        victims = []
        for timestamp, length in oldest:
            if over_count <= 0 and over_bytes <= 0:
                break
            victims.append(timestamp)
            over_count, over_bytes = over_count - 1, over_bytes - length
        if over_count > 0 or over_bytes > 0:
            raise StorageFull("the local store is full of pinned sessions")
        log.warning("local store full: evicted the %d oldest session(s)", len(victims))
        return victims


class Facets(NamedTuple):
    """What a list filters on, from a summary: what the stores index."""

    story_uuid: str | None
    episode: str | None  # the episode number as text, as the `episode` filter is given
    title: str | None  # casefolded, for the case-insensitive title search

    @classmethod
    def of(cls, summary: dict) -> Facets:
        number, title = summary.get("episodeNumber"), summary.get("title")
        return cls(summary.get("storyUuid"), None if number is None else str(number),
                   title.casefold() if isinstance(title, str) else None)


@dataclass(frozen=True, slots=True)
class Query:
    """Which sessions a list page wants: a timestamp range, optional summary filters, then offset/limit.

    `before` is the keyset cursor (strictly older than), so pages do not drift while sessions arrive."""

    offset: int = 0
    limit: int = 20
    since: int | None = None
    until: int | None = None
    before: int | None = None
    story_uuid: str | None = None
    episode: str | None = None
    text: str | None = None  # case-insensitive substring of the title

    @property
    def low(self) -> int:
        return self.since or 0

    @property
    def high(self) -> int:
        high = self.until if self.until is not None else 2**53
        return min(high, self.before - 1) if self.before is not None else high

    @property
    def filters_summaries(self) -> bool:
        return self.story_uuid is not None or self.episode is not None or self.text is not None

    def matches(self, summary: dict) -> bool:
        return self.matches_facets(Facets.of(summary))

    def matches_facets(self, facets: Facets) -> bool:
        story, episode, title = facets
        return ((self.story_uuid is None or story == self.story_uuid)
                and (self.episode is None or episode == self.episode)
                and (self.text is None or (title is not None and self.text.casefold() in title)))

    def widened(self) -> Query:
        """The same selection from the start, as long as needed to cut this page from a merge of two stores."""
        return replace(self, offset=0, limit=self.offset + self.limit)


# ------------------------------------------------------------------------------------------ the interface


class SessionStore(abc.ABC):
    """What every backend does. Timestamps come from `allocator.choose` (or its Lua twin) inside the store's
    own atomic step; `proposal` is where that rule starts for a session sent without a timestamp."""

    storage: str  # the wire name of this store in `storage` fields

    @abc.abstractmethod
    def save(self, draft: Draft, *, now: int, ttl_ms: int, proposal: int, when_full: WhenFull | None = None) -> int:
        """Store `draft` under its own timestamp, or under one the allocator's rule chooses; return it.
        `when_full` overrides a local store's policy for this save (an import or a restore refuses rather than
        evict); Redis evicts nothing itself (a Redis that may is refused at start-up) and ignores it."""

    @abc.abstractmethod
    def get(self, timestamp: int) -> Stored | None: ...

    @abc.abstractmethod
    def exists(self, timestamp: int) -> bool: ...

    @abc.abstractmethod
    def latest(self) -> Stored | None: ...

    @abc.abstractmethod
    def timestamps(self, query: Query) -> tuple[int, list[int]]:
        """(how many match, the timestamps of `query.widened()`'s page, newest first): a list is found by
        timestamps first (and two stores merged by them), then read with `rows`."""

    @abc.abstractmethod
    def rows(self, timestamps: list[int], summaries: bool = False) -> list[Stored]:
        """The sessions (or summaries) of `timestamps` that still exist, in that order."""

    @abc.abstractmethod
    def delete(self, timestamp: int) -> bool: ...

    @abc.abstractmethod
    def pin(self, timestamp: int, pinned: bool, *, now: int, ttl_ms: int) -> bool:
        """Keep the session forever (`pinned`), or let it expire `ttl_ms` from `now`; False when there is none.
        A later save of a pinned session keeps it pinned."""

    @abc.abstractmethod
    def close(self) -> None: ...


class LocalStore(SessionStore):
    """A store on this host that holds sessions when there is no Redis, or while Redis is away ("pending").

    `exclusive()` is the store's write lock (a transaction for SQLite): the write-back moves one session and a
    delete removes one inside it, so across every process sharing the store a session is moved once and a
    deleted one never comes back."""

    storage = LOCAL
    kind: str  # "sqlite" or "memory", for /health
    limits: Limits
    location: str | None  # the file, for /health
    clock_path: Path | None  # where the processes sharing this store keep the allocator's clock

    @abc.abstractmethod
    def exclusive(self) -> AbstractContextManager[None]: ...

    @abc.abstractmethod
    def oldest(self) -> Record | None:
        """The oldest session held, expired or not (a write-back drops an expired one)."""

    @abc.abstractmethod
    def count(self) -> tuple[int, int]:
        """(sessions, bytes) held."""


# --------------------------------------------------------------------------------------------- failover


class RedisState(enum.Enum):
    NOT_CONFIGURED = "not configured"
    CONNECTED = "connected"
    READ_ONLY = "refusing writes"  # it answers, but refuses writes (a replica, maxmemory): reads still use it
    DOWN = "disconnected"


class SessionStorage:
    """Redis first, the local store when Redis is absent, failing or refusing writes; reads see both."""

    def __init__(self, local: LocalStore, redis_store: RedisStore | None, ttl_seconds: int,
                 retry_interval: float, *, allow_eviction: bool = False, slot: Slot = ONE_HOST) -> None:
        self.local = local
        self.redis = redis_store
        self.ttl_ms = ttl_seconds * 1000
        self.retry_interval = retry_interval
        self.allocator = Allocator(local.clock_path, slot)
        self._state = RedisState.CONNECTED if redis_store is not None else RedisState.NOT_CONFIGURED
        self._lock = threading.Lock()
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

    # -- state

    @property
    def redis_state(self) -> RedisState:
        return self._state

    @property
    def saves_go_to(self) -> str:
        return "redis" if self._state is RedisState.CONNECTED else LOCAL

    def _redis_failed(self, error: redis.RedisError) -> None:
        """Skip Redis until the background thread finds it again. An error Redis answered with (READONLY,
        OOM, too few replicas) only stops saves: what it holds stays readable, also when it was down before
        (a new master that has no replica yet)."""
        state = RedisState.READ_ONLY if isinstance(error, redis.ResponseError) else RedisState.DOWN
        with self._lock:
            if self._state is RedisState.CONNECTED:
                log.error("Redis unavailable (%s: %s); saving to the local %s store and retrying every %gs",
                          type(error).__name__, error, self.local.kind, self.retry_interval)
            elif self._state is RedisState.DOWN and state is RedisState.READ_ONLY:
                log.warning("Redis answers again, but takes no saves yet (%s: %s)", type(error).__name__, error)
            if self._state is not RedisState.DOWN or state is RedisState.READ_ONLY:
                self._state = state

    @property
    def warnings(self) -> list[str]:
        """What /health warns about: the configured Redis's problems, and saves that no replica confirms now."""
        unreplicated = self.redis.unreplicated if self.redis is not None else None
        return self.redis_warnings + ([f"Redis: saves are not replicated ({unreplicated}): a failover now would "
                                       "lose the sessions saved meanwhile"] if unreplicated else [])

    def _readable(self) -> bool:
        return self.redis is not None and self._state is not RedisState.DOWN

    # -- operations

    def save(self, draft: Draft, *, when_full: WhenFull | None = None) -> tuple[int, str]:
        """Store and return (timestamp, where). Raises `StorageUnavailable` (or `StorageFull`) when no store
        could commit it: then nothing was acknowledged. An import or a restore passes `WhenFull.REFUSE`: what
        it was asked to keep never makes room by evicting other sessions."""
        now = now_ms()
        proposal = self.allocator.propose(now) if draft.timestamp is None else now
        if self.redis is not None and self._state is RedisState.CONNECTED:
            try:
                timestamp = self.redis.save(draft, now=now, ttl_ms=self.ttl_ms, proposal=proposal)
            except redis.RedisError as error:
                self._redis_failed(error)
            else:
                if draft.timestamp is None:
                    self.allocator.observe(timestamp)
                if draft.timestamp is not None and self.local.exists(timestamp):
                    with self.local.exclusive():  # an older pending copy must not be written back over it
                        self.local.delete(timestamp)
                return timestamp, "redis"
        timestamp = self.local.save(draft, now=now, ttl_ms=self.ttl_ms, proposal=proposal, when_full=when_full)
        if draft.timestamp is None:
            self.allocator.observe(timestamp)
        return timestamp, LOCAL

    def _from_redis(self, call: Callable[[RedisStore], T]) -> T | None:
        """`call(redis)`, or None when Redis is absent, known to be down, or fails now. `StorageBusy` (no free
        connection) is raised, not taken for a Redis that fails."""
        if not self._readable():
            return None
        try:
            return call(self.redis)
        except redis.RedisError as error:
            self._redis_failed(error)
            return None

    def _unreadable(self) -> StorageUnavailable:
        return StorageUnavailable("Redis is unreachable, and the session may be there")

    def get(self, timestamp: int) -> Stored | None:
        """A pending local copy first (it was acknowledged after any copy in Redis this host saw; one another
        host saved since is sorted out by the write-back), then Redis. Raises
        `StorageUnavailable` rather than answer "not found" for a session an unreachable Redis may hold, and
        `NotASession` for a record that is not one."""
        found = self.local.get(timestamp)
        if found is None and self.redis is not None:
            found = self._from_redis(lambda r: r.get(timestamp))
            if found is None and not self._readable():
                raise self._unreadable()
        if found is None:
            return None
        checked = self._checked(found)
        if checked is None:
            raise NotASession(f"The record stored under {timestamp} is not a session (not a JSON object).")
        return checked

    def held(self, timestamps: list[int]) -> tuple[set[int], bool]:
        """(which of `timestamps` hold a session in either store, whether a configured Redis was asked). The local
        store is asked first: a session the write-back moves meanwhile is in Redis by the time Redis is asked."""
        held = {ts for ts in timestamps if self.local.exists(ts)}
        if self.redis is None:
            return held, True
        remote = self._from_redis(lambda r: r.existing([ts for ts in timestamps if ts not in held]))
        return held | (remote or set()), remote is not None

    def latest(self) -> tuple[Stored | None, bool]:
        """(the newest session of both stores, whether an unreachable Redis may hold a newer one)."""
        local = self.local.latest()
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
        """Whether Redis has sessions but lost its index, then rebuilt; asked at most every `REINDEX_CHECK_S`
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
                    "storyart:sessions:index", adopted.sessions)
        return bool(adopted.sessions)

    def listing(self, query: Query, summaries: bool = False) -> Listing:
        """Sessions (or their summaries) newest first. The matching timestamps are found first (merged by
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
        """`page`'s sessions, read a batch at a time. A session listed in the local store may have been written
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
        """`found` if its bytes are the ones this service recorded (their hash is the summary's), else checked
        now: a JSON object gets a fresh summary (stored for next time); anything else is not a session (None,
        logged once per process)."""
        hashed = hashed_part(found.body, found.timestamp)
        if found.summary and orjson.loads(found.summary).get("etag") == content_hash(hashed):
            return found
        try:
            session = orjson.loads(found.body)
        except orjson.JSONDecodeError:
            session = None
        if not isinstance(session, dict):
            if found.timestamp not in self._reported:
                self._reported.add(found.timestamp)
                log.warning("the record under %s%d is not a session (not a JSON object); it is skipped",
                            KEY_PREFIX, found.timestamp)
            return None
        summary = summarize(session, len(found.body), hashed)
        if found.storage == "redis":
            self._from_redis(lambda r: r.store_summary(found.timestamp, summary))
        return found._replace(summary=summary)

    def delete(self, timestamp: int) -> bool:
        """Delete everywhere, or not at all: with Redis configured but away, a copy there would come back. Redis
        keeps a tombstone of the delete, so a copy another host acknowledged before it and still holds is
        dropped when that host writes it back (`store_redis.RedisStore.delete`)."""
        return self._everywhere("deleted", lambda store: store.delete(timestamp))

    def pin(self, timestamp: int, pinned: bool) -> bool:
        """Pin or unpin everywhere, or not at all (a copy left unchanged in Redis would undo it). A pending copy
        is written back with its pin; one that is not pinned leaves the pin Redis has. Raises `NotASession`,
        as `get` does, for a record another tool wrote that is not a session: it is not kept forever."""
        if pinned and self.get(timestamp) is None:
            return False
        now = now_ms()
        return self._everywhere("pinned" if pinned else "unpinned",
                                lambda store: store.pin(timestamp, pinned, now=now, ttl_ms=self.ttl_ms))

    def _everywhere(self, done: str, change: Callable[[SessionStore], bool]) -> bool:
        """`change` applied to Redis and the local store, inside the local store's write lock (so a write-back
        of the same session cannot slip in between); True when either held the session. Raises
        `StorageUnavailable` when a configured Redis cannot be reached, before changing anything."""
        if self.redis is None:
            with self.local.exclusive():
                return change(self.local)
        unreachable = f"Redis is unreachable, so the session cannot be {done} everywhere"
        if self._state is RedisState.DOWN and self.check(when_down=True) is RedisState.DOWN:  # rare: ask now
            raise StorageUnavailable(unreachable)
        with self.local.exclusive():
            try:
                in_redis = change(self.redis)
            except redis.RedisError as error:
                self._redis_failed(error)
                raise StorageUnavailable(unreachable) from error
            return change(self.local) or in_redis

    def check(self, *, when_down: bool = False) -> RedisState:
        """Health probe: ping Redis, unless it is known to be down (no wait on a dead Redis) and `when_down` is
        not asked for; a Redis that answers again counts as connected at once (the background thread writes
        the pending sessions back)."""
        if self.redis is not None and (when_down or self._state is not RedisState.DOWN):
            try:
                self.redis.ping()
            except redis.RedisError as error:
                self._redis_failed(error)
            else:
                with self._lock:
                    if self._state is RedisState.DOWN:
                        self._state = RedisState.CONNECTED
        return self._state

    # -- recovery

    def write_back(self) -> int:
        """Move every pending session to Redis, oldest first; returns how many were moved.

        Each move runs inside the local store's write lock: the session is read, written to Redis (same
        timestamp, remaining TTL, index entry and summary) and removed, so whichever process gets there first
        moves it and the others find it gone. A process killed halfway leaves it pending; the next move writes
        the same bytes again, which changes nothing. An expired session is dropped, not revived. Which copy
        wins when Redis holds another one, or a delete, under the timestamp: `store_redis.RedisStore.write_back`
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
                    self._log_move(record, self.redis.write_back(record, now=now))
                    moved += 1
                    if moved == 1:  # Redis takes writes: new saves go there while the rest follows
                        self._accepting()
                self.local.delete(record.timestamp)
            time.sleep(MOVE_PAUSE_S)  # between moves the lock is free: a save waiting for it gets its turn
        return moved

    def _accepting(self) -> None:
        """Redis took a write (or answers again and nothing is pending): saves go to it again."""
        with self._lock:
            was, self._state = self._state, RedisState.CONNECTED
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
        """Check the configured Redis once it answers (at start-up, or when it first does): every problem is
        logged loudly and kept for /health. (What refuses start-up was refused by `build_storage` already.)"""
        refuse, warn = (facts or self.redis.facts()).problems(self.allow_eviction)
        self._inspected = True
        self.redis_warnings = [f"Redis: {problem}" for problem in refuse + warn]
        for warning in self.redis_warnings:
            log.error("%s", warning)

    def recover(self) -> int:
        """One round of the background thread: ping Redis; when it answers, count it as reachable again (reads,
        deletes and new saves use it at once) and write every pending session back, which also tells whether
        a Redis that refused writes takes them again. Returns how many moved; raises what Redis or the local
        store raised."""
        self.redis.ping()
        if not self._inspected:
            self.inspect_redis()
        pending = self.local.count()[0]
        with self._lock:
            if self._state is RedisState.DOWN:
                self._state = RedisState.CONNECTED
                log.warning("Redis is reachable again; writing back %d pending session(s)", pending)
        moved = self.write_back() if pending else 0
        self._accepting()
        if moved:
            log.warning("write-back: %d session(s) moved from the local store to Redis", moved)
        return moved

    def _recover_loop(self) -> None:
        """Every `retry_interval`, while Redis is away, sessions are pending (left by this process, another
        worker, or an earlier run) or saves are not replicated (the ping tells when replicas are back): `recover`;
        else a round of `reconcile`."""
        while not self._stopping.wait(self.retry_interval):
            try:
                if self._state is not RedisState.CONNECTED or self.local.count()[0] or self.redis.unreplicated:
                    self.recover()
                else:
                    self.reconcile()
            except redis.RedisError as error:
                self._redis_failed(error)
            except StorageUnavailable as error:  # the local store is busy or failing: try again next round
                log.warning("write-back postponed: %s", error)

    def reconcile(self) -> None:
        """One round of bringing Redis's index and list filters in step with the session keys other tools write
        (`store_redis.Reconciler`; one process of all sharing the Redis does it). An error Redis answers with (an
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
        """Index every session key the Redis index lacks (another tool wrote it without the index), now: a full
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
                        "storyart:sessions:index")

    def close(self) -> None:
        """Stop the background thread and try one last write-back, then say what is left: with the SQLite
        store it waits for the next start (which writes it back); with the memory store it ends here."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout=self.retry_interval + 5)
        if self.redis is not None:
            moved, error = 0, None
            try:
                if self.local.count()[0]:
                    self.redis.ping()
                    moved = self.write_back()
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


def hashed_part(body: bytes, timestamp: int) -> memoryview | bytes:
    """What the recorded content hash covers: the stored bytes up to the timestamp the service appends (all of
    them for a record that does not end that way, which the service did not write)."""
    tail = b"%d}" % timestamp
    return memoryview(body)[: -len(tail)] if body.endswith(tail) else body


def build_storage(config: Config) -> SessionStorage:
    """The storage a `Config` describes. The backends are imported here, not at the top: they import this
    module's interface."""
    import store_memory
    import store_redis
    import store_sqlite

    limits = Limits(config.local_max_sessions, config.local_max_bytes,
                    WhenFull.REFUSE if config.redis_configured else WhenFull.EVICT_OLDEST)
    if config.local_store == "memory":
        local: LocalStore = store_memory.MEMORY
        local.configure(limits)
    else:
        local = store_sqlite.SqliteStore.open(config.local_store_path, limits, synchronous=config.local_store_sync)
    redis_store = store_redis.RedisStore.from_config(config) if config.redis_configured else None
    facts = None
    if redis_store is not None:
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
    storage = SessionStorage(local, redis_store, config.session_ttl_seconds, config.redis_retry_interval,
                             allow_eviction=config.redis_allow_eviction,
                             slot=Slot(config.service_host_index, config.service_hosts))
    if facts is not None:
        storage.inspect_redis(facts)
    return storage

