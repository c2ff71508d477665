"""The Redis backend: the public layout other StoryArt tools read (and rewrite) directly, and the service's own.

Public, byte-compatible with the original service (see `docs/contract.md`):

* `storyart:session:<ms>`: a string, the session JSON (UTF-8) including its `timestamp`, with the session TTL;
* `storyart:sessions:index`: a sorted set, member the session key, score the timestamp.

The service's own, outside the public pattern `storyart:session:*`:

* `storyart:meta:<ms>`: the session's summary JSON, same TTL (list views and ETags read it, not the body);
* `storyart:sessions:expiry`: a sorted set of session keys by expiry time, so expired members leave the index;
* `storyart:sessions:clock`: the last timestamp the service assigned (`allocator.py`);
* `storyart:sessions:pinned`: a set of the session keys kept forever (their keys and summaries carry no TTL);
* `storyart:sessions:facets` (a hash, field `<ms>`), `storyart:sessions:story:<storyUuid>` and
  `storyart:sessions:episode:<n>` (sorted sets of session keys by timestamp): what the list filters read;
* `storyart:save:<id>`: the timestamp a save (`payload.Draft.save_id`) was stored under, with the session's TTL.
  A save whose reply was lost (Redis died after applying it) fell back to the local store under a timestamp of
  its own; its write-back finds the unconfirmed copy by this key and removes it, so the session exists once,
  under the timestamp its client was given;
* `storyart:sessions:acked`: a hash, field `<ms>`, value when the copy Redis holds under it was acknowledged
  (ms): what a write-back compares a pending copy's own acknowledgement time with;
* `storyart:deleted:<ms>`: a delete's tombstone, the time of the delete (ms), kept `tombstone_ms` (at least 30
  days): a pending copy acknowledged before it is dropped at its write-back instead of bringing the session back.

Which copy wins (docs/contract.md §2): the one acknowledged last, by these times, never by expiry. A session key
another tool wrote keeps whatever `storyart:sessions:acked` said before (nothing, for a key the service never
wrote: 0): the tool wrote after that time, so a pending copy acknowledged earlier still loses to it, and one
acknowledged later wins (when the tool wrote in between is unknown; the copy this service acknowledged is kept).
* `storyart:sessions:reconciler`: the token of the process whose `Reconciler` takes in the session keys other
  tools write without the index, or rewrite in place (a lease with a TTL).

A request that needs several commands runs them in one Lua script (`stores/lua/`, one file each, with what it
takes and returns): one round trip, and atomic across every thread, worker and host that shares the Redis.

With `REDIS_SENTINELS` the master is found, and followed through a failover, by redis-py's own
`redis.sentinel.Sentinel` pools: a connection asks the Sentinels for the master before it connects, and one
that meets a demoted master (`READONLY`) is dropped as a connection error, so the caller falls back to the local
store until the new master is known. With `REDIS_WAIT_REPLICAS` each save waits for that many replicas to confirm
it (`WAIT`), so a failover cannot take an acknowledged session with the old master; when fewer confirm (a data
node lost), saves go on to the master that answers and /health says they are not replicated, unless
`REDIS_REQUIRE_REPLICAS` says such a save is not in Redis (then it waits in the local store).

A request waits up to `REDIS_POOL_TIMEOUT` for one of the process's `REDIS_MAX_CONNECTIONS` connections; when
none comes free it gets `StorageBusy` (a 503 for that request alone), never a Redis counted as down.
"""

from __future__ import annotations

import copy
import functools
import logging
import random
import re
import secrets
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, LifoQueue
from typing import Any, NamedTuple, TypeVar

import orjson
import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from allocator import MAX_AHEAD_MS, PROBES, SKEW_MS, distrusted, now_ms
from config import Config
from payload import Draft, content_hash, head_of, summarize
from stores.base import (  # INDEX_KEY and KEY_PREFIX: tools and tests import them from here
    DEFAULT_KEYS,
    NEVER,
    Event,
    Facets,
    Keep,
    Keys,
    Moved,
    Outcome,
    Query,
    Record,
    SessionStore,
    Share,
    StorageBusy,
    Stored,
    WhenFull,
)
from stores.base import (
    INDEX_KEY as INDEX_KEY,
)
from stores.base import (
    KEY_PREFIX as KEY_PREFIX,
)

log = logging.getLogger(__name__)

# The default user's keys by name (`stores.base.Keys` has every user's):
META_PREFIX = DEFAULT_KEYS.meta
SAVE_PREFIX = DEFAULT_KEYS.save
DELETED_PREFIX = DEFAULT_KEYS.deleted
ACKED_KEY = DEFAULT_KEYS.acked
EXPIRY_KEY = DEFAULT_KEYS.expiry
CLOCK_KEY = DEFAULT_KEYS.clock
PINNED_KEY = DEFAULT_KEYS.pinned
FACETS_KEY = DEFAULT_KEYS.facets
STORY_PREFIX = DEFAULT_KEYS.story
EPISODE_PREFIX = DEFAULT_KEYS.episode
RECONCILER_KEY = "storyart:sessions:reconciler"
# How a hang-up reads, by when it came: mid-handshake, or (TLS 1.3 completes the client's side first) at the
# first read after it, as the server's "certificate required" alert when it arrived before the hang-up.
HANGUP_SIGNS = ("EOF occurred", "Connection reset", "Error while reading from socket", "Connection closed by server",
                "CERTIFICATE_REQUIRED")
