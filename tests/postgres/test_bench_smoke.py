"""bench/postgres_bench.py runs end to end and produces every number (structure only: no
timing is asserted, the machine is shared)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.postgres_bench import SMOKE, WORKLOADS

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_postgres_bench_smoke_run(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "bench.postgres_bench", "--smoke",
                                "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "postgres-benchmarks.json").read_text())
    assert set(results["workloads"]) == set(WORKLOADS)
    for row in results["workloads"].values():
        assert set(row["tps"]) == {"direct (token, TLS)", "keyless (wrong password)"}
        assert all(math.isfinite(v) and v > 0 for v in row["tps"].values()), row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
    # -C logs in once per transaction, all with the one token fetched
    assert results["token_fetches"] == 1
    assert results["keyless_logins"] > SMOKE.clients * 2
    assert "token fetches for the whole run: 1" in completed.stdout
