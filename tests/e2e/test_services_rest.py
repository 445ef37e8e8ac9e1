"""Legacy REST calls with key-based auth to Service Bus, Event Hubs, Communication Services,
Maps, SignalR, Key Vault and a custom Storage route: through keyless they reach the (fake)
service with a managed-identity token of the right audience and identity and no key left;
sent directly, the same requests are refused.

The fakes (tests/support/fake_rest.py) answer like the services and check every converted
request (tests/support/fake_azure.py `check`): Bearer form, no key material anywhere, token
audience, token identity (`appid`), plus per-service checks (Maps `x-ms-client-id`, SignalR
token algorithm, Storage `x-ms-version`).
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import parse_qs, unquote

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import (
    FAKE_HOSTS,
    MAPS_CLIENT_ID,
    ROUTE_A_CLIENT_ID,
    ROUTE_B_CLIENT_ID,
    ROUTE_B_SCOPE,
)
from tests.support import fake_rest
from tests.support.fake_azure import Expect, FakeAzure, FakeRequest, check
from tests.support.fake_rest import (
    COMMUNICATION_RESOURCE,
    EVENTHUBS_RESOURCE,
    KEYVAULT_CHALLENGE,
    KEYVAULT_RESOURCE,
    MAPS_RESOURCE,
    SERVICEBUS_RESOURCE,
    SIGNALR_RESOURCE,
    STORAGE_RESOURCE,
)
from tests.support.identity_endpoint import (
    SYSTEM_ASSIGNED_CLIENT_ID,
    decode,
    make_token,
)
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e

SB = FAKE_HOSTS["servicebus"]
EH = FAKE_HOSTS["eventhubs"]
ACS = FAKE_HOSTS["communication"]
MAPS = FAKE_HOSTS["maps"]
SIGNALR = FAKE_HOSTS["signalr"]
VAULT = FAKE_HOSTS["keyvault"]
ROUTE_A = FAKE_HOSTS["route-a"]
ROUTE_B = FAKE_HOSTS["route-b"]
ROUTE_B_RESOURCE = ROUTE_B_SCOPE.removesuffix("/.default")
APP_BEARER = "app-token-xyz"  # the Key Vault app's own (useless) token


@pytest.fixture(scope="module")
def fakes(fake_azure: FakeAzure) -> FakeAzure:
    fake_rest.register_all(fake_azure, FAKE_HOSTS, maps_client_id=MAPS_CLIENT_ID,
                           route_a_client_id=ROUTE_A_CLIENT_ID)
    return fake_azure


# -- the legacy app's requests -----------------------------------------------------------------

@dataclass
class Legacy:
    """One request exactly as the legacy app sends it, and the secrets it carries."""

    method: str
    host: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    secrets: list[str] = field(default_factory=list)  # must never reach the service

    @property
    def url(self) -> str:
        return f"https://{self.host}{self.path}"


def _sas_secrets(sas: str) -> list[str]:
    fields = parse_qs(sas.removeprefix("SharedAccessSignature "))
    return [sas, fields["sig"][0], unquote(fields["sig"][0])]


def servicebus_send(body: bytes, label: str, queue: str = "myqueue") -> Legacy:
    sas = fake_rest.servicebus_sas(f"https://{SB}/{queue}")
    return Legacy("POST", SB, f"/{queue}/messages", {
        "Authorization": sas,
        "BrokerProperties": json.dumps({"Label": label, "State": "Active", "TimeToLive": 10}),
        "Content-Type": "application/atom+xml;type=entry;charset=utf-8",
    }, body, _sas_secrets(sas))


def servicebus_receive_and_delete(queue: str = "myqueue") -> Legacy:
    sas = fake_rest.servicebus_sas(f"https://{SB}/{queue}")
    return Legacy("DELETE", SB, f"/{queue}/messages/head?timeout=5", {"Authorization": sas},
                  secrets=_sas_secrets(sas))


def eventhubs_send(host: str, path: str, body: bytes) -> Legacy:
    hub = path.split("/")[1]
    sas = fake_rest.servicebus_sas(f"https://{host}/{hub}")
    return Legacy("POST", host, path, {
        "Authorization": sas,
        "Content-Type": "application/atom+xml;type=entry;charset=utf-8",
    }, body, _sas_secrets(sas))


def _hmac_signed(path: str, document: dict[str, object]) -> Legacy:
    body = json.dumps(document).encode()
    headers = fake_rest.communication_hmac_headers("POST", f"https://{ACS}{path}", body)
    signature = headers["Authorization"].split("Signature=", 1)[1]
    return Legacy("POST", ACS, path, {**headers, "Content-Type": "application/json"}, body,
                  [headers["Authorization"], signature])


def communication_email() -> Legacy:
    return _hmac_signed("/emails:send?api-version=2023-03-31", {
        "senderAddress": "DoNotReply@keylesscomm.azurecomm.net",
        "recipients": {"to": [{"address": "ops@contoso.example", "displayName": "Ops"}]},
        "content": {"subject": "keyless", "plainText": "no keys were harmed"},
    })


def communication_sms() -> Legacy:
    return _hmac_signed("/sms?api-version=2021-03-07", {
        "from": "+18005550100",
        "smsRecipients": [{"to": "+14255550123"}],
        "message": "no keys were harmed",
        "smsSendOptions": {"enableDeliveryReport": False},
    })


MAPS_PATH = "/search/address/json?api-version=1.0&query=Seattle"


def maps_search() -> Legacy:
    key = fake_rest.DUMMY_MAPS_KEY
    return Legacy("GET", MAPS, f"{MAPS_PATH}&subscription-key={key}", {}, secrets=[key])


SIGNALR_PATH = "/api/v1/hubs/chat"


def signalr_broadcast() -> Legacy:
    jwt = fake_rest.signalr_jwt(f"https://{SIGNALR}{SIGNALR_PATH}")
    body = json.dumps({"target": "newMessage", "arguments": ["hello from keyless"]}).encode()
    return Legacy("POST", SIGNALR, f"{SIGNALR_PATH}?api-version=2022-06-01",
                  {"Authorization": f"Bearer {jwt}", "Content-Type": "application/json"},
                  body, [jwt])


def keyvault_get(authorization: str | None) -> Legacy:
    headers = {"Authorization": authorization} if authorization else {}
    return Legacy("GET", VAULT, "/secrets/mysecret?api-version=7.4", headers,
                  secrets=[APP_BEARER])


def route_a_put(body: bytes) -> Legacy:
    headers = {"x-ms-version": "2015-02-21", "x-ms-date": formatdate(usegmt=True),
               "x-ms-blob-type": "BlockBlob", "Content-Length": str(len(body))}
    shared_key = fake_rest.storage_shared_key("storagea", "PUT", "/c/b", headers)
    return Legacy("PUT", ROUTE_A, "/c/b", {**headers, "Authorization": shared_key}, body,
                  [shared_key, shared_key.split(":", 1)[1]])


def route_b_call() -> Legacy:
    key = "keyless-dummy-api-b-key"
    return Legacy("GET", ROUTE_B, "/", {"api-key": key}, secrets=[key])


# -- sending -----------------------------------------------------------------------------------

def through_app(legacy: Legacy) -> requests.Response:
    """What the app does: an ordinary HTTPS call, which its environment sends via keyless."""
    return requests.request(legacy.method, legacy.url, headers=legacy.headers,
                            data=legacy.body or None, timeout=30)


@dataclass
class DirectResponse:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def direct(fake: FakeAzure, ca_path: str, legacy: Legacy) -> DirectResponse:
    """The same request straight to the fake (no keyless), TLS-verified for the service's name."""
    context = ssl.create_default_context(cafile=ca_path)
    connection = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=10)
    connection.sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", fake.port), timeout=10),
        server_hostname=legacy.host)
    try:
        connection.request(legacy.method, legacy.path, body=legacy.body or None,
                           headers={"Host": legacy.host, **legacy.headers})
        response = connection.getresponse()
        return DirectResponse(response.status, response.headers, response.read())
    finally:
        connection.close()


