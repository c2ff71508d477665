"""The failover soak (bench/failover.py): 8 clients, 1 MB saves and latest reads against gunicorn on a master, a
replica and three Sentinels while the master is killed (-9), the Sentinels promote the replica and the old master
comes back as its replica. Every acknowledged save must read back through the service and be on the new master
itself, byte for byte and once; no request may get a 5xx or no answer (a latest read answered 503 with
Retry-After while no master took saves excepted: see docs/high-availability.md)."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from servers import ROOT

pytestmark = pytest.mark.slow


def test_a_master_killed_under_load_loses_nothing_and_saves_reach_the_promoted_replica() -> None:
    done = subprocess.run([sys.executable, "bench/failover.py", "--before", "3", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    print(done.stdout, done.stderr[-4000:], sep="\n")
    result = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert result["acknowledged_to_memory"] > 0  # saves really waited in the local store meanwhile
    assert result["saves_reach_new_master_s"] is not None  # and then went to the new master again
    assert result["acknowledged"] > 50 and result["requests_during_failover"] > 0
    assert result["lost"] == 0, result["lost_examples"]
    assert result["not_on_new_master"] == 0 and result["duplicates_on_new_master"] == 0
    assert result["server_errors"] == 0, result["errors_by_status"]
    assert done.returncode == 0
