"""Every identity source keyless uses in production, with real azure-identity in the real keyless
process, against local fakes that answer like Microsoft Entra ID, IMDS and the Azure CLI.

Each test runs a legacy app (the real azure-storage-blob SDK, a wrong account key) through
keyless to Azurite and to a FakeAzure storage host. FakeAzure verifies each token the way an
Entra-protected service does (signature with the tests' issuer key, iss, aud, exp, nbf, and
the identity: appid/oid), so a token from the wrong identity, or not from the issuer, fails.

- Workload Identity (deploy/kubernetes): AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID,
  AZURE_TENANT_ID, AZURE_AUTHORITY_HOST -> FakeEntra over HTTPS; the token file is rotated.
- IMDS (VMs, AKS pod-managed identity): AZURE_POD_IDENTITY_AUTHORITY_HOST -> FakeIdentityEndpoint.
- Service principal with a client secret, and with a certificate -> FakeEntra.
- Azure CLI (local development): a fake `az` on PATH.
- A user-assigned identity from AZURE_CLIENT_ID; two routes with two identities.

keyless trusts FakeEntra's test CA through SSL_CERT_FILE: azure-identity's async credentials
use azure-core's aiohttp transport, whose default SSL context reads OpenSSL's default paths
(SSL_CERT_FILE); REQUESTS_CA_BUNDLE only concerns `requests`, which the async path never uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobClient, BlobServiceClient

from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV, route_app_through
from tests.support import fake_rest
from tests.support.azurite import ACCOUNT, WRONG_KEY, Azurite, TestPKI
from tests.support.entra import (
    TENANT_ID,
    FakeCluster,
    FakeEntra,
    decode,
    mint,
    object_id_for,
    write_client_certificate,
)
from tests.support.fake_azure import Expect, FakeAzure, FakeResponse
from tests.support.identity_endpoint import IMDS_API_VERSION, FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e

STORAGE_RESOURCE = "https://storage.azure.com"
STORAGE_SCOPE = f"{STORAGE_RESOURCE}/.default"
API_SCOPE = "api://keyless-test-identities/.default"  # a second scope for the same identity
WORKLOAD_CLIENT_ID = "c1c1c1c1-0000-4000-8000-0000000000c1"
SECOND_WORKLOAD_CLIENT_ID = "c2c2c2c2-0000-4000-8000-0000000000c2"
SP_CLIENT_ID = "5e5e5e5e-0000-4000-8000-00000000005e"
USER_ASSIGNED = "7e57c11e-0000-4000-8000-00000000beef"
IDENTITY_A = "aaaaaaaa-0000-4000-8000-00000000000a"
IDENTITY_B = "bbbbbbbb-0000-4000-8000-00000000000b"
AZURE_CLI_APP_ID = "04b07795-8ddb-461a-bbee-02f9e1bf7b46"  # tokens from `az` name the CLI app
SERVICE_ACCOUNT = "system:serviceaccount:shop:keyless"
# Names that would make azure-identity in keyless pick another source than the test's.
_IDENTITY_ENV = ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
                 "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_CLIENT_CERTIFICATE_PASSWORD",
                 "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST", "AZURE_USERNAME",
                 "AZURE_PASSWORD", "AZURE_TOKEN_CREDENTIALS", "AZURE_POD_IDENTITY_AUTHORITY_HOST",
                 "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IDENTITY_SERVER_THUMBPRINT",
                 "IMDS_ENDPOINT", "MSI_ENDPOINT", "MSI_SECRET", "SSL_CERT_FILE", "SSL_CERT_DIR")


def host_for(label: str) -> str:
    return f"{label}.contoso.internal"


@pytest.fixture(autouse=True)
def clean_identity_env(monkeypatch) -> None:
    """keyless inherits the test process' environment: only the test's own settings count."""
    for name in _IDENTITY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def entra(pki: TestPKI) -> Iterator[FakeEntra]:
    with FakeEntra(pki.issue_server_cert()) as fake:
        yield fake


@pytest.fixture(scope="module")
def upstream(pki: TestPKI) -> Iterator[FakeAzure]:
    """Storage hosts under custom names, each checking the token of one identity."""
    with FakeAzure(pki.issue_server_cert("*.contoso.internal")) as fake:
        yield fake


def verifying_route(upstream: FakeAzure, label: str, client_id: str) -> str:
    """A storage-blob host on `upstream` that accepts only `client_id`'s tokens."""
    host = host_for(label)
    fake_rest.register_storage_route(upstream, host, client_id)
    return host


