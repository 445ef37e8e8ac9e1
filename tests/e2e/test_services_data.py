"""Cosmos DB, App Configuration and Event Grid apps with DUMMY keys, through keyless.

Each service has three tests:
- the real SDK as the legacy app (key from its connection string / key credential) through
  keyless completes real data operations against the fake, which only accepts Entra tokens;
- the fake is realistic: the same SDK with its own Entra (token credential) support, straight
  to the fake, completes the same operations;
- the fake checks: the same SDK with its key, straight to the fake, is refused.

The direct tests keep the production host names (the SDKs sign them) and make them "resolve"
to the fake by patching urllib3's connect step, like an /etc/hosts entry. This is needed
because `azure.eventgrid.EventGridPublisherClient` drops transport/connection keyword arguments
for basic topics, so a custom transport cannot be passed to it.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import urllib3.util.connection
from azure.appconfiguration import AzureAppConfigurationClient, ConfigurationSetting
from azure.core.credentials import AccessToken, AzureKeyCredential, AzureSasCredential
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.core.messaging import CloudEvent
from azure.cosmos import CosmosClient
from azure.cosmos.exceptions import CosmosHttpResponseError
from azure.eventgrid import EventGridEvent, EventGridPublisherClient, generate_sas

from tests.e2e.conftest import FAKE_HOSTS
from tests.support.fake_azure import FakeAzure, FakeRequest, token_of
from tests.support.fake_services import (
    APPCONFIG_AUDIENCE,
    COSMOS_AUDIENCE,
    COSMOS_CONTAINER,
    COSMOS_DATABASE,
    EVENTGRID_AUDIENCE,
    AppConfigState,
    CosmosState,
    EventGridState,
    cosmos_quote,
    register_appconfig,
    register_cosmos,
    register_eventgrid,
)
from tests.support.identity_endpoint import SYSTEM_ASSIGNED_CLIENT_ID, decode, make_token

pytestmark = pytest.mark.e2e

COSMOS_HOST = FAKE_HOSTS["cosmos"]
COSMOS_REGIONAL_HOST = FAKE_HOSTS["cosmos-regional"]
APPCONFIG_HOST = FAKE_HOSTS["appconfig"]
EVENTGRID_HOST = FAKE_HOSTS["eventgrid"]
MY_HOSTS = (COSMOS_HOST, COSMOS_REGIONAL_HOST, APPCONFIG_HOST, EVENTGRID_HOST)

COSMOS_URL = f"https://{COSMOS_HOST}:443/"
# Dummy secrets: well-formed (the SDKs base64-decode them to sign) and wrong.
DUMMY_COSMOS_KEY = base64.b64encode(b"not-the-cosmos-master-key-" * 3).decode()
DUMMY_APPCONFIG_SECRET = base64.b64encode(b"not-the-app-configuration-secret").decode()
APPCONFIG_CONNECTION_STRING = (
    f"Endpoint=https://{APPCONFIG_HOST};Id=abcd-l0-s0:AAAAAAAAAAAAAAAAAAAA;"
    f"Secret={DUMMY_APPCONFIG_SECRET}"
)
EVENTGRID_URL = f"https://{EVENTGRID_HOST}/api/events"
DUMMY_EVENTGRID_KEY = "dummy-key"
COSMOS_AAD_PREFIX = "type%3Daad%26ver%3D1.0%26sig%3D"


@dataclass
class Services:
    cosmos: CosmosState
    appconfig: AppConfigState
    eventgrid: EventGridState


@pytest.fixture(scope="module")
def services(fake_azure: FakeAzure) -> Services:
    """The three fakes on the session's FakeAzure (registered once per FakeAzure)."""
    return Services(register_cosmos(fake_azure), register_appconfig(fake_azure),
                    register_eventgrid(fake_azure))


class Since:
    """What the fake saw after this point (its records are append-only lists)."""

    def __init__(self, fake_azure: FakeAzure) -> None:
        self.fake = fake_azure
        self.requests_from = len(fake_azure.requests)
        self.problems_from = len(fake_azure.problems)

    def requests(self, *hosts: str) -> list[FakeRequest]:
        return [r for r in self.fake.requests[self.requests_from:] if r.host in hosts]

    def problems(self, *hosts: str) -> list[tuple[str, str, list[str]]]:
        return [p for p in self.fake.problems[self.problems_from:] if p[0] in hosts]


class SentHeaders:
    """A raw_request_hook: the headers the SDK put on each request, after its own signing."""

    def __init__(self) -> None:
        self.sent: list[dict[str, str]] = []

    def __call__(self, pipeline_request: Any) -> None:
        headers = pipeline_request.http_request.headers
        self.sent.append({k.lower(): v for k, v in headers.items()})

    def values(self, name: str) -> list[str]:
        return [h[name] for h in self.sent if name in h]