class Upstream:
    """What the fake received for one host from a point on; and what it found wrong."""

    def __init__(self, fake: FakeAzure, host: str) -> None:
        self.fake, self.host = fake, host
        self.seen = len(fake.requests_for(host))
        self.problems_seen = len(fake.problems)

    @property
    def requests(self) -> list[FakeRequest]:
        return self.fake.requests_for(self.host)[self.seen:]

    @property
    def last(self) -> FakeRequest:
        assert self.requests, f"nothing reached the fake for {self.host}"
        return self.requests[-1]

    def problems(self) -> list[tuple[str, str, list[str]]]:
        return [p for p in self.fake.problems[self.problems_seen:] if p[0] == self.host]


def explain(response: requests.Response | DirectResponse, upstream: Upstream,
            keyless: KeylessProcess | None = None) -> str:
    if isinstance(response, requests.Response):
        status, body = response.status_code, response.content
    else:
        status, body = response.status, response.body
    text = f"status {status}; body {body[:400]!r}; fake found {upstream.problems()}"
    if keyless is not None:
        text += "\nkeyless log (tail):\n" + keyless.log()[-3000:]
    return text


def send_converted(legacy: Legacy, fake: FakeAzure, keyless: KeylessProcess,
                   status: int) -> tuple[requests.Response, FakeRequest]:
    """Send through keyless; the service must answer `status`. Returns what it received."""
    upstream = Upstream(fake, legacy.host)
    response = through_app(legacy)
    assert response.status_code == status, explain(response, upstream, keyless)
    assert not upstream.problems(), explain(response, upstream, keyless)
    received = upstream.last
    assert_no_secret(received, legacy.secrets)
    return response, received


