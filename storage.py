"""Session storage: Redis first, a module-level in-process store whenever Redis is absent or away.

Three layers, read top to bottom:

* `MemoryStore`: a thread-safe, bounded, TTL-honouring store of serialized sessions.
* `RedisStore`: the same operations on the public Redis layout (SPEC §3), each one Redis round trip
  (a Lua script where a request needs several commands, which also makes timestamp allocation atomic
  across threads, workers and hosts).
* `SessionStorage`: what the HTTP layer talks to. It tries Redis, falls back to memory on any Redis error,
  skips Redis while it is down, and a background thread retries it and writes memory-held sessions back.

Sessions are stored as the exact bytes the API returns: `head + b"<ms>}"`, where `head` is the serialized
session without its closing brace and ends in `"timestamp":`. Reads splice those bytes into the response
without parsing them.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple, TypeVar

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from config import Config
from payload import Draft, head_of, summarize

try:
    import fcntl
except ImportError:  # Windows: no gunicorn, so no forked workers to share a clock with
    fcntl = None

log = logging.getLogger("storyart.storage")

KEY_PREFIX = "storyart:session:"
META_PREFIX = "storyart:meta:"  # string: the session's summary JSON, same TTL (ours; outside the public pattern)
INDEX_KEY = "storyart:sessions:index"  # sorted set: member session key, score timestamp (public)
EXPIRY_KEY = "storyart:sessions:expiry"  # sorted set: member session key, score expiry in ms (ours)
CLOCK_KEY = "storyart:sessions:clock"  # the last timestamp this service assigned (ours)

T = TypeVar("T")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def session_key(timestamp: int) -> str:
    return f"{KEY_PREFIX}{timestamp}"


class Stored(NamedTuple):
    timestamp: int
    body: bytes  # the session JSON, or its summary JSON where a summary was asked for
    storage: str  # "redis" or "memory": where this copy was read from
    summary: bytes | None = None  # the summary JSON next to a body, when the store has one


class StorageUnavailable(Exception):
    """The operation cannot be done safely now; the client should retry later (503)."""


class StorageFull(StorageUnavailable):
    """Neither Redis nor memory can take this session now."""


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

    def in_range(self, timestamp: int) -> bool:
        return self.low <= timestamp <= self.high

    def matches(self, summary: dict) -> bool:
        if self.story_uuid is not None and summary.get("storyUuid") != self.story_uuid:
            return False
        if self.episode is not None and str(summary.get("episodeNumber")) != self.episode:
            return False
        title = summary.get("title")
        return self.text is None or (isinstance(title, str) and self.text.casefold() in title.casefold())

    def widened(self) -> Query:
        """The same selection from the start, as long as needed to cut this page from a merge of two stores."""
        return replace(self, offset=0, limit=self.offset + self.limit)


# --------------------------------------------------------------------------------------------- memory


class SharedClock:
    """The last timestamp assigned by any of the processes forked after it was made (gunicorn's workers, each
    with its own memory store while Redis is away), so no two of them give two sessions one timestamp.

    It lives in an unlinked temporary file under a POSIX record lock, which the kernel releases if a worker
    dies holding it; the thread lock covers threads of one process, which a record lock does not tell apart.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - open for the life of the process
        self._lock = threading.Lock()
        os.pwrite(self._file.fileno(), bytes(8), 0)

    def next(self, wanted: int) -> int:
        """`wanted`, or the next timestamp after every one this clock has given, whichever is greater."""
        fd = self._file.fileno()
        with self._lock:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                timestamp = max(wanted, int.from_bytes(os.pread(fd, 8, 0), "little") + 1)
                os.pwrite(fd, timestamp.to_bytes(8, "little"), 0)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        return timestamp


@dataclass(slots=True)
class _Entry:
    body: bytes
    summary: bytes
    expires_at: int  # wall clock, ms
    assigned: bool  # the service chose the timestamp (else it is the client's identity for the session)


