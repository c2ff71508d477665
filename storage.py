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
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from config import Config

log = logging.getLogger("storyart.storage")

KEY_PREFIX = "storyart:session:"
INDEX_KEY = "storyart:sessions:index"  # sorted set: member session key, score timestamp (public)
EXPIRY_KEY = "storyart:sessions:expiry"  # sorted set: member session key, score expiry in ms (ours)
CLOCK_KEY = "storyart:sessions:clock"  # the last timestamp this service assigned (ours)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def session_key(timestamp: int) -> str:
    return f"{KEY_PREFIX}{timestamp}"


@dataclass(frozen=True, slots=True)
class Draft:
    """A validated session, serialized up to its timestamp; `timestamp` is None when the service assigns it."""

    head: bytes
    timestamp: int | None

    def render(self, timestamp: int) -> bytes:
        return b"%s%d}" % (self.head, timestamp)


def head_of(body: bytes, timestamp: int) -> bytes:
    """The `Draft.head` of a stored body: every stored body ends in `<timestamp>}`."""
    return body[: -len(str(timestamp)) - 1]


class Stored(NamedTuple):
    timestamp: int
    body: bytes
    storage: str  # "redis" or "memory": where this copy was read from


class StorageFull(Exception):
    """Neither Redis nor memory can take this session now; the client should retry later (503)."""


# --------------------------------------------------------------------------------------------- memory


@dataclass(slots=True)
class _Entry:
    body: bytes
    expires_at: int  # wall clock, ms


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

    @property
    def last_assigned(self) -> int:
        return self._last_assigned

    def save(self, draft: Draft, now: int, ttl_ms: int) -> int:
        """Store `draft` and return its timestamp: the requested one, or a fresh one unique in this process."""
        with self._lock:
            timestamp = draft.timestamp
            if timestamp is None:
                timestamp = max(now, self._last_assigned + 1)
                while timestamp in self._entries:
                    timestamp += 1
                self._last_assigned = timestamp
            self._put(timestamp, draft.render(timestamp), now + ttl_ms, now)
            return timestamp

    def put(self, timestamp: int, body: bytes, expires_at: int) -> None:
        """Store an already rendered body (used to move sessions between stores)."""
        with self._lock:
            self._put(timestamp, body, expires_at, now_ms())

    def _put(self, timestamp: int, body: bytes, expires_at: int, now: int) -> None:
        self._purge_expired(now)
        old = self._entries.get(timestamp)
        freed = len(old.body) if old else 0
        self._make_room(len(body) - freed, 0 if old else 1)
        if old:
            self._bytes -= freed
        else:
            bisect.insort(self._order, timestamp)
        self._entries[timestamp] = _Entry(body, expires_at)
        self._bytes += len(body)
        heapq.heappush(self._expiry, (expires_at, timestamp))

    def _make_room(self, extra_bytes: int, extra_count: int) -> None:
        if extra_bytes > self.max_bytes:
            raise StorageFull("the session is larger than MEMORY_MAX_BYTES")
        over_count = len(self._entries) + extra_count - self.max_sessions
        over_bytes = self._bytes + extra_bytes - self.max_bytes
        if over_count <= 0 and over_bytes <= 0:
            return
        if not self.evict:
            raise StorageFull("the in-memory store is full of sessions waiting for Redis")
        evicted = 0
        while self._order and (over_count > 0 or over_bytes > 0):
            entry = self._entries.pop(self._order.pop(0))
            self._bytes -= len(entry.body)
            over_count, over_bytes, evicted = over_count - 1, over_bytes - len(entry.body), evicted + 1
        log.warning("memory store full: evicted the %d oldest session(s)", evicted)

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

    def get(self, timestamp: int) -> bytes | None:
        entry = self._entries.get(timestamp)
        if entry is None or entry.expires_at <= now_ms():
            return None
        return entry.body

    def latest(self) -> Stored | None:
        now = now_ms()
        with self._lock:
            for timestamp in reversed(self._order):
                entry = self._entries[timestamp]
                if entry.expires_at > now:
                    return Stored(timestamp, entry.body, "memory")
        return None

    def page(self, offset: int, limit: int) -> tuple[int, list[Stored]]:
        """(number stored, up to `limit` sessions newest first after skipping `offset`)."""
        now = now_ms()
        with self._lock:
            self._purge_expired(now)
            stop = max(0, len(self._order) - offset)
            chosen = self._order[max(0, stop - limit) : stop][::-1]  # newest first, without copying the rest
            return len(self._order), [Stored(ts, self._entries[ts].body, "memory") for ts in chosen]

    def delete(self, timestamp: int) -> bool:
        with self._lock:
            return self._drop(timestamp) is not None

    def snapshot(self) -> list[tuple[int, bytes, int]]:
        """(timestamp, body, expires_at) of every session, oldest first: what a write-back walks through."""
        with self._lock:
            return [(ts, self._entries[ts].body, self._entries[ts].expires_at) for ts in self._order]

    def discard_if_same(self, timestamp: int, body: bytes) -> None:
        """Forget a session that now lives in Redis, unless it was replaced meanwhile."""
        with self._lock:
            entry = self._entries.get(timestamp)
            if entry is not None and entry.body is body:
                self._drop(timestamp)