def assert_no_secret(received: FakeRequest, secrets: list[str]) -> None:
    wire = "\n".join([received.path, *(f"{k}: {v}" for k, v in received.headers)])
    for secret in secrets:
        assert secret not in wire, f"key material {secret[:12]}… reached the service"
        assert secret.encode() not in received.body, f"{secret[:12]}… in the body"


def token_claims(received: FakeRequest) -> dict[str, object]:
    authorization = received.header("authorization") or ""
    assert authorization.startswith("Bearer "), authorization[:30]
    return decode(authorization)


# -- the fakes themselves, without keyless -----------------------------------------------------

SAS_AUTH_LEFT = "key-based Authorization SharedAccessSignature left"
DIRECT_REFUSALS: dict[str, tuple[Callable[[], Legacy], str]] = {
    "servicebus-send": (lambda: servicebus_send(b"direct", "direct"), SAS_AUTH_LEFT),
    "servicebus-receive": (servicebus_receive_and_delete, SAS_AUTH_LEFT),
    "eventhubs": (lambda: eventhubs_send(EH, "/myhub/messages?timeout=60&api-version=2014-01",
                                         b"direct"), SAS_AUTH_LEFT),
    "eventhubs-partition": (lambda: eventhubs_send(SB, "/myhub/partitions/1/messages",
                                                   b"direct"), SAS_AUTH_LEFT),
    "communication-email": (communication_email, "key-based Authorization HMAC-SHA256 left"),
    "communication-sms": (communication_sms, "key-based Authorization HMAC-SHA256 left"),
    "maps": (maps_search, "key query parameter subscription-key left"),
    "signalr": (signalr_broadcast, "token alg 'HS256': not an Entra token"),
    "keyvault": (lambda: keyvault_get(f"Bearer {APP_BEARER}"), "token is not a JWT"),
    "route-a": (lambda: route_a_put(b"direct"), "key-based Authorization SharedKey left"),
}


def assert_refused_directly(fakes, pki, legacy, problem: str):
    """Sent straight to the fake, the request gets 401 and the fake names `problem`."""
    upstream = Upstream(fakes, legacy.host)
    response = direct(fakes, pki.ca_pem_path, legacy)
    assert response.status == 401, explain(response, upstream)
    found = [text for _, _, problems in upstream.problems() for text in problems]
    assert any(problem in text for text in found), found
    return response