SAVE_ID_TTL_MS = 30 * 86_400_000  # how long a save id is kept when its session has no TTL
# How long a delete's tombstone is kept at least (longer when the session TTL is longer): a pending copy
# acknowledged before the delete has expired by then, unless it is pinned or sessions never expire; such a copy
# on a host that stays away longer comes back (docs/decisions.md, "Tombstones").
TOMBSTONE_MS = 30 * 86_400_000
# Every loop in a script is bounded, so that no script holds Redis (which answers nobody else meanwhile) for long:
FORGET_BATCH = 1000  # the most expired or dead index members one script forgets
PAGE_ROUNDS = 16  # the most windows of a list page one script reads
# The largest body `lua/latest.lua` returns itself (one round trip; a larger one is fetched with a GET after it), and
# `lua/save.lua` takes as an argument (a larger one is staged with a SET in the same pipeline): moving a value
# through Lua costs Redis more than a second command beyond about this size (docs/benchmarks.md).
INLINE_BODY_MAX = 64 * 1024
STAGED_TTL_MS = 60_000  # a save's staged body (`lua/save.lua`) outlives its script only if the connection died between
T = TypeVar("T")

SCRIPTS = Path(__file__).with_name("lua")  # the Lua scripts, one file each (see `_lua`)


@dataclass(frozen=True, slots=True)
class RedisFacts:
    cluster: bool  # a Redis Cluster node: the save script's keys cannot share a slot, so it cannot run there
    eviction: str | None  # maxmemory-policy: all but noeviction may drop sessions (all carry a TTL); None: unknown
    persistent: bool | None  # AOF or RDB snapshots configured (None: not allowed to ask)

    def problems(self, allow_eviction: bool) -> tuple[list[str], list[str]]:
        """(what refuses start-up, what only warns)."""
        refuse, warn = [], []
        if self.cluster:
            refuse.append("it is a Redis Cluster node, and the service's atomic save touches keys that cannot "
                          "share a hash slot (use a single Redis, or Sentinel for failover)")
        if self.eviction not in ("noeviction", None):
            (warn if allow_eviction else refuse).append(
                f"its maxmemory-policy is {self.eviction}, which can silently drop sessions when memory is full "
                "(set it to noeviction, or REDIS_ALLOW_EVICTION=1 to accept that)")
        if self.persistent is False:
            warn.append("it persists nothing (no AOF, no RDB snapshots): a restart of Redis loses every session")
        return refuse, warn


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Adopted(NamedTuple):
    """What `lua/adopt.lua` found among the session keys it was given."""

    sessions: int  # keys that exist
    indexed: int  # of them, added to the index
    stale: list[int]  # timestamps whose summary and facets need recording anew


class Checked(NamedTuple):
    """What `RedisStore.check_summary` did."""

    read: int  # session bytes read
    recorded: bool  # the summary and facets were recorded anew


def _facets_json(summary: bytes) -> bytes:
    """A summary's `Facets` as the save script records them: a JSON array, "" for none."""
    return orjson.dumps([value or "" for value in Facets.of(orjson.loads(summary))])


def _facets_field(facets: bytes, timestamp: int) -> bytes:
    """Facets as `storyart:sessions:facets` stores them: the timestamp appended (see `facet` in `lua/forget.lua`)."""
    return b"%s,%d]" % (facets[:-1], timestamp)


NO_FACETS = b'["","",""]'  # a record that is not a session: no filter matches it


def _summary_of(body: bytes, timestamp: int) -> bytes | None:
    """The summary of a stored record; None when it is not a session (not a JSON object)."""
    try:
        session = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return summarize(session, len(body), head_of(body, timestamp)) if isinstance(session, dict) else None


def _recorded(body: bytes, timestamp: int, meta: bytes | None, facets: bytes | None) -> bool:
    """Whether Redis's summary and facets for a key match its bytes.

    Whether the summary and facets Redis holds for a key are those of the bytes it holds: the summary's
    content hash and size are theirs and the facets are the summary's; for a record that is not a session, no
    summary and empty facets. A same-size rewrite by another tool changes only the hash, which needs the bytes."""
    if meta is None:
        return facets == _facets_field(NO_FACETS, timestamp) and _summary_of(body, timestamp) is None
    try:
        summary = orjson.loads(meta)
        return (summary.get("etag") == content_hash(head_of(body, timestamp))
                and summary.get("sizeBytes") == len(body) and facets == _facets_field(_facets_json(meta), timestamp))
    except (orjson.JSONDecodeError, AttributeError):  # not a summary this service wrote
        return False


def _lua(keys: Keys, *names: str) -> str:
    """Load a Lua script from its files with the names filled in.

    One script, made of these files of `lua/` in order (the libraries it calls first), with each name in braces
    (`{SESSION}`, `{PROBES}`, ...) filled in from the constant it names, the key names those of `keys`' space. A
    name left unfilled is a mistake in a file: it fails at import, not at the first request that runs the script."""
    source = "".join((SCRIPTS / f"{name}.lua").read_text(encoding="utf-8") for name in names)
    filled = {"SESSION": keys.session, "META": keys.meta, "SAVE": keys.save, "FACETS": keys.facets,
              "ACKED": keys.acked, "DELETED": keys.deleted, "STORY": keys.story, "EPISODE": keys.episode,
              "SHARES": keys.shares, "ACTIVITY": keys.activity,
              "ID_AT": str(len(keys.session) + 1), **_CONSTANTS}
    for name, value in filled.items():
        source = source.replace(f"{{{name}}}", value)
    if unfilled := re.search(r"\{[A-Z_]+\}", source):
        raise RuntimeError(f"{unfilled.group()} in the Lua script {'+'.join(names)} names no constant")
    return source


_CONSTANTS = {"SAVE_ID_TTL": str(SAVE_ID_TTL_MS), "PROBES": str(PROBES), "SKEW_MS": str(SKEW_MS),
              "MAX_AHEAD_MS": str(MAX_AHEAD_MS), "FORGET_BATCH": str(FORGET_BATCH), "PAGE_ROUNDS": str(PAGE_ROUNDS)}
