"""The timestamp allocator's clocks (allocator.py): a clock file, Redis's clock key or a local store's last
assigned timestamp that runs far ahead of the wall clock, or holds no timestamp at all, is logged and replaced,
never trusted; and no Redis script loops without bound. First the rule on its own, then real processes: two
hosts (their own SQLite stores and clock files) on one Redis with AOF."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
from chaos import PERSISTENT, session

from allocator import MAX_AHEAD_MS, PROBES, Allocator, Slot, choose, now_ms
from config import Config
from payload import Draft, parse_session
from servers import RedisServer, ServiceProcess, request, save_request, wait_for
from storage import Query
from stores.base import Limits
from stores.redis import CLOCK_KEY, EXPIRY_KEY, FORGET_BATCH, INDEX_KEY, PAGE_ROUNDS, PINNED_KEY, RedisStore
from stores.sqlite import SqliteStore

DAY_MS = 86_400_000
TWO_53 = 2**53
LATE = "not a timestamp in ms at most"  # what every log line about a distrusted clock says


def draft(text: str) -> Draft:
    return parse_session(orjson.dumps({"scriptText": text, "episodeContext": "", "storyUuid": "s",
                                       "analyzedEpisode": {}}), now_ms())


def clock_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "allocator" and LATE in r.getMessage()]


# ------------------------------------------------------------------------------------------ the rule itself


DAMAGED = {  # what a clock file may hold, by how it got there; each a function of the wall clock
    "a day ahead": lambda now: (now + DAY_MS).to_bytes(8, "little"),  # copied from a host whose clock ran ahead
    "0xFF bytes": lambda now: b"\xff" * 8,
    "2^53": lambda now: TWO_53.to_bytes(8, "little"),  # where Lua's doubles stop counting by one
    "2^62": lambda now: (2**62).to_bytes(8, "little"),  # 19 digits
    "3 bytes": lambda now: b"\x01\x02\x03",  # cut short
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_clock_file_that_holds_no_sane_timestamp_is_replaced_and_logged(tmp_path: Path, content,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "sessions.sqlite3-clock"
    now = now_ms()
    path.write_bytes(content(now))
    allocator = Allocator(path, Slot(1, 2))
    with caplog.at_level(logging.WARNING):
        proposal = allocator.propose(now)
    assert proposal in (now, now + 1) and proposal % 2 == 1
    assert int.from_bytes(path.read_bytes()[:8], "little") == proposal
    assert len(lines := clock_lines(caplog)) == 1 and str(path) in lines[0]
    assert allocator.propose(now) == proposal + 2 and len(clock_lines(caplog)) == 1  # trusted from now on
    allocator.close()


def test_a_clock_file_a_little_ahead_is_kept_one_far_ahead_is_not(tmp_path: Path) -> None:
    """A burst of saves faster than one per millisecond runs the clock ahead by seconds: that is kept (numbers
    are never reused); minutes beyond `MAX_AHEAD_MS` no save of this service made."""
    path, now = tmp_path / "clock", now_ms()
    path.write_bytes((now + 10_000).to_bytes(8, "little"))
    assert Allocator(path).propose(now) == now + 10_001
    path.write_bytes((now + MAX_AHEAD_MS + 1000).to_bytes(8, "little"))
    assert Allocator(path).propose(now) == now


UNTRUSTED = {  # what a local store's last assigned timestamp may hold (SQLite keeps any type in a column)
    "a day ahead": lambda now: now + DAY_MS, "2^64": lambda now: 2**64, "2^53": lambda now: TWO_53,
    "text": lambda now: "garbage", "negative": lambda now: -1, "NULL": lambda now: None,
}


@pytest.mark.parametrize("last", UNTRUSTED.values(), ids=UNTRUSTED.keys())
def test_a_store_clock_that_is_not_trusted_counts_as_none(last, caplog: pytest.LogCaptureFixture) -> None:
    now = now_ms()
    with caplog.at_level(logging.WARNING):
        assert choose(now, last(now), lambda ts: ts < now + 2, now, "Test's clock") == (now + 2, now + 2)
    assert len(lines := clock_lines(caplog)) == 1 and lines[0].startswith("Test's clock held")
    # a trusted clock still wins over a proposal lagging by more than the skew (another host's slow clock)
    assert choose(now - 5000, now + 2000, lambda ts: False, now, "x") == (now + 2001, now + 2001)


def test_the_sqlite_stores_last_assigned_timestamp_a_day_ahead_is_replaced(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """What a run with a clock file a day ahead left in the local store before this rule."""
    path = tmp_path / "s.sqlite3"
    SqliteStore.open(path, Limits(100, 1 << 30)).close()
    now = now_ms()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE state SET last_assigned = ?", (now + DAY_MS,))
    store = SqliteStore.open(path, Limits(100, 1 << 30))
    with caplog.at_level(logging.WARNING):
        assert store.save(draft("a"), now=now, ttl_ms=60_000, proposal=now) == now
        assert store.save(draft("b"), now=now, ttl_ms=60_000, proposal=now) == now + 1
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT last_assigned FROM state").fetchone()[0] == now + 1
    assert len(lines := clock_lines(caplog)) == 1 and str(path) in lines[0]


@pytest.fixture
def own_store(own_redis: Callable[..., RedisServer]) -> Iterator[tuple[RedisStore, redis.Redis]]:
    """A RedisStore on a Redis of this test's own: a script that never ends wedges only that one."""
    server = own_redis()
    store = RedisStore.from_config(dataclasses.replace(Config(), redis_url=server.url))
    yield store, server.client()
    store.close()