class MemoryStore:
    """Sessions in this process, newest by timestamp found in O(1), bounded by count and bytes.

    `evict` decides what happens when full: in memory-only mode the oldest sessions make room (and that is
    logged); when Redis is configured, memory only holds sessions waiting to be written back, which are never
    evicted, so a save that does not fit raises `StorageFull` instead of dropping an acknowledged session.
    """

    def __init__(self, max_sessions: int = 500, max_bytes: int = 512 * 1024 * 1024, evict: bool = True) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._order: list[int] = []  # timestamps, ascending
        self._expiry: list[tuple[int, int]] = []  # heap of (expires_at, timestamp); replaced pairs are skipped
        self._bytes = 0
        self._last_assigned = 0
        self.clock: SharedClock | None = None  # set before forking workers that assign timestamps too
        self.configure(max_sessions, max_bytes, evict)

    def configure(self, max_sessions: int, max_bytes: int, evict: bool) -> None:
        self.max_sessions, self.max_bytes, self.evict = max_sessions, max_bytes, evict

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._order.clear()
            self._expiry.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def save(self, draft: Draft, now: int, ttl_ms: int, reserved: int | None = None) -> int:
        """Store `draft` and return its timestamp: the requested one, else `reserved` (see `reserve`), else a
        fresh one unique in this process."""
        with self._lock:
            timestamp = draft.timestamp
            if timestamp is None:
                timestamp = reserved if reserved is not None else self._next_timestamp(now)
                while timestamp in self._entries:
                    timestamp = self._next_timestamp(timestamp + 1)
            entry = _Entry(draft.render(timestamp), draft.summary, now + ttl_ms, draft.timestamp is None)
            self._put(timestamp, entry, now)
            return timestamp

    def _next_timestamp(self, wanted: int) -> int:
        timestamp = max(wanted, self._last_assigned + 1)
        if self.clock is not None:
            timestamp = self.clock.next(timestamp)
        self._last_assigned = timestamp
        return timestamp

    def reserve(self, now: int) -> int:
        """A timestamp greater than any this process (and, with a shared clock, its sibling workers) has
        given, whichever store it went to: Redis starts its own choice there, so a session written back
        later from memory never meets a session Redis numbered the same."""
        with self._lock:
            return self._next_timestamp(now)

    def _put(self, timestamp: int, entry: _Entry, now: int) -> None:
        """Insert or replace; room is made (or refused) before anything changes, so a failed replace keeps
        the old copy."""
        self._purge_expired(now)
        old = self._entries.get(timestamp)
        self._make_room(entry, timestamp, len(old.body) if old else 0, 0 if old else 1)
        if old:
            self._drop(timestamp)
        bisect.insort(self._order, timestamp)
        self._entries[timestamp] = entry
        self._bytes += len(entry.body)
        heapq.heappush(self._expiry, (entry.expires_at, timestamp))

    def _make_room(self, entry: _Entry, timestamp: int, freed: int, added: int) -> None:
        if len(entry.body) > self.max_bytes:
            raise StorageFull("the session is larger than MEMORY_MAX_BYTES")
        over_count = len(self._entries) + added - self.max_sessions
        over_bytes = self._bytes - freed + len(entry.body) - self.max_bytes
        if over_count <= 0 and over_bytes <= 0:
            return
        if not self.evict:
            raise StorageFull("the in-memory store is full of sessions waiting for Redis")
        victims = []
        for oldest in self._order:  # never the one being replaced
            if over_count <= 0 and over_bytes <= 0:
                break
            if oldest != timestamp:
                victims.append(oldest)
                over_count, over_bytes = over_count - 1, over_bytes - len(self._entries[oldest].body)
        for victim in victims:
            self._drop(victim)
        log.warning("memory store full: evicted the %d oldest session(s)", len(victims))

    def _purge_expired(self, now: int) -> None:
        """Drop what has expired: only the due end of the expiry heap is looked at, never every session."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expires_at, timestamp = heapq.heappop(heap)
            entry = self._entries.get(timestamp)
            if entry is not None and entry.expires_at == expires_at:
                self._drop(timestamp)
        if len(heap) > 2 * len(self._entries) + 64:  # pairs of replaced or removed sessions: rebuild, amortized
            self._expiry = [(entry.expires_at, ts) for ts, entry in self._entries.items()]
            heapq.heapify(self._expiry)

    def _drop(self, timestamp: int) -> _Entry | None:
        entry = self._entries.pop(timestamp, None)
        if entry is not None:
            self._order.pop(bisect.bisect_left(self._order, timestamp))
            self._bytes -= len(entry.body)
        return entry

    def _live(self, timestamp: int) -> _Entry | None:
        entry = self._entries.get(timestamp)
        return entry if entry is not None and entry.expires_at > now_ms() else None

    def get(self, timestamp: int) -> Stored | None:
        entry = self._live(timestamp)
        return Stored(timestamp, entry.body, "memory", entry.summary) if entry else None

    def exists(self, timestamp: int) -> bool:
        return self._live(timestamp) is not None

    def latest(self) -> Stored | None:
        now = now_ms()
        with self._lock:
            for timestamp in reversed(self._order):
                entry = self._entries[timestamp]
                if entry.expires_at > now:
                    return Stored(timestamp, entry.body, "memory", entry.summary)
        return None

    def page(self, query: Query, summaries: bool = False) -> tuple[int, list[Stored]]:
        """(how many match, up to `query.limit` of them newest first after `query.offset`)."""
        with self._lock:
            self._purge_expired(now_ms())
            low = bisect.bisect_left(self._order, query.low)
            high = bisect.bisect_right(self._order, query.high)
            if query.filters_summaries:
                chosen = [ts for ts in reversed(self._order[low:high])
                          if query.matches(orjson.loads(self._entries[ts].summary))]
                total, page = len(chosen), chosen[query.offset : query.offset + query.limit]
            else:  # an index slice, newest first, without copying the rest
                stop = max(low, high - query.offset)
                total, page = high - low, self._order[max(low, stop - query.limit) : stop][::-1]
            rows = [(ts, self._entries[ts]) for ts in page]
        return total, [Stored(ts, e.summary if summaries else e.body, "memory", e.summary) for ts, e in rows]

    def delete(self, timestamp: int) -> bool:
        with self._lock:
            return self._drop(timestamp) is not None

    def snapshot(self) -> list[tuple[int, _Entry]]:
        """Every session, oldest first: what a write-back walks through."""
        with self._lock:
            return [(ts, self._entries[ts]) for ts in self._order]

    def holds(self, timestamp: int, entry: _Entry) -> bool:
        return self._entries.get(timestamp) is entry

    def discard_if_same(self, timestamp: int, entry: _Entry) -> None:
        """Forget a session that now lives in Redis, unless it was replaced meanwhile."""
        with self._lock:
            if self._entries.get(timestamp) is entry:
                self._drop(timestamp)


MEMORY = MemoryStore()
"""The process's in-memory store (SPEC: module-level), configured by `build_storage`."""


