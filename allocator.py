"""The timestamp allocator: the one rule by which the service numbers the sessions it is sent without one.

A session's timestamp is its identity (`storyart:session:<ms>`), so two sessions must never share one, across
threads, gunicorn workers, restarts and hosts. The rule is:

    the proposal (the wall clock in ms, or one past the last timestamp this process assigned, whichever is
    greater), or one past the last timestamp the store assigned, whichever is greater; then the first of those
    milliseconds no session holds.

It runs where the session is stored, inside that store's atomic step, so it is atomic wherever it is needed:

* Redis: `REDIS_ASSIGN` below, inside the save script; every host sharing the Redis shares its clock key.
* the local store: `choose` inside the save's transaction (SQLite: every worker on the host, and the next run
  of the service, since the store keeps its last value) or under the memory store's lock.

A save costs one round trip (or one transaction) however many milliseconds are already taken. The proposal
comes from `Allocator` before the save is tried: if Redis times out on a save it may still apply, the local
fallback stores the session under the same proposal, so the write-back finds the same bytes there and keeps
one copy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def choose(proposal: int, last: int, taken: Callable[[int], bool]) -> int:
    """The rule, for a store that holds its own `last` assigned timestamp and can tell a taken one."""
    timestamp = max(proposal, last + 1)
    while taken(timestamp):
        timestamp += 1
    return timestamp


# The same rule in Lua, for Redis's save script. Expects `proposal` (a number) and `clock` (the clock key's
# name) in scope and leaves the chosen timestamp in `ts`, recorded in the clock key.
REDIS_ASSIGN = """
ts = math.max(proposal, tonumber(redis.call('GET', clock) or '0') + 1)
while redis.call('EXISTS', '{SESSION}' .. string.format('%d', ts)) == 1 do ts = ts + 1 end
redis.call('SET', clock, string.format('%d', ts))
"""


class Allocator:
    """Proposals for one process: never below the wall clock, never at or below a timestamp this process has
    already seen assigned (by Redis or by the local store), so a failover from one store to the other does
    not start from an older clock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def propose(self, now: int) -> int:
        with self._lock:
            return max(now, self._last + 1)

    def observe(self, timestamp: int) -> None:
        """Record a timestamp a store assigned."""
        with self._lock:
            self._last = max(self._last, timestamp)
