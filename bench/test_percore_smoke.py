"""bench/percore.py and bench/workers.py --generator wrk run end to end and produce every
number (structure only: no timing is asserted, the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def test_percore_benchmark_produces_both_ratios_per_case(tmp_path):
    out = tmp_path / "percore.json"
    completed = run_bench("bench.percore", "--seconds", "0.5", "--rounds", "1", "--out", str(out))
    results = json.loads(out.read_text())
    assert results["generator"] == "go"
    assert {(r["mode"], r["concurrency"]) for r in results["rows"]} == {
        ("keep-alive", 1), ("keep-alive", 10), ("new-conn", 1)}
    for row in results["rows"]:
        assert row["mitmdump_rps"] > 0 and row["keyless_rps"] > 0
        assert row["throughput_ratio"] > 0 and row["per_cpu_ratio"] > 0
    assert "req/cpu-s" in completed.stdout


def test_workers_benchmark_under_wrk_and_nginx(tmp_path):
    out = tmp_path / "workers.json"
    run_bench("bench.workers", "--generator", "wrk", "--seconds", "1", "--rounds", "1",
              "--out", str(out))
    results = json.loads(out.read_text())
    assert results["generator"] == "wrk"
    for row in results["rows"]:
        assert row["one_worker_rps"] > 0 and row["two_workers_rps"] > 0
        assert set(row["machine_cores"]) == {"1", "2"}  # JSON keys: the worker counts
