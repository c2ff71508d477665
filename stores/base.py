"""The shared vocabulary of session storage, and the interface every backend implements.

* `Stored` (a session or summary as read), `Record` (a session as a local store holds it), `Query` (a list
  page), `Listing` (a list answer, read while it is sent), `Limits` (a local store's caps and what it does when
  full), and the errors the HTTP layer turns into 503s and 422s;
* `SessionStore`, the interface every backend implements, and `LocalStore`, what the local stores add for
  failover. The backends live beside this module, one each: `redis.py` (the public Redis layout and its
  scripts), `sqlite.py` (the durable default local store, one file shared by every process on the host) and
  `memory.py` (the volatile, per-process choice, `LOCAL_STORE=memory`). They import this module and nothing
  above it; `storage.py` (the failover and the one factory) imports them.

Sessions are stored as the exact bytes the API returns: `head + b"<ms>}"` (see `payload.Draft`), so reads
splice them into responses without parsing. The promises behind all of this are in `docs/contract.md`.
"""

from __future__ import annotations

import abc
import copy
import enum
import functools
import logging
import random
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import orjson

from config import LOCAL_MAX_BYTES, LOCAL_MAX_SESSIONS
from payload import Draft, head_of

log = logging.getLogger(__name__)

DEFAULT_OWNER = ""  # the default user's space: the public layout, and every session saved before users existed
LOCAL = "memory"  # the wire name of the local fallback in `storage` fields, whichever local store it is
EVERY = 2**31  # `Query.limit` of a list that asked for no limit
NEVER = 2**62  # the `expires_at` of a session that does not expire (pinned, or SESSION_TTL_SECONDS=0)



@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis key names of one user's space.

    The default user's are the public layout other StoryArt tools read (`storyart:session:<ms>`,
    `storyart:sessions:index`, ...); every other user's are the same names under `storyart:{u:<name>}:`, whose
    hash tag keeps one user's keys in one Redis Cluster slot. `stores/redis.py` says what each key holds."""

    owner: str
    prefix: str
    session: str  # + <ms>: the session JSON
    index: str
    meta: str  # + <ms>: its summary
    save: str  # + <save id>
    deleted: str  # + <ms>: a delete's tombstone
    acked: str
    expiry: str
    clock: str
    pinned: str
    facets: str
    story: str  # + <storyUuid>
    episode: str  # + <n>
    shares: str  # a hash: share id -> the share's record
    activity: str  # a sorted set: the activity log, by time

    @classmethod
    def of(cls, owner: str) -> Keys:
        return _keys(owner)

    def session_key(self, timestamp: int) -> str:
        return f"{self.session}{timestamp}"


@functools.cache
def _keys(owner: str) -> Keys:
    prefix = "storyart:" if owner == DEFAULT_OWNER else f"storyart:{{u:{owner}}}:"
    return Keys(owner, prefix, f"{prefix}session:", f"{prefix}sessions:index", f"{prefix}meta:", f"{prefix}save:",
                f"{prefix}deleted:", f"{prefix}sessions:acked", f"{prefix}sessions:expiry", f"{prefix}sessions:clock",
                f"{prefix}sessions:pinned", f"{prefix}sessions:facets", f"{prefix}sessions:story:",
                f"{prefix}sessions:episode:", f"{prefix}shares", f"{prefix}activity")


DEFAULT_KEYS = Keys.of(DEFAULT_OWNER)
KEY_PREFIX = DEFAULT_KEYS.session
INDEX_KEY = DEFAULT_KEYS.index  # the public index: member a session key, score its timestamp


def session_key(timestamp: int) -> str:
    """The default user's key of a session (`Keys.session_key` names any user's)."""
    return DEFAULT_KEYS.session_key(timestamp)


def expiry(now: int, ttl_ms: int) -> int:
    """When a session saved (or unpinned) at `now` expires: `NEVER` with no TTL (SESSION_TTL_SECONDS=0)."""
    return now + ttl_ms if ttl_ms else NEVER


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a user's activity log, recorded in the same step as the change it records.

    Stored as the JSON `render` writes (the same bytes in every store, so a copy written back to Redis is the copy
    already there); `id` tells copies apart from other events. A save without a timestamp learns its timestamp
    where the store chooses it, which renders it in (`split`)."""

    id: str
    at: int  # ms
    action: str  # save, delete, pin, unpin, import, share, revoke, share-opened
    source: str  # the client's address as the access log has it ("from")
    timestamp: int | None = None
    share_id: str | None = None

    def split(self) -> tuple[bytes, bytes]:
        """The JSON before and after the session's timestamp."""
        head = b'{"id":"%s","at":%d,"action":"%s","timestamp":' % (self.id.encode(), self.at, self.action.encode())
        share = b',"shareId":"%s"' % self.share_id.encode() if self.share_id else b""
        return head, b'%s,"from":%s}' % (share, orjson.dumps(self.source))

    def render(self, timestamp: int | None = None) -> bytes:
        head, tail = self.split()
        return b"%s%d%s" % (head, timestamp if timestamp is not None else self.timestamp or 0, tail)