# ---------------------------------------------------------------------------------------------- redis

# Index members whose session expired leave the index (and the expiry set); run by every save, latest and
# list page. The work is the number of sessions that expired since the last run.
_PRUNE = """
local function prune(index, expiry, now)
  local due = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
  for _, k in ipairs(due) do
    local left = redis.call('PTTL', k)
    if left == -2 then
      redis.call('ZREM', index, k)
      redis.call('ZREM', expiry, k)
    elseif left == -1 then
      redis.call('ZREM', expiry, k)
    else
      redis.call('ZADD', expiry, string.format('%d', now + left), k)
    end
  end
end
"""

# Save (and write back) one session atomically. KEYS: index, expiry, clock. ARGV: head, requested timestamp
# or "", now in ms, TTL in ms, write-back mode, summary JSON, "exact" (assign exactly `now`, a timestamp the
# caller reserved, or return 0 if a session holds it). Returns the timestamp, or 0 when a write-back was
# superseded or an exact timestamp is taken. A save replaces whatever holds its timestamp. A write-back
# meeting a *different* session there: if its timestamp was the client's ("identity"), the copy acknowledged
# later wins (the later expiry); if the service assigned it ("assigned": two processes chose the same
# millisecond), both are kept and the written-back one takes a fresh timestamp.
_SAVE = _PRUNE + """
local function fmt(n) return string.format('%d', n) end
local head, now, ttl = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local ts = tonumber(ARGV[2])
if ts and ARGV[5] ~= '' then
  local current = redis.call('GET', '{SESSION}' .. fmt(ts))
  if current and current ~= head .. fmt(ts) .. '}' then
    if ARGV[5] == 'assigned' then
      ts = nil
    elseif redis.call('PTTL', '{SESSION}' .. fmt(ts)) >= ttl then
      return 0
    end
  end
end
if not ts and ARGV[7] == 'exact' then
  if redis.call('EXISTS', '{SESSION}' .. fmt(now)) == 1 then return 0 end
  ts = now
  if ts > tonumber(redis.call('GET', KEYS[3]) or '0') then redis.call('SET', KEYS[3], fmt(ts)) end
elseif not ts then
  ts = math.max(now, tonumber(redis.call('GET', KEYS[3]) or '0') + 1)
  while redis.call('EXISTS', '{SESSION}' .. fmt(ts)) == 1 do ts = ts + 1 end
  redis.call('SET', KEYS[3], fmt(ts))
end
local id = fmt(ts)
local key = '{SESSION}' .. id
redis.call('SET', key, head .. id .. '}', 'PX', fmt(ttl))
redis.call('SET', '{META}' .. id, ARGV[6], 'PX', fmt(ttl))
redis.call('ZADD', KEYS[1], id, key)
redis.call('ZADD', KEYS[2], fmt(now + ttl), key)
prune(KEYS[1], KEYS[2], now)
return id
"""

