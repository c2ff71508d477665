"""The volatile local store (`LOCAL_STORE=memory`): a module-level dict in this process.

Nothing touches the disk and nothing is shared: another gunicorn worker does not see these sessions, and they
end with the process. It is the choice for a throwaway run or a test; the durable default is `stores/sqlite.py`.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import logging
import secrets
import threading
from collections.abc import Iterator
from dataclasses import replace

import orjson

from allocator import choose, now_ms
from payload import Draft
from stores.base import (
    LOCAL,
    NEVER,
    Event,
    Keep,
    Limits,
    LocalStore,
    Origin,
    Pending,
    Query,
    Record,
    Share,
    Stored,
    WhenFull,
    expiry,
)

log = logging.getLogger(__name__)


class _Shelf:
    """Every space's sessions in this process, shared by the store and its views (`MemoryStore.scoped`)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # also `exclusive()`: a write-back step and a delete never interleave
        self.records: dict[tuple[str, int], Record] = {}  # by (owner, timestamp)
        self.order: list[tuple[str, int]] = []  # (owner, timestamp), ascending: each space's sessions in a row
        self.expiry: list[tuple[int, str, int]] = []  # heap of (expires_at, owner, timestamp); replaced ones skipped
        self.saves: dict[tuple[str, str], int] = {}  # (owner, save id) -> timestamp
        self.bytes = 0
        self.last_assigned = 0
        self.shares: dict[tuple[str, str], Share] = {}  # by (owner, id)
        self.opens: dict[tuple[str, str], tuple[int, str]] = {}  # openings of shares only Redis holds, and a batch id
        self.activity: dict[str, dict[str, tuple[int, bytes]]] = {}  # owner -> event id -> (at, event)