@dataclass(frozen=True, slots=True)
class Share:
    """A share link: who may read one session without signing in, until when.

    Only the SHA-256 of its token is kept (the token is in the answer that made it, and in the link)."""

    id: str
    owner: str
    timestamp: int  # the session's
    token_sha: str
    created_at: int
    expires_at: int
    revoked: bool = False
    opened: int = 0

    def record(self) -> bytes:
        """The share as the stores keep it (without `opened`, which stores count apart)."""
        return orjson.dumps({"id": self.id, "owner": self.owner, "timestamp": self.timestamp,
                             "tokenSha256": self.token_sha, "createdAt": self.created_at,
                             "expiresAt": self.expires_at, "revoked": self.revoked})

    @classmethod
    def of(cls, record: bytes, opened: int = 0) -> Share:
        r = orjson.loads(record)
        return cls(r["id"], r["owner"], r["timestamp"], r["tokenSha256"], r["createdAt"], r["expiresAt"],
                   r["revoked"], opened)

    def public(self) -> dict[str, object]:
        """What `GET /api/v1/shares` says of it (never the token or its hash)."""
        return {"id": self.id, "timestamp": self.timestamp, "createdAt": self.created_at,
                "expiresAt": self.expires_at, "opened": self.opened, "revoked": self.revoked}

    def open_at(self, now: int) -> bool:
        return not self.revoked and self.expires_at > now


@dataclass(frozen=True, slots=True)
class Keep:
    """How much of an activity log is kept: `days`, and at most `most` events.

    A local store prunes its log on one event in `prune_every` (at random), so an event costs no pass over the
    log: it may hold about that many events more than `most` in between."""

    days: int = 90
    most: int = 10_000
    prune_every: int = 64

    @property
    def ms(self) -> int:
        return self.days * 86_400_000

    def due(self) -> bool:
        return random.randrange(self.prune_every) == 0


class Stored(NamedTuple):
    timestamp: int
    body: bytes  # the session JSON, or its summary JSON where a summary was asked for
    storage: str  # "redis" or "memory" (the local store): where this copy was read from
    summary: bytes | None = None  # the summary JSON next to a body, when the store has one
    pinned: bool = False  # kept forever until unpinned


