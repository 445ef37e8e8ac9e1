"""Legacy Storage apps with a WRONG key succeed through keyless, and fail without it."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import requests
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import (
    BlobClient,
    BlobSasPermissions,
    BlobServiceClient,
    generate_blob_sas,
)
from azure.storage.queue import QueueClient

from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV, QUEUE_HOST, route_app_through
from tests.support.azurite import ACCOUNT, ACCOUNT_KEY, WRONG_KEY
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess
from tests.support.upstreams import CountingRelay, RecordingServer

pytestmark = pytest.mark.e2e
STORAGE_RESOURCE = "https://storage.azure.com"
BIG = 64 * 1024 * 1024 + 123  # a single PUT and GET of more than 64 MiB
PEAK_GROWTH_LIMIT = 8 * 1024 * 1024  # keyless' peak RSS growth while streaming BIG both ways
LEGACY_BLOB = (
    f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
    f"BlobEndpoint=https://{BLOB_HOST}"
)
LEGACY_QUEUE = (
    f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
    f"QueueEndpoint=https://{QUEUE_HOST}"
)
used_secrets: list[str] = [WRONG_KEY]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def test_blob_app_with_wrong_key_works_through_keyless_and_streams_64mib(through_keyless):
    keyless = through_keyless
    service = BlobServiceClient.from_connection_string(
        LEGACY_BLOB, max_single_put_size=128 * 1024 * 1024, max_single_get_size=128 * 1024 * 1024
    )
    container = service.create_container(unique("legacy"))
    payload = os.urandom(BIG)
    rss_before = keyless.peak_rss_bytes()

    container.upload_blob("big.bin", payload)
    downloaded = container.download_blob("big.bin").readall()

    peak_growth = keyless.peak_rss_bytes() - rss_before
    assert hashlib.sha256(downloaded).digest() == hashlib.sha256(payload).digest()
    assert [b.name for b in container.list_blobs()] == ["big.bin"]
    container.delete_blob("big.bin")
    assert list(container.list_blobs()) == []
    container.delete_container()
    # Bodies stream: keyless' peak memory grows by a few MiB (README: ~2-3 MiB, measured
    # 2.3-3.0 MiB on a fresh keyless), not by a copy of the blob (64 MiB) or a part of it.
    print(f"keyless peak RSS growth while streaming {BIG} bytes: {peak_growth / 2**20:.1f} MiB")
    assert peak_growth <= PEAK_GROWTH_LIMIT, f"{peak_growth / 2**20:.1f} MiB"
    metrics = keyless.metrics()
    assert 'keyless_requests_total{outcome="converted",service="storage-blob"}' in metrics
    assert 'keyless_key_material_stripped_total{scheme="SharedKey",service="storage-blob"}' \
        in metrics


def test_same_app_straight_to_azurite_is_refused(direct, azurite, pki):
    service = BlobServiceClient.from_connection_string(
        f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
        f"BlobEndpoint=https://127.0.0.1:{azurite.blob_port}/{ACCOUNT}",
        connection_verify=pki.ca_pem_path,
    )
    with pytest.raises(HttpResponseError) as caught:
        service.create_container(unique("direct"))
    # Azure answers a bad Shared Key with 403 AuthenticationFailed. Azurite under --oauth basic
    # runs its Bearer authenticator last and answers 400 InvalidAuthenticationInfo instead
    # (its own quirk, shown in tests/unit/test_support_selfcheck.py). Either way: refused.
    assert (caught.value.status_code, caught.value.error_code) == (400, "InvalidAuthenticationInfo")


def test_sas_url_with_bogus_signature_works_through_keyless(through_keyless, azurite, pki):
    container_name = unique("sas")
    BlobServiceClient.from_connection_string(LEGACY_BLOB).create_container(container_name)
    sas = generate_blob_sas(
        ACCOUNT, container_name, "note.txt", account_key=WRONG_KEY,
        permission=BlobSasPermissions(read=True, write=True, create=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )
    used_secrets.append(sas.split("sig=")[1].split("&")[0])
    blob = BlobClient.from_blob_url(f"https://{BLOB_HOST}/{container_name}/note.txt?{sas}")
    blob.upload_blob(b"hello through a bogus SAS")
    assert blob.download_blob().readall() == b"hello through a bogus SAS"

    # The same SAS straight to Azurite is refused: the signature really is bogus.
    direct_blob = BlobClient.from_blob_url(
        f"https://127.0.0.1:{azurite.blob_port}/{ACCOUNT}/{container_name}/note.txt?{sas}",
        connection_verify=pki.ca_pem_path, proxies={},
    )
    with pytest.raises(HttpResponseError) as caught:
        direct_blob.download_blob().readall()
    assert caught.value.status_code == 403


def test_queue_app_with_wrong_key_sends_and_receives(through_keyless):
    queue = QueueClient.from_connection_string(LEGACY_QUEUE, unique("q"))
    queue.create_queue()
    queue.send_message("first")
    queue.send_message("second")
    received = [m.content for m in queue.receive_messages(messages_per_page=10, max_messages=10)]
    assert sorted(received) == ["first", "second"]
    queue.delete_queue()


def test_one_token_call_for_the_storage_scope(monkeypatch, tmp_path, pki, azurite):
    # A keyless and an identity endpoint of this test's own, so the count does not depend on
    # which tests ran before: blob and queue requests share the storage scope, and
    # azure-identity is asked once for the default identity, however many requests follow.
    with FakeIdentityEndpoint() as endpoint:
        process = KeylessProcess(tmp_path / "keyless-one-token", [
            "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
            "--connect-to", f"{QUEUE_HOST}:443:127.0.0.1:{azurite.queue_port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        ], {**endpoint.env(), **DEAD_PROXY_ENV}).start()
        try:
            route_app_through(monkeypatch, process)
            container = BlobServiceClient.from_connection_string(LEGACY_BLOB) \
                .create_container(unique("onetoken"))
            for i in range(5):
                container.upload_blob(f"b{i}", b"one token", overwrite=True)
            assert len(list(container.list_blobs())) == 5
            container.delete_container()
            queue = QueueClient.from_connection_string(LEGACY_QUEUE, unique("q"))
            queue.create_queue()
            queue.send_message("one token")
            queue.delete_queue()
            converted = process.metric("keyless_requests_total", outcome="converted")
        finally:
            assert process.stop() == 0, process.log()
    assert converted >= 10, converted  # the requests really were converted
    calls = [c for c in endpoint.calls_for(STORAGE_RESOURCE) if c["client_id"] is None]
    assert len(calls) == 1, calls
    assert calls[0]["status"] == 200
    assert len(endpoint.calls) == 1, endpoint.calls  # and no token for any other scope


def test_non_azure_host_is_tunnelled_with_its_own_certificate(through_keyless, pki):
    cert, key = pki.issue_server_cert("localhost")
    with RecordingServer(tls=(cert, key)) as upstream:
        url = f"https://localhost:{upstream.port}/hello"
        proxies = {"https": through_keyless.proxy_url}
        # Trusting only the upstream's CA works: the certificate is the upstream's own.
        response = requests.get(url, proxies=proxies, verify=pki.ca_pem_path, timeout=10)
        assert response.status_code == 200
        # Trusting only keyless' CA fails: keyless did not intercept.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url, proxies=proxies, verify=through_keyless.ca_path, timeout=10)
    assert upstream.requests and not any(r.has_header("authorization")
                                         for r in upstream.requests)


def test_plain_http_to_a_catalog_host_gets_no_token(
    through_keyless, plain_http_recorder, identity
):
    calls_before = len(identity.calls)
    seen_before = len(plain_http_recorder.requests)
    keyed = requests.get(
        f"http://{BLOB_HOST}/c/b?comp=list",
        headers={"Authorization": f"SharedKey {ACCOUNT}:c2lnbmF0dXJl",
                 "x-ms-version": "2021-08-06"},
        proxies={"http": through_keyless.proxy_url}, timeout=10,
    )
    # A key over plain HTTP is neither converted nor forwarded: a clear refusal.
    assert keyed.status_code == 403
    assert keyed.json()["error"]["code"] == "KeylessPlainHttpRefused"
    assert len(plain_http_recorder.requests) == seen_before
    # Without key material the request goes on as sent, and never with a token.
    anonymous = requests.get(f"http://{BLOB_HOST}/public/blob",
                             proxies={"http": through_keyless.proxy_url}, timeout=10)
    assert anonymous.status_code == 200
    assert not plain_http_recorder.requests[-1].has_header("authorization")
    assert len(identity.calls) == calls_before


@pytest.fixture
def keyless_without_identity(tmp_path, pki, azurite):
    """keyless whose token endpoint is down, dialling Azurite through a counting relay."""
    with FakeIdentityEndpoint(mode="error") as broken, \
            CountingRelay(("127.0.0.1", azurite.blob_port)) as relay:
        process = KeylessProcess(
            tmp_path / "keyless-down",
            [
                "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{relay.port}",
                "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
                "--token-timeout", "3",
            ],
            {**broken.env(), **DEAD_PROXY_ENV},
        ).start()
        try:
            yield process, broken, relay
        finally:
            assert process.stop() == 0, process.log()


def test_token_endpoint_down_refuses_with_503_and_nothing_reaches_azurite(
    monkeypatch, keyless_without_identity
):
    process, broken, relay = keyless_without_identity
    route_app_through(monkeypatch, process)
    service = BlobServiceClient.from_connection_string(LEGACY_BLOB, retry_total=0)
    with pytest.raises(HttpResponseError) as caught:
        service.create_container(unique("down"))
    assert caught.value.status_code == 503
    assert caught.value.error_code == "KeylessTokenUnavailable"

    raw = requests.put(
        f"https://{BLOB_HOST}/{unique('raw')}?restype=container",
        headers={"Authorization": f"SharedKey {ACCOUNT}:{WRONG_KEY}", "x-ms-version": "2021-08-06"},
        timeout=30,
    )
    assert raw.status_code == 503
    error = raw.json()["error"]
    assert error["code"] == "KeylessTokenUnavailable"
    assert "https://storage.azure.com/.default" in error["message"]
    assert WRONG_KEY not in raw.text
    assert relay.connections == 0 and relay.bytes_to_target == 0
    assert broken.calls, "keyless never asked the identity endpoint"

    # keyless keeps serving: once the endpoint recovers, the same app succeeds.
    broken.mode = "ok"
    service.create_container(unique("recovered"))
    assert relay.connections >= 1
    assert 'keyless_requests_total{outcome="refused",service="storage-blob"}' in process.metrics()


def test_no_secret_in_logs_or_metrics(keyless, identity):
    captured = keyless.log() + keyless.metrics()
    secrets = [*identity.issued, *used_secrets, ACCOUNT_KEY]
    assert identity.issued, "no token was issued: the check would prove nothing"
    leaked = [s[:12] + "…" for s in secrets if s and s in captured]
    assert not leaked, f"secrets found in keyless output: {leaked}"
    json.dumps(captured)  # the captured text is plain, printable output
