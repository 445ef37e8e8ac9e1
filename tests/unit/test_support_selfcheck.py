"""Self-checks for the test-support code: the fake identity endpoint must
satisfy the real azure-identity client, and Azurite must accept its tokens
(and reject bad credentials) the way Azure Storage would."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.identity.aio import ManagedIdentityCredential
from azure.storage.blob import BlobServiceClient

from tests.support.azurite import ACCOUNT, ACCOUNT_KEY, WRONG_KEY, Azurite, TestPKI
from tests.support.identity_endpoint import (
    SYSTEM_ASSIGNED_CLIENT_ID,
    TENANT_ID,
    FakeIdentityEndpoint,
    decode,
    make_token,
)

STORAGE_RESOURCE = "https://storage.azure.com"
STORAGE_SCOPE = STORAGE_RESOURCE + "/.default"
USER_CLIENT_ID = "11111111-1111-1111-1111-111111111111"

# Anything that could reroute loopback traffic or make ManagedIdentityCredential
# pick a different flavour than App Service.
_INTERFERING_ENV = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _INTERFERING_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def endpoint(clean_env: pytest.MonkeyPatch) -> Iterator[FakeIdentityEndpoint]:
    with FakeIdentityEndpoint() as ep:
        for name, value in ep.env().items():
            clean_env.setenv(name, value)
        yield ep


async def _get_token(**kwargs: Any) -> tuple[str, int]:
    async with ManagedIdentityCredential(**kwargs) as cred:
        info = await cred.get_token_info(STORAGE_SCOPE)
        return info.token, info.expires_on


def _raw_get(
    ep: FakeIdentityEndpoint, query: str, secret: str | None = None
) -> urllib.request.Request:
    req = urllib.request.Request(f"{ep.url}?{query}")
    req.add_header("X-IDENTITY-HEADER", ep.secret if secret is None else secret)
    return req


def _open(req: urllib.request.Request) -> Any:
    # No proxy handler: the request must go straight to 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(req, timeout=10)


# -- fake identity endpoint ----------------------------------------------------


def test_system_assigned_token_via_real_credential(endpoint: FakeIdentityEndpoint) -> None:
    before = int(time.time())
    token, expires_on = asyncio.run(_get_token())

    claims = decode(token)
    assert claims["aud"] == STORAGE_RESOURCE
    assert claims["iss"].startswith("https://sts.windows.net/")
    assert claims["iss"] == f"https://sts.windows.net/{TENANT_ID}/"
    assert claims["tid"] == TENANT_ID
    assert claims["appid"] == SYSTEM_ASSIGNED_CLIENT_ID
    assert claims["nbf"] <= before <= claims["iat"] + 1
    assert claims["exp"] == expires_on
    assert 3590 <= expires_on - before <= 3610

    calls = endpoint.calls_for(STORAGE_RESOURCE)
    assert len(calls) == 1
    assert calls[0]["client_id"] is None
    assert calls[0]["status"] == 200
    assert calls[0]["api_version"] == "2019-08-01"
    assert endpoint.issued == [token]


def test_user_assigned_client_id(endpoint: FakeIdentityEndpoint) -> None:
    token, _ = asyncio.run(_get_token(client_id=USER_CLIENT_ID))

    assert decode(token)["appid"] == USER_CLIENT_ID
    calls = endpoint.calls_for(STORAGE_RESOURCE)
    assert [c["client_id"] for c in calls] == [USER_CLIENT_ID]


def test_tokens_are_unique_and_lifetime_is_live(endpoint: FakeIdentityEndpoint) -> None:
    endpoint.lifetime_seconds = 120
    first, _ = asyncio.run(_get_token())
    second, expires_on = asyncio.run(_get_token())  # new credential: no shared cache

    assert decode(first)["jti"] != decode(second)["jti"]
    assert expires_on - int(time.time()) <= 120
    assert len(endpoint.calls) == 2
    endpoint.reset()
    assert endpoint.calls == [] and endpoint.issued == []


def test_error_mode_makes_credential_raise(endpoint: FakeIdentityEndpoint) -> None:
    endpoint.mode = "error"
    with pytest.raises(ClientAuthenticationError):
        asyncio.run(_get_token())

    # azure-identity retries a 500 a bounded number of times, then gives up (no timing
    # asserted: the count is what bounds the time)
    statuses = [c["status"] for c in endpoint.calls]
    assert len(statuses) == 4 and set(statuses) == {500}  # the first try and 3 retries
    assert endpoint.issued == []


def test_rejects_wrong_secret_and_missing_api_version(endpoint: FakeIdentityEndpoint) -> None:
    with pytest.raises(urllib.error.HTTPError) as wrong_secret:
        _open(_raw_get(endpoint, "api-version=2019-08-01&resource=x", secret="nope"))
    assert wrong_secret.value.code == 401
    assert "message" in json.load(wrong_secret.value)
    wrong_secret.value.close()

    with pytest.raises(urllib.error.HTTPError) as no_version:
        _open(_raw_get(endpoint, "resource=x"))
    assert no_version.value.code == 400
    no_version.value.close()

    assert [c["status"] for c in endpoint.calls] == [401, 400]
    assert endpoint.issued == []


def test_throttle_slow_and_drop_modes(endpoint: FakeIdentityEndpoint) -> None:
    query = "api-version=2019-08-01&resource=https://vault.azure.net&principal_id=p1"

    endpoint.mode = "throttle"
    with pytest.raises(urllib.error.HTTPError) as throttled:
        _open(_raw_get(endpoint, query))
    assert throttled.value.code == 429
    assert throttled.value.headers["Retry-After"] == "1"
    throttled.value.close()

    endpoint.mode = "slow"
    endpoint.delay_seconds = 0.5
    started = time.monotonic()
    with _open(_raw_get(endpoint, query)) as resp:
        body = json.load(resp)
    assert time.monotonic() - started >= 0.5
    assert decode(body["access_token"])["aud"] == "https://vault.azure.net"
    assert body["resource"] == "https://vault.azure.net"
    assert int(body["expires_on"]) > time.time()

    endpoint.mode = "drop"
    conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=5)
    conn.request("GET", f"/msi/token?{query}", headers={"X-IDENTITY-HEADER": endpoint.secret})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        conn.getresponse()
    conn.close()

    calls = endpoint.calls_for("https://vault.azure.net")
    assert [c["status"] for c in calls] == [429, 200, None]
    assert {c["principal_id"] for c in calls} == {"p1"}

    with pytest.raises(ValueError):
        endpoint.mode = "oops"  # type: ignore[assignment]


def test_standalone_cli_prints_env_and_serves(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "support" / "identity_endpoint.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        env = json.loads(proc.stdout.readline())
        assert env["IDENTITY_ENDPOINT"].startswith("http://127.0.0.1:")
        req = urllib.request.Request(
            f"{env['IDENTITY_ENDPOINT']}?api-version=2019-08-01&resource=r"
        )
        req.add_header("X-IDENTITY-HEADER", env["IDENTITY_HEADER"])
        with _open(req) as resp:
            assert decode(json.load(resp)["access_token"])["aud"] == "r"
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


# -- Azurite -----------------------------------------------------------------


class StaticTokenCredential:
    """Minimal sync TokenCredential minting fake-endpoint tokens locally."""

    def __init__(self, resource: str = STORAGE_RESOURCE) -> None:
        self.resource = resource
        self.scopes_seen: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes_seen.append(scopes)
        token = make_token(self.resource)
        return AccessToken(token, decode(token)["exp"])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[Azurite]:
    with Azurite(tmp_path_factory.mktemp("azurite"), pki) as az:
        yield az


def _container_name() -> str:
    return f"c{uuid.uuid4().hex[:20]}"


def test_azurite_accepts_fake_bearer_token(
    azurite: Azurite, pki: TestPKI, clean_env: pytest.MonkeyPatch
) -> None:
    cred = StaticTokenCredential()
    client = BlobServiceClient(
        account_url=f"https://127.0.0.1:{azurite.blob_port}/{ACCOUNT}",
        credential=cred,
        connection_verify=pki.ca_pem_path,
    )
    container = client.create_container(_container_name())
    container.upload_blob("hello.txt", b"hello keyless")
    assert container.download_blob("hello.txt").readall() == b"hello keyless"
    assert cred.scopes_seen and cred.scopes_seen[0] == (STORAGE_SCOPE,)


def test_azurite_rejects_token_for_wrong_audience(
    azurite: Azurite, pki: TestPKI, clean_env: pytest.MonkeyPatch
) -> None:
    client = BlobServiceClient(
        account_url=azurite.blob_url,
        credential=StaticTokenCredential("https://vault.azure.net"),
        connection_verify=pki.ca_pem_path,
        retry_total=0,
    )
    with pytest.raises(HttpResponseError) as err:
        client.create_container(_container_name())
    assert err.value.status_code == 403
    assert err.value.error_code == "AuthenticationFailed"
    assert "Invalid token audience" in str(err.value)


def test_azurite_shared_key_right_and_wrong(
    azurite: Azurite, pki: TestPKI, clean_env: pytest.MonkeyPatch
) -> None:
    good = BlobServiceClient.from_connection_string(
        azurite.connection_string(ACCOUNT_KEY), connection_verify=pki.ca_pem_path
    )
    name = _container_name()
    good.create_container(name).upload_blob("k.txt", b"shared key")
    assert good.get_container_client(name).download_blob("k.txt").readall() == b"shared key"

    bad = BlobServiceClient.from_connection_string(
        azurite.connection_string(WRONG_KEY),
        connection_verify=pki.ca_pem_path,
        retry_total=0,
    )
    with pytest.raises(HttpResponseError) as err:
        bad.get_container_client(name).download_blob("k.txt").readall()
    # Azurite quirk under --oauth basic: the Bearer authenticator runs last
    # and rejects the non-Bearer header, so a bad signature is a 400 here.
    assert err.value.status_code == 400
    assert err.value.error_code == "InvalidAuthenticationInfo"


def test_azurite_without_oauth_answers_wrong_key_with_403(
    tmp_path: Path, pki: TestPKI, clean_env: pytest.MonkeyPatch
) -> None:
    with Azurite(tmp_path, pki, oauth=False) as az:
        assert "--oauth" not in az.command
        good = BlobServiceClient.from_connection_string(
            az.connection_string(), connection_verify=pki.ca_pem_path
        )
        good.create_container("keyed").upload_blob("k.txt", b"x")
        bad = BlobServiceClient.from_connection_string(
            az.connection_string(WRONG_KEY),
            connection_verify=pki.ca_pem_path,
            retry_total=0,
        )
        with pytest.raises(HttpResponseError) as err:
            bad.get_container_client("keyed").download_blob("k.txt").readall()
    # Real Azure says 403 AuthenticationFailed; Azurite's code differs.
    assert err.value.status_code == 403
    assert err.value.error_code == "AuthorizationFailure"


def _list_containers_with_host(azurite: Azurite, pki: TestPKI, host: str) -> tuple[int, str]:
    # What the proxy will do: keep the Azure hostname, connect to loopback.
    conn = http.client.HTTPSConnection(
        "127.0.0.1", azurite.blob_port, context=pki.client_ssl_context(), timeout=10
    )
    try:
        conn.request(
            "GET",
            "/?comp=list",
            headers={
                "Host": host,
                "Authorization": f"Bearer {make_token(STORAGE_RESOURCE)}",
                "x-ms-version": "2023-11-03",
                "x-ms-date": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()),
            },
        )
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_azurite_routes_account_from_production_host_header(azurite: Azurite, pki: TestPKI) -> None:
    status, body = _list_containers_with_host(azurite, pki, f"{ACCOUNT}.blob.core.windows.net")
    assert status == 200, body
    assert "<EnumerationResults" in body and "<Containers>" in body

    # Same request, other account in the Host header: proves the Host header
    # (not the path or the IP) selects the account.
    status, body = _list_containers_with_host(azurite, pki, "nosuchacct.blob.core.windows.net")
    assert status == 404, body
