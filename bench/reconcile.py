"""Reconcile rounds: what one costs and how many it takes before the service sees what another tool wrote.

    python bench/reconcile.py                    # 1,000 / 10,000 / 100,000 small sessions, then 64 of 1 MB
    python bench/reconcile.py --counts 2000      # a quick look

It starts its own redis-server on a free 127.0.0.1 port and drives a `stores.redis.Reconciler` with the default
`Budget` round by round in this process (the service runs one round every REDIS_RETRY_INTERVAL). For each count
of small sessions written by "another tool" (SET, no index), once everything is reconciled: the rounds of one
SCAN pass, a round's time and its longest Redis command (SLOWLOG, so what other clients may wait behind), and
the rounds until a new key SET without the index is indexed. Then, with 1 MB sessions: a round's bytes and time
and the rounds of a reading pass, until a same-size rewrite (`SET ... KEEPTTL`) of the oldest session reaches the
story filter. It asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from allocator import now_ms  # noqa: E402
from config import Config  # noqa: E402
from payload import parse_session  # noqa: E402
from servers import RedisServer  # noqa: E402
from storage import Query  # noqa: E402
from stores.redis import INDEX_KEY, Reconciled, Reconciler, RedisStore  # noqa: E402

FIRST = 1_700_000_000_000
LEASE_MS = 10_000


def plant(client, stamps: range, body: bytes = b"") -> None:
    with client.pipeline(transaction=False) as pipe:
        for ts in stamps:
            value = body.replace(b'"storyUuid":"', b'"storyUuid":"s%d-' % ts) if body else orjson.dumps(
                {"scriptText": "x", "episodeContext": "", "storyUuid": f"s{ts}",
                 "analyzedEpisode": {"title": f"T {ts}"}, "timestamp": ts})
            pipe.set(f"storyart:session:{ts}", value, ex=86_400)
            if len(pipe) >= 1000:
                pipe.execute()
        pipe.execute()


def timed_round(reconciler: Reconciler) -> tuple[Reconciled, float]:
    started = time.perf_counter()
    done = reconciler.round(LEASE_MS)
    return done, time.perf_counter() - started


def settle(reconciler: Reconciler) -> int:
    """Rounds until one changes nothing and no reading pass is under way; returns how many ran."""
    rounds = 0
    while True:
        done, _ = timed_round(reconciler)
        rounds += 1
        if not (done.indexed or done.recorded or reconciler._stale or reconciler._below is not None):
            return rounds


def longest_command(client) -> tuple[float, str]:
    """(ms, name) of the slowest command SLOWLOG holds since it was reset."""
    entries = [e for e in client.slowlog_get(100_000) if not e["command"].startswith((b"SLOWLOG", b"CONFIG"))]
    slowest = max(entries, key=lambda e: e["duration"])
    return slowest["duration"] / 1000, slowest["command"][:60].decode(errors="replace")


def keys_run(store: RedisStore, client, count: int) -> None:
    client.flushall()
    for i in range(count):  # saved by the service: index, summary, facets and save id in place
        session = {"scriptText": "x", "episodeContext": "", "storyUuid": f"s{i}", "analyzedEpisode": {"title": f"T{i}"},
                   "timestamp": FIRST + i}
        store.save(parse_session(orjson.dumps(session), now_ms()), now=now_ms(), ttl_ms=86_400_000, proposal=0)
    reconciler = Reconciler(store)
    while not (reconciler._cursor == 0 and not reconciler._found):  # to the end of the first SCAN pass
        timed_round(reconciler)
    client.slowlog_reset()
    client.config_resetstat()
    times, scanned, rounds_per_pass = [], 0, 0
    while True:  # one whole SCAN pass
        done, seconds = timed_round(reconciler)
        times.append(seconds)
        scanned += done.checked
        rounds_per_pass += 1
        if reconciler._cursor == 0 and not reconciler._found:
            break
    slowest_ms, slowest = longest_command(client)
    stats = client.info("commandstats")
    average = ", ".join(f"{name} {stats[f'cmdstat_{name}']['usec_per_call'] / 1000:.2f} ms"
                        for name in ("evalsha", "scan") if f"cmdstat_{name}" in stats)
    new = FIRST + count + 10
    plant(client, range(new, new + 1))
    rounds = 0
    while client.zscore(INDEX_KEY, f"storyart:session:{new}") is None:
        timed_round(reconciler)
        rounds += 1
    print(f"{count:>7} sessions ({client.dbsize()} keys): a SCAN pass {rounds_per_pass} round(s) ({scanned} keys), "
          f"a round {statistics.median(times) * 1000:.1f} ms median, {max(times) * 1000:.1f} ms max, longest Redis "
          f"command {slowest_ms:.2f} ms ({slowest}), on average {average}; a new key indexed after {rounds} round(s)")


def bytes_run(store: RedisStore, client, count: int) -> None:
    client.flushall()
    body = (ROOT / "tests" / "fixtures" / "session-1mb.json").read_bytes()
    plant(client, range(FIRST, FIRST + count), body)
    reconciler = Reconciler(store)
    settle(reconciler)
    reconciler._pass_started = -reconciler.budget.rest  # a reading pass may start at once
    target = FIRST  # the oldest: the reading pass, newest first, meets it last
    key = f"storyart:session:{target}"
    client.set(key, client.get(key).replace(b"s%d-" % target, b"z%d-" % target), keepttl=True)  # same size
    rounds, reads, times = 0, [], []
    while store.timestamps(Query(story_uuid=f"z{target}-" + _story_of(body)))[0] == 0:
        done, seconds = timed_round(reconciler)
        rounds, reads, times = rounds + 1, reads + [done.read], times + [seconds]
    print(f"{count} sessions of {len(body) / 1e6:.1f} MB: a same-size rewrite of the oldest reached the story filter "
          f"after {rounds} round(s) (one reading pass); per round {max(reads) / 1e6:.1f} MB read at most, "
          f"{statistics.median(times) * 1000:.0f} ms median, {max(times) * 1000:.0f} ms max")


def _story_of(body: bytes) -> str:
    return orjson.loads(body)["storyUuid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000,10000,100000")
    parser.add_argument("--big", type=int, default=64, help="sessions of 1 MB for the reading pass")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir)).start()
        try:
            client = server.client()
            client.config_set("slowlog-log-slower-than", 0)
            client.config_set("slowlog-max-len", 100_000)
            store = RedisStore.from_config(dataclasses.replace(Config(), redis_url=server.url))
            for count in (int(c) for c in args.counts.split(",")):
                keys_run(store, client, count)
            bytes_run(store, client, args.big)
            store.close()
        finally:
            server.kill_all()


if __name__ == "__main__":
    main()