# Each script of a space, by the attribute a store keeps it in; `forget`, `prune` and `assign` are libraries of
# local functions the others call.
_SCRIPTS = {"_save": ("forget", "prune", "assign", "activity", "save"), "_latest": ("forget", "prune", "latest"),
            "_page": ("forget", "prune", "page"), "_prune_now": ("forget", "prune", "prune_now"),
            "_pin": ("activity", "pin"), "_delete": ("forget", "activity", "delete"), "_summary": ("forget", "summary"),
            "_no_facets": ("forget", "no_facets"), "_adopt": ("adopt",), "_lease": ("lease",), "_claim": ("claim",),
            "_share": ("activity", "share"), "_revoke": ("activity", "revoke"), "_opened": ("activity", "opened"),
            "_events": ("activity", "events")}


@functools.cache
def _scripts(keys: Keys) -> dict[str, str]:
    """The scripts of one space, read and filled in once per process (the default user's at import)."""
    return {attribute: _lua(keys, *names) for attribute, names in _SCRIPTS.items()}


def _session_key_pattern(keys: Keys) -> re.Pattern[bytes]:
    """Match the keys the service counts as a space's sessions.

    The prefix and a timestamp as the API names one (1-16 digits, no leading zero), which is also what other
    tools keep ("exactly two colons" in the default user's space)."""
    return re.compile(re.escape(keys.session.encode()) + rb"[1-9][0-9]{0,15}")


_scripts(DEFAULT_KEYS)  # a mistake in a file fails at import