@pytest.mark.parametrize("held", ["a day ahead", str(TWO_53), str(2**62), "1e300", "0x1F", "-5", "", "garbage",
                                  "a hash"])
def test_redis_replaces_a_clock_key_it_cannot_trust(own_store, held: str, caplog: pytest.LogCaptureFixture) -> None:
    """What another tool may leave in `storyart:sessions:clock`. Before this rule 2^53 and above (and 1e300)
    made the save script loop forever (a double's `ts + 1` is `ts` there), a day ahead carried every later
    save with it, and text or another type failed every save."""
    store, client = own_store
    now = now_ms()
    if held == "a hash":
        client.hset(CLOCK_KEY, "field", "value")
    else:
        client.set(CLOCK_KEY, str(now + DAY_MS) if held == "a day ahead" else held)
    client.set(f"storyart:session:{TWO_53}", b"{}")  # a session under 2^53: Lua's 2^53 + 1 lands on it
    with caplog.at_level(logging.WARNING):
        first = store.save(draft("first"), now=now, ttl_ms=60_000, proposal=now)
        second = store.save(draft("second"), now=now, ttl_ms=60_000, proposal=now)
    assert (first, second) == (now, now + 1)
    assert client.get(CLOCK_KEY) == str(now + 1).encode()
    assert len(lines := clock_lines(caplog)) == 1 and lines[0].startswith(f"Redis's clock key {CLOCK_KEY} held")
    assert client.ping()


def test_a_save_probes_a_bounded_number_of_taken_timestamps(own_store) -> None:
    """Every timestamp from the proposal on taken (another tool's keys): the script stops after `PROBES` and
    answers an error (the service then saves to the local store) instead of holding Redis."""
    store, client = own_store
    now = now_ms()
    client.mset({f"storyart:session:{now + i}": b"{}" for i in range(PROBES)})
    with pytest.raises(redis.ResponseError, match="no free timestamp"):
        store.save(draft("crowded"), now=now, ttl_ms=60_000, proposal=now)
    assert store.save(draft("beyond"), now=now, ttl_ms=60_000, proposal=now + 1) == now + PROBES
    assert client.ping()


def test_latest_and_a_list_page_forget_dead_members_a_batch_per_call(own_store) -> None:
    """Index members of sessions gone without an expiry entry (another tool deleted them) above the live ones:
    each script call forgets a bounded number and says so; the store calls again until it has its answer."""
    store, client = own_store
    now = now_ms()
    live = store.save(draft("live"), now=now, ttl_ms=60_000, proposal=now - 1000)
    dead = 2 * FORGET_BATCH + 500
    client.zadd(INDEX_KEY, {f"storyart:session:{now + i}": now + i for i in range(dead)})
    keys = (INDEX_KEY, EXPIRY_KEY, PINNED_KEY)
    assert store._latest(keys=keys, args=(now_ms(),)) == 0 and client.zcard(INDEX_KEY) == 1 + dead - FORGET_BATCH
    assert store.latest().timestamp == live and client.zcard(INDEX_KEY) == 1
    dead = 3 * PAGE_ROUNDS
    client.zadd(INDEX_KEY, {f"storyart:session:{now - i}": now - i for i in range(1, dead + 1)})
    assert store._page(keys=keys, args=(0, 1, 0, now, now_ms())) == []  # one dead member per window
    assert client.zcard(INDEX_KEY) == 1 + dead - PAGE_ROUNDS
    assert store.timestamps(Query(limit=1, until=now)) == (1, [live])


