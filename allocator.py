"""The timestamp allocator: the one rule by which the service numbers the sessions it is sent without one.

A session's timestamp is its identity (`storyart:session:<ms>`), so two sessions must never share one, across
threads, gunicorn workers, restarts and hosts. Two steps:

1. **Propose** (`Allocator.propose`, before the save is tried): the wall clock in ms, or one past the last
   number proposed or assigned on this host, whichever is greater. Every proposal on a host is a new number:
   it is reserved in a small clock file next to the local store, shared by every process using that store
   (and kept across restarts).
2. **Choose** (inside the store's own atomic step): the proposal itself, unless it lags more than `SKEW_MS`
   behind the last timestamp that store assigned (another host with a slow clock: then one past that), and
   then the first millisecond from there that no session holds.
   * Redis: `REDIS_ASSIGN` below, inside the save script; every host sharing the Redis shares its clock key.
   * the local store: `choose`, inside the save's transaction (SQLite) or under the memory store's lock.

Why the proposal is used as it is rather than "one past the last": two workers' saves reach a store in any
order, and "one past the last" would give the slower one a number proposed to a third save meanwhile. Had
Redis died just then, that third save, now in the local store, would hold the same number as a session in
Redis. Used as is, a host's proposals never meet (only a number some other session already holds is skipped).

A save costs one round trip (or one transaction) however many milliseconds are already taken. If Redis times
out on a save it may still apply, the local fallback stores the session under the same proposal, so the
write-back finds the same bytes there and keeps one copy. Across hosts only Redis can tell; a clash met at
write-back keeps both sessions (see store_redis.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no record locks; the clock is this process's own (one process there anyway)
    fcntl = None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


SKEW_MS = 1000  # a proposal this far behind a store's last assignment comes from a host whose clock lags


def choose(proposal: int, last: int, taken: Callable[[int], bool]) -> int:
    """Step 2, for a store that keeps its own `last` assigned timestamp and can tell a taken one."""
    timestamp = proposal if proposal + SKEW_MS >= last else last + 1
    while taken(timestamp):
        timestamp += 1
    return timestamp


# Step 2 in Lua, for Redis's save script. Expects `proposal` (a number) and `clock` (the clock key's name) in
# scope and leaves the chosen timestamp in `ts`; the clock key keeps the greatest timestamp assigned.
REDIS_ASSIGN = """
local last = tonumber(redis.call('GET', clock) or '0')
ts = proposal
if ts + {SKEW_MS} < last then ts = last + 1 end
while redis.call('EXISTS', '{SESSION}' .. string.format('%d', ts)) == 1 do ts = ts + 1 end
if ts > last then redis.call('SET', clock, string.format('%d', ts)) end
""".replace("{SKEW_MS}", str(SKEW_MS))


@dataclass(frozen=True, slots=True)
class Slot:
    """Which milliseconds this host proposes: those with `ms % count == index`. Hosts sharing one Redis with
    distinct indexes (SERVICE_HOSTS, SERVICE_HOST_INDEX) never propose the same one, so the sessions they save
    in their local stores during a Redis outage do not meet under one timestamp at the write-back."""

    index: int = 0
    count: int = 1


ONE_HOST = Slot()


class Allocator:
    """Step 1: proposals never below the wall clock, each one above every timestamp proposed or seen assigned
    before, by this process or (with `shared`, a file path) by any process using the same file, and in this
    host's `Slot`."""

    def __init__(self, shared: Path | None = None, slot: Slot = ONE_HOST) -> None:
        self._lock = threading.Lock()
        self._slot = slot
        self._last = 0
        self._fd: int | None = None
        if shared is not None and fcntl is not None:
            self._fd = os.open(shared, os.O_RDWR | os.O_CREAT, 0o600)

    def propose(self, now: int) -> int:
        """A timestamp no other save on this host was proposed: max(now, last + 1) or the next one in this
        host's slot, reserved."""
        index, count = self._slot.index, self._slot.count

        def next_free(last: int) -> int:
            least = max(now, last + 1)
            return least + (index - least) % count

        return self._update(next_free)

    def observe(self, timestamp: int) -> None:
        """Record a timestamp a store assigned (it may be above the proposal: taken ones were skipped)."""
        self._update(lambda last: max(last, timestamp))

    def _update(self, step: Callable[[int], int]) -> int:
        with self._lock:
            if self._fd is None:
                self._last = step(self._last)
                return self._last
            fcntl.lockf(self._fd, fcntl.LOCK_EX)  # released by the kernel if this process dies holding it
            try:
                raw = os.pread(self._fd, 8, 0)
                value = step(max(self._last, int.from_bytes(raw, "little") if len(raw) == 8 else 0))
                os.pwrite(self._fd, value.to_bytes(8, "little"), 0)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            self._last = value
            return value

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
