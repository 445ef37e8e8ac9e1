"""Real processes on loopback: Azurite (HTTPS, OAuth), a managed-identity endpoint, keyless."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.azurite import Azurite, TestPKI
from tests.support.fake_azure import FakeAzure
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess
from tests.support.upstreams import RecordingServer

BLOB_HOST = "devstoreaccount1.blob.core.windows.net"
QUEUE_HOST = "devstoreaccount1.queue.core.windows.net"
RECORDER_HOST = "recorder.blob.core.windows.net"  # a catalog host served by a recording fake

# Hosts served by the FakeAzure upstream (one loopback HTTPS server, chosen by Host header).
FAKE_HOSTS = {
    "cosmos": "keylesscosmos.documents.azure.com",
    "cosmos-regional": "keylesscosmos-westus2.documents.azure.com",
    "appconfig": "keylessconfig.azconfig.io",
    "eventgrid": "keylesstopic.westus2-1.eventgrid.azure.net",
    "openai": "keylessai.openai.azure.com",
    "ai-regional": "westus2.api.cognitive.microsoft.com",
    "search": "keylesssearch.search.windows.net",
    "servicebus": "keylessbus.servicebus.windows.net",
    "eventhubs": "keylesshub.servicebus.windows.net",  # made Event Hubs by a route below
    "communication": "keylesscomm.communication.azure.com",
    "maps": "atlas.microsoft.com",
    "signalr": "keylesssignalr.service.signalr.net",
    "keyvault": "keylessvault.vault.azure.net",
    "route-a": "storage-a.contoso.internal",  # custom route: storage-blob, identity A
    "route-b": "api-b.contoso.internal",  # custom route: explicit scope, api-key, identity B
    # services that refuse: "identity lacks a role", network rules, ... (test_rbac_diagnosis)
    "denied-storage": "denied.blob.core.windows.net",
    "denied-cosmos": "deniedcosmos.documents.azure.com",
    "denied-openai": "deniedai.openai.azure.com",
    "denied-servicebus": "deniedbus.servicebus.windows.net",
    "denied-search": "deniedsearch.search.windows.net",
    "denied-keyvault": "deniedvault.vault.azure.net",
    "denied-appconfig": "deniedconfig.azconfig.io",
    "denied-eventgrid": "deniedtopic.westus2-1.eventgrid.azure.net",
    "denied-eventhubs": "deniedhub.servicebus.windows.net",  # Event Hubs by its paths
    "denied-communication": "deniedcomm.communication.azure.com",
    "denied-maps": "us.atlas.microsoft.com",
    "denied-signalr": "deniedsignalr.service.signalr.net",
    "denied-webpubsub": "deniedpubsub.webpubsub.azure.com",
    # a service that revokes tokens on demand (401 to a token it has seen before)
    "revoking": "revokingsearch.search.windows.net",
}
MAPS_CLIENT_ID = "3a3a3a3a-0000-4000-8000-00000000a71a"
ROUTE_A_CLIENT_ID = "aaaaaaaa-0000-4000-8000-00000000000a"
ROUTE_B_CLIENT_ID = "bbbbbbbb-0000-4000-8000-00000000000b"
ROUTE_B_SCOPE = "api://keyless-test-api-b/.default"
KEYLESS_TOML = f"""
maps-client-id = "{MAPS_CLIENT_ID}"
keyvault-swap-bearer = true

[[route]]
host = "{FAKE_HOSTS['eventhubs']}"
service = "eventhubs"

[[route]]
host = "storage-*.contoso.internal"
service = "storage-blob"
client-id = "{ROUTE_A_CLIENT_ID}"

[[route]]
host = "{FAKE_HOSTS['route-b']}"
scope = "{ROUTE_B_SCOPE}"
strip = ["api-key"]
token-format = "bearer"
client-id = "{ROUTE_B_CLIENT_ID}"
"""
# Proxy variables for keyless' own process: a dead proxy. If the credential's traffic went
# through proxy environment variables, no token could be fetched.
DEAD_PROXY_ENV = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
                  "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
                  "NO_PROXY": "", "no_proxy": ""}
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def azurite(tmp_path_factory, pki) -> Iterator[Azurite]:
    with Azurite(tmp_path_factory.mktemp("azurite"), pki) as running:
        yield running


@pytest.fixture(scope="session")
def identity() -> Iterator[FakeIdentityEndpoint]:
    with FakeIdentityEndpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def module_identity() -> Iterator[FakeIdentityEndpoint]:
    """An identity endpoint of the module's own, for keyless instances other than the
    session's: their token calls must not mix with the session keyless' records."""
    with FakeIdentityEndpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def plain_http_recorder() -> Iterator[RecordingServer]:
    """Stands in for a catalog host reached over plain HTTP (port 80)."""
    with RecordingServer() as server:
        yield server


@pytest.fixture(scope="session")
def catalog_recorder(pki) -> Iterator[RecordingServer]:
    """A TLS server for a catalog host name that records exactly what keyless forwarded."""
    with RecordingServer(tls=pki.issue_server_cert(RECORDER_HOST)) as server:
        yield server


@pytest.fixture(scope="session")
def fake_azure(pki) -> Iterator[FakeAzure]:
    """The fake upstream for services without an emulator; test modules add their handlers."""
    with FakeAzure(pki.issue_server_cert(*FAKE_HOSTS.values())) as fake:
        yield fake


@pytest.fixture(scope="session")
def keyless(tmp_path_factory, pki, azurite, identity, plain_http_recorder,
            catalog_recorder, fake_azure) -> Iterator[KeylessProcess]:
    workdir = tmp_path_factory.mktemp("keyless")
    (workdir / "keyless.toml").write_text(KEYLESS_TOML)
    process = KeylessProcess(
        workdir,
        [
            "--config", str(workdir / "keyless.toml"),
            "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
            "--connect-to", f"{QUEUE_HOST}:443:127.0.0.1:{azurite.queue_port}",
            "--connect-to", f"{BLOB_HOST}:80:127.0.0.1:{plain_http_recorder.port}",
            "--connect-to", f"{RECORDER_HOST}:443:127.0.0.1:{catalog_recorder.port}",
            # everything else on 443 (the FakeAzure hosts) goes to the fake upstream
            "--connect-to", f":443:127.0.0.1:{fake_azure.port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            "--token-timeout", "5",
        ],
        {**identity.env(), **DEAD_PROXY_ENV},
    ).start()
    yield process
    assert process.stop() == 0, process.log()


def route_app_through(monkeypatch, process: KeylessProcess) -> KeylessProcess:
    """The legacy app's environment: proxy variables and keyless' CA, nothing else."""
    monkeypatch.setenv("HTTPS_PROXY", process.proxy_url)
    monkeypatch.setenv("HTTP_PROXY", process.proxy_url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", process.ca_path)
    for name in ("NO_PROXY", "no_proxy", "https_proxy", "http_proxy", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return process


@pytest.fixture
def through_keyless(monkeypatch, keyless) -> KeylessProcess:
    return route_app_through(monkeypatch, keyless)


@pytest.fixture
def direct(monkeypatch) -> None:
    """No proxy at all: the app talks to Azurite itself."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
