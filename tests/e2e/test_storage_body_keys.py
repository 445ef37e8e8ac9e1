"""Key material outside the request's own headers and query: Blob Batch sub-requests and copy
sources. The legacy app (the real SDK with a WRONG key) goes through the real keyless process,
to Azurite (it implements Blob Batch and checks every sub-request's auth) or to a fake that
checks copy-source authorization the way the service does (tests.support.fake_body_keys).
Each fake is calibrated: the SDK in Entra mode passes it, the SDK with its key or SAS fails.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobClient, ContainerClient, StandardBlobTier

from proxy.conversions import STORAGE_SAS_PARAMS
from proxy.storage_batch import rewrite_batch
from proxy.wire import remove_query_params
from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV, route_app_through
from tests.support.azurite import ACCOUNT, WRONG_KEY
from tests.support.fake_azure import FakeAzure
from tests.support.fake_body_keys import (
    EVENTGRID_AUDIENCE,
    SERVICEBUS_AUDIENCE,
    STORAGE_AUDIENCE,
    FakeBlobBodies,
    FakeDataLakeAndFiles,
    FakeEventGridNamespace,
    FakeServiceBusAdmin,
)
from tests.support.identity_endpoint import make_token
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e
LEGACY_BLOB = (
    f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
    f"BlobEndpoint=https://{BLOB_HOST}"
)
FAKE_ACCOUNT = "keylesscopy"
FAKE_HOST = f"{FAKE_ACCOUNT}.blob.core.windows.net"
DFS_HOST = f"{FAKE_ACCOUNT}.dfs.core.windows.net"
FILE_HOST = f"{FAKE_ACCOUNT}.file.core.windows.net"
BUS_HOST = "keylessfwd.servicebus.windows.net"
GRID_HOST = "keylessns.westus2-1.eventgrid.azure.net"
OTHER_SOURCE = "https://othersource.blob.core.windows.net/src/blob.txt"
SAME_SOURCE = f"https://{FAKE_HOST}/src/blob.txt"
# A SAS as the legacy app makes it: signed with its (wrong) key.
WRONG_SAS = "sv=2025-01-05&se=2030-01-01T00%3A00%3A00Z&sr=b&sp=r&sig=d3Jvbmcta2V5LXNpZw%3D%3D"
VOLATILE = re.compile(rb"(x-ms-date: [^\r]+|x-ms-client-request-id: [^\r]+|batch_[0-9a-f-]+|"
                      rb"Bearer [A-Za-z0-9._-]+)")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


class StaticToken:
    """The SDK's Entra mode: a TokenCredential (with a token like Entra's)."""

    def __init__(self, audience: str = STORAGE_AUDIENCE) -> None:
        self.token = make_token(audience)

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


# Blob Batch against Azurite ------------------------------------------------------------------

def test_blob_batch_with_wrong_key_works_through_keyless(through_keyless):
    container = ContainerClient.from_connection_string(LEGACY_BLOB, unique("batch"))
    container.create_container()
    for name in ("a", "b/c d", "ü", "x", "y"):
        container.upload_blob(name, b"data")

    stripped_before = through_keyless.metric("keyless_key_material_stripped_total",
                                             service="storage-blob", scheme="BatchSharedKey")
    container.delete_blobs("a", "b/c d", "ü")
    container.set_standard_blob_tier_blobs(StandardBlobTier.COOL, "x", "y")
    assert through_keyless.metric("keyless_key_material_stripped_total", service="storage-blob",
                                  scheme="BatchSharedKey") == stripped_before + 2

    assert sorted(b.name for b in container.list_blobs()) == ["x", "y"]
    assert {container.get_blob_client(n).get_blob_properties().blob_tier
            for n in ("x", "y")} == {"Cool"}
    container.delete_container()


def test_blob_batch_with_a_wrong_sas_works_through_keyless(through_keyless):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    name = unique("sasbatch")
    ContainerClient.from_connection_string(LEGACY_BLOB, name).create_container()
    sas = generate_container_sas(ACCOUNT, name, account_key=WRONG_KEY,
                                 permission=ContainerSasPermissions(read=True, write=True,
                                                                    delete=True, list=True),
                                 expiry=datetime.now(UTC) + timedelta(hours=1))
    container = ContainerClient.from_container_url(f"https://{BLOB_HOST}/{name}?{sas}")
    for blob in ("a", "b", "c"):
        container.upload_blob(blob, b"data")
    stripped_before = through_keyless.metric("keyless_key_material_stripped_total",
                                             service="storage-blob", scheme="BatchSAS")
    container.delete_blobs("a", "b")
    container.set_standard_blob_tier_blobs(StandardBlobTier.COOL, "c")
    assert [b.name for b in container.list_blobs()] == ["c"]
    assert container.get_blob_client("c").get_blob_properties().blob_tier == "Cool"
    # (Azurite accepts a sub-request whose SAS is wrong when its Bearer is valid, so the SAS
    # left on a sub-request is checked by the fake below, not here.)
    assert through_keyless.metric("keyless_key_material_stripped_total", service="storage-blob",
                                  scheme="BatchSAS") == stripped_before + 2
    container.delete_container()


def test_same_batch_straight_to_azurite_is_refused(direct, azurite, pki):
    url = f"https://127.0.0.1:{azurite.blob_port}/{ACCOUNT}"
    token = ContainerClient(url, unique("batch"), credential=StaticToken(),
                            connection_verify=pki.ca_pem_path)
    token.create_container()
    token.upload_blob("a", b"data")
    legacy = ContainerClient(url, token.container_name,
                             credential={"account_name": ACCOUNT, "account_key": WRONG_KEY},
                             connection_verify=pki.ca_pem_path)
    with pytest.raises(HttpResponseError) as caught:
        legacy.delete_blobs("a")
    # Azurite refuses the wrong key's outer signature (InvalidAuthenticationInfo, 400).
    assert caught.value.status_code in (400, 403)
    assert [b.name for b in token.list_blobs()] == ["a"]
    token.delete_container()


class _Keep(RequestsTransport):
    def __init__(self) -> None:
        super().__init__()
        self.kept: list = []

    def send(self, request, **kwargs):  # type: ignore[no-untyped-def]
        self.kept.append(request)
        raise ConnectionAbortedError("kept, not sent")


def test_azurite_checks_every_sub_requests_auth(direct, azurite, pki):
    """Calibration: with a valid outer token, sub-requests signed with the wrong key fail
    inside the batch; the same body re-signed by keyless' rewrite succeeds; and the SDK's
    own Entra mode succeeds."""
    url = f"https://127.0.0.1:{azurite.blob_port}/{ACCOUNT}"
    credential = StaticToken()
    entra = ContainerClient(url, unique("batch"), credential=credential,
                            connection_verify=pki.ca_pem_path)
    entra.create_container()
    for name in ("a", "b", "c"):
        entra.upload_blob(name, b"data")
    keep = _Keep()
    keyed = ContainerClient(url, entra.container_name, transport=keep,
                            credential={"account_name": ACCOUNT, "account_key": WRONG_KEY})
    with pytest.raises(ConnectionAbortedError):
        keyed.delete_blobs("a", "b")
    (request,) = keep.kept

    def send(body: bytes) -> requests.Response:
        return requests.post(request.url, data=body, verify=pki.ca_pem_path, timeout=10,
                             headers={"content-type": request.headers["Content-Type"],
                                      "x-ms-version": request.headers["x-ms-version"],
                                      "x-ms-date": request.headers["x-ms-date"],
                                      "authorization": f"Bearer {credential.token}"})

    wrong = send(request.body)
    assert wrong.status_code == 202
    # Azurite's refusal of a wrong Shared Key signature, once per sub-request:
    assert wrong.text.count("x-ms-error-code: InvalidAuthenticationInfo") == 2
    assert "HTTP/1.1 202" not in wrong.text
    assert sorted(b.name for b in entra.list_blobs()) == ["a", "b", "c"]

    resigned = send(rewrite_batch(request.body, request.headers["Content-Type"],
                                  credential.token))
    assert resigned.status_code == 202 and resigned.text.count("HTTP/1.1 202") == 2
    assert [b.name for b in entra.list_blobs()] == ["c"]

    entra.delete_blobs("c")
    assert list(entra.list_blobs()) == []
    entra.delete_container()


# The fake Blob endpoint: copy sources, and the batch calibration -----------------------------

@pytest.fixture(scope="module")
def fake_blob(pki) -> Iterator[tuple[FakeAzure, FakeBlobBodies]]:
    with FakeAzure(pki.issue_server_cert(FAKE_HOST, BUS_HOST, GRID_HOST, DFS_HOST,
                                         FILE_HOST)) as fake:
        FakeDataLakeAndFiles(fake, re.escape(DFS_HOST), re.escape(FILE_HOST))
        FakeServiceBusAdmin(fake, re.escape(BUS_HOST))
        FakeEventGridNamespace(fake, re.escape(GRID_HOST))
        yield fake, FakeBlobBodies(fake, re.escape(FAKE_HOST))


@pytest.fixture(scope="module")
def body_keyless(tmp_path_factory, pki, module_identity, fake_blob) -> Iterator[KeylessProcess]:
    fake, _ = fake_blob
    process = KeylessProcess(
        tmp_path_factory.mktemp("keyless-bodies"),
        ["--connect-to", f"{FAKE_HOST}:443:127.0.0.1:{fake.port}",
         "--connect-to", f"{BUS_HOST}:443:127.0.0.1:{fake.port}",
         "--connect-to", f"{GRID_HOST}:443:127.0.0.1:{fake.port}",
         "--connect-to", f"{DFS_HOST}:443:127.0.0.1:{fake.port}",
         "--connect-to", f"{FILE_HOST}:443:127.0.0.1:{fake.port}",
         "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
         "--token-timeout", "5"],
        {**module_identity.env(), **DEAD_PROXY_ENV},
    ).start()
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def fake_direct(monkeypatch, direct, fake_blob, pki) -> str:
    """The app straight to the fake (no keyless): FAKE_HOST resolves to it. Returns the
    account URL, with the fake's port."""
    fake, _ = fake_blob
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        return real("127.0.0.1" if host in (FAKE_HOST, BUS_HOST, GRID_HOST, DFS_HOST, FILE_HOST)
                    else host,
                    *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.ca_pem_path)
    return f"https://{FAKE_HOST}:{fake.port}"


