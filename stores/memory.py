"""The volatile local store (`LOCAL_STORE=memory`): a module-level dict in this process.

Nothing touches the disk and nothing is shared: another gunicorn worker does not see these sessions, and they
end with the process. It is the choice for a throwaway run or a test; the durable default is `stores/sqlite.py`.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace

import orjson

from allocator import choose, now_ms
from payload import Draft
from stores.base import LOCAL, NEVER, Limits, LocalStore, Origin, Query, Record, Stored, WhenFull, expiry

log = logging.getLogger(__name__)


class MemoryStore(LocalStore):
    """In-process session store.

    Sessions in this process: the newest found in O(1), pages cut from a sorted index without copying it,
    expired sessions purged from an expiry heap, bounded by count and bytes."""

    kind = "memory"
    location = None
    clock_path = None  # nothing is shared: the allocator's clock is this process's own

    def __init__(self, limits: Limits | None = None) -> None:
        self._lock = threading.RLock()  # also `exclusive()`: a write-back step and a delete never interleave
        self._records: dict[int, Record] = {}
        self._order: list[int] = []  # timestamps, ascending
        self._expiry: list[tuple[int, int]] = []  # heap of (expires_at, timestamp); replaced pairs are skipped
        self._saves: dict[str, int] = {}  # save id -> timestamp
        self._bytes = 0
        self._last_assigned = 0
        self.configure(limits or Limits())

    def configure(self, limits: Limits) -> None:
        self.limits = limits

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._saves.clear()
            self._order.clear()
            self._expiry.clear()
            self._bytes = 0

    def count(self) -> tuple[int, int]:
        return len(self._records), self._bytes

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            yield

    def save(self, draft: Draft, *, now: int, ttl_ms: int, proposal: int, when_full: WhenFull | None = None) -> int:
        with self._lock:
            timestamp, origin = draft.timestamp, Origin.CLIENT
            earlier = self._records.get(self._saves.get(draft.save_id, -1))
            if timestamp is None and earlier and earlier.expires_at > now \
                    and earlier.body == draft.render(earlier.timestamp):
                return earlier.timestamp  # this very save was applied before (a retried import)
            if timestamp is None:
                timestamp, self._last_assigned = choose(proposal, self._last_assigned, self._records.__contains__,
                                                        now, "The memory store's last assigned timestamp")
                origin = Origin.SERVICE
            old = self._records.get(timestamp)
            pinned = old is not None and old.pinned
            acked = now if old is None else max(now, old.acked + 1)  # after the copy it replaces
            self._put(Record(timestamp, draft.render(timestamp), draft.summary,
                             NEVER if pinned else expiry(now, ttl_ms), origin, draft.save_id, pinned, acked), now,
                      when_full)
            return timestamp

    def pin(self, timestamp: int, pinned: bool, *, now: int, ttl_ms: int) -> bool:
        with self._lock:
            record = self._live(timestamp)
            if record is None:
                return False
            if record.pinned != pinned:
                record = replace(record, pinned=pinned, expires_at=NEVER if pinned else expiry(now, ttl_ms))
                self._records[timestamp] = record
                heapq.heappush(self._expiry, (record.expires_at, timestamp))
            return True

    def _put(self, record: Record, now: int, when_full: WhenFull | None) -> None:
        """Insert or replace a session, making room first.

        Insert or replace; room is made (or refused) before anything changes, so a failed replace keeps the
        old copy."""
        self._purge_expired(now)
        old = self._records.get(record.timestamp)
        self._make_room(record, old, when_full)
        if old:
            self._drop(record.timestamp)
        bisect.insort(self._order, record.timestamp)
        self._records[record.timestamp] = record
        self._saves[record.save_id] = record.timestamp
        self._bytes += len(record.body)
        heapq.heappush(self._expiry, (record.expires_at, record.timestamp))

    def _make_room(self, record: Record, replaced: Record | None, when_full: WhenFull | None) -> None:
        """Evict the oldest unpinned sessions (never the one being replaced) as `Limits.victims` says."""
        others = ((ts, len(self._records[ts].body)) for ts in self._order
                  if ts != record.timestamp and not self._records[ts].pinned)
        for victim in self.limits.victims(held=(len(self._records), self._bytes), size=len(record.body),
                                          replaced=len(replaced.body) if replaced else None, oldest=others,
                                          when_full=when_full):
            self._drop(victim)

    def _purge_expired(self, now: int) -> None:
        """Drop what has expired: only the due end of the expiry heap is looked at, never every session."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expires_at, timestamp = heapq.heappop(heap)
            record = self._records.get(timestamp)
            if record is not None and record.expires_at == expires_at:
                self._drop(timestamp)
        if len(heap) > 2 * len(self._records) + 64:  # pairs of replaced or removed sessions: rebuild, amortized
            self._expiry = [(record.expires_at, ts) for ts, record in self._records.items()]
            heapq.heapify(self._expiry)

    def _drop(self, timestamp: int) -> Record | None:
        record = self._records.pop(timestamp, None)
        if record is not None:
            if self._saves.get(record.save_id) == timestamp:
                del self._saves[record.save_id]
            self._order.pop(bisect.bisect_left(self._order, timestamp))
            self._bytes -= len(record.body)
        return record

    def _live(self, timestamp: int) -> Record | None:
        record = self._records.get(timestamp)
        return record if record is not None and record.expires_at > now_ms() else None

    @staticmethod
    def _stored(record: Record, summaries: bool = False) -> Stored:
        return Stored(record.timestamp, record.summary if summaries else record.body, LOCAL, record.summary,
                      record.pinned)

    def get(self, timestamp: int) -> Stored | None:
        record = self._live(timestamp)
        return self._stored(record) if record else None

    def exists(self, timestamp: int) -> bool:
        return self._live(timestamp) is not None

    def latest(self) -> Stored | None:
        now = now_ms()
        with self._lock:
            for timestamp in reversed(self._order):
                record = self._records[timestamp]
                if record.expires_at > now:
                    return self._stored(record)
        return None

    def _matching(self, query: Query) -> tuple[int, list[int]]:
        """(how many match, their timestamps newest first, cut to the page); the caller holds the lock."""
        self._purge_expired(now_ms())
        low = bisect.bisect_left(self._order, query.low)
        high = bisect.bisect_right(self._order, query.high)
        if query.filters_summaries:
            chosen = [ts for ts in reversed(self._order[low:high])
                      if query.matches(orjson.loads(self._records[ts].summary))]
            return len(chosen), chosen[query.offset : query.offset + query.limit]
        stop = max(low, high - query.offset)  # an index slice, newest first, without copying the rest
        return high - low, self._order[max(low, stop - query.limit) : stop][::-1]

    def timestamps(self, query: Query) -> tuple[int, list[int]]:
        with self._lock:
            return self._matching(query.widened())

    def rows(self, timestamps: list[int], summaries: bool = False) -> list[Stored]:
        found = (self._live(ts) for ts in timestamps)
        return [self._stored(record, summaries) for record in found if record is not None]

    def delete(self, timestamp: int) -> bool:
        with self._lock:
            return self._drop(timestamp) is not None

    def oldest(self) -> Record | None:
        with self._lock:
            return self._records[self._order[0]] if self._order else None

    def close(self) -> None:
        """The module-level store outlives an app built on it (tests build many): nothing to release."""


MEMORY = MemoryStore()
"""This process's in-memory store: module-level, as the design card has it; `storage.build_storage` sets its
limits."""