def routes_toml(*routes: tuple[str, str | None, str | None]) -> str:
    """[[route]] tables: (host, client-id or None, scope or None: storage-blob)."""
    tables = []
    for host, client_id, scope in routes:
        lines = ["[[route]]", f'host = "{host}"']
        lines.append(f'scope = "{scope}"\nstrip = ["SharedKey"]\ntoken-format = "bearer"'
                     if scope else 'service = "storage-blob"')
        if client_id:
            lines.append(f'client-id = "{client_id}"')
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"


@contextmanager
def running_keyless(workdir: Path, pki: TestPKI, azurite: Azurite, upstream: FakeAzure,
                    env: dict[str, str], routes: str = "") -> Iterator[KeylessProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "keyless.toml").write_text(routes)
    process = KeylessProcess(
        workdir,
        ["--config", str(workdir / "keyless.toml"),
         "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
         "--connect-to", f":443:127.0.0.1:{upstream.port}",
         "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
         "--token-timeout", "20"],
        {**DEAD_PROXY_ENV, **env},
    ).start()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log()


def entra_env(entra: FakeEntra, pki: TestPKI) -> dict[str, str]:
    return {"AZURE_AUTHORITY_HOST": entra.authority, "AZURE_TENANT_ID": TENANT_ID,
            "SSL_CERT_FILE": pki.ca_pem_path}


def legacy_blob_service() -> BlobServiceClient:
    """The legacy app: the Blob SDK with a wrong account key, against (keyless to) Azurite."""
    return BlobServiceClient.from_connection_string(
        f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
        f"BlobEndpoint=https://{BLOB_HOST}", retry_total=0)


def assert_refused_for_want_of_a_token(process: KeylessProcess) -> None:
    """The legacy app's call gets keyless' 503: no token could be had."""
    with pytest.raises(HttpResponseError) as refused:
        list(legacy_blob_service().list_containers())
    assert refused.value.status_code == 503, process.log()


def list_azurite_containers(process: KeylessProcess) -> list[str]:
    service = legacy_blob_service()
    try:
        name = f"id{uuid.uuid4().hex[:12]}"
        service.create_container(name)
        return [c.name for c in service.list_containers(name_starts_with=name)]
    except HttpResponseError as exc:  # pragma: no cover - shown on failure
        pytest.fail(f"Azurite through keyless failed: {exc}\n{process.log()}")


def upload_through(process: KeylessProcess, host: str) -> None:
    """The legacy app uploading a blob to a custom storage host with a wrong key."""
    blob = BlobClient.from_connection_string(
        f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={WRONG_KEY};"
        f"BlobEndpoint=https://{host}", "c", f"b{uuid.uuid4().hex[:8]}", retry_total=0)
    try:
        blob.upload_blob(b"passwordless", overwrite=True)
    except HttpResponseError as exc:  # pragma: no cover - shown on failure
        pytest.fail(f"{host} through keyless failed: {exc}\n{process.log()}")


def call_api(process: KeylessProcess, host: str) -> dict[str, object]:
    """A plain HTTP client calling a second-scope API: its (wrong) SharedKey is replaced."""
    response = requests.get(f"https://{host}/c?restype=container",
                            headers={"Authorization": f"SharedKey acct:{WRONG_KEY}",
                                     "x-ms-version": "2021-08-06"}, timeout=30)
    assert response.status_code == 200, (response.text, process.log())
    return decode(response.headers["x-echo-authorization"])


def register_echo_api(upstream: FakeAzure, label: str, audience: str, client_id: str) -> str:
    """An API on `upstream` that checks the token like FakeAzure does and echoes it back,
    so the test can tell which Entra call the token came from."""
    host = host_for(label)
    upstream.add(host.replace(".", r"\."), Expect(audience, client_id=client_id),
                 lambda request: FakeResponse.json(
                     {"ok": True}, **{"x-echo-authorization":
                                      (request.header("authorization") or "")[7:]}))
    return host