@pytest.mark.parametrize("case", DIRECT_REFUSALS)
def test_service_refuses_the_apps_key_based_request_sent_directly(case, fakes, pki):
    build, problem = DIRECT_REFUSALS[case]
    legacy = build()
    response = assert_refused_directly(fakes, pki, legacy, problem)
    if legacy.host == VAULT:
        assert response.headers["WWW-Authenticate"] == KEYVAULT_CHALLENGE


def test_key_vault_challenges_a_request_without_a_token_directly(fakes, pki):
    response = direct(fakes, pki.ca_pem_path, keyvault_get(None))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == KEYVAULT_CHALLENGE
    assert json.loads(response.body)["error"]["code"] == "Unauthorized"


def _entra(legacy: Legacy, audience: str, client_id: str | None = None, *,
           path: str | None = None, **extra: str) -> Legacy:
    """The request as keyless should forward it: key material gone, an Entra Bearer on it."""
    headers = {k: v for k, v in legacy.headers.items() if k.lower() != "authorization"}
    headers.update(extra)
    headers["Authorization"] = f"Bearer {make_token(audience, client_id)}"
    return Legacy(legacy.method, legacy.host, path or legacy.path, headers, legacy.body)


CONVERTED_BY_HAND: dict[str, tuple[Callable[[], Legacy], int]] = {
    "servicebus": (lambda: _entra(servicebus_send(b"x", "x", "controlqueue"),
                                  SERVICEBUS_RESOURCE), 201),
    "eventhubs": (lambda: _entra(eventhubs_send(EH, "/myhub/messages?timeout=60", b"x"),
                                 EVENTHUBS_RESOURCE), 201),
    "eventhubs-partition-on-shared-suffix": (
        lambda: _entra(eventhubs_send(SB, "/myhub/partitions/1/messages", b"x"),
                       EVENTHUBS_RESOURCE), 201),
    "communication": (lambda: _entra(communication_email(), COMMUNICATION_RESOURCE), 202),
    "maps": (lambda: _entra(maps_search(), MAPS_RESOURCE, path=MAPS_PATH,
                            **{"x-ms-client-id": MAPS_CLIENT_ID}), 200),
    "signalr": (lambda: _entra(signalr_broadcast(), SIGNALR_RESOURCE), 202),
    "keyvault": (lambda: _entra(keyvault_get(None), KEYVAULT_RESOURCE), 200),
    "route-a": (lambda: _entra(route_a_put(b"x"), STORAGE_RESOURCE, ROUTE_A_CLIENT_ID,
                               **{"x-ms-version": "2017-11-09"}), 201),
}


@pytest.mark.parametrize("case", CONVERTED_BY_HAND)
def test_service_accepts_the_request_keyless_should_produce(case, fakes, pki):
    build, status = CONVERTED_BY_HAND[case]
    legacy = build()
    upstream = Upstream(fakes, legacy.host)
    response = direct(fakes, pki.ca_pem_path, legacy)
    assert response.status == status, explain(response, upstream)