@pytest.fixture
def through_body_keyless(monkeypatch, body_keyless) -> KeylessProcess:
    return route_app_through(monkeypatch, body_keyless)


def legacy_blob(name: str = "dst.txt") -> BlobClient:
    return BlobClient.from_connection_string(
        f"DefaultEndpointsProtocol=https;AccountName={FAKE_ACCOUNT};AccountKey={WRONG_KEY};"
        f"BlobEndpoint=https://{FAKE_HOST}", "c", name, retry_total=0)


def sync_copies(blob: BlobClient, source: str, **auth: str) -> None:
    """Every copy that reads its source itself, as the SDK sends it."""
    blob.upload_blob_from_url(source, overwrite=True, **auth)  # Put Blob From URL
    blob.stage_block_from_url("YmxvY2sx", source, **auth)  # Put Block From URL
    copied = blob.start_copy_from_url(source, requires_sync=True, **auth)  # Copy From URL
    assert copied["copy_status"] == "success"


def last_requests(fake: FakeAzure, count: int):
    return fake.requests_for(FAKE_HOST)[-count:]


def test_copy_fake_is_calibrated_by_the_sdk_itself(fake_direct, fake_blob):
    fake, _ = fake_blob
    entra = BlobClient(fake_direct, "c", "dst.txt", credential=StaticToken(), retry_total=0)
    token = entra.credential.token
    sync_copies(entra, OTHER_SOURCE, source_authorization=f"Bearer {token}")
    assert entra.start_copy_from_url(SAME_SOURCE)["copy_status"] == "pending"
    assert fake.problems == []

    keyed = BlobClient(fake_direct, "c", "dst.txt", retry_total=0,
                       credential={"account_name": FAKE_ACCOUNT, "account_key": WRONG_KEY})
    for call in (lambda: keyed.upload_blob_from_url(f"{OTHER_SOURCE}?{WRONG_SAS}"),
                 lambda: keyed.stage_block_from_url("YmxvY2sx", f"{OTHER_SOURCE}?{WRONG_SAS}"),
                 lambda: entra.stage_block_from_url("YmxvY2sx", f"{OTHER_SOURCE}?{WRONG_SAS}"),
                 lambda: entra.upload_blob_from_url(OTHER_SOURCE)):  # no source token
        with pytest.raises(HttpResponseError) as caught:
            call()
        assert caught.value.status_code == 401
    assert len(fake.problems) == 4
    fake.problems.clear()