# The newest session: {score, body, summary or false}, or false. ARGV: now. Members whose key is gone without
# an expiry entry (written by another tool, then deleted) are pruned on the way.
_LATEST = _PRUNE + """
prune(KEYS[1], KEYS[2], tonumber(ARGV[1]))
while true do
  local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #top == 0 then return false end
  local body = redis.call('GET', top[1])
  if body then return {top[2], body, redis.call('GET', '{META}' .. top[2])} end
  redis.call('ZREM', KEYS[1], top[1])
  redis.call('ZREM', KEYS[2], top[1])
end
"""

# One page newest first within a score range: {total, score1, value1, score2, value2, ...}. ARGV: offset,
# limit, min, max, now, "meta" for summaries (false where a session has none) instead of bodies. Dead members
# in the window are removed first, so a page is never short while matches remain.
_PAGE = _PRUNE + """
prune(KEYS[1], KEYS[2], tonumber(ARGV[5]))
local rows, dead
repeat
  rows = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[4], ARGV[3], 'WITHSCORES', 'LIMIT', ARGV[1], ARGV[2])
  dead = 0
  for i = 1, #rows, 2 do
    if redis.call('EXISTS', rows[i]) == 0 then
      redis.call('ZREM', KEYS[1], rows[i])
      redis.call('ZREM', KEYS[2], rows[i])
      dead = dead + 1
    end
  end
until dead == 0
local out = {redis.call('ZCOUNT', KEYS[1], ARGV[3], ARGV[4])}
for i = 1, #rows, 2 do
  out[#out + 1] = rows[i + 1]
  if ARGV[6] == 'meta' then
    out[#out + 1] = redis.call('GET', '{META}' .. rows[i + 1])
  else
    out[#out + 1] = redis.call('GET', rows[i])
  end
end
return out
"""


def _script(source: str) -> str:
    return source.replace("{SESSION}", KEY_PREFIX).replace("{META}", META_PREFIX)