# Each near miss differs from an accepted request in one thing keyless must get right.
NEAR_MISSES: dict[str, tuple[Callable[[], Legacy], str]] = {
    "servicebus-token-on-event-hub-path": (
        lambda: _entra(eventhubs_send(SB, "/myhub/partitions/1/messages", b"x"),
                       SERVICEBUS_RESOURCE), "expected 'https://eventhubs.azure.net'"),
    "eventhubs-token-on-queue-path": (
        lambda: _entra(servicebus_send(b"x", "x", "controlqueue"), EVENTHUBS_RESOURCE),
        "expected 'https://servicebus.azure.net'"),
    "servicebus-token-on-event-hubs-namespace": (
        lambda: _entra(eventhubs_send(EH, "/myhub/messages", b"x"), SERVICEBUS_RESOURCE),
        "expected 'https://eventhubs.azure.net'"),
    "communication-wrong-identity": (
        lambda: _entra(communication_sms(), COMMUNICATION_RESOURCE, ROUTE_A_CLIENT_ID),
        f"expected {SYSTEM_ASSIGNED_CLIENT_ID!r}"),
    "maps-without-client-id": (lambda: _entra(maps_search(), MAPS_RESOURCE, path=MAPS_PATH),
                               "x-ms-client-id None"),
    "maps-key-left-in-query": (
        lambda: _entra(maps_search(), MAPS_RESOURCE, **{"x-ms-client-id": MAPS_CLIENT_ID}),
        "key query parameter subscription-key left"),
    "signalr-hs256-with-entra-audience": (
        lambda: Legacy("POST", SIGNALR, SIGNALR_PATH, {"Authorization": "Bearer " + (
            fake_rest.signalr_jwt(SIGNALR_RESOURCE, appid=SYSTEM_ASSIGNED_CLIENT_ID))},
            b'{"target": "x", "arguments": []}'), "token alg 'HS256'"),
    "keyvault-storage-token": (lambda: _entra(keyvault_get(None), STORAGE_RESOURCE),
                               "expected 'https://vault.azure.net'"),
    "route-a-default-identity": (
        lambda: _entra(route_a_put(b"x"), STORAGE_RESOURCE, **{"x-ms-version": "2017-11-09"}),
        f"expected {ROUTE_A_CLIENT_ID!r}"),
    "route-a-old-version": (
        lambda: _entra(route_a_put(b"x"), STORAGE_RESOURCE, ROUTE_A_CLIENT_ID),
        "x-ms-version '2015-02-21' is too old"),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_service_refuses_a_near_miss(case, fakes, pki):
    build, problem = NEAR_MISSES[case]
    assert_refused_directly(fakes, pki, build(), problem)


def test_legacy_credentials_have_the_documented_shape():
    sas = fake_rest.servicebus_sas(f"https://{SB}/myqueue", expiry=1700000000)
    assert sas.startswith("SharedAccessSignature sr=https%3A%2F%2Fkeylessbus.servicebus."
                          "windows.net%2Fmyqueue&sig=")
    assert sas.endswith("&se=1700000000&skn=RootManageSharedAccessKey")
    fields = parse_qs(sas.removeprefix("SharedAccessSignature "))
    assert len(base64.b64decode(fields["sig"][0])) == 32
    headers = fake_rest.communication_hmac_headers("POST", f"https://{ACS}/sms", b"{}",
                                                   date="Sat, 28 Nov 2026 10:00:00 GMT")
    assert headers["x-ms-content-sha256"] == "RBNvo1WzZ4oRRq0W9+hknpT7T8If536DEMBg9hyq/4o="
    assert headers["Authorization"].startswith(
        "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=")
    jwt = fake_rest.signalr_jwt(f"https://{SIGNALR}{SIGNALR_PATH}")
    assert fake_rest.jwt_header(jwt) == {"alg": "HS256", "typ": "JWT"}
    assert decode(jwt)["aud"] == f"https://{SIGNALR}{SIGNALR_PATH}"


# -- through keyless ---------------------------------------------------------------------------

def test_service_bus_send_and_receive_and_delete(through_keyless, fakes):
    body = f"This is a message {uuid.uuid4()}".encode()
    send = servicebus_send(body, "M1")
    _, received = send_converted(send, fakes, through_keyless, 201)
    claims = token_claims(received)
    assert claims["aud"] == SERVICEBUS_RESOURCE
    assert claims["appid"] == SYSTEM_ASSIGNED_CLIENT_ID
    assert received.path == "/myqueue/messages"
    assert received.header("BrokerProperties") == send.headers["BrokerProperties"]
    assert received.body == body

    response, received = send_converted(servicebus_receive_and_delete(), fakes,
                                        through_keyless, 200)
    assert response.content == body
    assert json.loads(response.headers["BrokerProperties"])["Label"] == "M1"
    assert received.path == "/myqueue/messages/head?timeout=5"
    assert token_claims(received)["aud"] == SERVICEBUS_RESOURCE


def test_event_hubs_namespace_declared_by_route(through_keyless, fakes):
    legacy = eventhubs_send(EH, "/myhub/messages?timeout=60&api-version=2014-01",
                            b"<entry>temperature=21</entry>")
    _, received = send_converted(legacy, fakes, through_keyless, 201)
    assert token_claims(received)["aud"] == EVENTHUBS_RESOURCE
    assert received.path == "/myhub/messages?timeout=60&api-version=2014-01"
    assert received.header("content-type") == "application/atom+xml;type=entry;charset=utf-8"
    assert received.body == b"<entry>temperature=21</entry>"


@pytest.mark.parametrize("path, audience", [
    ("/myhub/partitions/1/messages", EVENTHUBS_RESOURCE),
    ("/myhub/publishers/device-7/messages", EVENTHUBS_RESOURCE),
    ("/myqueue/messages", SERVICEBUS_RESOURCE),
])
def test_shared_suffix_picks_the_service_by_path(path, audience, through_keyless, fakes):
    legacy = eventhubs_send(SB, path, b"reading")
    _, received = send_converted(legacy, fakes, through_keyless, 201)
    assert token_claims(received)["aud"] == audience
    assert received.path == path


@pytest.mark.parametrize("build", [communication_email, communication_sms],
                         ids=["email", "sms"])
def test_communication_services_hmac_becomes_bearer(build, through_keyless, fakes):
    legacy = build()
    response, received = send_converted(legacy, fakes, through_keyless, 202)
    assert token_claims(received)["aud"] == COMMUNICATION_RESOURCE
    assert received.path == legacy.path
    assert received.body == legacy.body
    if build is communication_email:
        assert response.json()["status"] == "Running"
        assert response.headers["operation-id"] == response.json()["id"]
    else:
        assert response.json()["value"][0]["successful"] is True


def test_maps_subscription_key_becomes_bearer_and_client_id(through_keyless, fakes):
    response, received = send_converted(maps_search(), fakes, through_keyless, 200)
    assert received.path == MAPS_PATH  # query and api-version byte for byte, key gone
    assert received.header("x-ms-client-id") == MAPS_CLIENT_ID
    claims = token_claims(received)
    assert claims["aud"] == MAPS_RESOURCE
    assert claims["appid"] == SYSTEM_ASSIGNED_CLIENT_ID  # the Maps account id is no identity
    assert response.json()["results"][0]["address"]["municipality"] == "Seattle"


def test_signalr_access_key_jwt_becomes_entra_bearer(through_keyless, fakes):
    legacy = signalr_broadcast()
    _, received = send_converted(legacy, fakes, through_keyless, 202)
    token = (received.header("authorization") or "").removeprefix("Bearer ")
    assert fake_rest.jwt_header(token)["alg"] == "RS256"
    assert token_claims(received)["aud"] == SIGNALR_RESOURCE
    assert received.path == f"{SIGNALR_PATH}?api-version=2022-06-01"
    assert received.body == legacy.body


def test_key_vault_challenge_then_bearer_swap(through_keyless, fakes, identity):
    upstream = Upstream(fakes, VAULT)
    # 1. Like the SDK: a first request without a token, to get the challenge.
    challenge = through_app(keyvault_get(None))
    assert challenge.status_code == 401, explain(challenge, upstream, through_keyless)
    assert challenge.headers["WWW-Authenticate"] == KEYVAULT_CHALLENGE
    # 2. The app's own token: keyless swaps it for the managed identity's.
    swapped = Upstream(fakes, VAULT)
    response = through_app(keyvault_get(f"Bearer {APP_BEARER}"))
    assert response.status_code == 200, explain(response, swapped, through_keyless)
    assert response.json()["value"] == "s3cret"
    assert response.json()["id"].startswith(f"https://{VAULT}/secrets/mysecret/")
    assert not swapped.problems(), swapped.problems()
    for received in swapped.requests:
        assert_no_secret(received, [APP_BEARER])
    claims = token_claims(swapped.last)
    assert (claims["aud"], claims["appid"]) == (KEYVAULT_RESOURCE, SYSTEM_ASSIGNED_CLIENT_ID)
    calls = identity.calls_for(KEYVAULT_RESOURCE)
    assert calls and all(call["client_id"] is None for call in calls), calls


def test_custom_routes_use_their_own_identities_once_each(through_keyless, fakes, identity):
    route_b = Upstream(fakes, ROUTE_B)
    for _ in range(2):
        legacy = route_a_put(b"route a payload")
        _, received = send_converted(legacy, fakes, through_keyless, 201)
        claims = token_claims(received)
        assert (claims["aud"], claims["appid"]) == (STORAGE_RESOURCE, ROUTE_A_CLIENT_ID)
        assert received.header("x-ms-version") == "2017-11-09"
        assert received.body == b"route a payload"

        legacy = route_b_call()
        response = through_app(legacy)  # whoever serves route B decides the answer
        received = route_b.last
        problems = check(received, Expect(ROUTE_B_RESOURCE, client_id=ROUTE_B_CLIENT_ID))
        assert not problems, explain(response, route_b, through_keyless) + f"\n{problems}"
        assert_no_secret(received, legacy.secrets)

    calls = identity.calls
    by_identity = {client: {c["resource"] for c in calls if c["client_id"] == client}
                   for client in (ROUTE_A_CLIENT_ID, ROUTE_B_CLIENT_ID)}
    assert by_identity == {ROUTE_A_CLIENT_ID: {STORAGE_RESOURCE},
                           ROUTE_B_CLIENT_ID: {ROUTE_B_RESOURCE}}
    for client, resource in ((ROUTE_A_CLIENT_ID, STORAGE_RESOURCE),
                             (ROUTE_B_CLIENT_ID, ROUTE_B_RESOURCE)):
        matching = [c for c in calls if (c["client_id"], c["resource"]) == (client, resource)]
        assert len(matching) == 1, (client, resource, matching)


# -- metrics -----------------------------------------------------------------------------------

def samples(metrics_text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(metrics_text)
            for sample in family.samples if sample.name == name}


def value(table: dict[tuple[tuple[str, str], ...], float], **labels: str) -> float:
    return table.get(tuple(sorted(labels.items())), 0.0)


CONVERTED_SERVICES = ("servicebus", "eventhubs", "communication", "maps", "signalr", "keyvault")
STRIPPED_SCHEMES = {  # (service, scheme label keyless reports)
    ("servicebus", "SharedAccessSignature"),
    ("eventhubs", "SharedAccessSignature"),
    ("communication", "HMAC-SHA256"),
    ("maps", "subscription-key"),
    ("signalr", "AccessKeyJwt"),
    ("keyvault", "Bearer"),
}


def test_metrics_count_conversions_and_stripped_key_material(through_keyless, fakes):
    before = through_keyless.metrics()
    send_converted(servicebus_send(b"metrics", "metrics", "metricsqueue"), fakes,
                   through_keyless, 201)
    received, _ = send_converted(servicebus_receive_and_delete("metricsqueue"), fakes,
                                 through_keyless, 200)
    assert received.content == b"metrics"
    send_converted(eventhubs_send(EH, "/myhub/messages", b"metrics"), fakes, through_keyless,
                   201)
    send_converted(communication_sms(), fakes, through_keyless, 202)
    send_converted(maps_search(), fakes, through_keyless, 200)
    send_converted(signalr_broadcast(), fakes, through_keyless, 202)
    through_app(keyvault_get(None))
    send_converted(keyvault_get(f"Bearer {APP_BEARER}"), fakes, through_keyless, 200)
    after = through_keyless.metrics()

    requests_before = samples(before, "keyless_requests_total")
    requests_after = samples(after, "keyless_requests_total")
    grew = {service: value(requests_after, outcome="converted", service=service)
            - value(requests_before, outcome="converted", service=service)
            for service in CONVERTED_SERVICES}
    assert grew == {"servicebus": 2, "eventhubs": 1, "communication": 1, "maps": 1,
                    "signalr": 1, "keyvault": 1}, sorted(requests_after.items())

    stripped = samples(after, "keyless_key_material_stripped_total")
    reported = {(dict(labels)["service"], dict(labels)["scheme"])
                for labels, count in stripped.items() if count > 0}
    assert not STRIPPED_SCHEMES - reported, sorted(reported)