class _ReplicasNow:
    """Why writes are not replicated now (None: they are), and the lock that changes it: one per Redis."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.lock = threading.Lock()


class NotReplicated(redis.ResponseError):
    """Too few replicas confirmed a write.

    With `REDIS_REQUIRE_REPLICAS`, fewer replicas than `REDIS_WAIT_REPLICAS` confirmed a write (or are
    online): Redis answers, but a failover now could lose what it holds, so saves go to the local store (like a
    Redis refusing writes)."""


class _FreeConnections(LifoQueue):
    """A free-connection queue that raises `StorageBusy` when none comes.

    The free connections of a `redis.BlockingConnectionPool` (its `queue_class`): a thread that finds none
    waits up to the pool's timeout, then gets `StorageBusy` rather than redis-py's `ConnectionError("No
    connection available.")`, which every caller would take for a Redis that is down."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            return super().get(block, timeout)
        except Empty:
            raise StorageBusy(f"the service is busy: its {self.maxsize} Redis connection(s) (REDIS_MAX_CONNECTIONS) "
                              f"stayed in use for {timeout:g} s (REDIS_POOL_TIMEOUT)") from None


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel connection pool that waits for a free connection.

    Sentinel's pool with the blocking pool's wait for a free connection, as without Sentinel: a thread
    waits for a connection instead of counting Redis as down when all are in use."""


@dataclass(frozen=True)
class Replication:
    """Replication requirements for writes.

    How many replicas each write waits for, how long (ms), and whether a write they do not confirm is refused
    (`NotReplicated`) or kept, with a warning."""

    replicas: int = 0
    wait_ms: int = 1000
    required: bool = False


class RedisStore(SessionStore):
    """The operations of `SessionStore` on the layout above."""

    storage = "redis"
    SCAN_BATCH = 500  # summaries fetched per round trip when a list filters on them
    ADOPT_BATCH = 100  # session keys one `lua/adopt.lua` checks: about 1 ms of Redis's time (docs/decisions.md)

    def __init__(self, client: redis.Redis, probe: redis.Redis | None = None, *,
                 replication: Replication = Replication(), sentinel: Sentinel | None = None,
                 tombstone_ms: int = TOMBSTONE_MS, keep: Keep | None = None) -> None:
        self.client = client
        self.keep = keep or Keep()  # how much of each user's activity log is kept
        self.probe = probe or client  # pings: answers within the connect timeout, or Redis counts as down
        self.replication = replication
        self.sentinel = sentinel
        self.tombstone_ms = tombstone_ms
        self._replicas_now = _ReplicasNow()  # shared by every space's view of this store
        self._spaces: dict[str, RedisStore] = {}  # the views `scoped` made, shared too
        self._use(DEFAULT_KEYS)
        self.reconciler = Reconciler(self)  # other tools write the default user's keys only

    def _use(self, keys: Keys) -> None:
        self.keys, self.owner = keys, keys.owner
        self.is_session_key = _session_key_pattern(keys).fullmatch
        self._indexes = (keys.index, keys.expiry, keys.pinned)  # what the scripts that forget expired members take
        self._save_keys = (keys.index, keys.expiry, keys.clock, keys.pinned)
        for attribute, source in _scripts(keys).items():
            setattr(self, attribute, self.client.register_script(source))

    def scoped(self, owner: str) -> RedisStore:
        """This store in `owner`'s space: the same connections, that user's keys (`stores.base.Keys`)."""
        if owner == self.owner:
            return self
        view = self._spaces.get(owner)
        if view is None:
            view = copy.copy(self)
            view._use(Keys.of(owner))
            self._spaces[owner] = view
        return view

    @classmethod
    def from_config(cls, config: Config) -> RedisStore:
        """Build the Redis store and its connection pools from the config.

        One pool per process, whose connections a request waits for (`_FreeConnections`); no redis-py
        retries, so a dead Redis costs one connect timeout and the caller decides what happens next (the local
        store). With Sentinels, both clients are Sentinel-managed pools of the master (options in REDIS_URL win
        over the service's own, as `from_url` has them). The probe has a pool of its own, so a busy process
        still tells at once whether Redis answers."""
        limits = {"socket_connect_timeout": config.redis_connect_timeout, "retry": Retry(NoBackoff(), 0)}
        pool_size = {"max_connections": config.redis_max_connections, "timeout": config.redis_pool_timeout,
                     "queue_class": _FreeConnections}
        replication = Replication(config.redis_wait_replicas, max(1, round(config.redis_connect_timeout * 1000)),
                                  config.redis_require_replicas)
        kept = {"tombstone_ms": max(TOMBSTONE_MS, config.session_ttl_seconds * 1000),
                "keep": Keep(config.activity_keep_days)}
        if not config.redis_sentinels:
            pool = redis.BlockingConnectionPool.from_url(config.redis_url, socket_timeout=config.redis_socket_timeout,
                                                         **pool_size, **limits)
            probe = redis.Redis.from_url(config.redis_url, socket_timeout=config.redis_connect_timeout, **limits)
            return cls(redis.Redis(connection_pool=pool), probe, replication=replication, **kept)
        node = parse_url(config.redis_url or "redis://")
        tls = {k: v for k, v in node.items() if k.startswith("ssl_")}
        if node.pop("connection_class", None) is redis.SSLConnection:
            node["ssl"] = tls["ssl"] = True  # the Sentinels are reached over TLS when the data nodes are
        sentinel = Sentinel(config.redis_sentinels, sentinel_kwargs={
            "socket_timeout": config.redis_connect_timeout, "username": config.redis_sentinel_username,
            "password": config.redis_sentinel_password, **limits, **tls})
        name = config.redis_sentinel_master
        client = sentinel.master_for(name, connection_pool_class=_BlockingSentinelPool,
                                     **{"socket_timeout": config.redis_socket_timeout, **pool_size, **limits, **node})
        probe = sentinel.master_for(name, **{"socket_timeout": config.redis_connect_timeout, **limits, **node})
        return cls(client, probe, replication=replication, sentinel=sentinel, **kept)

    @property
    def master(self) -> str | None:
        """The address of the Redis master saves go to.

        `host:port` of the Redis saves go to: with Sentinel, the master it named last (None before it
        named one)."""
        pool = self.probe.connection_pool
        options = pool.connection_kwargs
        if self.sentinel is None and "path" in options:
            return options["path"]  # unix://
        address = pool.master_address if self.sentinel is not None else \
            (options.get("host", "localhost"), options.get("port", 6379))
        if address is None:
            return None
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- writes

    def _run_save(self, draft: Draft, now: int, ttl_ms: int, proposal: int, pending: Record | None = None,
                  event: Event | None = None) -> Moved:
        """A save (`pending` None) or the write-back of `pending`, whose draft `draft` is."""
        origin, pin, acked = ("", "", "") if pending is None else \
            (pending.origin.value, "1" if pending.pinned else "", pending.acked)
        rendered_as, body = draft.rendered(proposal if draft.timestamp is None else draft.timestamp)
        inline = len(body) <= INLINE_BODY_MAX  # else staged: see `lua/save.lua`
        staged = f"{self.keys.save}{draft.save_id}:{random.getrandbits(64):016x}"  # this attempt's alone
        args = (rendered_as, draft.summary, now, ttl_ms, "" if draft.timestamp is None else draft.timestamp, proposal,
                origin, draft.save_id, pin, _facets_json(draft.summary), acked, body if inline else "",
                *self._event(event))
        outcome, stored_as, removed, *held = self._write(self._save, (*self._save_keys, staged), args,
                                                         staged=None if inline else (staged, body))
        if held:
            distrusted(f"Redis's clock key {self.keys.clock}", repr(held[0].decode(errors="replace")), now)
        return Moved(Outcome(outcome.decode()), int(stored_as), int(removed) if removed else None)

    @property
    def unreplicated(self) -> str | None:
        """Why writes are not replicated now, if they are not.

        Why writes are not replicated now ("0 of 1 replica(s) online"), or None: set when a write is not
        confirmed by `REDIS_WAIT_REPLICAS` replicas or a ping finds fewer online, cleared by a ping that finds
        them (without `REDIS_REQUIRE_REPLICAS`, which refuses such writes instead)."""
        return self._replicas_now.reason

    def _replicas(self, online: int, shortfall: str) -> None:
        """Record how many replicas confirmed a write or are online.

        Record a count of replicas that confirmed a write, or are online: fewer than `REDIS_WAIT_REPLICAS`
        raises `NotReplicated` when they are required, else marks writes as not replicated (`shortfall` says
        why); the change either way is logged once."""
        wanted = self.replication.replicas
        if online < wanted and self.replication.required:
            raise NotReplicated(shortfall)
        reason = shortfall if online < wanted else None
        with self._replicas_now.lock:
            was, self._replicas_now.reason = self._replicas_now.reason, reason
        if reason and not was:
            log.warning("Redis saves are not replicated (%s): they go on to the master, but a failover now would "
                        "lose them (REDIS_REQUIRE_REPLICAS=1 keeps them in the local store instead)", reason)
        elif was and not reason:
            log.warning("Redis saves are replicated again (%d of %d replica(s) online)", online, wanted)

    def _write(self, script: Script, keys: tuple[str, ...], args: tuple = (),
               staged: tuple[str, bytes] | None = None) -> Any:
        """Run a writing script and wait for its replicas.

        Run a writing script, after SETting `staged` (key, value) when given (a save's body, see `lua/save.lua`);
        with `REDIS_WAIT_REPLICAS`, followed by WAIT on the same connection (WAIT counts the writes of its own
        connection); all in one pipeline: one round trip. Too few replicas confirming
        it raises `NotReplicated` when they are required (the write may be in Redis, unconfirmed: a save's
        write-back later removes such a copy by its save id), else the write stands, not replicated. While
        writes are known not to be replicated (and that is allowed) there is no WAIT: it would last its whole
        timeout each time."""
        wanted = self.replication.replicas
        wait = bool(wanted) and not (self._replicas_now.reason and not self.replication.required)
        if not wait and staged is None:
            return script(keys=keys, args=args)
        for _ in range(2):  # a new master's script cache may be empty: load it, then once more
            with self.client.pipeline(transaction=False) as pipe:
                if staged is not None:
                    pipe.set(*staged, px=STAGED_TTL_MS)
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                if wait:
                    pipe.wait(wanted, self.replication.wait_ms)
                try:
                    replies = pipe.execute()
                except redis.exceptions.NoScriptError:
                    self.client.script_load(script.script)
                    continue
            if wait:
                confirmed = replies[-1]
                self._replicas(confirmed, f"{confirmed} of {wanted} replica(s) confirmed a write within "
                                          f"{self.replication.wait_ms} ms")
            return replies[1 if staged is not None else 0]
        raise redis.exceptions.NoScriptError("the script could not be loaded")

    def save(self, draft: Draft, *, now: int, ttl_ms: int, proposal: int, when_full: WhenFull | None = None,
             event: Event | None = None) -> int:
        return self._run_save(draft, now, ttl_ms, proposal, event=event).timestamp

    def _event(self, event: Event | None) -> tuple[bytes, bytes, int, int, int]:
        """An event as the scripts take it (`lua/activity.lua`): nothing recorded for None."""
        if event is None:
            return b"", b"", 0, 0, 0
        return *event.split(), event.at, self.keep.ms, self.keep.most

    def write_back(self, record: Record, *, now: int) -> Moved:
        """Write a pending session back to Redis.

        Recreate a pending session from the local store with its timestamp, remaining TTL, pin and the time
        it was acknowledged, unless Redis holds a copy acknowledged later or a later delete (see `lua/save.lua`).
        Writing the same bytes twice changes nothing, so a write-back cut short and repeated stores one copy."""
        ttl_ms = 0 if record.expires_at == NEVER else record.expires_at - now
        return self._run_save(record.draft, now, ttl_ms, record.timestamp, record)

    def pin(self, timestamp: int, pinned: bool, *, now: int, ttl_ms: int, event: Event | None = None) -> bool:
        return bool(self._write(self._pin, (self.keys.expiry, self.keys.pinned),
                                (timestamp, int(pinned), now, ttl_ms, *self._event(event))))

    def delete(self, timestamp: int, *, event: Event | None = None) -> bool:
        """Delete a session and leave a tombstone.

        Delete the session and leave a tombstone (`lua/delete.lua`), found or not: a copy another host still holds
        and acknowledged before this delete is dropped at its write-back."""
        return bool(self._write(self._delete, self._indexes,
                                (timestamp, now_ms(), self.tombstone_ms, *self._event(event))))

    # -- share links and the activity log (`lua/share.lua` says what the keys hold)

    def add_share(self, share: Share, event: Event) -> None:
        self._put_share(share, event, "")

    def restore_share(self, share: Share, marker: str) -> None:
        """Write back a share a local store kept, with its openings (`lua/share.lua`): applied once per `marker`."""
        self._put_share(share, None, marker)

    def _put_share(self, share: Share, event: Event | None, marker: str) -> None:
        self._write(self._share, (), (share.id, share.record(), share.token_sha, "1" if share.revoked else "",
                                      share.opened, marker, *self._event(event), share.timestamp))

    def shares(self) -> list[Share]:
        with self.client.pipeline(transaction=False) as pipe:
            records, opened = pipe.hgetall(self.keys.shares).hgetall(f"{self.keys.shares}:opened").execute()
        return [Share.of(record, int(opened.get(share_id, 0))) for share_id, record in records.items()]

    def find_share(self, token_sha: str) -> Share | None:
        share_id = self.client.hget(f"{self.keys.shares}:tokens", token_sha)
        if share_id is None:
            return None
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.shares, share_id).hget(f"{self.keys.shares}:opened", share_id)
            record, opened = pipe.execute()
        return Share.of(record, int(opened or 0)) if record is not None else None

    def revoke_share(self, share_id: str, event: Event) -> bool:
        return bool(self._write(self._revoke, (), (share_id, *self._event(event))))

    def share_opened(self, share: Share, event: Event) -> None:
        self._write(self._opened, (), (share.id, 1, "", *self._event(event), share.timestamp))

    def add_openings(self, share_id: str, count: int, marker: str) -> None:
        """Write back openings a local store counted (`lua/opened.lua`): applied once per `marker`."""
        self._write(self._opened, (), (share_id, count, marker, *self._event(None), 0))

    def events(self, before: int, limit: int) -> list[bytes]:
        return self.client.zrevrangebyscore(self.keys.activity, f"({before}", "-inf", start=0, num=limit)

    def add_events(self, events: list[tuple[int, bytes]]) -> None:
        """Write back events a local store kept (`lua/events.lua`): (when, the event) each; once, however often."""
        for batch in _batches(events, 500):
            self._write(self._events, (), (self.keep.ms, self.keep.most, *(part for pair in batch for part in pair)))

    # -- reads

    def get(self, timestamp: int) -> Stored | None:
        key = self.keys.session_key(timestamp)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.mget(key, f"{self.keys.meta}{timestamp}").sismember(self.keys.pinned, key)
            (body, summary), pinned = pipe.execute()
        return Stored(timestamp, body, self.storage, summary, bool(pinned)) if body is not None else None

    def exists(self, timestamp: int) -> bool:
        return bool(self.client.exists(self.keys.session_key(timestamp)))

    def existing(self, timestamps: list[int]) -> set[int]:
        """Which of `timestamps` hold a session: one round trip per 1,000 of them."""
        found: set[int] = set()
        for batch in _batches(timestamps, 1000):
            with self.client.pipeline(transaction=False) as pipe:
                for timestamp in batch:
                    pipe.exists(self.keys.session_key(timestamp))
                found.update(ts for ts, held in zip(batch, pipe.execute(), strict=True) if held)
        return found

    def expiry_of(self, timestamp: int) -> int | None:
        left = self.client.pttl(self.keys.session_key(timestamp))
        return None if left == -2 else NEVER if left == -1 else now_ms() + left

    def latest(self) -> Stored | None:
        missed = 0
        while missed < 3:  # the newest may expire or be deleted between the two round trips: look again
            top = self._latest(keys=self._indexes, args=(now_ms(), INLINE_BODY_MAX))
            if top == 0:
                continue  # the script forgot a batch of dead members: on with the rest
            if not top:
                return None
            stamp, body, summary, pinned = top
            timestamp = int(stamp)
            if body is not None:
                return Stored(timestamp, body, self.storage, summary, bool(pinned))
            found = self.get(timestamp)
            if found is not None:
                return found
            missed += 1
        return None

    def timestamps(self, query: Query) -> tuple[int, list[int]]:
        wide = query.widened()
        if query.filters_summaries:
            total, matched = self._filtered(query)
            return total, matched[: wide.limit]
        out: list[bytes] = []
        while not out:  # empty: the script forgot dead members for a while and stopped; on with the rest
            out = self._page(keys=self._indexes,
                             args=(wide.offset, wide.limit, wide.low, wide.high, now_ms()))
        return int(out[0]), [int(ts) for ts in out[1:]]

    def rows(self, timestamps: list[int], summaries: bool = False) -> list[Stored]:
        if not timestamps:
            return []
        keys = [self.keys.session_key(ts) for ts in timestamps]
        with self.client.pipeline(transaction=False) as pipe:
            if not summaries:
                pipe.mget(keys)
            pipe.mget([f"{self.keys.meta}{ts}" for ts in timestamps]).smismember(self.keys.pinned, keys)
            *bodies, metas, pins = pipe.execute()
        found = []
        for i, (ts, meta, pinned) in enumerate(zip(timestamps, metas, pins, strict=True)):
            if summaries:
                meta = meta or self._backfill(ts)
                if meta:
                    found.append(Stored(ts, meta, self.storage, meta, bool(pinned)))
            elif bodies[0][i] is not None:
                found.append(Stored(ts, bodies[0][i], self.storage, meta, bool(pinned)))
        return found

    def _filtered(self, query: Query) -> tuple[int, list[int]]:
        """Find the timestamps matching a list's filters.

        Every timestamp in the range matching the filters, newest first. A story or episode filter reads that
        story's (or episode's) set, then the facets of its members: O(its sessions). A title search alone reads
        the facets of every session (~70 bytes each, the timestamp among them) with one HVALS: O(sessions), and
        only those whose bytes contain the search text are decoded."""
        if self._prune_now(keys=self._indexes, args=(now_ms(),)):
            self._complete_facets()
        if query.story_uuid is not None or query.episode is not None:
            source = f"{self.keys.story}{query.story_uuid}" if query.story_uuid is not None \
                else f"{self.keys.episode}{query.episode}"
            stamps = [int(score) for _, score in self.client.zrevrangebyscore(source, query.high, query.low,
                                                                              withscores=True)]
            candidates: Iterable[bytes | None] = (facets for batch in _batches(stamps, self.SCAN_BATCH)
                                                  for facets in self.client.hmget(self.keys.facets, batch))
        else:
            candidates = self.client.hvals(self.keys.facets)
        needle = orjson.dumps(query.text.casefold())[1:-1] if query.text is not None else b""  # as JSON writes it
        matched = []
        for facets in candidates:
            if facets is not None and needle in facets:
                story, episode, title, ts = orjson.loads(facets)
                if query.low <= ts <= query.high and query.matches_facets(Facets(story or None, episode or None,
                                                                                 title or None)):
                    matched.append(ts)
        matched.sort(reverse=True)
        return len(matched), matched

    def _complete_facets(self) -> None:
        """Record the facets of indexed sessions that lack them.

        Record the facets of indexed sessions that have none (saved by another tool, by an older version of
        the service, or indexed again by `reindex`): once, when `lua/prune_now.lua` finds the counts differ. A member
        left with none (its key is gone, or holds no session) is settled too, or every filtered list would walk
        the index again."""
        for batch in _batches((int(score) for _, score in self.client.zscan_iter(self.keys.index, count=1000)), 500):
            for ts, facets in zip(batch, self.client.hmget(self.keys.facets, batch), strict=True):
                if facets is None:
                    meta = self.client.get(f"{self.keys.meta}{ts}")
                    if meta is None or not self.store_summary(ts, meta):
                        self._record(ts)

    def _backfill(self, timestamp: int) -> bytes:
        """Compute and store a missing session summary.

        The summary of a session saved without one (by another tool or an older version), stored for next
        time; empty when the session is gone or the record is not a JSON object (not a session)."""
        body = self.client.get(self.keys.session_key(timestamp))
        summary = _summary_of(body, timestamp) if body is not None else None
        if summary is None:
            return b""
        self.store_summary(timestamp, summary)
        return summary

    def store_summary(self, timestamp: int, summary: bytes) -> bool:
        """Store a session's summary and facets.

        Record a summary and its facets with the session's remaining TTL (none when the session has none);
        False when the session is gone."""
        return bool(self._summary(args=(timestamp, summary, _facets_json(summary))))

    def claim(self, lease_key: str, cursor_key: str, owner: str, lease_ms: int, due: int) -> bool:
        """Take the lease of one due time (`lua/claim.lua`) unless another process has; True when `owner` did."""
        return bool(self._claim(keys=(lease_key, cursor_key), args=(owner, lease_ms, due)))

    def reindex(self) -> Adopted:
        """Index the session keys the index lacks.

        Index every session key the index lacks, with its TTL, in one pass over the keys with SCAN in
        batches (never KEYS, which would stall Redis): for when the index was lost (a tool, a careless FLUSH, an
        eviction) while the sessions are still there, and before a backup lists the index. Returns how many
        session keys exist, how many were indexed now, and which need their summary recorded anew."""
        return self.adopt(key for key in self.client.scan_iter(match=f"{self.keys.session}*", count=1000)
                          if self.is_session_key(key))

    def unindexed(self) -> int:
        """How many session keys the index lacks, found without writing (for a Redis that refuses writes)."""
        missing = 0
        keys = (key for key in self.client.scan_iter(match=f"{self.keys.session}*", count=1000)
                if self.is_session_key(key))
        for batch in _batches(keys, 500):
            with self.client.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.zscore(self.keys.index, key)
                missing += sum(score is None for score in pipe.execute())
        return missing

    def adopt(self, keys: Iterable[bytes]) -> Adopted:
        """Index a batch of session keys.

        Index those of `keys` (session keys) that exist but are not indexed, and name those whose summary and
        facets need recording anew (see `lua/adopt.lua`); no value is read. One round trip per `ADOPT_BATCH` keys, so
        Redis serves other clients between them."""
        sessions, indexed, stale = 0, 0, []
        for batch in _batches(keys, self.ADOPT_BATCH):
            found, added, names = self._adopt(keys=(self.keys.index, self.keys.expiry), args=(now_ms(), *batch))
            sessions, indexed = sessions + found, indexed + added
            stale += [int(ts) for ts in names]
        return Adopted(sessions, indexed, stale)

    def check_summary(self, timestamp: int) -> Checked:
        """Check a session's summary against its bytes and fix it.

        Compare the summary and facets recorded for a session with the bytes its key holds, and record them
        anew where they differ (another tool rewrote the key, or wrote it without them); a session that is gone
        leaves the index and the filters. The bytes are read once (twice when they changed)."""
        key = self.keys.session_key(timestamp)
        with self.client.pipeline(transaction=False) as pipe:
            pipe.get(key).get(f"{self.keys.meta}{timestamp}").hget(self.keys.facets, timestamp)
            body, meta, facets = pipe.execute()
        if body is not None and _recorded(body, timestamp, meta, facets):
            return Checked(len(body), False)
        again = self._record(timestamp)
        return again._replace(read=len(body or b"") + again.read)

    def _record(self, timestamp: int) -> Checked:
        """Record a session's summary and facets from its bytes.

        Record the summary and facets of the bytes the session's key holds now (a record that is not a
        session: none, and empty facets), unless the key or its summary changes meanwhile: WATCH makes the
        write fail then, and a later round looks again (a save recorded them itself)."""
        key, meta_key = self.keys.session_key(timestamp), f"{self.keys.meta}{timestamp}"
        with self.client.pipeline() as pipe:
            pipe.watch(key, meta_key)
            body = pipe.get(key)
            summary = _summary_of(body, timestamp) if body is not None else None
            pipe.multi()
            if summary is None:
                self._no_facets(keys=self._indexes, args=(timestamp,), client=pipe)
            else:
                self._summary(args=(timestamp, summary, _facets_json(summary)), client=pipe)
            try:
                pipe.execute()
            except redis.WatchError:
                return Checked(len(body or b""), False)
        return Checked(len(body or b""), True)

    def lease(self, token: str, lease_ms: int) -> bool:
        """Take or renew the reconciler's lease for `lease_ms` (see `lua/lease.lua`); False while another holds it."""
        return bool(self._lease(keys=(RECONCILER_KEY,), args=(token, lease_ms)))

    def index_lost(self) -> bool:
        """The index is empty while session keys exist (one SCAN step tells)."""
        if self.client.zcard(self.keys.index):
            return False
        cursor, keys = self.client.scan(0, match=f"{self.keys.session}*", count=1000)
        while not keys and cursor:
            cursor, keys = self.client.scan(cursor, match=f"{self.keys.session}*", count=1000)
        return any(self.is_session_key(k) for k in keys)

    def facts(self) -> RedisFacts:
        """Describe this Redis for start-up checks and /health.

        What this Redis is, for the checks at start-up and in /health. An ACL user may be denied INFO and
        CONFIG (the service itself needs neither): then what they would tell is unknown, not a failure."""
        try:
            info = {**self.probe.info("memory"), **self.probe.info("persistence"), **self.probe.info("cluster")}
        except redis.ResponseError:
            return RedisFacts(False, None, None)
        persistent: bool | None = bool(info.get("aof_enabled"))
        if not persistent:
            try:  # RDB snapshots show only in CONFIG, which an ACL user may be denied: then unknown
                persistent = bool(self.probe.config_get("save").get("save"))
            except redis.ResponseError:
                persistent = None
        return RedisFacts(bool(info.get("cluster_enabled")), str(info.get("maxmemory_policy", "noeviction")),
                          persistent)

    def hint(self, error: redis.RedisError) -> str:
        """Suggest a cause of a Redis connection error for the log.

        A likely cause of `error` an operator can act on, for the log (else ""): a TLS server that requires
        client certificates hangs up on a client without one, which the client only sees as the connection
        ending (`HANGUP_SIGNS`)."""
        pool = self.probe.connection_pool
        if issubclass(pool.connection_class, redis.SSLConnection) and not pool.connection_kwargs.get("ssl_certfile") \
                and any(sign in str(error) for sign in HANGUP_SIGNS):
            return " (a TLS server that requires client certificates hangs up on a client without one: add " \
                   "ssl_certfile and ssl_keyfile to REDIS_URL)"
        return ""

    def ping(self) -> None:
        """Check that Redis answers and is the master with enough replicas.

        Raises unless Redis answers. With Sentinel, asks the Sentinels for the master first (a new one makes
        both pools drop their idle connections to the old, which may still take writes until it is demoted),
        then raises unless that node says it is the master (HELLO names the role, and any ACL user may send
        it). With `REDIS_WAIT_REPLICAS`, counts the replicas online (WAIT on a connection that never wrote
        answers at once with them): too few raise `NotReplicated` when they are required, else mark writes as
        not replicated until a ping finds them again (`unreplicated`)."""
        if self.sentinel is None:
            self.probe.ping()
        else:
            for client in (self.client, self.probe):
                client.connection_pool.get_master_address()
            if self.probe.execute_command("HELLO").get(b"role") != b"master":
                self.probe.connection_pool.disconnect()  # connect again where the Sentinels say
                raise redis.ReadOnlyError(f"{self.master} is no longer the master")
        wanted = self.replication.replicas
        if wanted:
            online = self.probe.wait(wanted, 1)
            self._replicas(online, f"{online} of {wanted} replica(s) online")

    def close(self) -> None:
        for client in {id(c): c for c in (self.client, self.probe)}.values():
            client.close()
            client.connection_pool.disconnect()
        if self.sentinel is not None:
            self.sentinel.close()