class RedisStore:
    """The public Redis layout (SPEC §3) behind the same operations as `MemoryStore`."""

    SCAN_BATCH = 500  # summaries fetched per round trip when a list filters on them

    def __init__(self, client: redis.Redis, probe: redis.Redis | None = None) -> None:
        self.client = client
        self.probe = probe or client  # pings: answers within the connect timeout, or Redis counts as down
        self._save = client.register_script(_script(_SAVE))
        self._latest = client.register_script(_script(_LATEST))
        self._page = client.register_script(_script(_PAGE))

    @classmethod
    def from_config(cls, config: Config) -> RedisStore:
        """One pool per process, sized for its threads; no redis-py retries, so a dead Redis costs one
        connect timeout and the caller decides what happens next (fall back to memory)."""
        pool = redis.BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=config.redis_max_connections,
            timeout=config.redis_socket_timeout,
            socket_connect_timeout=config.redis_connect_timeout,
            socket_timeout=config.redis_socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        probe = redis.Redis.from_url(config.redis_url, socket_connect_timeout=config.redis_connect_timeout,
                                     socket_timeout=config.redis_connect_timeout, retry=Retry(NoBackoff(), 0))
        return cls(redis.Redis(connection_pool=pool), probe)

    def save(self, draft: Draft, now: int, ttl_ms: int, write_back: str = "", exact: bool = False) -> int:
        """Store; `write_back` is "" for a client's save, else "identity" or "assigned"; `exact`: `now` is a
        reserved timestamp to use as is (0 back if taken). See `_SAVE`."""
        requested = "" if draft.timestamp is None else str(draft.timestamp)
        args = (draft.head, requested, now, ttl_ms, write_back, draft.summary, "exact" if exact else "")
        return int(self._save(keys=(INDEX_KEY, EXPIRY_KEY, CLOCK_KEY), args=args))

    def get(self, timestamp: int) -> Stored | None:
        body, summary = self.client.mget(session_key(timestamp), f"{META_PREFIX}{timestamp}")
        return Stored(timestamp, body, "redis", summary) if body is not None else None

    def exists(self, timestamp: int) -> bool:
        return bool(self.client.exists(session_key(timestamp)))

    def latest(self) -> Stored | None:
        found = self._latest(keys=(INDEX_KEY, EXPIRY_KEY), args=(now_ms(),))
        return Stored(int(found[0]), found[1], "redis", found[2] or None) if found else None

    def page(self, query: Query, summaries: bool = False) -> tuple[int, list[Stored]]:
        if query.filters_summaries:
            return self._filtered_page(query, summaries)
        out = self._page(keys=(INDEX_KEY, EXPIRY_KEY), args=(
            query.offset, query.limit, query.low, query.high, now_ms(), "meta" if summaries else ""))
        rows = [(int(out[i]), out[i + 1]) for i in range(1, len(out), 2)]
        if summaries:
            rows = [(ts, value or self._backfill(ts)) for ts, value in rows]
            return int(out[0]), [Stored(ts, value, "redis", value) for ts, value in rows if value]
        return int(out[0]), [Stored(ts, value, "redis") for ts, value in rows]

    def _filtered_page(self, query: Query, summaries: bool) -> tuple[int, list[Stored]]:
        """Walk the range newest first in batches, reading summaries only; O(sessions in range)."""
        matched: list[tuple[int, bytes]] = []
        start = 0
        while True:
            batch = self.client.zrevrangebyscore(INDEX_KEY, query.high, query.low, start=start,
                                                 num=self.SCAN_BATCH, withscores=True)
            if not batch:
                break
            stamps = [int(score) for _, score in batch]
            values = self.client.mget([f"{META_PREFIX}{ts}" for ts in stamps])
            for ts, value in zip(stamps, values, strict=True):
                value = value or self._backfill(ts)
                if value and query.matches(orjson.loads(value)):
                    matched.append((ts, value))
            start += self.SCAN_BATCH
        page = matched[query.offset : query.offset + query.limit]
        if summaries:
            return len(matched), [Stored(ts, value, "redis", value) for ts, value in page]
        bodies = self.client.mget([session_key(ts) for ts, _ in page]) if page else []
        rows = [Stored(ts, body, "redis", value) for (ts, value), body in zip(page, bodies, strict=True) if body]
        return len(matched), rows

    def _backfill(self, timestamp: int) -> bytes:
        """The summary of a session saved without one (by another tool or an older version), stored for next
        time with the session's remaining TTL; empty when the session is gone."""
        key = session_key(timestamp)
        with self.client.pipeline(transaction=False) as pipe:
            body, left = pipe.get(key).pttl(key).execute()
        if body is None:
            return b""
        summary = summarize(orjson.loads(body), len(body), head_of(body, timestamp))
        self.client.set(f"{META_PREFIX}{timestamp}", summary, px=left if left > 0 else None)
        return summary

    def delete(self, timestamp: int) -> bool:
        key = session_key(timestamp)
        with self.client.pipeline() as pipe:
            deleted = pipe.delete(key, f"{META_PREFIX}{timestamp}").zrem(INDEX_KEY, key).zrem(EXPIRY_KEY, key).execute()
        return bool(deleted[0])

    def ping(self) -> None:
        self.probe.ping()

    def close(self) -> None:
        for client in {id(c): c for c in (self.client, self.probe)}.values():
            client.close()
            client.connection_pool.disconnect()


# -------------------------------------------------------------------------------------------- failover