def assert_never_logged(process: KeylessProcess, *secrets: str) -> None:
    log = process.log()
    assert secrets and all(secret and secret not in log for secret in secrets)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def token_calls(entra: FakeEntra, client_id: str) -> list[dict[str, object]]:
    return [c for c in entra.calls if c["client_id"] == client_id]


# -- Workload Identity --------------------------------------------------------------------------

def test_workload_identity_federated_token_file_and_its_rotation(
        tmp_path, monkeypatch, pki, azurite, upstream, entra):
    cluster = FakeCluster()
    entra.add_federated(WORKLOAD_CLIENT_ID, cluster, SERVICE_ACCOUNT)
    entra.add_federated(SECOND_WORKLOAD_CLIENT_ID, cluster, SERVICE_ACCOUNT)
    token_file = tmp_path / "azure-identity-token"
    first = cluster.write_token(token_file, SERVICE_ACCOUNT)
    verify_host = verifying_route(upstream, "wi-default", WORKLOAD_CLIENT_ID)
    second_host = verifying_route(upstream, "wi-second", SECOND_WORKLOAD_CLIENT_ID)
    api_host = register_echo_api(upstream, "wi-api", API_SCOPE.removesuffix("/.default"),
                                 WORKLOAD_CLIENT_ID)
    env = {**entra_env(entra, pki), "AZURE_CLIENT_ID": WORKLOAD_CLIENT_ID,
           "AZURE_FEDERATED_TOKEN_FILE": str(token_file)}
    routes = routes_toml((verify_host, None, None), (second_host, SECOND_WORKLOAD_CLIENT_ID, None),
                         (api_host, None, API_SCOPE))
    before = len(token_calls(entra, WORKLOAD_CLIENT_ID))
    with running_keyless(tmp_path / "keyless", pki, azurite, upstream, env, routes) as process:
        route_app_through(monkeypatch, process)
        assert list_azurite_containers(process)
        upload_through(process, verify_host)
        [call] = token_calls(entra, WORKLOAD_CLIENT_ID)[before:]
        assert (call["status"], call["auth"], call["tenant"], call["grant_type"],
                call["scope"]) == (200, "federated", TENANT_ID, "client_credentials",
                                   STORAGE_SCOPE)
        assert call["assertion_sha256"] == sha256(first)

        # The kubelet rotates the projected token (the old one stays valid for a while).
        second = cluster.write_token(token_file, SERVICE_ACCOUNT)
        assert second != first
        # A credential created after the rotation (another route's identity) reads the new file.
        upload_through(process, second_host)
        [rotated] = token_calls(entra, SECOND_WORKLOAD_CLIENT_ID)
        assert (rotated["status"], rotated["auth"]) == (200, "federated")
        assert rotated["assertion_sha256"] == sha256(second)
        # A second scope of the default identity has a credential of its own (one per
        # identity and scope), created after the rotation: it reads the new file too.
        claims = call_api(process, api_host)
        assert claims["appid"] == WORKLOAD_CLIENT_ID
        api_call = token_calls(entra, WORKLOAD_CLIENT_ID)[-1]
        assert (api_call["status"], api_call["scope"]) == (200, API_SCOPE)
        assert api_call["assertion_sha256"] == sha256(second)
        assert_never_logged(process, first, second, *entra.issued)
    assert upstream.problems == []
    assert entra.unexpected == []  # one POST per token: no discovery requests


@contextlib.contextmanager
def short_entra_tokens(entra: FakeEntra, seconds: int) -> Iterator[None]:
    """Entra tokens that live `seconds` (the module's FakeEntra is shared: restored after)."""
    before = entra.lifetime_seconds
    entra.lifetime_seconds = seconds
    try:
        yield
    finally:
        entra.lifetime_seconds = before


# A credential that lived across a rotation fetches again with what it kept: the same scope,
# its token refreshed. azure-identity refreshes a token it holds only 30 s after its previous
# call (DEFAULT_TOKEN_REFRESH_RETRY_DELAY), so tokens live 40 s with a 5 s margin: keyless'
# refresh at ~33 s reaches Entra with the kept (stale) material.
SHORT_TOKEN_SECONDS, SHORT_MARGIN = 40, "5"