def test_a_save_prunes_a_batch_of_expired_entries(own_store) -> None:
    store, client = own_store
    now = now_ms()
    expired = FORGET_BATCH + 500
    client.zadd(EXPIRY_KEY, {f"storyart:session:{now - i}": now - i for i in range(1, expired + 1)})
    store.save(draft("prunes"), now=now, ttl_ms=60_000, proposal=now)
    assert client.zcard(EXPIRY_KEY) == expired - FORGET_BATCH + 1  # the rest at the next calls
    store.save(draft("prunes more"), now=now, ttl_ms=60_000, proposal=now)
    assert client.zcard(EXPIRY_KEY) == 2


# ------------------------------------------------------------------------------------ real processes

Hosts = tuple[RedisServer, ServiceProcess, ServiceProcess]


@pytest.fixture
def hosts(tmp_path: Path, own_redis: Callable[..., RedisServer]) -> Iterator[Hosts]:
    """A Redis with AOF and two hosts on it, not started yet: A under `python app.py`, B under gunicorn, each
    with its own SQLite store and clock file (`LOCAL_STORE_PATH`-clock)."""
    server = own_redis(*PERSISTENT)
    env = {"REDIS_URL": server.url, "SERVICE_HOSTS": "2", "REDIS_RETRY_INTERVAL": "0.5"}
    a = ServiceProcess("app", {**env, "SERVICE_HOST_INDEX": "0"}, tmp_path / "host-a.log")
    b = ServiceProcess("gunicorn", {**env, "SERVICE_HOST_INDEX": "1"}, tmp_path / "host-b.log")
    yield server, a, b
    for host in (a, b):
        host.stop()


def clock_file(host: ServiceProcess) -> Path:
    return Path(f"{host.env['LOCAL_STORE_PATH']}-clock")


def saved(host: ServiceProcess, tag: str) -> int:
    """A save without a timestamp through `host`: stored in Redis under the time it was made."""
    before = now_ms()
    got = save_request(host.port, session(tag))
    after = now_ms()
    assert got.status == 200 and got.json()["storage"] == "redis", got.body
    timestamp = got.json()["timestamp"]
    assert before <= timestamp <= after + 1000, f"{tag}: {timestamp} is {timestamp - after} ms past the save"
    return timestamp


def logged(host: ServiceProcess, text: str, times: int) -> None:
    wait_for(lambda: host.log().count(text) == times, what=f"{times} log line(s) with {text!r}", timeout=10)


class Pinger:
    """PINGs Redis every 20 ms while the block runs, as any other StoryArt tool's request would reach it, and
    keeps every failure (BUSY while a script runs on, or no answer)."""

    def __init__(self, server: RedisServer) -> None:
        self.client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
        self.failures: list[str] = []
        self.pings = 0
        self._done = threading.Event()

    def __enter__(self) -> Pinger:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(0.02):
            try:
                self.client.ping()
                self.pings += 1
            except redis.RedisError as error:
                self.failures.append(f"{type(error).__name__}: {error}")

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.client.close()


@pytest.mark.slow
def test_a_clock_file_a_day_ahead_moves_no_host_and_is_replaced(hosts) -> None:
    """Host A starts with its clock file a day ahead (a copy from a host whose clock ran ahead): its saves and
    host B's stay at the wall clock, the file is replaced, and a browser's re-post stamped with the real time
    is the newest session on both hosts."""
    server, a, b = hosts
    clock_file(a).write_bytes((now_ms() + DAY_MS).to_bytes(8, "little"))
    a.start()
    b.start()
    on_a, on_b = saved(a, "on A"), saved(b, "on B")
    logged(a, f"The clock file {clock_file(a)} held", 1)
    assert on_a < on_b and int.from_bytes(clock_file(a).read_bytes(), "little") == on_a  # replaced
    assert int(server.client().get(CLOCK_KEY)) == on_b
    repost = max(now_ms(), on_b + 1)
    assert save_request(a.port, session("re-post", timestamp=repost)).status == 200
    for host in (a, b):
        assert request(host.port, "GET", "/api/v1/session/latest").json()["data"]["timestamp"] == repost