MEMORY = MemoryStore()
"""The process's in-memory store (SPEC: module-level), configured by `build_storage`."""


# ---------------------------------------------------------------------------------------------- redis

# Save (and write back) one session atomically. KEYS: index, expiry, clock. ARGV: head, requested timestamp
# or "", now in ms, TTL in ms, key prefix, "keep" ("1": never replace a different session under the requested
# timestamp but take a fresh one; used by write-back). Returns the timestamp as a string.
_SAVE = """
local function fmt(n) return string.format('%d', n) end
local head, now, ttl, prefix = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local ts = tonumber(ARGV[2])
if ts and ARGV[6] == '1' then
  local current = redis.call('GET', prefix .. fmt(ts))
  if current and current ~= head .. fmt(ts) .. '}' then ts = nil end
end
if not ts then
  ts = math.max(now, tonumber(redis.call('GET', KEYS[3]) or '0') + 1)
  while redis.call('EXISTS', prefix .. fmt(ts)) == 1 do ts = ts + 1 end
  redis.call('SET', KEYS[3], fmt(ts))
end
local id = fmt(ts)
local key = prefix .. id
redis.call('SET', key, head .. id .. '}', 'PX', fmt(ttl))
redis.call('ZADD', KEYS[1], id, key)
redis.call('ZADD', KEYS[2], fmt(now + ttl), key)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', fmt(now), 'LIMIT', 0, 100)
for _, k in ipairs(due) do
  local left = redis.call('PTTL', k)
  if left == -2 then
    redis.call('ZREM', KEYS[1], k)
    redis.call('ZREM', KEYS[2], k)
  elseif left == -1 then
    redis.call('ZREM', KEYS[2], k)
  else
    redis.call('ZADD', KEYS[2], fmt(now + left), k)
  end
end
return id
"""

# The newest session: {score, body}, or false. Index members whose key is gone are pruned on the way.
_LATEST = """
for _ = 1, 100 do
  local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #top == 0 then return false end
  local body = redis.call('GET', top[1])
  if body then return {top[2], body} end
  redis.call('ZREM', KEYS[1], top[1])
  redis.call('ZREM', KEYS[2], top[1])
end
return false
"""

# One page newest first: {total, score1, body1, score2, body2, ...}; ARGV: offset, limit.
_PAGE = """
local rows = redis.call('ZREVRANGE', KEYS[1], ARGV[1], tonumber(ARGV[1]) + tonumber(ARGV[2]) - 1, 'WITHSCORES')
local out = {0}
for i = 1, #rows, 2 do
  local body = redis.call('GET', rows[i])
  if body then
    out[#out + 1] = rows[i + 1]
    out[#out + 1] = body
  else
    redis.call('ZREM', KEYS[1], rows[i])
    redis.call('ZREM', KEYS[2], rows[i])
  end
end
out[1] = redis.call('ZCARD', KEYS[1])
return out
"""


