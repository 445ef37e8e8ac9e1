"""The benchmark suite's smoke variant runs end to end and produces every number.

Structure only: no timing is asserted (the machine is shared). Run it with
`python -m pytest bench/test_smoke.py`; `make test` runs it too (bench is in `testpaths`).
Needs Azurite (npm) like the e2e tests; takes about a minute.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e
SMOKE_TIMEOUT = 900  # seconds: a bound for a hung run, not a speed target (it takes ~1 min)


def positive(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_smoke_run_produces_every_number(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out",
                                str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                               timeout=SMOKE_TIMEOUT)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    assert (tmp_path / "benchmarks.png").stat().st_size > 0

    # 1-3: every (mode, concurrency, config) measured, no failed request, positive numbers
    http = {(r["mode"], r["concurrency"], r["config"]) for r in results["http"]}
    assert http == {(m, c, cfg) for m in ("keep-alive", "new-conn") for c in (1, 10)
                    for cfg in ("direct", "mitmdump", "keyless")}
    plain = {(r["mode"], r["concurrency"], r["config"]) for r in results["http_plain"]}
    assert plain == {("new-conn", c, cfg) for c in (1, 10)
                     for cfg in ("mitmdump", "keyless", "keyless (no pool, RSA CA)")}
    tunnel = {(r["mode"], r["concurrency"], r["config"]) for r in results["tunnel"]}
    assert tunnel == {(m, c, cfg) for m, c in (("keep-alive", 1), ("keep-alive", 10),
                                               ("new-conn", 10))
                      for cfg in ("direct", "keyless (tunnel)")}
    for r in results["http"] + results["http_plain"] + results["tunnel"]:
        assert r["failures"] == 0, r
        assert all(positive(r[k]) for k in ("requests", "rps", "p50_ms", "p99_ms")), r
    assert results["tunnel_connections_counted"] > 0  # keyless really tunnelled them
    # 4: the SDK scenario
    for label in ("direct-token SDK", "direct-token SDK via mitmdump", "legacy SDK via keyless"):
        for op in ("upload", "download", "all"):
            assert positive(results["sdk"][label][op]["rps"]), (label, op)
    # 5: the large transfer
    large = results["large"]
    for config in ("direct", "keyless"):
        assert all(positive(large[config][k]) for k in ("upload_MBps", "download_MBps"))
    assert positive(large["keyless_peak_rss_MB"])
    # 6: one token call, however many requests waited
    cold = results["cold_cache"]
    assert cold["statuses"] == {"200": cold["requests"]}, cold
    assert cold["token_calls"] == 1, cold
    # 7: the soak ran to its count
    soak = results["soak"]
    assert soak["requests"] == soak["requested"] and soak["failures"] == 0, soak
    assert all(positive(soak[k]) for k in ("rss_start_MB", "rss_middle_MB", "rss_end_MB"))
    # the target table: every ratio/value present and positive (token calls: exactly 1)
    names = [t["name"] for t in results["targets"]]
    assert len(names) == len(set(names))
    for target in results["targets"]:
        if "growth" in target["name"]:
            assert math.isfinite(target["value"]), target
        else:
            assert positive(target["value"]), target
