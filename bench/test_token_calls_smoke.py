"""bench/token_calls.py runs end to end (a short run: structure only, no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def test_token_calls_benchmark_runs_and_counts_the_endpoint_calls(tmp_path):
    out = tmp_path / "tokens.json"
    completed = subprocess.run([sys.executable, "-m", "bench.token_calls", "--scenario",
                                "short-lived", "--seconds", "3", "--out", str(out)], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(out.read_text())["short_lived"]
    # 3 s into a 400 s token: every request converted, one call at the endpoint
    assert result["requests"] > 5 and result["statuses"] == {"200": result["requests"]}
    assert result["calls"] == {"https://storage.azure.com": [0.0]}
