"""bench/amqp_bench.py runs end to end in its --smoke mode: both columns measured, keyless
converted the app's SAS put-tokens and none reached the namespace. It asserts no timing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_amqp_bench_smoke() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.amqp_bench", "--smoke"],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stdout + done.stderr
    rows = dict(re.findall(r"^(direct|keyless)\s+(\d+)\s+\d+\.\d\d$", done.stdout, re.MULTILINE))
    assert set(rows) == {"direct", "keyless"}, done.stdout
    assert all(int(rate) > 0 for rate in rows.values())
    assert re.search(r"^ratio keyless/direct msg/s: \d+\.\d\d", done.stdout, re.MULTILINE)
    assert re.search(r"^keyless RSS: [\d.]+ MiB before, [\d.]+ MiB after 400 messages",
                     done.stdout, re.MULTILINE)
    converted = re.search(r"put-tokens converted by keyless: (\d+); "
                          r"SAS tokens that reached the namespace: (\d+)", done.stdout)
    assert converted and int(converted[1]) > 0 and converted[2] == "0", done.stdout