def wait_for_calls(entra: FakeEntra, client_id: str, count: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while len(token_calls(entra, client_id)) < count and time.monotonic() < deadline:
        time.sleep(0.2)


def test_an_expired_federated_assertion_is_replaced_by_the_rotated_file(
        tmp_path, monkeypatch, pki, azurite, upstream, entra):
    """azure-identity re-reads the token file at most every 10 minutes. Should the assertion it
    kept expire first (a cluster with short-lived tokens), Entra refuses it when the scope's
    token is refreshed; keyless then asks a fresh credential, which reads the rotated file,
    and the app's requests keep succeeding."""
    client_id = "c4c4c4c4-0000-4000-8000-0000000000c4"
    cluster = FakeCluster()
    entra.add_federated(client_id, cluster, SERVICE_ACCOUNT)
    token_file = tmp_path / "token"
    api_host = register_echo_api(upstream, "wi-expired-api", API_SCOPE.removesuffix("/.default"),
                                 client_id)
    env = {**entra_env(entra, pki), "AZURE_CLIENT_ID": client_id,
           "AZURE_FEDERATED_TOKEN_FILE": str(token_file), "KEYLESS_TOKEN_MARGIN": SHORT_MARGIN}
    with short_entra_tokens(entra, SHORT_TOKEN_SECONDS), \
            running_keyless(tmp_path / "keyless", pki, azurite, upstream, env,
                            routes_toml((api_host, None, API_SCOPE))) as process:
        route_app_through(monkeypatch, process)
        short_lived = cluster.write_token(token_file, SERVICE_ACCOUNT, lifetime=5)
        assert call_api(process, api_host)["appid"] == client_id
        rotated = cluster.write_token(token_file, SERVICE_ACCOUNT)
        wait_for_calls(entra, client_id, 3, SHORT_TOKEN_SECONDS + 20)  # the refresh
        assert call_api(process, api_host)["appid"] == client_id
        assert_never_logged(process, short_lived, rotated, *entra.issued)
    calls = token_calls(entra, client_id)
    assert [(c["scope"], c["status"], c["code"], c["assertion_sha256"]) for c in calls] == [
        (API_SCOPE, 200, None, sha256(short_lived)),
        (API_SCOPE, 400, "AADSTS700024", sha256(short_lived)),  # the kept, expired one
        (API_SCOPE, 200, None, sha256(rotated)),  # a fresh credential read the file
    ]
    assert upstream.problems == []


def test_workload_identity_refused_for_a_subject_without_federated_credential(
        tmp_path, monkeypatch, pki, azurite, upstream, entra):
    cluster = FakeCluster()
    entra.add_federated("c3c3c3c3-0000-4000-8000-0000000000c3", cluster, SERVICE_ACCOUNT)
    token_file = tmp_path / "token"
    cluster.write_token(token_file, "system:serviceaccount:other:intruder")
    env = {**entra_env(entra, pki), "AZURE_CLIENT_ID": "c3c3c3c3-0000-4000-8000-0000000000c3",
           "AZURE_FEDERATED_TOKEN_FILE": str(token_file)}
    with running_keyless(tmp_path / "keyless", pki, azurite, upstream, env) as process:
        route_app_through(monkeypatch, process)
        assert_refused_for_want_of_a_token(process)
        assert "AADSTS700213" in process.log()
    [call] = token_calls(entra, "c3c3c3c3-0000-4000-8000-0000000000c3")
    assert (call["status"], call["code"]) == (400, "AADSTS700213")


# -- IMDS ------------------------------------------------------------------------------------

def test_imds_pod_identity_and_a_user_assigned_identity_from_azure_client_id(
        tmp_path, monkeypatch, pki, azurite, upstream):
    verify_host = verifying_route(upstream, "imds-user", USER_ASSIGNED)
    with FakeIdentityEndpoint(protocol="imds") as imds:
        env = {**imds.env(), "AZURE_CLIENT_ID": USER_ASSIGNED}
        with running_keyless(tmp_path / "keyless", pki, azurite, upstream, env,
                             routes_toml((verify_host, None, None))) as process:
            route_app_through(monkeypatch, process)
            assert list_azurite_containers(process)
            upload_through(process, verify_host)
            assert_never_logged(process, *imds.issued)
        [call] = imds.calls_for(STORAGE_RESOURCE)
        assert (call["path"], call["api_version"], call["client_id"], call["status"]) == (
            "/metadata/identity/oauth2/token", IMDS_API_VERSION, USER_ASSIGNED, 200)
        assert decode(imds.issued[0])["oid"] == object_id_for(USER_ASSIGNED)
    assert upstream.problems == []


# -- service principals ----------------------------------------------------------------------

def test_service_principal_with_a_client_secret(tmp_path, monkeypatch, pki, azurite, upstream,
                                                entra):
    secret = "keyless-test-client-secret~" + uuid.uuid4().hex
    entra.add_secret(SP_CLIENT_ID, secret)
    verify_host = verifying_route(upstream, "sp", SP_CLIENT_ID)
    env = {**entra_env(entra, pki), "AZURE_CLIENT_ID": SP_CLIENT_ID,
           "AZURE_CLIENT_SECRET": secret}
    before = len(token_calls(entra, SP_CLIENT_ID))
    with running_keyless(tmp_path / "keyless", pki, azurite, upstream, env,
                         routes_toml((verify_host, None, None))) as process:
        route_app_through(monkeypatch, process)
        assert list_azurite_containers(process)
        upload_through(process, verify_host)
        assert_never_logged(process, secret, *entra.issued)
    [call] = token_calls(entra, SP_CLIENT_ID)[before:]
    assert (call["status"], call["auth"], call["scope"]) == (200, "secret", STORAGE_SCOPE)
    assert upstream.problems == []
    assert entra.unexpected == []


def test_service_principal_with_a_certificate(tmp_path, monkeypatch, pki, azurite, upstream,
                                              entra):
    client_id = "5e5e5e5e-0000-4000-8000-0000000000ce"
    certificate_path = tmp_path / "sp.pem"
    entra.add_certificate(client_id, write_client_certificate(certificate_path, client_id))
    verify_host = verifying_route(upstream, "sp-cert", client_id)
    env = {**entra_env(entra, pki), "AZURE_CLIENT_ID": client_id,
           "AZURE_CLIENT_CERTIFICATE_PATH": str(certificate_path)}
    with running_keyless(tmp_path / "keyless", pki, azurite, upstream, env,
                         routes_toml((verify_host, None, None))) as process:
        route_app_through(monkeypatch, process)
        assert list_azurite_containers(process)
        upload_through(process, verify_host)
        assert_never_logged(process, certificate_path.read_text().split("-----")[2].strip(),
                            *entra.issued)
    [call] = token_calls(entra, client_id)
    assert (call["status"], call["auth"], call["scope"]) == (200, "certificate", STORAGE_SCOPE)
    assert upstream.problems == []
    assert entra.unexpected == []


def test_a_rotated_service_principal_certificate_is_picked_up_without_restart(
        tmp_path, monkeypatch, pki, azurite, upstream, entra):
    """azure-identity reads the certificate file once. When the app registration's certificate
    is replaced and the file rotated (Key Vault CSI driver, cert-manager), Entra refuses the
    old one at the scope's next refresh; keyless asks a fresh credential, which loads the new
    file, and the app's requests keep succeeding."""
    client_id = "5e5e5e5e-0000-4000-8000-0000000000c7"
    certificate_path = tmp_path / "sp.pem"
    entra.add_certificate(client_id, write_client_certificate(certificate_path, client_id))
    api_host = register_echo_api(upstream, "sp-cert-api", API_SCOPE.removesuffix("/.default"),
                                 client_id)
    env = {**entra_env(entra, pki), "AZURE_CLIENT_ID": client_id,
           "AZURE_CLIENT_CERTIFICATE_PATH": str(certificate_path),
           "KEYLESS_TOKEN_MARGIN": SHORT_MARGIN}
    with short_entra_tokens(entra, SHORT_TOKEN_SECONDS), \
            running_keyless(tmp_path / "keyless", pki, azurite, upstream, env,
                            routes_toml((api_host, None, API_SCOPE))) as process:
        route_app_through(monkeypatch, process)
        assert call_api(process, api_host)["appid"] == client_id
        staged = tmp_path / "sp.pem.new"
        entra.add_certificate(client_id, write_client_certificate(staged, client_id))
        staged.replace(certificate_path)  # the old certificate is no longer registered
        wait_for_calls(entra, client_id, 3, SHORT_TOKEN_SECONDS + 20)  # the refresh
        assert call_api(process, api_host)["appid"] == client_id
    calls = token_calls(entra, client_id)
    assert [(c["scope"], c["status"], c["code"]) for c in calls] == [
        (API_SCOPE, 200, None), (API_SCOPE, 401, "AADSTS700027"), (API_SCOPE, 200, None)]
    assert upstream.problems == []


def test_service_principal_certificate_not_registered_is_refused(
        tmp_path, monkeypatch, pki, azurite, upstream, entra):
    client_id = "5e5e5e5e-0000-4000-8000-0000000000cf"
    entra.add_certificate(client_id, write_client_certificate(tmp_path / "registered.pem",
                                                              client_id))
    other = tmp_path / "other.pem"
    write_client_certificate(other, client_id)  # same subject, another key: not registered
    env = {**entra_env(entra, pki), "AZURE_CLIENT_ID": client_id,
           "AZURE_CLIENT_CERTIFICATE_PATH": str(other)}
    with running_keyless(tmp_path / "keyless", pki, azurite, upstream, env) as process:
        route_app_through(monkeypatch, process)
        assert_refused_for_want_of_a_token(process)
    [call] = token_calls(entra, client_id)
    assert (call["status"], call["code"]) == (401, "AADSTS700027")


def test_keyless_trusts_a_private_authority_ca_through_ssl_cert_file_not_requests_ca_bundle(
        tmp_path, monkeypatch, pki, azurite, upstream, entra):
    client_id = "5e5e5e5e-0000-4000-8000-0000000000ca"
    entra.add_secret(client_id, "another-secret")
    env = {**entra_env(entra, pki), "AZURE_CLIENT_ID": client_id,
           "AZURE_CLIENT_SECRET": "another-secret"}
    del env["SSL_CERT_FILE"]
    env["REQUESTS_CA_BUNDLE"] = pki.ca_pem_path
    with running_keyless(tmp_path / "keyless", pki, azurite, upstream, env) as process:
        route_app_through(monkeypatch, process)
        assert_refused_for_want_of_a_token(process)
        assert "CERTIFICATE_VERIFY_FAILED" in process.log()
    assert token_calls(entra, client_id) == []  # the TLS handshake failed: no request arrived


def test_a_route_identity_never_gets_the_environment_service_principal_token(
        tmp_path, monkeypatch, pki, azurite, upstream, entra):
    """A service principal in the environment is AZURE_CLIENT_ID's identity. A route naming
    another client id gets that identity's token (here from IMDS), not the principal's."""
    client_id = "5e5e5e5e-0000-4000-8000-0000000000d0"
    entra.add_secret(client_id, "sp-secret-d0")
    default_host = verifying_route(upstream, "sp-default", client_id)
    route_host = verifying_route(upstream, "sp-route-a", IDENTITY_A)
    with FakeIdentityEndpoint(protocol="imds") as imds:
        env = {**entra_env(entra, pki), **imds.env(), "AZURE_CLIENT_ID": client_id,
               "AZURE_CLIENT_SECRET": "sp-secret-d0"}
        routes = routes_toml((default_host, None, None), (route_host, IDENTITY_A, None))
        with running_keyless(tmp_path / "keyless", pki, azurite, upstream, env,
                             routes) as process:
            route_app_through(monkeypatch, process)
            upload_through(process, default_host)
            upload_through(process, route_host)
        assert [c["client_id"] for c in imds.calls] == [IDENTITY_A]
    assert [c["status"] for c in token_calls(entra, client_id)] == [200]
    assert upstream.problems == []


# -- Azure CLI ---------------------------------------------------------------------------------

FAKE_AZ = """#!{python}
import json, sys, time
with open({record!r}, "a") as record:
    record.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
resource = args[args.index("--resource") + 1]
token = json.load(open({tokens!r}))[resource]
expires_on = int(time.time()) + 3600
print(json.dumps({{
    "accessToken": token,
    "expiresOn": time.strftime("%Y-%m-%d %H:%M:%S.000000", time.localtime(expires_on)),
    "expires_on": expires_on,
    "subscription": "00000000-0000-4000-8000-00000000005b",
    "tenant": {tenant!r},
    "tokenType": "Bearer",
}}, indent=2))
"""


def test_azure_cli_for_local_development(tmp_path, monkeypatch, pki, azurite, upstream):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "az-calls.jsonl"
    tokens = tmp_path / "az-tokens.json"
    # What `az login` would hand out: tokens from the same issuer, for the Azure CLI app.
    tokens.write_text(json.dumps({STORAGE_RESOURCE: mint(STORAGE_RESOURCE, AZURE_CLI_APP_ID)}))
    az = bin_dir / "az"
    az.write_text(FAKE_AZ.format(python=sys.executable, record=str(record), tokens=str(tokens),
                                 tenant=TENANT_ID))
    az.chmod(0o755)
    verify_host = verifying_route(upstream, "cli", AZURE_CLI_APP_ID)
    # AZURE_TOKEN_CREDENTIALS=dev: only the developer credentials (here the Azure CLI), so no
    # managed-identity probe of 169.254.169.254 leaves the laptop (or this test's loopback).
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "AZURE_TOKEN_CREDENTIALS": "dev"}
    with running_keyless(tmp_path / "keyless", pki, azurite, upstream, env,
                         routes_toml((verify_host, None, None))) as process:
        route_app_through(monkeypatch, process)
        assert list_azurite_containers(process)
        upload_through(process, verify_host)
        assert_never_logged(process, *json.loads(tokens.read_text()).values())
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls == [["account", "get-access-token", "--output", "json",
                      "--resource", STORAGE_RESOURCE]]
    assert upstream.problems == []