@dataclass(frozen=True, slots=True)
class Budget:
    """The most one reconcile round does (docs/decisions.md, "Tool writes reach the index": what it costs)."""

    keys: int = 1000  # session keys SCAN finds and `lua/adopt.lua` checks
    reads: int = 100  # sessions read in full (one round trip each; real ones are 0.3-3 MB: `bytes` binds first)
    bytes: int = 16 << 20  # session bytes read in full (the session that crosses it is read whole)
    scans: int = 10  # SCAN calls, COUNT `keys` each (a database of mostly other keys is walked no faster)
    rest: int = 10  # rounds from the start of one pass reading every session in full to the start of the next
    stale: int = 10_000  # timestamps kept to read first; more are met by the pass reading every session


class Reconciled(NamedTuple):
    """What one reconcile round did."""

    checked: int  # session keys SCAN found, whose index entry, expiry and summary size were checked
    indexed: int  # of them, added to the index (another tool SET them without it)
    read: int  # session bytes read in full, to compare with their summaries' content hash
    recorded: int  # sessions whose summary and facets were recorded anew (new, rewritten, or gone)


class Reconciler:
    """Keep Redis's index, summaries and facets in step with the session keys.

    Keeps the index, the expiry set, the summaries and the list filters' facets in step with the session keys
    themselves, which other StoryArt tools write directly (contract.md §0): a key SET without the index, a
    session rewritten with `SET ... KEEPTTL`. In rounds of bounded work (`Budget`), run by the background thread
    of one process at a time among all that share the Redis (a lease, `storyart:sessions:reconciler`):

    * a SCAN pass over the session keys, `Budget.keys` per round: each key the index lacks is indexed (with its
      TTL), and one whose summary is missing or names another size than the key holds is read first;
    * a pass over the index, newest first, reading every session in full (`Budget.bytes` per round, one pass
      at most every `Budget.rest` rounds): a summary whose content hash is not the bytes' is recorded anew, so
      a same-size rewrite is found too.

    The hot path (save, latest, get) does nothing more: saves record their index entry and facets themselves.
    """

    WALK_STEP = 64  # index members fetched at a time by the pass reading every session

    def __init__(self, store: RedisStore, budget: Budget = Budget()) -> None:
        self.store = store
        self.budget = budget
        self.token = secrets.token_hex(8)
        self._cursor = 0
        self._found: deque[bytes] = deque()  # session keys SCAN returned beyond a round's share
        self._stale: dict[int, None] = {}  # timestamps to read first, in order, each once
        self._walk: list[int] = []  # the next timestamps of the reading pass, oldest first (popped from the end)
        self._below: int | None = None  # where the reading pass goes on (None: no pass under way)
        self._rounds = 0
        self._pass_started = -budget.rest  # the round the last reading pass started in

    def round(self, lease_ms: int) -> Reconciled | None:
        """Run one reconcile round while this process holds the lease.

        One round, when this process holds the lease (taken or renewed for `lease_ms`); None while another
        process holds it."""
        if not self.store.lease(self.token, lease_ms):
            return None
        self._rounds += 1
        keys = self._next_keys()
        adopted = self.store.adopt(keys)
        for ts in adopted.stale[: max(0, self.budget.stale - len(self._stale))]:
            self._stale[ts] = None
        sessions = read = recorded = 0
        while sessions < self.budget.reads and read < self.budget.bytes and (ts := self._next_to_read()) is not None:
            checked = self.store.check_summary(ts)
            sessions, read, recorded = sessions + 1, read + checked.read, recorded + checked.recorded
        return Reconciled(len(keys), adopted.indexed, read, recorded)

    def _next_keys(self) -> list[bytes]:
        """Return the next keys of the SCAN pass.

        The next `Budget.keys` session keys of the SCAN pass; a round ends where a pass does, so a database
        of fewer keys is walked whole every round."""
        for _ in range(self.budget.scans):
            if len(self._found) >= self.budget.keys:
                break
            self._cursor, keys = self.store.client.scan(self._cursor, match=f"{self.store.keys.session}*",
                                                        count=self.budget.keys)
            self._found.extend(key for key in keys if self.store.is_session_key(key))
            if not self._cursor:
                break
        return [self._found.popleft() for _ in range(min(self.budget.keys, len(self._found)))]

    def _next_to_read(self) -> int | None:
        """Return the next session to read in full.

        The next session to read in full: one found stale, else the next of the reading pass; None when
        neither has one this round (the pass ended, or rests)."""
        if self._stale:
            ts = next(iter(self._stale))
            del self._stale[ts]
            return ts
        if not self._walk:
            if self._below is None:
                if self._rounds - self._pass_started < self.budget.rest:
                    return None
                self._pass_started = self._rounds
            high = "+inf" if self._below is None else f"({self._below}"
            rows = self.store.client.zrevrangebyscore(self.store.keys.index, high, "-inf", start=0, num=self.WALK_STEP,
                                                      withscores=True)
            self._walk = [int(score) for _, score in reversed(rows)]
            if not self._walk:
                self._below = None
                return None
        self._below = self._walk.pop()
        return self._below
