"""bench/workers.py runs end to end and produces every number (structure only: no timing is
asserted, the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def test_workers_benchmark_produces_every_ratio(tmp_path):
    out = tmp_path / "workers.json"
    completed = subprocess.run([sys.executable, "-m", "bench.workers", "--seconds", "0.5",
                                "--rounds", "1", "--out", str(out)], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {(r["mode"], r["concurrency"]) for r in results["rows"]} == {
        ("keep-alive", 10), ("new-conn", 10)}
    for row in results["rows"]:
        assert row["one_worker_rps"] > 0 and row["two_workers_rps"] > 0 and row["ratio"] > 0
    assert set(results["cpu_seconds"]) == {"load generator", "upstream", "keyless 1 worker",
                                           "keyless 2 workers"}
    assert "ratio" in completed.stdout
