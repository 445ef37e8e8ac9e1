"""bench/redis_bench.py runs end to end (small and bounded): every setup logs in and the
table has a ratio for each test and pipeline depth. It asserts no timing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_redis_bench_smoke() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.redis_bench", "--requests", "2000",
                           "--clients", "10", "--rounds", "1"], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stdout + done.stderr
    rows = re.findall(r"^(SET|GET)\s+(1|16)\s+\d+\s+\d+\s+\d+\s+(\d+\.\d\d)\s+(\d+\.\d\d)$",
                      done.stdout, re.MULTILINE)
    assert {(test, depth) for test, depth, _, _ in rows} == {
        ("SET", "1"), ("GET", "1"), ("SET", "16"), ("GET", "16")}, done.stdout
    assert all(float(ratio) > 0 for *_, ratio, _ in rows)
    assert "logged in" in done.stdout and "the app's key went nowhere" in done.stdout
