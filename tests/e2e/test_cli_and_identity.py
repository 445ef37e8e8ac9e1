"""`keyless ca`, user-assigned identities, and bad configuration at start."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobServiceClient

from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV, RECORDER_HOST, route_app_through
from tests.support.azurite import ACCOUNT, WRONG_KEY
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess, keyless_command

pytestmark = pytest.mark.e2e
USER_ASSIGNED = "7e57c11e-0000-4000-8000-00000000beef"


def test_keyless_ca_prints_the_certificate_the_proxy_presents(keyless, tmp_path):
    printed = subprocess.run(
        [*keyless_command(), "ca", "--confdir", str(keyless.confdir)],
        capture_output=True, check=True, timeout=60,
    ).stdout
    assert printed.startswith(b"-----BEGIN CERTIFICATE-----")
    assert printed == Path(keyless.ca_path).read_bytes()
    # First use generates a CA, with the private key kept out of the public file.
    fresh = tmp_path / "fresh"
    out = subprocess.run([*keyless_command(), "ca", "--confdir", str(fresh)],
                         capture_output=True, check=True, timeout=60).stdout
    assert out.startswith(b"-----BEGIN CERTIFICATE-----") and b"PRIVATE KEY" not in out
    assert (fresh / "mitmproxy-ca-cert.pem").read_bytes() == out


def test_bad_flag_is_refused_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [*keyless_command(), "run", "--confdir", str(tmp_path), "--connect-to", "nonsense"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "expected HOST:PORT:ADDR:PORT" in result.stderr


@pytest.mark.parametrize(
    ("host_header", "gets_token"),
    [(RECORDER_HOST, True), (f"{RECORDER_HOST}:443", True), ("evil.test", False),
     (f"{RECORDER_HOST}:8443", False), ("devstoreaccount1.blob.core.windows.net", False)],
)
def test_token_only_when_host_header_agrees_with_connect_target(
    through_keyless, catalog_recorder, host_header, gets_token
):
    before = len(catalog_recorder.requests)
    response = requests.get(
        f"https://{RECORDER_HOST}/c/b?comp=list&sig=bogus",
        headers={"Host": host_header, "Authorization": f"SharedKey {ACCOUNT}:AAAA",
                 "x-ms-version": "2021-08-06"},
        timeout=10,
    )
    if gets_token:
        assert response.status_code == 200
        seen = catalog_recorder.requests[-1]
        assert (seen.header("authorization") or "").startswith("Bearer ey")
        assert seen.path == "/c/b?comp=list"
    else:
        # no token, and the key is not forwarded either: a clear refusal, nothing sent
        assert response.status_code == 421
        assert response.json()["error"]["code"] == "KeylessMisdirectedRequest"
        assert len(catalog_recorder.requests) == before


def test_azure_client_id_selects_a_user_assigned_identity(tmp_path, pki, azurite, monkeypatch):
    with FakeIdentityEndpoint() as endpoint:
        process = KeylessProcess(
            tmp_path / "keyless-uai",
            ["--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
             "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}"],
            {**endpoint.env(), **DEAD_PROXY_ENV, "AZURE_CLIENT_ID": USER_ASSIGNED},
        ).start()
        try:
            route_app_through(monkeypatch, process)
            service = BlobServiceClient.from_connection_string(
                f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
                f"BlobEndpoint=https://{BLOB_HOST}", retry_total=0,
            )
            try:
                list(service.list_containers())
            except HttpResponseError as exc:  # pragma: no cover - shown on failure
                pytest.fail(f"listing through keyless failed: {exc}\n{process.log()}")
        finally:
            assert process.stop() == 0
        calls = endpoint.calls_for("https://storage.azure.com")
        assert [c["client_id"] for c in calls] == [USER_ASSIGNED]
        assert endpoint.decode(endpoint.issued[0])["appid"] == USER_ASSIGNED