def test_copy_from_a_sas_url_with_wrong_key_works_through_keyless(through_body_keyless,
                                                                  fake_blob):
    fake, _ = fake_blob
    blob = legacy_blob()
    sync_copies(blob, f"{OTHER_SOURCE}?{WRONG_SAS}&snapshot=2026-01-01")
    assert fake.problems == []
    for request in last_requests(fake, 3):
        assert request.header("x-ms-copy-source") == f"{OTHER_SOURCE}?snapshot=2026-01-01"
        assert request.header("x-ms-copy-source-authorization") \
            == request.header("authorization")
    assert through_body_keyless.metric("keyless_key_material_stripped_total",
                                       service="storage-blob", scheme="CopySourceSAS") >= 3


def test_async_copy_in_the_same_account_works_and_another_account_is_the_services_call(
        through_body_keyless, fake_blob):
    fake, _ = fake_blob
    blob = legacy_blob()
    assert blob.start_copy_from_url(f"{SAME_SOURCE}?{WRONG_SAS}")["copy_status"] == "pending"
    with pytest.raises(HttpResponseError) as caught:
        blob.start_copy_from_url(f"{OTHER_SOURCE}?{WRONG_SAS}")
    assert caught.value.error_code == "CannotVerifyCopySource"
    assert fake.problems == []
    same, other = last_requests(fake, 2)
    assert same.header("x-ms-copy-source") == SAME_SOURCE
    assert other.header("x-ms-copy-source") == OTHER_SOURCE
    assert other.header("x-ms-copy-source-authorization") is None
    log = through_body_keyless.log()
    assert "asynchronous copy from another account (othersource.blob.core.windows.net)" in log
    assert "d3Jvbmcta2V5LXNpZw" not in log and log.count("asynchronous copy from") == 1


