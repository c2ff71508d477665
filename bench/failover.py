"""Failover soak: the soak's clients (1 MB saves and latest reads) against gunicorn on Redis Sentinel while the
master is killed (-9), the Sentinels promote its replica, and the old master comes back as a replica.

    python bench/failover.py                    # 8 clients, 6 s of load before the kill and 6 s after the rejoin
    python bench/failover.py --before 20 --after 20 --json
    python bench/failover.py --gone             # the old master never comes back: no replica is left

It starts a master, a replica and three Sentinels (`redis-server <conf> --sentinel`, `down-after-milliseconds`
1000, `failover-timeout` 4000) and `gunicorn app:app` configured with `REDIS_SENTINELS` on free 127.0.0.1 ports,
drives `bench/soak.py`'s clients, kills the master, waits for the Sentinels to name the promoted replica, restarts
the old master as a replica of it (as an orchestrator would restart a failed node; with `--gone` it stays down, so
the new master has no replica and its saves are not replicated), and keeps the load on. Then it checks that every
acknowledged save reads back through the service and is on the new master itself, byte for byte, exactly once.
It prints the time the Sentinels took, the time until saves reached the new master again (and when the last one
went to the local store), requests, acknowledged, lost, 5xx and the slowest response; `--json` adds the same as
one JSON line. Exit status 1 when anything acknowledged is missing, differs or is duplicated on the new master,
or a request got a 5xx or no answer (a latest read answered 503 with Retry-After while no master took saves is
counted apart: the browser keeps its own copy then, and the local store held nothing newer).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from chaos import tagged  # noqa: E402

from bench.soak import Call, Soak, settle, stored_tags, verify  # noqa: E402
from servers import RedisServer, SentinelGroup, ServiceProcess, wait_for  # noqa: E402


def differing(master: RedisServer, acknowledged: list[Call], base: bytes) -> list[Call]:
    """The acknowledged saves that the master does not hold as the very bytes the client sent (plus the
    timestamp the service appends)."""
    client = master.client()
    wrong = []
    for start in range(0, len(acknowledged), 50):
        batch = acknowledged[start : start + 50]
        stored = client.mget([f"storyart:session:{c.timestamp}" for c in batch])
        wrong += [c for c, value in zip(batch, stored, strict=True)
                  if value != tagged(base, c.tag)[:-1] + b',"timestamp":%d}' % c.timestamp]
    return wrong


def run(args: argparse.Namespace) -> dict:
    base = (ROOT / "tests" / "fixtures" / "session-1mb.json").read_bytes()
    workdir = Path(tempfile.mkdtemp(prefix="storyart-failover-"))
    group = SentinelGroup(workdir / "redis")
    env = {"REDIS_SENTINELS": group.addresses, "REDIS_SENTINEL_MASTER": group.name,
           "REDIS_RETRY_INTERVAL": str(args.retry_interval), "WEB_CONCURRENCY": str(args.workers), "LOG_LEVEL": "INFO",
           "LOCAL_STORE_MAX_SESSIONS": "100000", "LOCAL_STORE_MAX_BYTES": str(8 << 30)}  # see bench/soak.py
    service = ServiceProcess("gunicorn", env, workdir / "gunicorn.log")
    try:
        group.start()
        service.start()
        soak = Soak(service.port, base, args.read_ratio)
        clients = [threading.Thread(target=soak.client, args=(n,)) for n in range(args.clients)]
        for thread in clients:
            thread.start()
        time.sleep(args.before)
        old = group.master()
        killed = time.monotonic()
        old.kill()
        new = group.promoted(old)
        promoted = time.monotonic()
        if not args.gone:
            old.restart(*group.node_flags, "--replicaof", "127.0.0.1", str(new.port))
            # saves go on meanwhile, so the copy races the soak's writes: give it time (README, "Redis Sentinel")
            wait_for(lambda: group.online(old, new), what="the old master to replicate the new one", timeout=60)
        rejoined = time.monotonic()
        time.sleep(args.after)
        soak.stop.set()
        for thread in clients:
            thread.join()

        calls = soak.calls
        acknowledged = [c for c in calls if c.kind == "save" and c.status == 200]
        back = min((c.started + c.elapsed for c in acknowledged if c.storage == "redis" and c.started > killed),
                   default=None)
        last_local = max((c.started + c.elapsed for c in acknowledged if c.storage == "memory"), default=None)
        settle(service.port, patience=args.retry_interval * 5 + 30)
        lost = verify(service.port, acknowledged, patience=args.retry_interval * 5 + 10)
        wrong = differing(new, acknowledged, base)
        stored = stored_tags(new)
        switching = (killed, back if back is not None else time.monotonic())
        during = [c for c in calls if c.started < switching[1] and c.started + c.elapsed > switching[0]]
        honest = [c for c in during if c.kind == "latest" and c.status == 503 and c.retry_after]
        errors = Counter(f"{c.kind} {c.status or 'no answer'}" for c in calls if c.status != 200)
        result = {
            "clients": args.clients,
            "workers": args.workers,
            "seconds": round(time.monotonic() - killed + args.before, 1),
            "sentinels_promoted_s": round(promoted - killed, 2),
            "old_master_replicating_s": None if args.gone else round(rejoined - killed, 2),
            "saves_reach_new_master_s": round(back - killed, 2) if back is not None else None,
            "last_save_to_local_store_s": round(last_local - killed, 2) if last_local is not None else None,
            "requests": len(calls),
            "saves": sum(c.kind == "save" for c in calls),
            "latest_reads": sum(c.kind == "latest" for c in calls),
            "errors_by_status": dict(sorted(errors.items())),
            "server_errors": sum(1 for c in calls if c.status >= 500 or c.status == 0) - len(honest),
            "reads_unavailable_during_failover": len(honest),
            "server_error_examples": sorted({f"{c.kind} {c.status}: {c.error}" for c in calls if c.error})[:5],
            "acknowledged": len(acknowledged),
            "acknowledged_to_memory": sum(c.storage == "memory" for c in acknowledged),
            "lost": len(lost),
            "lost_examples": [f"{c.tag}@{c.timestamp}" for c in lost[:5]],
            "not_on_new_master": len(wrong),
            "duplicates_on_new_master": sum(n - 1 for n in stored.values() if n > 1),
            "requests_during_failover": len(during),
            "slowest_during_failover_s": round(max((c.elapsed for c in during), default=0.0), 3),
            "slowest_s": round(max((c.elapsed for c in calls), default=0.0), 3),
        }
    finally:
        service.stop()
        group.kill_all()
    if args.keep:
        result["workdir"] = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def report(result: dict) -> str:
    errors = ", ".join(f"{status}: {n}" for status, n in result["errors_by_status"].items()) or "none"
    return "\n".join([
        f"failover: {result['clients']} clients, gunicorn with {result['workers']} workers, master killed (-9): "
        f"replica promoted after {result['sentinels_promoted_s']} s, "
        + (f"old master replicating after {result['old_master_replicating_s']} s"
           if result["old_master_replicating_s"] is not None else "old master gone for good")
        + f", saves on the new master after {result['saves_reach_new_master_s']} s (the last one to the local store "
        f"{result['last_save_to_local_store_s']} s after the kill)",
        f"requests:     {result['requests']} ({result['saves']} saves of 1 MB, {result['latest_reads']} latest reads; "
        f"{result['requests_during_failover']} during the failover)",
        f"errors:       {errors} (5xx or no answer: {result['server_errors']}; latest 503 with Retry-After during "
        f"the failover: {result['reads_unavailable_during_failover']})",
        *(f"              {example}" for example in result["server_error_examples"]),
        f"acknowledged: {result['acknowledged']} ({result['acknowledged_to_memory']} of them to the local store)",
        f"lost:         {result['lost']} {result['lost_examples'] or ''}".rstrip(),
        f"new master:   {result['not_on_new_master']} acknowledged sessions missing or different, "
        f"{result['duplicates_on_new_master']} duplicates",
        f"slowest:      {result['slowest_during_failover_s']:.3f} s during the failover, {result['slowest_s']:.3f} s "
        "overall",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=float, default=6.0, help="seconds of load before the kill (default 6)")
    parser.add_argument("--after", type=float, default=6.0,
                        help="seconds of load after the old master replicates again, or with --gone after the "
                             "promotion (default 6)")
    parser.add_argument("--gone", action="store_true",
                        help="leave the old master down: the new master has no replica left")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--read-ratio", type=float, default=0.5, help="share of latest reads (default 0.5)")
    parser.add_argument("--workers", type=int, default=3, help="gunicorn workers (default 3)")
    parser.add_argument("--retry-interval", type=float, default=0.5, help="REDIS_RETRY_INTERVAL (default 0.5)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (conf files, gunicorn log)")
    args = parser.parse_args(argv)
    result = run(args)
    print(report(result))
    if "workdir" in result:
        print(f"work directory: {result['workdir']}")
    if args.json:
        print(orjson.dumps(result).decode())
    failed = result["lost"] or result["not_on_new_master"] or result["duplicates_on_new_master"] \
        or result["server_errors"] or result["saves_reach_new_master_s"] is None
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