class MemoryStore(LocalStore):
    """In-process session store.

    Sessions in this process: the newest found in O(log n), pages cut from a sorted index without copying it,
    expired sessions purged from an expiry heap, bounded by count and bytes."""

    kind = "memory"
    location = None
    clock_path = None  # nothing is shared: the allocator's clock is this process's own

    def __init__(self, limits: Limits | None = None) -> None:
        self._shelf = _Shelf()
        self.configure(limits or Limits())

    def configure(self, limits: Limits, keep: Keep | None = None) -> None:
        self.limits = limits
        self.keep = keep  # how much activity to keep: only without Redis (None: it all waits for Redis)

    def clear(self) -> None:
        shelf = self._shelf
        with shelf.lock:
            shelf.records.clear()
            shelf.saves.clear()
            shelf.order.clear()
            shelf.expiry.clear()
            shelf.bytes = 0
            shelf.shares.clear()
            shelf.opens.clear()
            shelf.activity.clear()

    def count(self) -> tuple[int, int]:
        return len(self._shelf.records), self._shelf.bytes

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._shelf.lock:
            yield

    def save(self, draft: Draft, *, now: int, ttl_ms: int, proposal: int, when_full: WhenFull | None = None,
             event: Event | None = None) -> int:
        shelf, owner = self._shelf, self.owner
        with shelf.lock:
            timestamp, origin = draft.timestamp, Origin.CLIENT
            earlier = shelf.records.get((owner, shelf.saves.get((owner, draft.save_id), -1)))
            if timestamp is None and earlier and earlier.expires_at > now \
                    and earlier.body == draft.render(earlier.timestamp):
                return earlier.timestamp  # this very save was applied before (a retried import)
            if timestamp is None:
                timestamp, shelf.last_assigned = choose(proposal, shelf.last_assigned,
                                                        lambda ts: (owner, ts) in shelf.records, now,
                                                        "The memory store's last assigned timestamp")
                origin = Origin.SERVICE
            old = shelf.records.get((owner, timestamp))
            pinned = old is not None and old.pinned
            acked = now if old is None else max(now, old.acked + 1)  # after the copy it replaces
            self._put(Record(timestamp, draft.render(timestamp), draft.summary,
                             NEVER if pinned else expiry(now, ttl_ms), origin, draft.save_id, pinned, acked, owner),
                      now, when_full)
            self._record(event, timestamp)
            return timestamp

    def pin(self, timestamp: int, pinned: bool, *, now: int, ttl_ms: int, event: Event | None = None) -> bool:
        shelf = self._shelf
        with shelf.lock:
            record = self._live(timestamp)
            if record is None:
                return False
            if record.pinned != pinned:
                record = replace(record, pinned=pinned, expires_at=NEVER if pinned else expiry(now, ttl_ms))
                shelf.records[self.owner, timestamp] = record
                heapq.heappush(shelf.expiry, (record.expires_at, self.owner, timestamp))
            return self._record(event, timestamp)

    def _put(self, record: Record, now: int, when_full: WhenFull | None) -> None:
        """Insert or replace a session, making room first.

        Insert or replace; room is made (or refused) before anything changes, so a failed replace keeps the
        old copy."""
        shelf, key = self._shelf, (record.owner, record.timestamp)
        self._purge_expired(now)
        old = shelf.records.get(key)
        self._make_room(record, old, when_full)
        if old:
            self._drop(key)
        bisect.insort(shelf.order, key)
        shelf.records[key] = record
        shelf.saves[record.owner, record.save_id] = record.timestamp
        shelf.bytes += len(record.body)
        heapq.heappush(shelf.expiry, (record.expires_at, *key))

    def _make_room(self, record: Record, replaced: Record | None, when_full: WhenFull | None) -> None:
        """Evict the oldest unpinned sessions as `Limits.victims` says.

        Only the saving user's own, never the one being replaced: one person's saves never evict another's
        sessions (docs/decisions.md, "People")."""
        shelf = self._shelf
        low, high = self._bounds(0, 2**63)
        others = ((ts, len(shelf.records[owner, ts].body)) for owner, ts in shelf.order[low:high]
                  if ts != record.timestamp and not shelf.records[owner, ts].pinned)
        for victim in self.limits.victims(held=(len(shelf.records), shelf.bytes), size=len(record.body),
                                          replaced=len(replaced.body) if replaced else None, oldest=others,
                                          when_full=when_full):
            self._drop((self.owner, victim))

    def _bounds(self, low: int, high: int) -> tuple[int, int]:
        """Where this space's sessions from `low` to `high` (ms, both included) sit in the shared order."""
        order = self._shelf.order
        return bisect.bisect_left(order, (self.owner, low)), bisect.bisect_right(order, (self.owner, high))

    def _purge_expired(self, now: int) -> None:
        """Drop what has expired: only the due end of the expiry heap is looked at, never every session."""
        shelf = self._shelf
        heap = shelf.expiry
        while heap and heap[0][0] <= now:
            expires_at, *key = heapq.heappop(heap)
            record = shelf.records.get(tuple(key))
            if record is not None and record.expires_at == expires_at:
                self._drop(tuple(key))
        if len(heap) > 2 * len(shelf.records) + 64:  # pairs of replaced or removed sessions: rebuild, amortized
            heap[:] = [(record.expires_at, *key) for key, record in shelf.records.items()]
            heapq.heapify(heap)

    def _drop(self, key: tuple[str, int]) -> Record | None:
        shelf = self._shelf
        record = shelf.records.pop(key, None)
        if record is not None:
            if shelf.saves.get((record.owner, record.save_id)) == record.timestamp:
                del shelf.saves[record.owner, record.save_id]
            shelf.order.pop(bisect.bisect_left(shelf.order, key))
            shelf.bytes -= len(record.body)
        return record

    def _live(self, timestamp: int) -> Record | None:
        record = self._shelf.records.get((self.owner, timestamp))
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

    def expiry_of(self, timestamp: int) -> int | None:
        record = self._live(timestamp)
        return record.expires_at if record is not None else None

    def latest(self) -> Stored | None:
        now, shelf = now_ms(), self._shelf
        with shelf.lock:
            low, high = self._bounds(0, 2**63)
            for key in reversed(shelf.order[low:high]):
                record = shelf.records[key]
                if record.expires_at > now:
                    return self._stored(record)
        return None

    def _matching(self, query: Query) -> tuple[int, list[int]]:
        """(how many match, their timestamps newest first, cut to the page); the caller holds the lock."""
        self._purge_expired(now_ms())
        order, records = self._shelf.order, self._shelf.records
        low, high = self._bounds(query.low, query.high)
        if query.filters_summaries:
            chosen = [key[1] for key in reversed(order[low:high]) if query.matches(orjson.loads(records[key].summary))]
            return len(chosen), chosen[query.offset : query.offset + query.limit]
        stop = max(low, high - query.offset)  # an index slice, newest first, without copying the rest
        return high - low, [ts for _, ts in order[max(low, stop - query.limit) : stop][::-1]]

    def timestamps(self, query: Query) -> tuple[int, list[int]]:
        with self._shelf.lock:
            return self._matching(query.widened())

    def rows(self, timestamps: list[int], summaries: bool = False) -> list[Stored]:
        found = (self._live(ts) for ts in timestamps)
        return [self._stored(record, summaries) for record in found if record is not None]

    def delete(self, timestamp: int, *, event: Event | None = None) -> bool:
        with self._shelf.lock:
            return self._record(event, timestamp, self._drop((self.owner, timestamp)) is not None)

    # -- share links and the activity log

    def _record(self, event: Event | None, timestamp: int | None = None, done: bool = True) -> bool:
        """Record `event` with the change it records, when that change was `done` (the caller holds the lock)."""
        if event is not None and done:
            log = self._shelf.activity.setdefault(self.owner, {})
            log[event.id] = (event.at, event.render(timestamp))
            if self.keep is not None and self.keep.due():
                for key in [key for key, (at, _) in log.items() if at < event.at - self.keep.ms]:
                    del log[key]
                while len(log) > self.keep.most:
                    del log[min(log, key=lambda key: log[key][0])]
        return done

    def add_share(self, share: Share, event: Event) -> None:
        with self._shelf.lock:
            self._shelf.shares[self.owner, share.id] = share
            self._record(event, share.timestamp)

    def shares(self) -> list[Share]:
        with self._shelf.lock:
            return [share for (owner, _), share in self._shelf.shares.items() if owner == self.owner]

    def find_share(self, token_sha: str) -> Share | None:
        return next((share for share in self.shares() if share.token_sha == token_sha), None)

    def revoke_share(self, share_id: str, event: Event) -> bool:
        with self._shelf.lock:
            share = self._shelf.shares.get((self.owner, share_id))
            if share is not None and not share.revoked:
                self._shelf.shares[self.owner, share_id] = replace(share, revoked=True)
                self._record(event, share.timestamp)
            return share is not None

    def share_opened(self, share: Share, event: Event) -> None:
        shelf, key = self._shelf, (self.owner, share.id)
        with shelf.lock:
            held = shelf.shares.get(key)
            if held is not None:
                shelf.shares[key] = replace(held, opened=held.opened + 1)
            else:  # a share only Redis holds: counted apart until the write-back
                opened, batch = shelf.opens.get(key, (0, secrets.token_hex(8)))
                shelf.opens[key] = (opened + 1, batch)
            self._record(event, share.timestamp)

    def events(self, before: int, limit: int) -> list[bytes]:
        with self._shelf.lock:
            found = sorted(((at, key, event) for key, (at, event) in self._shelf.activity.get(self.owner, {}).items()
                            if at < before), reverse=True)
        return [event for _, _, event in found[:limit]]

    def pending_people(self) -> Pending:
        shelf = self._shelf
        with shelf.lock:
            events = sorted((at, owner, event_id, event) for owner, log in shelf.activity.items()
                            for event_id, (at, event) in log.items())
            opens = [(owner, share_id, opened, batch) for (owner, share_id), (opened, batch) in shelf.opens.items()]
            return Pending(list(shelf.shares.values()), opens,
                           [(owner, at, event_id, event) for at, owner, event_id, event in events])

    def settle(self, pending: Pending) -> None:
        shelf = self._shelf
        with shelf.lock:
            for share in pending.shares:
                shelf.shares.pop((share.owner, share.id), None)
            for owner, share_id, _, _ in pending.opens:
                shelf.opens.pop((owner, share_id), None)
            for owner, _, event_id, _ in pending.events:
                shelf.activity.get(owner, {}).pop(event_id, None)

    def oldest(self) -> Record | None:
        shelf = self._shelf
        with shelf.lock:
            return shelf.records[min(shelf.records, key=lambda key: key[1])] if shelf.records else None

    def close(self) -> None:
        """The module-level store outlives an app built on it (tests build many): nothing to release."""


MEMORY = MemoryStore()
"""This process's in-memory store: module-level, as the design card has it; `storage.build_storage` sets its
limits."""