def test_a_source_outside_azure_storage_is_left_alone(through_body_keyless, fake_blob):
    fake, _ = fake_blob
    source = "https://downloads.example.com/file.bin?sig=theirs&se=2030"
    copied = legacy_blob().start_copy_from_url(source, requires_sync=True)
    assert copied["copy_status"] == "success" and fake.problems == []
    (request,) = last_requests(fake, 1)
    assert request.header("x-ms-copy-source") == source
    assert request.header("x-ms-copy-source-authorization") is None


def test_keyless_batch_is_what_the_sdk_in_entra_mode_sends(monkeypatch, fake_direct, fake_blob,
                                                          body_keyless):
    fake, blob_bodies = fake_blob
    entra = ContainerClient(fake_direct, "c", credential=StaticToken(), retry_total=0)
    entra.delete_blobs("a", "b/c d")
    (sent_by_entra,) = last_requests(fake, 1)
    keyed = ContainerClient(fake_direct, "c", retry_total=0,
                            credential={"account_name": FAKE_ACCOUNT, "account_key": WRONG_KEY})
    with pytest.raises(HttpResponseError):
        keyed.delete_blobs("a", "b/c d")  # the fake refuses the wrong key
    assert blob_bodies.batch_problems == [] and len(fake.problems) == 1
    fake.problems.clear()

    route_app_through(monkeypatch, body_keyless)
    pooled_before = body_keyless.metric("keyless_upstream_pool_requests_total",
                                        service="storage-blob", result="pooled")
    legacy = ContainerClient.from_connection_string(
        f"DefaultEndpointsProtocol=https;AccountName={FAKE_ACCOUNT};AccountKey={WRONG_KEY};"
        f"BlobEndpoint=https://{FAKE_HOST}", "c", retry_total=0)
    legacy.delete_blobs("a", "b/c d")
    (sent_by_keyless,) = last_requests(fake, 1)
    assert fake.problems == [] and blob_bodies.batch_problems == []
    assert VOLATILE.sub(b"", sent_by_keyless.body) == VOLATILE.sub(b"", sent_by_entra.body)
    outer = sent_by_keyless.header("authorization")
    assert outer is not None and sent_by_keyless.body.count(outer.encode()) == 2
    # The app connection's first request: it went over keyless' upstream pool, which sends
    # the (re-signed) body from its own request hook.
    assert body_keyless.metric("keyless_upstream_pool_requests_total",
                               service="storage-blob", result="pooled") == pooled_before + 1