class Origin(enum.Enum):
    """Who chose a session's timestamp.

    Who chose a session's timestamp: it decides what a write-back does when Redis holds another session
    under it (see `stores.redis.RedisStore.write_back`)."""

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
    owner: str = DEFAULT_OWNER  # whose space it is in

    @property
    def draft(self) -> Draft:
        """The draft that stores these very bytes again, under this timestamp and save id (a write-back)."""
        return Draft(bytes(head_of(self.body, self.timestamp)), self.timestamp, self.summary, self.save_id)


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
    """A page of sessions, read lazily.

    A list answer: `rows` is an iterator that reads the sessions in small batches while the answer is sent,
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
    """No free Redis connection in time.

    Every Redis connection of this process stayed in use for `REDIS_POOL_TIMEOUT`: Redis is fine, this process
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
        """Choose the sessions to evict to make room for a save.

        The sessions to evict so that one of `size` bytes fits, given (sessions, bytes) `held` now, the size of
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
    """The interface every session store implements.

    What every backend does. Timestamps come from `allocator.choose` (or its Lua twin) inside the store's
    own atomic step; `proposal` is where that rule starts for a session sent without a timestamp."""

    storage: str  # the wire name of this store in `storage` fields
    owner: str = DEFAULT_OWNER  # whose space this store's operations see: one user's, never another's

    @abc.abstractmethod
    def scoped(self, owner: str) -> SessionStore:
        """This store seen from one user's space.

        The same store (its connections, locks and caps shared) whose every operation sees `owner`'s sessions
        only: how the service keeps one user's sessions from another (docs/contract.md §6)."""

    @abc.abstractmethod
    def save(self, draft: Draft, *, now: int, ttl_ms: int, proposal: int, when_full: WhenFull | None = None,
             event: Event | None = None) -> int:
        """Store a session and return its timestamp.

        Store `draft` under its own timestamp, or under one the allocator's rule chooses; return it.
        `when_full` overrides a local store's policy for this save (an import or a restore refuses rather than
        evict); Redis evicts nothing itself (a Redis that may is refused at start-up) and ignores it. `event`
        is recorded in the activity log in the same step, with the timestamp chosen."""

    @abc.abstractmethod
    def get(self, timestamp: int) -> Stored | None: ...

    @abc.abstractmethod
    def exists(self, timestamp: int) -> bool: ...

    @abc.abstractmethod
    def latest(self) -> Stored | None: ...

    @abc.abstractmethod
    def expiry_of(self, timestamp: int) -> int | None:
        """When a session expires (wall clock, ms; `NEVER` for one that does not); None when there is none."""

    @abc.abstractmethod
    def timestamps(self, query: Query) -> tuple[int, list[int]]:
        """Find the timestamps of one page of a list.

        (how many match, the timestamps of `query.widened()`'s page, newest first): a list is found by
        timestamps first (and two stores merged by them), then read with `rows`."""

    @abc.abstractmethod
    def rows(self, timestamps: list[int], summaries: bool = False) -> list[Stored]:
        """The sessions (or summaries) of `timestamps` that still exist, in that order."""

    @abc.abstractmethod
    def delete(self, timestamp: int, *, event: Event | None = None) -> bool:
        """Delete a session; `event` is recorded in the same step when there was one."""

    @abc.abstractmethod
    def pin(self, timestamp: int, pinned: bool, *, now: int, ttl_ms: int, event: Event | None = None) -> bool:
        """Pin a session or set its expiry.

        Keep the session forever (`pinned`), or let it expire `ttl_ms` from `now`; False when there is none.
        A later save of a pinned session keeps it pinned. `event` is recorded in the same step when there was one."""

    # -- share links and the activity log, in this space

    @abc.abstractmethod
    def add_share(self, share: Share, event: Event) -> None: ...

    @abc.abstractmethod
    def shares(self) -> list[Share]:
        """This space's shares, revoked and expired ones included, with how often each was opened."""

    @abc.abstractmethod
    def find_share(self, token_sha: str) -> Share | None:
        """The share of this space whose token has this SHA-256 (revoked and expired ones too)."""

    @abc.abstractmethod
    def revoke_share(self, share_id: str, event: Event) -> bool:
        """Revoke a share for good; False when this space has none by that id (one revoked before: True)."""

    @abc.abstractmethod
    def share_opened(self, share: Share, event: Event) -> None:
        """Count one opening of a share, and record it, in one step."""

    @abc.abstractmethod
    def events(self, before: int, limit: int) -> list[bytes]:
        """This space's activity, newest first, `at` before `before`: each as `Event.render` wrote it."""

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

    def scoped(self, owner: str) -> LocalStore:
        """This store in `owner`'s space: a shallow copy with her as owner.

        Each local store keeps its state (file, connections, the thread's transaction, lock, sessions) in objects
        the copy shares, so the view sees and locks the same store, and its queries keep to her rows."""
        if owner == self.owner:
            return self
        view = copy.copy(self)
        view.owner = owner
        return view

    @abc.abstractmethod
    def oldest(self) -> Record | None:
        """The oldest session held in any user's space, expired or not (a write-back drops an expired one)."""

    @abc.abstractmethod
    def count(self) -> tuple[int, int]:
        """(sessions, bytes) held, in every user's space: the caps are the host's."""

    @abc.abstractmethod
    def pending_people(self) -> Pending:
        """What waits for Redis besides sessions, in every space: shares, counts of openings, activity."""

    @abc.abstractmethod
    def settle(self, pending: Pending) -> None:
        """Drop what `pending_people` gave, once Redis holds it.

        Both run inside one `exclusive()`, so nothing changes in between (an opening takes the write lock too)."""


@dataclass(frozen=True, slots=True)
class Pending:
    """Shares, share openings and activity a local store keeps while Redis is away, to be written back."""

    shares: list[Share]
    opens: list[tuple[str, str, int, str]]  # (owner, share id, openings, batch id: Redis applies a batch once)
    events: list[tuple[str, int, str, bytes]]  # (owner, at, event id, the event as rendered)

    def __bool__(self) -> bool:
        return bool(self.shares or self.opens or self.events)