class RedisStore:
    """The public Redis layout (SPEC §3) behind the same operations as `MemoryStore`."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._save = client.register_script(_SAVE)
        self._latest = client.register_script(_LATEST)
        self._page = client.register_script(_PAGE)

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
        return cls(redis.Redis(connection_pool=pool))

    def save(self, draft: Draft, now: int, ttl_ms: int, keep: bool = False) -> int:
        head = draft.head
        requested = "" if draft.timestamp is None else str(draft.timestamp)
        keys = (INDEX_KEY, EXPIRY_KEY, CLOCK_KEY)
        return int(self._save(keys=keys, args=(head, requested, now, ttl_ms, KEY_PREFIX, "1" if keep else "")))

    def get(self, timestamp: int) -> bytes | None:
        return self.client.get(session_key(timestamp))

    def latest(self) -> Stored | None:
        found = self._latest(keys=(INDEX_KEY, EXPIRY_KEY))
        return Stored(int(found[0]), found[1], "redis") if found else None

    def page(self, offset: int, limit: int) -> tuple[int, list[Stored]]:
        out = self._page(keys=(INDEX_KEY, EXPIRY_KEY), args=(offset, limit))
        return int(out[0]), [Stored(int(out[i]), out[i + 1], "redis") for i in range(1, len(out), 2)]

    def delete(self, timestamp: int) -> bool:
        key = session_key(timestamp)
        with self.client.pipeline() as pipe:
            deleted, _, _ = pipe.delete(key).zrem(INDEX_KEY, key).zrem(EXPIRY_KEY, key).execute()
        return bool(deleted)

    def ping(self) -> None:
        self.client.ping()

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()


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
        self._lock = threading.Lock()
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
        """Skip Redis from now on until the background retry finds it again."""
        with self._lock:
            if not self._redis_down:
                log.error("Redis unavailable (%s: %s); serving from memory and retrying every %gs",
                          type(error).__name__, error, self.retry_interval)
            self._redis_down = True
        self._start_worker()

    # -- operations

    def save(self, draft: Draft) -> tuple[int, str]:
        """Store and return (timestamp, where). Raises `StorageFull` when it fits nowhere."""
        now = max(now_ms(), self.memory.last_assigned + 1)
        if self._use_redis():
            try:
                timestamp = self.redis.save(draft, now, self.ttl_ms)
            except redis.RedisError as error:
                self._redis_failed(error)
            else:
                if draft.timestamp is not None and len(self.memory):
                    self.memory.delete(draft.timestamp)  # an older memory copy must not be written back later
                return timestamp, "redis"
        timestamp = self.memory.save(draft, now, self.ttl_ms)
        if self.redis is not None:
            self._start_worker()
        return timestamp, "memory"

    def get(self, timestamp: int) -> Stored | None:
        if self._use_redis():
            try:
                body = self.redis.get(timestamp)
            except redis.RedisError as error:
                self._redis_failed(error)
            else:
                if body is not None:
                    return Stored(timestamp, body, "redis")
        body = self.memory.get(timestamp)
        return Stored(timestamp, body, "memory") if body is not None else None

    def latest(self) -> Stored | None:
        candidates = [self.memory.latest()]
        if self._use_redis():
            try:
                candidates.append(self.redis.latest())
            except redis.RedisError as error:
                self._redis_failed(error)
        found = [c for c in candidates if c is not None]
        return max(found, key=lambda s: (s.timestamp, s.storage == "redis")) if found else None

    def page(self, offset: int, limit: int) -> tuple[int, list[Stored]]:
        """A page of sessions newest first and how many are stored; with sessions in both stores (only
        while a write-back is pending) the two are merged, a timestamp in both counted once."""
        memory_total, memory_rows = self.memory.page(0, offset + limit) if len(self.memory) else (0, [])
        if not self._use_redis():
            return memory_total, memory_rows[offset:]
        try:
            if not memory_rows:
                return self.redis.page(offset, limit)
            redis_total, redis_rows = self.redis.page(0, offset + limit)
        except redis.RedisError as error:
            self._redis_failed(error)
            return memory_total, memory_rows[offset:]
        merged = {row.timestamp: row for row in memory_rows}
        merged.update({row.timestamp: row for row in redis_rows})
        both = len(memory_rows) + len(redis_rows) - len(merged)
        rows = sorted(merged.values(), key=lambda s: s.timestamp, reverse=True)
        return redis_total + memory_total - both, rows[offset : offset + limit]

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
        session under the same timestamp (two workers saved in the same millisecond during an outage),
        this one is kept under a fresh timestamp rather than overwrite or be lost.
        """
        if self.redis is None:
            return 0
        moved = 0
        for timestamp, body, expires_at in self.memory.snapshot():
            now = now_ms()
            if expires_at <= now:
                self.memory.discard_if_same(timestamp, body)
                continue
            draft = Draft(head_of(body, timestamp), timestamp)
            stored_as = self.redis.save(draft, now, expires_at - now, keep=True)
            if stored_as != timestamp:
                log.warning("write-back: Redis already held another session %d; this one is now %d",
                            timestamp, stored_as)
            self.memory.discard_if_same(timestamp, body)
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
            if not (self._redis_down or len(self.memory)):
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
                if moved:
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