# -- two routes, two identities --------------------------------------------------------------

@pytest.mark.parametrize("source", ["imds", "workload-identity"])
def test_two_routes_get_tokens_for_their_own_identities(
        tmp_path, monkeypatch, pki, azurite, upstream, entra, source):
    host_a = verifying_route(upstream, f"{source}-a", IDENTITY_A)
    host_b = verifying_route(upstream, f"{source}-b", IDENTITY_B)
    routes = routes_toml((host_a, IDENTITY_A, None), (host_b, IDENTITY_B, None))
    with FakeIdentityEndpoint(protocol="imds") as imds:
        if source == "imds":
            env = imds.env()
        else:
            cluster = FakeCluster()
            for client_id in (IDENTITY_A, IDENTITY_B, WORKLOAD_CLIENT_ID):
                entra.add_federated(client_id, cluster, SERVICE_ACCOUNT)
            cluster.write_token(tmp_path / "token", SERVICE_ACCOUNT)
            env = {**entra_env(entra, pki), "AZURE_CLIENT_ID": WORKLOAD_CLIENT_ID,
                   "AZURE_FEDERATED_TOKEN_FILE": str(tmp_path / "token")}
        before = len(entra.calls)
        with running_keyless(tmp_path / "keyless", pki, azurite, upstream, env,
                             routes) as process:
            route_app_through(monkeypatch, process)
            for _ in range(2):
                upload_through(process, host_a)
                upload_through(process, host_b)
            assert list_azurite_containers(process)  # the default identity, to Azurite
        if source == "imds":
            assert sorted(str(c["client_id"]) for c in imds.calls) == sorted(
                [IDENTITY_A, IDENTITY_B, "None"])
        else:
            assert imds.calls == []
            assert sorted(str(c["client_id"]) for c in entra.calls[before:]) == sorted(
                [IDENTITY_A, IDENTITY_B, WORKLOAD_CLIENT_ID])
    seen = {request.host: decode(request.header("authorization") or "")["appid"]
            for request in upstream.requests if request.host in (host_a, host_b)}
    assert seen == {host_a: IDENTITY_A, host_b: IDENTITY_B}
    assert upstream.problems == []
