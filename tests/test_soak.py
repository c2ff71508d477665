"""The soak (bench/soak.py) for a short time: 8 clients, 1 MB saves and latest reads against gunicorn while
Redis is killed (-9) and restarted twice, and gunicorn itself (master and workers) is killed -9 and restarted
in the middle of the first outage. Nothing acknowledged may be lost or duplicated, and no request may get a
5xx or no answer (except a connection refused while the service was down)."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from servers import ROOT

pytestmark = pytest.mark.slow


def test_soak_loses_nothing_while_redis_is_killed_twice_and_the_service_once() -> None:
    done = subprocess.run([sys.executable, "bench/soak.py", "--duration", "14", "--kill-service", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    print(done.stdout, done.stderr[-4000:], sep="\n")
    result = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["outages"]) == 2 and result["requests_during_outages"] > 0
    assert len(result["service_killed"]) == 1
    assert result["acknowledged_to_memory"] > 0  # the outages really sent saves to memory
    assert result["acknowledged"] > 50
    assert result["lost"] == 0, result["lost_examples"]
    assert result["server_errors"] == 0, result["errors_by_status"]
    assert result["duplicates_in_redis"] == 0 and result["timestamps_given_twice"] == 0
    assert len(result["shutdown_log"]) == 3  # one line per gunicorn worker, saying what it flushed
    assert done.returncode == 0