@pytest.mark.slow
def test_damaged_clocks_give_sane_timestamps_and_redis_keeps_answering(hosts) -> None:
    """A's clock file damaged (0xFF bytes, 2^53, 2^62), then Redis's clock key set by a tool (2^53 with a
    session under it, 2^62, a day ahead, text): every save on either host is stored in Redis under the time
    it was made, each bad clock is logged once, both hosts read both saves, and Redis answers PING all along
    (before, the 2^53 clock key made the save script loop forever: BUSY to every client)."""
    server, a, b = hosts
    b.start()
    tool = server.client()
    with Pinger(server) as pinger:
        for count, name in enumerate(("0xFF bytes", "2^53", "2^62"), start=1):
            if a.proc is not None:
                a.stop()
            clock_file(a).write_bytes(DAMAGED[name](now_ms()))
            (a.restart if a.proc is not None else a.start)()
            stamps = saved(a, f"A after {name}"), saved(b, f"B after {name}")
            logged(a, f"The clock file {clock_file(a)} held", count)
            for host in (a, b):
                assert all(request(host.port, "GET", f"/api/v1/session/{ts}").status == 200 for ts in stamps)
                assert request(host.port, "GET", "/api/v1/session/latest").json()["data"]["timestamp"] == stamps[1]
        tool.set(f"storyart:session:{TWO_53}", session("a tool's"))
        for count, held in enumerate((TWO_53, 2**62, now_ms() + DAY_MS, "garbage"), start=1):
            tool.set(CLOCK_KEY, held)
            stamps = saved(b, f"B after the key held {held}"), saved(a, f"A after the key held {held}")
            logged(b, f"Redis's clock key {CLOCK_KEY} held", count)
            assert int(tool.get(CLOCK_KEY)) == stamps[1]
        time.sleep(0.1)  # at least a few pings after the last save
    assert pinger.failures == [] and pinger.pings > 10


@pytest.mark.parametrize("size", [100, 100_000], ids=["returned by the script", "fetched after it"])
def test_latest_reads_a_19_digit_timestamp_from_the_member_not_its_float_score(own_store, size: int) -> None:
    """A session an old clock bug saved under 19 digits: its index score comes back as a float ("1.7e+18"), so
    `latest` reads the timestamp from the member's digits, and answers the session instead of failing."""
    store, client = own_store
    huge = 1_733_123_456_789_012_345
    body = b'{"scriptText":"%s","timestamp":%d}' % (b"x" * size, huge)
    client.set(f"storyart:session:{huge}", body)
    client.zadd(INDEX_KEY, {f"storyart:session:{huge}": huge})
    found = store.latest()
    assert found is not None and (found.timestamp, found.body) == (huge, body)


@pytest.mark.parametrize("size", [100, 100_000], ids=["small: an argument of the script", "large: staged, renamed"])
def test_a_save_whose_proposal_is_taken_stores_its_bytes_under_the_timestamp_it_got(own_store, size: int) -> None:
    """Two saves with one proposal: the second gets the next millisecond, and its stored bytes end with that
    timestamp (a large body is staged under the proposal's digits and rewritten in place), with the session TTL;
    no staged key is left behind."""
    store, client = own_store
    now = now_ms()
    drafts = [draft(f"{name} {'x' * size}") for name in ("first", "second")]
    stamps = [store.save(d, now=now, ttl_ms=60_000, proposal=now) for d in drafts]
    assert stamps == [now, now + 1]
    for d, ts in zip(drafts, stamps, strict=True):
        assert client.get(f"storyart:session:{ts}") == d.render(ts) and bytes(d.render(ts)).endswith(b"%d}" % ts)
        assert 0 < client.pttl(f"storyart:session:{ts}") <= 60_000
    assert len(list(client.scan_iter("storyart:save:*"))) == 2  # the save ids; no staged body
