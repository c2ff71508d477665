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
   * Redis: `assign` in `stores/lua/assign.lua` (this rule's Lua twin), inside the save script; every host
     sharing the Redis shares its clock key.
   * the local store: `choose`, inside the save's transaction (SQLite) or under the memory store's lock.

Why the proposal is used as it is rather than "one past the last": two workers' saves reach a store in any
order, and "one past the last" would give the slower one a number proposed to a third save meanwhile. Had
Redis died just then, that third save, now in the local store, would hold the same number as a session in
Redis. Used as is, a host's proposals never meet (only a number some other session already holds is skipped).

A save costs one round trip (or one transaction) however many milliseconds are already taken. If Redis times
out on a save it may still apply, the local fallback stores the session under the same proposal, so the
write-back finds the same bytes there and keeps one copy. Across hosts only Redis can tell; a clash met at
write-back keeps both sessions (see stores/redis.py).

Every clock (the clock file, Redis's clock key, the local store's last assigned timestamp) is checked where it
is read: a value that is not a millisecond timestamp at most `MAX_AHEAD_MS` ahead of this host's clock (a file
copied from a host whose clock ran ahead, bytes damaged on disk, a key another tool set) is logged, ignored
and replaced by the next assignment. Trusted, it would carry every later timestamp with it, on every host
sharing the Redis, and past 2^53 Lua's numbers (doubles) could no longer count up. See docs/decisions.md.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


SKEW_MS = 1000  # a proposal this far behind a store's last assignment comes from a host whose clock lags
# The furthest a clock may run ahead of this host's wall clock and still be trusted. A burst of assignments
# faster than one per millisecond runs ahead by one per save (an import of small sessions: a few seconds); a
# clock further ahead was not made by this service's saves.
MAX_AHEAD_MS = 5 * 60_000
PROBES = 1000  # taken timestamps Redis's save script skips at most (~3 ms), so that it always ends (assign.lua)


def trusted(clock: object, now: int) -> bool:
    """Whether a clock's value is a millisecond timestamp this service could have assigned by `now`."""
    return type(clock) is int and 0 <= clock <= now + MAX_AHEAD_MS


def distrusted(where: str, value: object, now: int) -> None:
    """Log a clock's value that `trusted` refused (it is replaced by the next assignment)."""
    log.warning("%s held %s, not a timestamp in ms at most %d s ahead of this host's clock (%d): ignored and "
                "replaced", where, value, MAX_AHEAD_MS // 1000, now)


def choose(proposal: int, last: object, taken: Callable[[int], bool], now: int, where: str) -> tuple[int, int]:
    """Choose the timestamp a local store assigns to a save.

    Step 2, for a store that keeps its own `last` assigned timestamp (a clock named `where`) and can tell a
    taken one: (the timestamp, the store's clock after it). A `last` that is not `trusted` counts as none.
    (Unlike its Lua twin, `assign` in `stores/lua/assign.lua`, the loop needs no bound: Python's integers are
    exact and a local store is finite.)"""
    if not trusted(last, now):
        distrusted(where, repr(last), now)
        last = 0
    timestamp = proposal if proposal + SKEW_MS >= last else last + 1
    while taken(timestamp):
        timestamp += 1
    return timestamp, max(last, timestamp)


@dataclass(frozen=True, slots=True)
class Slot:
    """This host's share of the millisecond timestamps.

    Which milliseconds this host proposes: those with `ms % count == index`. Hosts sharing one Redis with
    distinct indexes (SERVICE_HOSTS, SERVICE_HOST_INDEX) never propose the same one, so the sessions they save
    in their local stores during a Redis outage do not meet under one timestamp at the write-back."""

    index: int = 0
    count: int = 1


ONE_HOST = Slot()


class Allocator:
    """Propose save timestamps that only increase, across processes sharing a clock file.

    Step 1: proposals never below the wall clock, each one above every timestamp proposed or seen assigned
    before, by this process or (with `shared`, a file path) by any process using the same file, and in this
    host's `Slot`. A clock file that does not hold a `trusted` value (8 bytes, little-endian) is logged and
    replaced: the proposal is then the wall clock's."""

    def __init__(self, shared: Path | None = None, slot: Slot = ONE_HOST) -> None:
        self._lock = threading.Lock()
        self._slot = slot
        self._last = 0
        self._path = shared
        self._fd: int | None = None
        if shared is not None and fcntl is not None:
            self._fd = os.open(shared, os.O_RDWR | os.O_CREAT, 0o600)

    def propose(self, now: int) -> int:
        """Reserve the next timestamp for a save on this host.

        A timestamp no other save on this host was proposed: max(now, last + 1) or the next one in this
        host's slot, reserved."""
        index, count = self._slot.index, self._slot.count

        def next_free(last: int) -> int:
            least = max(now, last + 1)
            return least + (index - least) % count

        return self._update(next_free, now)

    def observe(self, timestamp: int) -> None:
        """Record a timestamp a store assigned (it may be above the proposal: taken ones were skipped)."""
        self._update(lambda last: max(last, timestamp), now_ms())

    def _update(self, step: Callable[[int], int], now: int) -> int:
        with self._lock:
            mine = self._last if trusted(self._last, now) else 0
            if self._fd is None:
                self._last = step(mine)
                return self._last
            fcntl.lockf(self._fd, fcntl.LOCK_EX)  # released by the kernel if this process dies holding it
            try:
                raw = os.pread(self._fd, 8, 0)
                held = int.from_bytes(raw, "little")
                if len(raw) not in (0, 8) or not trusted(held, now):
                    shown = f"{held} (bytes 0x{raw.hex()})" if len(raw) == 8 else f"{len(raw)} bytes (0x{raw.hex()})"
                    distrusted(f"The clock file {self._path}", shown, now)
                    held = 0
                value = step(max(mine, held))
                os.pwrite(self._fd, value.to_bytes(8, "little"), 0)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            self._last = value
            return value

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
