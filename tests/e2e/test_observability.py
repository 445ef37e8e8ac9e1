"""Metrics, readiness, audit mode and the migration report, through the real keyless process."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid

import pytest
import requests
from azure.storage.blob import BlobServiceClient
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV, FAKE_HOSTS, route_app_through
from tests.support.azurite import ACCOUNT, ACCOUNT_KEY, WRONG_KEY
from tests.support.fake_rest import register_servicebus, servicebus_sas
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess, keyless_command

pytestmark = pytest.mark.e2e
SB_HOST = FAKE_HOSTS["servicebus"]
BOUNDED_LABEL = r"^[A-Za-z0-9_.:/+\-]{0,80}$"
# a token, not any text that happens to contain "eyJ" (like the scheme label AccessKeyJwt)
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.")


def families(process: KeylessProcess) -> dict:
    return {f.name: f for f in text_string_to_metric_families(process.metrics())}


def test_metrics_after_real_traffic_are_complete_and_bounded(through_keyless, identity):
    service = BlobServiceClient.from_connection_string(
        f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
        f"BlobEndpoint=https://{BLOB_HOST}")
    container = service.create_container(f"metrics{uuid.uuid4().hex[:8]}")
    container.upload_blob("m.txt", b"metrics")
    container.delete_container()
    found = families(through_keyless)
    for name in ("keyless_requests", "keyless_key_material_stripped", "keyless_token_fetches",
                 "keyless_token_fetch_seconds", "keyless_token_cache_lookups",
                 "keyless_token_expiry_seconds", "keyless_upstream_responses",
                 "keyless_added_seconds", "keyless_build_info"):
        assert name in found, f"missing metric family {name}"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in found.values() for s in f.samples}
    assert samples[("keyless_token_cache_lookups_total", (("result", "hit"),))] >= 2
    expiry = [v for (n, labels), v in samples.items() if n == "keyless_token_expiry_seconds"
              and ("scope", "https://storage.azure.com/.default") in labels]
    assert expiry and 0 < expiry[0] <= 3600
    assert samples[("keyless_upstream_responses_total",
                    (("service", "storage-blob"), ("status_class", "2xx")))] >= 3
    assert samples[("keyless_added_seconds_count", ())] >= 3
    # labels take bounded values only: no URL, no query, no token
    for f in found.values():
        for s in f.samples:
            for value in s.labels.values():
                assert re.match(BOUNDED_LABEL, value) and not JWT.search(value), (s.name, value)
    assert not any(token in through_keyless.metrics() for token in identity.issued)


def test_readiness_waits_for_the_initial_tokens(tmp_path):
    with FakeIdentityEndpoint(mode="error") as endpoint:
        process = KeylessProcess(tmp_path, ["--ready-scopes", "https://storage.azure.com/.default",
                                            "--log-format", "json"],
                                 {**endpoint.env(), **DEAD_PROXY_ENV})
        try:
            process.start(wait_ready=False)
            deadline = time.monotonic() + 20
            while process.get("/healthz")[0] != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            status, text = process.get("/readyz")
            assert status == 503 and "initial tokens" in text
            endpoint.mode = "ok"
            while process.get("/readyz")[0] != 200:
                assert time.monotonic() < deadline + 20, "never became ready"
                time.sleep(0.2)
        finally:
            assert process.stop() == 0
        # JSON lines, one event each
        events = [json.loads(line) for line in process.log().splitlines() if line.strip()]
        assert any("keyless listening" in e["message"] for e in events)
        assert {"time", "level", "logger", "message"} <= set(events[0])


def report_of(confdir, *extra: str) -> str:
    return subprocess.run([*keyless_command(), "report", "--confdir", str(confdir), *extra],
                          capture_output=True, text=True, check=True, timeout=60).stdout


def test_audit_mode_changes_nothing_and_the_report_plans_the_migration(
    tmp_path, pki, azurite, fake_azure, monkeypatch
):
    register_servicebus(fake_azure, SB_HOST)
    confdir = tmp_path / "shared-confdir"
    args = ["--confdir", str(confdir),
            "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
            "--connect-to", f"{SB_HOST}:443:127.0.0.1:{fake_azure.port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}"]
    container = f"audit{uuid.uuid4().hex[:8]}"
    sas = servicebus_sas(f"https://{SB_HOST}/auditqueue")
    with FakeIdentityEndpoint() as endpoint:
        env = {**endpoint.env(), **DEAD_PROXY_ENV}
        audit = KeylessProcess(tmp_path / "audit", [*args, "--audit"], env)
        audit.confdir = confdir
        audit.start()
        try:
            route_app_through(monkeypatch, audit)
            # the real key works in audit mode: keyless changed nothing
            legacy = BlobServiceClient.from_connection_string(
                f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};"
                f"AccountKey={ACCOUNT_KEY};BlobEndpoint=https://{BLOB_HOST}")
            legacy.create_container(container).upload_blob("a.txt", b"audited")
            seen_before = len(fake_azure.requests_for(SB_HOST))
            sent = requests.post(f"https://{SB_HOST}/auditqueue/messages", data=b"hi",
                                 headers={"Authorization": sas}, timeout=10)
            assert sent.status_code == 401  # the fake refuses the unconverted SAS: untouched
            upstream = fake_azure.requests_for(SB_HOST)[seen_before]
            assert upstream.header("authorization") == sas
            live = json.loads(audit.get("/report")[1])
        finally:
            assert audit.stop() == 0
        assert endpoint.calls == [], "audit mode fetched a token"
        assert {i["resource"] for i in live["inventory"]} == {ACCOUNT, "keylessbus"}

        text = report_of(confdir)
        assert f"storage-blob {ACCOUNT}" in text and "SharedKey" in text
        assert "servicebus keylessbus" in text and "SharedAccessSignature" in text
        assert '--role "Storage Blob Data Contributor"' in text
        assert '--role "Azure Service Bus Data Sender"' in text
        assert "Microsoft.Storage/storageAccounts" in text and "ba92f5b4-2d11-453d-a403" in text
        assert "NO: key-based calls are still forwarded" in text

        # Now keyless converts: the same calls, and the verdict flips.
        normal = KeylessProcess(tmp_path / "normal", args, env)
        normal.confdir = confdir
        normal.start()
        try:
            route_app_through(monkeypatch, normal)
            wrong = BlobServiceClient.from_connection_string(
                f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};"
                f"AccountKey={WRONG_KEY};BlobEndpoint=https://{BLOB_HOST}")
            wrong.get_container_client(container).upload_blob("b.txt", b"converted")
            assert requests.post(f"https://{SB_HOST}/auditqueue/messages", data=b"hi",
                                 headers={"Authorization": sas}, timeout=10).status_code == 201
        finally:
            assert normal.stop() == 0
    report = json.loads(report_of(confdir, "--json"))
    verdicts = {i["resource"]: i["local_auth_can_be_disabled"] for i in report["inventory"]}
    assert verdicts == {ACCOUNT: True, "keylessbus": True}
    everything = text + json.dumps(report) + (confdir / "keyless-state.json").read_text()
    for secret in (ACCOUNT_KEY, WRONG_KEY, sas.split("sig=")[1].split("&")[0]):
        assert secret not in everything
    state_mode = (confdir / "keyless-state.json").stat().st_mode & 0o777
    assert state_mode == 0o600