class MintingCredential:
    """A TokenCredential minting identity-endpoint-style tokens for the scope asked."""

    def __init__(self) -> None:
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.extend(scopes)
        resource = scopes[0].removesuffix("/.default")
        return AccessToken(make_token(resource), int(time.time()) + 3600)


@pytest.fixture
def to_fake(monkeypatch, fake_azure: FakeAzure, pki) -> str:
    """No proxy; the production host names connect straight to the fake (like /etc/hosts)."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "NO_PROXY",
                 "no_proxy", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.ca_pem_path)
    real_create_connection = urllib3.util.connection.create_connection

    def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> Any:
        host, port = address
        if host in MY_HOSTS and port == 443:
            address = ("127.0.0.1", fake_azure.port)
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", create_connection)
    return pki.ca_pem_path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def assert_converted(requests: list[FakeRequest], auth_format: str, audience: str,
                     issued: list[str]) -> None:
    """Every request carries a managed-identity token for `audience` in the exact form."""
    assert requests
    for request in requests:
        token, problems = token_of(request, auth_format)
        assert not problems, (request.method, request.path, problems)
        claims = decode(token)
        assert claims["aud"] == audience, (request.path, claims)
        assert claims["appid"] == SYSTEM_ASSIGNED_CLIENT_ID
        assert token in issued, "the token did not come from the managed identity endpoint"


# --------------------------------------------------------------------------- Cosmos DB


def cosmos_round_trip(client: CosmosClient, services: Services) -> dict[str, Any]:
    container = client.get_database_client(COSMOS_DATABASE).get_container_client(
        COSMOS_CONTAINER)
    item = {"id": unique("order"), "pk": unique("tenant"), "total": 42.5,
            "lines": [{"sku": "A-1", "qty": 2}]}
    created = container.create_item(item)
    read = container.read_item(item["id"], partition_key=item["pk"])
    assert {k: read[k] for k in item} == item
    assert created["_etag"] == read["_etag"]
    assert {k: services.cosmos.items[item["id"]][k] for k in item} == item
    return item


def test_cosmos_app_with_dummy_master_key_works_through_keyless(
    through_keyless, services, fake_azure, identity
):
    since = Since(fake_azure)
    sent = SentHeaders()
    client = CosmosClient(COSMOS_URL, credential=DUMMY_COSMOS_KEY, raw_request_hook=sent)

    cosmos_round_trip(client, services)

    # The app really signed with its (dummy) master key ...
    sent_auth = sent.values("authorization")
    assert sent_auth and all(a.startswith("type%3Dmaster%26ver%3D1.0%26sig%3D") for a in sent_auth)
    # ... and the fake, on both the account and the regional host, saw only Entra tokens.
    seen = since.requests(COSMOS_HOST, COSMOS_REGIONAL_HOST)
    assert_converted(seen, "cosmos", COSMOS_AUDIENCE, identity.issued)
    assert all(r.header("authorization").startswith(COSMOS_AAD_PREFIX) for r in seen)
    assert not [r for r in seen if "master" in (r.header("authorization") or "")]
    regional = [(r.method, r.path.split("?")[0]) for r in seen if r.host == COSMOS_REGIONAL_HOST]
    assert ("POST", f"/dbs/{COSMOS_DATABASE}/colls/{COSMOS_CONTAINER}/docs/") in regional
    assert any(m == "GET" and "/docs/" in p and not p.endswith("/docs/") for m, p in regional)
    # x-ms-date and x-ms-version arrive exactly as the app sent them (they are signed inputs).
    assert sorted(r.header("x-ms-date") for r in seen) == sorted(sent.values("x-ms-date"))
    assert {r.header("x-ms-version") for r in seen} == set(sent.values("x-ms-version"))
    assert since.problems(*MY_HOSTS) == []
    assert identity.calls_for(COSMOS_AUDIENCE)
    assert 'keyless_requests_total{outcome="converted",service="cosmos"}' \
        in through_keyless.metrics()


def test_cosmos_fake_is_realistic_sdk_entra_auth_straight_to_fake(to_fake, services, fake_azure):
    since = Since(fake_azure)
    credential = MintingCredential()

    def url_encode_aad(pipeline_request: Any) -> None:
        # The SDK writes its Entra header raw (type=aad&ver=1.0&sig=...); keyless and the
        # Cosmos docs use the URL-encoded form, which is what the fake accepts.
        headers = pipeline_request.http_request.headers
        headers["authorization"] = cosmos_quote(headers["authorization"])

    client = CosmosClient(COSMOS_URL, credential=credential, connection_verify=to_fake,
                          raw_request_hook=url_encode_aad)
    cosmos_round_trip(client, services)

    assert set(credential.scopes) == {f"{COSMOS_AUDIENCE}/.default"}
    seen = since.requests(COSMOS_HOST, COSMOS_REGIONAL_HOST)
    assert {r.host for r in seen} == {COSMOS_HOST, COSMOS_REGIONAL_HOST}
    assert since.problems(*MY_HOSTS) == []


def test_cosmos_fake_refuses_the_master_key(to_fake, services, fake_azure):
    since = Since(fake_azure)
    with pytest.raises(CosmosHttpResponseError) as caught:
        CosmosClient(COSMOS_URL, credential=DUMMY_COSMOS_KEY, connection_verify=to_fake,
                     retry_total=0)
    assert caught.value.status_code == 401
    problems = since.problems(COSMOS_HOST)
    assert problems and all("type%3Dmaster" in " ".join(p[2]) for p in problems)


# --------------------------------------------------------------------------- App Configuration


def appconfig_round_trip(client: AzureAppConfigurationClient, services: Services) -> str:
    key = unique("app:feature")
    client.set_configuration_setting(ConfigurationSetting(
        key=key, label="prod", value='{"enabled": true}', content_type="application/json",
        tags={"owner": "legacy-app"}))
    got = client.get_configuration_setting(key, label="prod")
    assert (got.key, got.label, got.value, got.content_type, got.tags) == (
        key, "prod", '{"enabled": true}', "application/json", {"owner": "legacy-app"})
    assert got.etag and got.last_modified is not None
    assert services.appconfig.settings[(key, "prod")]["value"] == '{"enabled": true}'
    return key


def test_appconfig_app_with_dummy_secret_works_through_keyless(
    through_keyless, services, fake_azure, identity
):
    since = Since(fake_azure)
    sent = SentHeaders()
    client = AzureAppConfigurationClient.from_connection_string(
        APPCONFIG_CONNECTION_STRING, raw_request_hook=sent)

    appconfig_round_trip(client, services)

    sent_auth = sent.values("authorization")
    assert len(sent_auth) == 2
    assert all(a.startswith("HMAC-SHA256 Credential=abcd-l0-s0:AAAAAAAAAAAAAAAAAAAA&SignedHeaders="
                            "x-ms-date;host;x-ms-content-sha256&Signature=") for a in sent_auth)
    seen = since.requests(APPCONFIG_HOST)
    assert [r.method for r in seen] == ["PUT", "GET"]
    assert_converted(seen, "bearer", APPCONFIG_AUDIENCE, identity.issued)
    assert since.problems(*MY_HOSTS) == []
    assert identity.calls_for(APPCONFIG_AUDIENCE)
    assert 'keyless_requests_total{outcome="converted",service="appconfig"}' \
        in through_keyless.metrics()


def test_appconfig_fake_is_realistic_sdk_entra_auth_straight_to_fake(
    to_fake, services, fake_azure
):
    since = Since(fake_azure)
    credential = MintingCredential()
    # No audience given: the SDK derives it from the host, as keyless does.
    client = AzureAppConfigurationClient(f"https://{APPCONFIG_HOST}", credential,
                                         connection_verify=to_fake)
    appconfig_round_trip(client, services)
    assert set(credential.scopes) == {f"{APPCONFIG_AUDIENCE}/.default"}
    assert [r.method for r in since.requests(APPCONFIG_HOST)] == ["PUT", "GET"]
    assert since.problems(*MY_HOSTS) == []


def test_appconfig_fake_refuses_the_hmac_secret(to_fake, services, fake_azure):
    since = Since(fake_azure)
    client = AzureAppConfigurationClient.from_connection_string(
        APPCONFIG_CONNECTION_STRING, connection_verify=to_fake)
    with pytest.raises(ClientAuthenticationError) as caught:
        client.get_configuration_setting("anything")
    assert caught.value.status_code == 401
    problems = since.problems(APPCONFIG_HOST)
    assert problems and all("HMAC-SHA256" in " ".join(p[2]) for p in problems)


# --------------------------------------------------------------------------- Event Grid


def eventgrid_sas() -> str:
    return generate_sas(EVENTGRID_URL, base64.b64encode(b"dummy-topic-key").decode(),
                        datetime.now(UTC) + timedelta(hours=1))


def publish_both_schemas(client: EventGridPublisherClient, services: Services,
                         hook: Callable[[Any], None] | None = None) -> None:
    """An EventGridEvent batch and a CloudEvent batch; the fake must hold both, intact."""
    batches_before = len(services.eventgrid.batches)
    tag = unique("order")
    grid_events = [EventGridEvent(subject=f"orders/{tag}", event_type="Contoso.Order.Placed",
                                  data={"order": tag, "n": n}, data_version="1.0")
                   for n in range(3)]
    cloud_event = CloudEvent(source="/contoso/orders", type="Contoso.Order.Shipped",
                             data={"order": tag, "carrier": "ups"})
    hook_kwargs = {"raw_request_hook": hook} if hook else {}
    client.send(grid_events, **hook_kwargs)
    client.send([cloud_event], **hook_kwargs)

    new = services.eventgrid.batches[batches_before:]
    assert [content_type for content_type, _ in new] == [
        "application/json", "application/cloudevents-batch+json"]
    received_grid, received_cloud = new[0][1], new[1][1]
    assert [(e["id"], e["subject"], e["eventType"], e["data"], e["dataVersion"])
            for e in received_grid] == [
        (str(e.id), f"orders/{tag}", "Contoso.Order.Placed", {"order": tag, "n": n}, "1.0")
        for n, e in enumerate(grid_events)]
    assert [(e["id"], e["source"], e["type"], e["specversion"], e["data"])
            for e in received_cloud] == [
        (cloud_event.id, "/contoso/orders", "Contoso.Order.Shipped", "1.0",
         {"order": tag, "carrier": "ups"})]


@pytest.mark.parametrize("credential_kind", ["key", "sas"])
def test_eventgrid_app_with_dummy_key_or_sas_works_through_keyless(
    credential_kind, through_keyless, services, fake_azure, identity
):
    since = Since(fake_azure)
    sent = SentHeaders()
    if credential_kind == "key":
        credential: Any = AzureKeyCredential(DUMMY_EVENTGRID_KEY)
        key_header, key_value = "aeg-sas-key", DUMMY_EVENTGRID_KEY
    else:
        sas = eventgrid_sas()
        credential = AzureSasCredential(sas)
        key_header, key_value = "aeg-sas-token", sas
    client = EventGridPublisherClient(EVENTGRID_URL, credential)

    publish_both_schemas(client, services, hook=sent)

    # The app sent its key material in the header its SDK uses ...
    assert sent.values(key_header) == [key_value, key_value]
    assert all("authorization" not in h for h in sent.sent)
    # ... and the topic got Entra tokens and none of it.
    seen = since.requests(EVENTGRID_HOST)
    assert len(seen) == 2
    assert_converted(seen, "bearer", EVENTGRID_AUDIENCE, identity.issued)
    for request in seen:
        assert request.header("aeg-sas-key") is None and request.header("aeg-sas-token") is None
        assert key_value not in request.path and key_value.encode() not in request.body
    assert since.problems(*MY_HOSTS) == []
    assert identity.calls_for(EVENTGRID_AUDIENCE)
    assert 'keyless_requests_total{outcome="converted",service="eventgrid"}' \
        in through_keyless.metrics()


def test_eventgrid_fake_is_realistic_sdk_entra_auth_straight_to_fake(
    to_fake, services, fake_azure
):
    since = Since(fake_azure)
    credential = MintingCredential()
    client = EventGridPublisherClient(EVENTGRID_URL, credential)
    publish_both_schemas(client, services)
    assert set(credential.scopes) == {f"{EVENTGRID_AUDIENCE}/.default"}
    assert len(since.requests(EVENTGRID_HOST)) == 2
    assert since.problems(*MY_HOSTS) == []


@pytest.mark.parametrize("credential_kind", ["key", "sas"])
def test_eventgrid_fake_refuses_key_and_sas(credential_kind, to_fake, services, fake_azure):
    since = Since(fake_azure)
    credential: Any = (AzureKeyCredential(DUMMY_EVENTGRID_KEY) if credential_kind == "key"
                       else AzureSasCredential(eventgrid_sas()))
    header = "aeg-sas-key" if credential_kind == "key" else "aeg-sas-token"
    batches_before = len(services.eventgrid.batches)
    client = EventGridPublisherClient(EVENTGRID_URL, credential)
    with pytest.raises(HttpResponseError) as caught:
        client.send([EventGridEvent(subject="s", event_type="t", data={}, data_version="1")])
    assert caught.value.status_code == 401
    problems = since.problems(EVENTGRID_HOST)
    assert problems and all(f"key header {header} left" in " ".join(p[2]) for p in problems)
    assert len(services.eventgrid.batches) == batches_before