def test_a_batch_keyless_cannot_read_is_refused_and_goes_nowhere(through_body_keyless,
                                                                  fake_blob):
    fake, _ = fake_blob
    before = len(fake.requests_for(FAKE_HOST))
    body = (b"--b1\r\nContent-Type: text/plain\r\n\r\nDELETE /c/a HTTP/1.1\r\n"
            b"Authorization: SharedKey keylesscopy:c2lnbmF0dXJl\r\n\r\n--b1--\r\n")
    answer = requests.post(
        f"https://{FAKE_HOST}/c?restype=container&comp=batch", data=body, timeout=10,
        proxies={"https": through_body_keyless.proxy_url}, verify=through_body_keyless.ca_path,
        headers={"content-type": "multipart/mixed; boundary=b1", "x-ms-version": "2026-10-06",
                 "x-ms-date": datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT"),
                 "authorization": "SharedKey keylesscopy:b3V0ZXI="})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "KeylessBatchMalformed"
    assert "c2lnbmF0dXJl" not in answer.text
    assert len(fake.requests_for(FAKE_HOST)) == before
    too_big = requests.post(
        f"https://{FAKE_HOST}/c?restype=container&comp=batch", data=b"x" * (4 * 2**20 + 1),
        proxies={"https": through_body_keyless.proxy_url}, verify=through_body_keyless.ca_path,
        headers={"content-type": "multipart/mixed; boundary=b1",
                 "authorization": "SharedKey keylesscopy:b3V0ZXI="}, timeout=10)
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "KeylessBatchTooLarge"
    assert len(fake.requests_for(FAKE_HOST)) == before
    assert "c2lnbmF0dXJl" not in through_body_keyless.log()


# Beyond Storage: Service Bus forward_to and Event Grid namespaces ---------------------------

def bus_admin(endpoint: str, credential: object | None = None):
    from azure.servicebus.management import ServiceBusAdministrationClient

    if credential is None:
        return ServiceBusAdministrationClient.from_connection_string(
            f"Endpoint=sb://{endpoint}/;SharedAccessKeyName=RootManageSharedAccessKey;"
            f"SharedAccessKey={WRONG_KEY}", retry_total=0)
    return ServiceBusAdministrationClient(endpoint, credential, retry_total=0)


def create_forwarding_queue(admin) -> None:  # type: ignore[no-untyped-def]
    admin.create_queue(unique("src"), forward_to="target",
                       forward_dead_lettered_messages_to="dlqtarget")


def test_service_bus_fake_is_calibrated_by_the_sdk_itself(fake_direct, fake_blob):
    fake, _ = fake_blob
    bus = f"{BUS_HOST}:{fake_direct.rsplit(':', 1)[1]}"
    create_forwarding_queue(bus_admin(bus, StaticToken(SERVICEBUS_AUDIENCE)))
    assert fake.problems == []
    with pytest.raises(HttpResponseError):
        create_forwarding_queue(bus_admin(bus))
    assert len(fake.problems) == 1
    fake.problems.clear()


def test_service_bus_forward_to_with_wrong_key_works_through_keyless(through_body_keyless,
                                                                     fake_blob):
    fake, _ = fake_blob
    create_forwarding_queue(bus_admin(BUS_HOST))
    assert fake.problems == []
    (request,) = fake.requests_for(BUS_HOST)[-1:]
    outer = request.header("authorization")
    assert outer is not None and outer.startswith("Bearer ")
    assert request.header("ServiceBusSupplementaryAuthorization") == outer
    assert request.header("ServiceBusDlqSupplementaryAuthorization") == outer


