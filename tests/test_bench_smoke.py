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
    args = [sys.executable, "bench/run.py", "--duration", "0.5", "--rounds", "1", "--generator", "python",
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
