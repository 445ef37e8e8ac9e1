"""--workers pieces that need no process: the worker count, the metrics merge, the audit
state file shared by several processes."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.audit import CallKey, CallLog, SharedCallLog
from proxy.config import cpu_quota, parse_workers
from proxy.workers import merged_families

KEY = CallKey("storage-blob", "acct", "acct.blob.core.windows.net", "SharedKey", "read",
              "default", "converted")


def test_worker_count_numbers_and_auto(monkeypatch, tmp_path):
    assert parse_workers("3") == 3 and parse_workers(" 1 ") == 1
    for bad in ("0", "-2", "two", "1000"):
        with pytest.raises(ValueError):
            parse_workers(bad)
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert cpu_quota(cpu_max) == 1.5
    cpu_max.write_text("max 100000\n")
    assert cpu_quota(cpu_max) is None
    assert cpu_quota(tmp_path / "absent") is None
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr("proxy.config.cpu_quota", lambda: 2.5)
    assert parse_workers("auto") == 2  # the quota caps the affinity
    monkeypatch.setattr("proxy.config.cpu_quota", lambda: 0.5)
    assert parse_workers("auto") == 1  # at least one
    monkeypatch.setattr("proxy.config.cpu_quota", lambda: None)
    assert parse_workers("AUTO") == 4


def registry_with(requests: float, build: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("keyless_requests", "r", ["service"], registry=registry)
    counter.labels(service="blob").inc(requests)
    Gauge("keyless_build_info", "b", registry=registry).set(build)
    return registry


def test_metrics_merge_sums_counters_and_keeps_one_gauge():
    families = merged_families(registry_with(3, 1).collect(), registry_with(4, 1).collect())
    samples = {(s.name, tuple(s.labels.items())): s.value
               for family in families for s in family.samples}
    assert samples[("keyless_requests_total", (("service", "blob"),))] == 7
    assert samples[("keyless_build_info", ())] == 1
    assert not any(name.endswith("_created") for name, _ in samples)
    assert len([f for f in families if f.name == "keyless_requests"]) == 1


def record_and_save(path: str, times: int) -> None:
    for _ in range(times):
        log = SharedCallLog(Path(path))
        log.record(KEY)
        log.save()


def test_shared_call_log_merges_concurrent_writers_in_todays_format(tmp_path):
    path = tmp_path / "keyless-state.json"
    old = CallLog(path)
    old.record(KEY)
    old.save()  # what a previous run left
    context = multiprocessing.get_context("spawn")  # pytest has threads: no fork
    writers = [context.Process(target=record_and_save, args=(str(path), 40)) for _ in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0
    entries = CallLog(path).entries()
    assert len(entries) == 1 and entries[0]["count"] == 1 + 3 * 40
    data = json.loads(path.read_text())
    assert data["version"] == 1 and set(data) == {"version", "calls"}
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_one_process_shows_no_worker_metrics():
    from prometheus_client import generate_latest

    from proxy import metrics

    assert b"keyless_worker_" not in generate_latest(metrics.REGISTRY)