def publish_to_namespace(endpoint: str, credential: object) -> None:
    from azure.core.credentials import AzureKeyCredential
    from azure.eventgrid import EventGridPublisherClient

    if isinstance(credential, str):
        credential = AzureKeyCredential(credential)
    client = EventGridPublisherClient(endpoint, credential, namespace_topic="orders",
                                      retry_total=0)
    client.send({"id": "1", "source": "keyless", "type": "t", "specversion": "1.0",
                 "data": {"n": 1}})


def test_event_grid_namespace_fake_is_calibrated_by_the_sdk_itself(fake_direct, fake_blob):
    fake, _ = fake_blob
    grid = f"https://{GRID_HOST}:{fake_direct.rsplit(':', 1)[1]}"
    publish_to_namespace(grid, StaticToken(EVENTGRID_AUDIENCE))
    assert fake.problems == []
    with pytest.raises(HttpResponseError):
        publish_to_namespace(grid, WRONG_KEY)
    assert len(fake.problems) == 1
    fake.problems.clear()


def test_event_grid_namespace_key_with_wrong_key_works_through_keyless(through_body_keyless,
                                                                       fake_blob):
    fake, _ = fake_blob
    publish_to_namespace(f"https://{GRID_HOST}", WRONG_KEY)
    assert fake.problems == []
    assert through_body_keyless.metric("keyless_key_material_stripped_total",
                                       service="eventgrid", scheme="SharedAccessKey") == 1


# Data Lake and Files: rename sources and Put Range From URL (SAS mode: the SAS is the key) ---

FILE_SOURCE = f"https://{FILE_HOST}/share/src.txt"


def lake_and_files(credential: object, port: str = "", **file_options: str) -> None:
    """Rename Path, Rename File, Put Range From URL and Copy File, as the SDKs send them."""
    from azure.storage.filedatalake import DataLakeFileClient
    from azure.storage.fileshare import ShareFileClient

    source_sas = f"?{WRONG_SAS}" if isinstance(credential, str) else ""
    lake = DataLakeFileClient(f"https://{DFS_HOST}{port}", "fs", "old name.txt",
                              credential=credential, retry_total=0)
    lake.rename_file("fs/new name.txt")
    share = ShareFileClient(f"https://{FILE_HOST}{port}", "share", "dir/old.txt",
                            credential=credential, retry_total=0, **file_options)
    share.rename_file("dir/new.txt")
    auth = {} if isinstance(credential, str) else {
        "source_authorization": f"Bearer {credential.token}"}  # type: ignore[attr-defined]
    share.upload_range_from_url(FILE_SOURCE + source_sas, offset=0, length=512,
                                source_offset=0, **auth)
    share.start_copy_from_url(FILE_SOURCE + source_sas)


def test_lake_and_files_fake_is_calibrated_by_the_sdks_themselves(fake_direct, fake_blob, pki):
    fake, _ = fake_blob
    port = ":" + fake_direct.rsplit(":", 1)[1]
    credential = StaticToken()
    lake_and_files(credential, port, token_intent="backup")
    assert fake.problems == []
    with pytest.raises(HttpResponseError):
        lake_and_files(WRONG_SAS, port)
    assert len(fake.problems) == 1
    # Each source check on its own: a valid outer token, but a SAS left on the source (or
    # Files without the backup intent) is refused.
    bearer = {"authorization": f"Bearer {credential.token}", "x-ms-version": "2026-10-06"}
    for host, path, headers in (
            (DFS_HOST, "/fs/new", {"x-ms-rename-source": f"/fs/old?{WRONG_SAS}"}),
            (FILE_HOST, "/share/new?comp=rename", {
                "x-ms-file-rename-source": f"https://{FILE_HOST}/share/old?{WRONG_SAS}",
                "x-ms-file-request-intent": "backup"}),
            (FILE_HOST, "/share/f?comp=range", {
                "x-ms-copy-source": f"{FILE_SOURCE}?{WRONG_SAS}",
                "x-ms-copy-source-authorization": bearer["authorization"],
                "x-ms-file-request-intent": "backup"}),
            (FILE_HOST, "/share/new?comp=rename", {
                "x-ms-file-rename-source": f"https://{FILE_HOST}/share/old"})):
        answer = requests.put(f"https://{host}{port}{path}", headers={**bearer, **headers},
                              verify=pki.ca_pem_path, timeout=10)
        assert answer.status_code == 401, (host, path)
    assert len(fake.problems) == 5
    fake.problems.clear()