class SessionStorage:
    """Redis first, memory when Redis is absent or failing; reads see both, the newest timestamp wins."""

    def __init__(self, memory: MemoryStore, redis_store: RedisStore | None, ttl_seconds: int,
                 retry_interval: float) -> None:
        self.memory = memory
        self.redis = redis_store
        self.ttl_ms = ttl_seconds * 1000
        self.retry_interval = retry_interval
        self._redis_down = False
        self._writes_refused = False  # Redis answers but refuses writes (READONLY, OOM): reads still use it
        self._lock = threading.Lock()
        self._moving = threading.Lock()  # a write-back step and a delete never interleave
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None

    # -- state

    @property
    def redis_state(self) -> str:
        if self.redis is None:
            return "not configured"
        return "disconnected" if self._redis_down else "connected"

    def _use_redis(self) -> bool:
        return self.redis is not None and not self._redis_down

    def _redis_failed(self, error: redis.RedisError) -> None:
        """Skip Redis from now on until the background retry finds it again. An error Redis answered with
        (a READONLY replica, OOM at maxmemory) only stops saves: what Redis holds stays readable."""
        with self._lock:
            if not (self._redis_down or self._writes_refused):
                log.error("Redis unavailable (%s: %s); serving from memory and retrying every %gs",
                          type(error).__name__, error, self.retry_interval)
            if isinstance(error, redis.ResponseError):
                self._writes_refused = True
            else:
                self._redis_down = True
        self._start_worker()

    # -- operations

    def save(self, draft: Draft) -> tuple[int, str]:
        """Store and return (timestamp, where). Raises `StorageFull` when it fits nowhere."""
        now, reserved = now_ms(), None
        if self._use_redis() and not self._writes_refused:
            assign = draft.timestamp is None
            start = self.memory.reserve(now) if assign else now
            try:
                timestamp = self.redis.save(draft, start, self.ttl_ms, exact=assign)
                while timestamp == 0:  # another host numbered a session with it: reserve the next one
                    start = self.memory.reserve(start + 1)
                    timestamp = self.redis.save(draft, start, self.ttl_ms, exact=True)
            except redis.RedisError as error:
                self._redis_failed(error)
                # Redis may still apply a save it timed out on, under the timestamp reserved for it: memory
                # keeps the same one, so the write-back finds the same bytes and nothing is stored twice.
                reserved = start if draft.timestamp is None else None
            else:
                if draft.timestamp is not None and len(self.memory):
                    self.memory.delete(draft.timestamp)  # an older memory copy must not be written back later
                return timestamp, "redis"
        timestamp = self.memory.save(draft, now, self.ttl_ms, reserved)
        if self.redis is not None:
            self._start_worker()
        return timestamp, "memory"

    def _from_redis(self, call: Callable[[RedisStore], T], fallback: T) -> T:
        """`call(redis)`, or `fallback` when Redis is absent, known to be down, or fails now."""
        if not self._use_redis():
            return fallback
        try:
            return call(self.redis)
        except redis.RedisError as error:
            self._redis_failed(error)
            return fallback

    def get(self, timestamp: int) -> Stored | None:
        return self._from_redis(lambda r: r.get(timestamp), None) or self.memory.get(timestamp)

    def exists(self, timestamp: int) -> bool:
        return self._from_redis(lambda r: r.exists(timestamp), False) or self.memory.exists(timestamp)

    def latest(self) -> Stored | None:
        found = [s for s in (self.memory.latest(), self._from_redis(RedisStore.latest, None)) if s is not None]
        return max(found, key=lambda s: (s.timestamp, s.storage == "redis")) if found else None

    def page(self, query: Query, summaries: bool = False) -> tuple[int, list[Stored]]:
        """A page of sessions (or their summaries) newest first and how many match; with sessions in both
        stores (only while a write-back is pending) the two are merged, a timestamp in both counted once."""
        if not len(self.memory):
            return self._from_redis(lambda r: r.page(query, summaries), (0, []))
        memory_total, memory_rows = self.memory.page(query.widened(), summaries)
        redis_result = self._from_redis(lambda r: r.page(query.widened(), summaries), None)
        if redis_result is None:
            return memory_total, memory_rows[query.offset :]
        redis_total, redis_rows = redis_result
        merged = {row.timestamp: row for row in memory_rows}
        merged.update({row.timestamp: row for row in redis_rows})
        both = len(memory_rows) + len(redis_rows) - len(merged)
        rows = sorted(merged.values(), key=lambda s: s.timestamp, reverse=True)
        return redis_total + memory_total - both, rows[query.offset : query.offset + query.limit]

    def delete(self, timestamp: int) -> bool:
        """Delete everywhere, or not at all: with Redis configured but away, a copy there would come back."""
        if self.redis is None:
            return self.memory.delete(timestamp)
        unavailable = StorageUnavailable("Redis is unreachable, so the session cannot be deleted everywhere")
        if self._redis_down:
            raise unavailable
        with self._moving:
            try:
                in_redis = self.redis.delete(timestamp)
            except redis.RedisError as error:
                self._redis_failed(error)
                raise unavailable from error
            return self.memory.delete(timestamp) or in_redis

    def check(self) -> str:
        """Health probe: ping Redis unless it is already known to be down (no wait on a dead Redis)."""
        if self._use_redis():
            try:
                self.redis.ping()
            except redis.RedisError as error:
                self._redis_failed(error)
        return self.redis_state

    # -- recovery

    def write_back(self) -> int:
        """Move memory-held sessions to Redis (same timestamp, remaining TTL); returns how many moved.

        A session that expired meanwhile is dropped, not revived. If Redis already holds a *different*
        session under the same timestamp, `_SAVE` decides: a later save of the same client timestamp wins;
        a service-assigned clash (two workers, one millisecond) keeps both.
        """
        if self.redis is None:
            return 0
        moved = 0
        for timestamp, entry in self.memory.snapshot():
            now = now_ms()
            if entry.expires_at <= now:
                self.memory.discard_if_same(timestamp, entry)
                continue
            draft = Draft(head_of(entry.body, timestamp), timestamp, entry.summary)
            mode = "assigned" if entry.assigned else "identity"
            with self._moving:
                if not self.memory.holds(timestamp, entry):
                    continue  # deleted or replaced since the snapshot
                stored_as = self.redis.save(draft, now, entry.expires_at - now, write_back=mode)
                self.memory.discard_if_same(timestamp, entry)
            if stored_as == 0:
                log.info("write-back: session %d was saved again since; the later copy stays", timestamp)
            elif stored_as != timestamp:
                log.warning("write-back: Redis already held another session %d; this one is now %d",
                            timestamp, stored_as)
            moved += 1
        return moved

    def _start_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._recover_loop, name="storyart-redis-retry",
                                                daemon=True)
                self._worker.start()

    def _recover_loop(self) -> None:
        """Every `retry_interval`: when Redis is down, ping it; when it answers, write memory back to it."""
        while not self._stopping.wait(self.retry_interval):
            if not (self._redis_down or self._writes_refused or len(self.memory)):
                continue
            try:
                self.redis.ping()
                if self._redis_down:
                    log.warning("Redis is reachable again; writing back %d session(s)", len(self.memory))
                    self._redis_down = False
                moved = self.write_back()
            except redis.RedisError as error:
                self._redis_failed(error)
            else:
                if self._writes_refused:
                    log.warning("Redis accepts writes again; wrote back %d session(s)", moved)
                    self._writes_refused = False
                elif moved:
                    log.info("write-back: %d session(s) moved from memory to Redis", moved)

    def close(self) -> None:
        """Stop retrying and flush what memory holds to Redis if it is reachable; say what could not be."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout=self.retry_interval + 5)
        if self.redis is None:
            if len(self.memory):
                log.warning("shutdown: %d session(s) held only in memory end with this process (no Redis)",
                            len(self.memory))
            return
        moved, error = 0, None
        try:
            self.redis.ping()
            moved = self.write_back()
        except redis.RedisError as exc:
            error = exc
        left = len(self.memory)
        log.log(logging.WARNING if left or error else logging.INFO,
                "shutdown: wrote %d session(s) back to Redis; %d memory-only session(s) could not be%s",
                        moved, left, f" ({error})" if error else "")
        self.redis.close()


def build_storage(config: Config, memory: MemoryStore = MEMORY) -> SessionStorage:
    memory.configure(config.memory_max_sessions, config.memory_max_bytes, evict=not config.redis_configured)
    redis_store = RedisStore.from_config(config) if config.redis_configured else None
    return SessionStorage(memory, redis_store, config.session_ttl_seconds, config.redis_retry_interval)