def test_lake_and_files_with_a_wrong_sas_work_through_keyless(through_body_keyless, fake_blob):
    fake, _ = fake_blob
    lake_and_files(WRONG_SAS)
    assert fake.problems == []
    (renamed,) = fake.requests_for(DFS_HOST)[-1:]
    assert renamed.header("x-ms-rename-source") == "/fs/old%20name.txt"
    rename, put_range, copy = fake.requests_for(FILE_HOST)[-3:]
    assert rename.header("x-ms-file-rename-source") == f"https://{FILE_HOST}/share/dir/old.txt"
    assert put_range.header("x-ms-copy-source") == FILE_SOURCE
    assert put_range.header("x-ms-copy-source-authorization") == put_range.header(
        "authorization")
    assert copy.header("x-ms-copy-source") == FILE_SOURCE
    assert copy.header("x-ms-copy-source-authorization") is None


def test_a_batch_with_a_wrong_sas_reaches_the_fake_without_any_sas(monkeypatch, fake_direct,
                                                                   fake_blob, body_keyless, pki):
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    fake, blob_bodies = fake_blob
    sas = generate_container_sas(FAKE_ACCOUNT, "c", account_key=WRONG_KEY,
                                 permission=ContainerSasPermissions(delete=True),
                                 expiry=datetime.now(UTC) + timedelta(hours=1))
    # Calibration: a valid outer token, the SAS-mode SDK's sub-requests (SAS, no token).
    keep = _Keep()
    with pytest.raises(ConnectionAbortedError):
        ContainerClient.from_container_url(f"{fake_direct}/c?{sas}",
                                           transport=keep).delete_blobs("a", "b")
    (request,) = keep.kept
    outer_url, _ = remove_query_params(request.url, STORAGE_SAS_PARAMS)
    answer = requests.post(outer_url, data=request.body, timeout=10,
                           verify=pki.ca_pem_path,
                           headers={"content-type": request.headers["Content-Type"],
                                    "x-ms-version": "2026-10-06",
                                    "authorization": f"Bearer {StaticToken().token}"})
    assert answer.status_code == 202 and answer.text.count("AuthenticationFailed") == 2
    assert ["a SAS on the sub-request", "0 Authorization headers"] in blob_bodies.batch_problems
    blob_bodies.batch_problems.clear()

    route_app_through(monkeypatch, body_keyless)
    legacy = ContainerClient.from_container_url(f"https://{FAKE_HOST}/c?{sas}", retry_total=0)
    legacy.delete_blobs("a", "b")
    (sent,) = last_requests(fake, 1)
    assert blob_bodies.batch_problems == [] and fake.problems == []
    assert b"sig=" not in sent.body and "sig=" not in sent.path


def test_a_replayed_batch_carries_the_fresh_token_in_every_sub_request(through_body_keyless,
                                                                      fake_blob):
    """The service rejects the cached token (401): keyless forgets it, fetches a fresh one
    and replays once; the replayed batch's sub-requests carry the fresh token too."""
    fake, blob_bodies = fake_blob
    legacy = ContainerClient.from_connection_string(
        f"DefaultEndpointsProtocol=https;AccountName={FAKE_ACCOUNT};AccountKey={WRONG_KEY};"
        f"BlobEndpoint=https://{FAKE_HOST}", "c", retry_total=0)
    blob_bodies.revoke_next = True
    legacy.delete_blobs("a", "b")
    first, replayed = last_requests(fake, 2)
    assert first.header("authorization") in blob_bodies.revoked
    fresh = replayed.header("authorization")
    assert fresh is not None and fresh != first.header("authorization")
    assert replayed.body.count(fresh.encode()) == 2
    assert first.header("authorization").encode() not in replayed.body
    assert blob_bodies.batch_problems == [] and fake.problems == []
    assert through_body_keyless.metric("keyless_token_retries_total", service="storage-blob",
                                       action="replayed") == 1
