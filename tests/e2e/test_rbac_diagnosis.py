"""A refusal that means "the identity lacks a role" explains itself: one RBAC log line naming
the role, and the denial metric. Every other refusal (network rules, disabled key auth, a
rejected token, a Key Vault access policy, an answer that does not say why) gets no RBAC hint
and leaves the metric alone; where the service says what it is, a "Refused:" line says it.

Each fake below answers like the service does (shapes and sources in proxy/diagnosis.py), after
checking the converted request like the service would (token audience, no key material). The
app's request carries the header `x-test-refusal` to pick which refusal the fake plays.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import requests

from proxy.roles import ROLES
from tests.e2e.conftest import FAKE_HOSTS
from tests.support import fake_rest
from tests.support.fake_azure import Expect, FakeAzure, FakeRequest, FakeResponse
from tests.support.identity_endpoint import SYSTEM_ASSIGNED_CLIENT_ID

pytestmark = pytest.mark.e2e

PICK = "x-test-refusal"  # which refusal the fake plays (default: the missing role)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes | dict = b""
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> FakeResponse:
        if isinstance(self.body, dict):
            return FakeResponse.json(self.body, self.status, **self.headers)
        return FakeResponse(self.status, self.body, dict(self.headers))


@dataclass(frozen=True)
class Refusing:
    """A fake service that refuses converted requests, and the app's request to it."""

    service: str  # keyless' catalog name
    host: str
    audience: str
    request: tuple[str, str, dict[str, str], bytes] | Callable[[], tuple[str, str, dict, bytes]]
    role: str | None  # the role the RBAC line names; None: no answer means a missing role
    answers: dict[str, Answer]  # "role" is the missing role; the others are not
    auth_format: str = "bearer"
    challenge: str | None = None  # Key Vault: answered to a request without a token

    def app_request(self) -> tuple[str, str, dict[str, str], bytes]:
        return self.request() if callable(self.request) else self.request


def error(code: str, message: str = "", inner: str | None = None) -> dict:
    found: dict = {"code": code, "message": message}
    if inner is not None:
        found["innererror"] = {"code": inner}
    return {"error": found}


def storage_error(code: str, message: str) -> Answer:
    return Answer(403, f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
                  f"<Message>{message}</Message></Error>".encode(),
                  {"x-ms-error-code": code, "content-type": "application/xml"})


def messaging_error(status: int, detail: str) -> Answer:
    return Answer(status, f"<Error><Code>{status}</Code><Detail>{detail}</Detail></Error>"
                  .encode(), {"content-type": "application/xml; charset=utf-8"})


def sas_request(host: str, path: str) -> Callable[[], tuple[str, str, dict, bytes]]:
    entity = path.split("/")[1]
    return lambda: ("POST", path, {
        "Authorization": fake_rest.servicebus_sas(f"https://{host}/{entity}"),
        "Content-Type": "application/atom+xml;type=entry;charset=utf-8"}, b"<entry>21</entry>")


def hmac_request(host: str, path: str) -> Callable[[], tuple[str, str, dict, bytes]]:
    body = b'{"senderAddress": "a@b.example", "recipients": {"to": []}}'
    return lambda: ("POST", path, {
        **fake_rest.communication_hmac_headers("POST", f"https://{host}{path}", body),
        "Content-Type": "application/json"}, body)


def access_key_jwt_request(host: str, path: str, query: str
                           ) -> Callable[[], tuple[str, str, dict, bytes]]:
    return lambda: ("POST", f"{path}?{query}", {
        "Authorization": "Bearer " + fake_rest.signalr_jwt(f"https://{host}{path}"),
        "Content-Type": "application/json"}, b'{"target": "t", "arguments": []}')


FIREWALL = "firewall refused keyless' address"
SILENT = "does not say whether a role"
ROLE_PICK = "role"

SERVICES: dict[str, Refusing] = {
    "storage-blob": Refusing(
        "storage-blob", FAKE_HOSTS["denied-storage"], "https://storage.azure.com",
        ("PUT", "/c/b", {"Authorization": "SharedKey denied:c2ln", "x-ms-version": "2023-11-03",
                         "x-ms-blob-type": "BlockBlob"}, b"blob"),
        "Storage Blob Data Contributor", {
            ROLE_PICK: storage_error("AuthorizationPermissionMismatch", "This request is not "
                                     "authorized to perform this operation using this "
                                     "permission."),
            "firewall": storage_error("AuthorizationFailure", "This request is not authorized "
                                      "to perform this operation."),
            "shared-key-off": storage_error("KeyBasedAuthenticationNotPermitted", "Key based "
                                            "authentication is not permitted on this storage "
                                            "account."),
            "bad-token": storage_error("AuthenticationFailed", "Server failed to authenticate "
                                       "the request."),
        }),
    "cosmos": Refusing(
        "cosmos", FAKE_HOSTS["denied-cosmos"], "https://deniedcosmos.documents.azure.com",
        ("GET", "/dbs/db/colls/c/docs/1",
         {"authorization": "type%3Dmaster%26ver%3D1.0%26sig%3Dc2ln"}, b""),
        "Cosmos DB Built-in Data Reader", {
            ROLE_PICK: Answer(403, {"code": "Forbidden", "message": "Request blocked by Auth "
                                    "deniedcosmos : Request is blocked because principal [p] "
                                    "does not have required RBAC permissions to perform "
                                    "action [Microsoft.DocumentDB/databaseAccounts/"
                                    "readMetadata] on resource [/]."},
                              {"x-ms-substatus": "5301"}),
            "firewall": Answer(403, {"code": "Forbidden", "message": "Request originated from "
                                     "IP 203.0.113.9 through public internet. This is blocked "
                                     "by your Cosmos DB account firewall settings."},
                               {"x-ms-substatus": "0"}),
            "not-data-plane": Answer(403, {"code": "Forbidden", "message": "Request blocked by "
                                           "Auth deniedcosmos : The given request [GET /dbs] "
                                           "cannot be authorized by AAD token in data plane."},
                                     {"x-ms-substatus": "5300"}),
            # 401s are replayed with a fresh token: only on this host's own scope, so the
            # session's other token counts (e.g. the storage scope's) stay as they are
            "token-401": Answer(401, {"code": "Unauthorized", "message": "The input "
                                      "authorization token can't serve the request."},
                                {"x-ms-substatus": "5202"}),
            "local-auth-off": Answer(401, {"code": "Unauthorized", "message": "Local "
                                           "Authorization is disabled. Use an AAD token to "
                                           "authorize all requests."},
                                     {"x-ms-substatus": "5202"}),
        }, auth_format="cosmos"),
    "openai": Refusing(
        "openai", FAKE_HOSTS["denied-openai"], "https://cognitiveservices.azure.com",
        ("POST", "/openai/deployments/d/chat/completions?api-version=2024-10-21",
         {"api-key": "k", "Content-Type": "application/json"}, b'{"messages": []}'),
        "Cognitive Services OpenAI User", {
            ROLE_PICK: Answer(403, error("PermissionDenied", "The principal lacks the required "
                                         "data action")),
            "firewall": Answer(403, error("403", "Access denied due to Virtual Network/"
                                          "Firewall rules."),
                               {"policy-id": "ThrowExceptionDueToTrafficDenied"}),
            "private-endpoint": Answer(403, error("403", "Traffic is not from an approved "
                                                  "private endpoint.")),
        }),
    "servicebus": Refusing(
        "servicebus", FAKE_HOSTS["denied-servicebus"], "https://servicebus.azure.net",
        sas_request(FAKE_HOSTS["denied-servicebus"], "/q/messages"),
        "Azure Service Bus Data Sender", {
            ROLE_PICK: messaging_error(401, "Unauthorized access. 'Send' claim(s) are required "
                                       "to perform this operation. Resource: 'sb://deniedbus."
                                       "servicebus.windows.net/q'."),
            "ip-filter": messaging_error(403, "Ip has been prevented to connect to the "
                                         "endpoint."),
        }),
    "eventhubs": Refusing(
        "eventhubs", FAKE_HOSTS["denied-eventhubs"], "https://eventhubs.azure.net",
        sas_request(FAKE_HOSTS["denied-eventhubs"], "/hub/partitions/0/messages"),
        "Azure Event Hubs Data Sender", {
            ROLE_PICK: messaging_error(401, "Unauthorized access. 'Send' claim(s) are required "
                                       "to perform this operation."),
            "ip-filter": messaging_error(403, "The client is rejected by IpFilter."),
        }),
    "search": Refusing(
        "search", FAKE_HOSTS["denied-search"], "https://search.azure.com",
        ("GET", "/indexes/i/docs?api-version=2024-07-01&search=*", {"api-key": "k"}, b""),
        "Search Index Data Reader", {
            ROLE_PICK: Answer(403, error("", "Authorization failed.")),
            "bare-403": Answer(403),  # a role, or the IP firewall? Search does not say
        }),
    "keyvault": Refusing(
        "keyvault", FAKE_HOSTS["denied-keyvault"], fake_rest.KEYVAULT_RESOURCE,
        ("GET", "/secrets/mysecret?api-version=7.4", {"Authorization": "Bearer app-token"}, b""),
        "Key Vault Secrets User", {
            ROLE_PICK: Answer(403, error("Forbidden", "Caller is not authorized to perform "
                                         "action on resource.", "ForbiddenByRbac")),
            "firewall": Answer(403, error("Forbidden", "Client address is not authorized and "
                                          "caller is not a trusted service.",
                                          "ForbiddenByFirewall")),
            "access-policy": Answer(403, error("Forbidden", "The user, group or application "
                                               "does not have secrets get permission on key "
                                               "vault 'deniedvault'.", "AccessDenied")),
        }, challenge=fake_rest.KEYVAULT_CHALLENGE),
    "appconfig": Refusing(
        "appconfig", FAKE_HOSTS["denied-appconfig"], "https://azconfig.io",
        ("GET", "/kv?api-version=1.0", {
            "Authorization": "HMAC-SHA256 Credential=abcd-l0-s0:AAAA&SignedHeaders=x-ms-date;"
                             "host;x-ms-content-sha256&Signature=c2lnbmF0dXJl"}, b""),
        "App Configuration Data Reader", {
            ROLE_PICK: Answer(403),
            "ip-rejected": Answer(403, {"type": "https://azconfig.io/errors/ip-address-rejected",
                                        "title": "Access to this resource is governed by a "
                                                 "network access policy.", "status": 403},
                                  {"content-type": "application/problem+json"}),
        }),
    "eventgrid": Refusing(
        "eventgrid", FAKE_HOSTS["denied-eventgrid"], "https://eventgrid.azure.net",
        ("POST", "/api/events?api-version=2018-01-01",
         {"aeg-sas-key": "a2V5", "Content-Type": "application/json"}, b"[]"),
        "EventGrid Data Sender", {
            ROLE_PICK: Answer(401, error("Unauthorized", "The principal associated with access "
                                         "token presented with the incoming request does not "
                                         "have permission to send data to /subscriptions/s/"
                                         "topics/deniedtopic.")),
            "ip-filter": Answer(403, error("Forbidden", "Publishing to deniedtopic by client "
                                           "203.0.113.9 is rejected due to IpAddress filtering "
                                           "rules.")),
        }),
    "communication": Refusing(
        "communication", FAKE_HOSTS["denied-communication"], fake_rest.COMMUNICATION_RESOURCE,
        hmac_request(FAKE_HOSTS["denied-communication"], "/emails:send?api-version=2023-03-31"),
        None, {"forbidden": Answer(403, error("Forbidden", "Forbidden"))}),
    "maps": Refusing(
        "maps", FAKE_HOSTS["denied-maps"], fake_rest.MAPS_RESOURCE,
        ("GET", "/search/address/json?api-version=1.0&query=x&subscription-key=k", {}, b""),
        None, {"forbidden": Answer(403, error("403 Forbidden", "Permission, capacity, or "
                                              "authentication issues."))}),
    "signalr": Refusing(
        "signalr", FAKE_HOSTS["denied-signalr"], fake_rest.SIGNALR_RESOURCE,
        access_key_jwt_request(FAKE_HOSTS["denied-signalr"], "/api/v1/hubs/chat",
                               "api-version=2022-06-01"),
        None, {"forbidden": Answer(403)}),
    "webpubsub": Refusing(
        "webpubsub", FAKE_HOSTS["denied-webpubsub"], "https://webpubsub.azure.com",
        access_key_jwt_request(FAKE_HOSTS["denied-webpubsub"], "/api/hubs/chat/:send",
                               "api-version=2022-11-01"),
        None, {"forbidden": Answer(403)}),
}

# (service, refusal) -> what the "Refused:" line says (None: no such line: a 401 about the
# token is the 401 replay's business)
NOT_A_ROLE: dict[tuple[str, str], str | None] = {
    ("cosmos", "token-401"): None,
    ("cosmos", "local-auth-off"): "key-based auth is disabled",
    ("storage-blob", "firewall"): "storage firewall refused keyless' address",
    ("storage-blob", "shared-key-off"): "key-based auth is disabled",
    ("storage-blob", "bad-token"): "rejected the token itself",
    ("cosmos", "firewall"): FIREWALL,
    ("cosmos", "not-data-plane"): "cannot authorize this operation on the data plane",
    ("openai", "firewall"): FIREWALL,
    ("openai", "private-endpoint"): FIREWALL,
    ("servicebus", "ip-filter"): FIREWALL,
    ("eventhubs", "ip-filter"): FIREWALL,
    ("search", "bare-403"): "not recognised as a missing role",
    ("keyvault", "firewall"): FIREWALL,
    ("keyvault", "access-policy"): "the vault uses access policies",
    ("appconfig", "ip-rejected"): FIREWALL,
    ("eventgrid", "ip-filter"): FIREWALL,
    ("communication", "forbidden"): SILENT,
    ("maps", "forbidden"): SILENT,
    ("signalr", "forbidden"): SILENT,
    ("webpubsub", "forbidden"): SILENT,
}


def handler(fake: FakeAzure, refusing: Refusing) -> Callable[[FakeRequest], FakeResponse]:
    expect = Expect(audience=refusing.audience, auth_format=refusing.auth_format,
                    client_id=SYSTEM_ASSIGNED_CLIENT_ID)

    def handle(request: FakeRequest) -> FakeResponse:
        if refusing.challenge is not None and request.header("authorization") is None:
            return FakeResponse.json(error("Unauthorized", "AKV10000: Request is missing a "
                                           "Bearer or PoP token."), 401,
                                     **{"WWW-Authenticate": refusing.challenge})
        if (refused := fake_rest.refuse_unless(fake, request, expect)) is not None:
            return refused
        return refusing.answers[request.header(PICK) or ROLE_PICK].response()
    return handle


@pytest.fixture(scope="module")
def refusing(fake_azure: FakeAzure) -> dict[str, Refusing]:
    registered: set[str] = fake_azure.__dict__.setdefault("_refusing_registered", set())
    for name, service in SERVICES.items():
        if name not in registered:
            fake_azure.add(re.escape(service.host), None, handler(fake_azure, service))
            registered.add(name)
    return SERVICES


def denial_count(keyless, service: str) -> float:
    return keyless.metric("keyless_authorization_denials_total", service=service)


def log_messages(keyless, prefix: str) -> list[str]:
    found = []
    for line in keyless.log().splitlines():
        try:
            message = json.loads(line)["message"]
        except (ValueError, KeyError, TypeError):
            message = line
        if message.startswith(prefix):
            found.append(message)
    return found


@dataclass
class Sent:
    status: int
    rbac: list[str]  # RBAC lines logged meanwhile
    refused: list[str]  # "Refused:" lines logged meanwhile
    denials: float  # change of the denial metric
    upstream: int  # requests the fake service got
    problems: list  # what the fake found wrong with the converted request


def send(keyless, fake: FakeAzure, refusing: Refusing, pick: str) -> Sent:
    method, path, headers, body = refusing.app_request()
    url = f"https://{refusing.host}{path}"
    if refusing.challenge is not None:  # like the SDK: learn the challenge first
        first = requests.request(method, url, timeout=10)
        assert first.status_code == 401, first.text
    rbac, refused = len(log_messages(keyless, "RBAC:")), len(log_messages(keyless, "Refused:"))
    count, upstream = denial_count(keyless, refusing.service), len(fake.requests_for(
        refusing.host))
    problems = len(fake.problems)
    response = requests.request(method, url, headers={**headers, PICK: pick}, data=body,
                                timeout=10)
    return Sent(response.status_code, log_messages(keyless, "RBAC:")[rbac:],
                log_messages(keyless, "Refused:")[refused:],
                denial_count(keyless, refusing.service) - count,
                len(fake.requests_for(refusing.host)) - upstream,
                [p for p in fake.problems[problems:] if p[0] == refusing.host])


ROLE_CASES = sorted(name for name, s in SERVICES.items() if s.role is not None)


@pytest.mark.parametrize("service", ROLE_CASES)
def test_rbac_refusal_names_identity_resource_and_role(through_keyless, fake_azure, refusing,
                                                       service):
    target = refusing[service]
    sent = send(through_keyless, fake_azure, target, ROLE_PICK)
    assert not sent.problems, sent.problems  # the converted request was right
    assert sent.status == target.answers[ROLE_PICK].status  # the answer reaches the app as is
    assert len(sent.rbac) == 1, sent.rbac
    resource = target.host.split(".")[0]
    assert "identity default may not" in sent.rbac[0]
    assert f"{service} {resource}" in sent.rbac[0]
    assert f"'{target.role}'" in sent.rbac[0]
    assert sent.refused == []  # one line, not two
    assert sent.denials == 1
    # a missing role is not a stale token: no 401 replay with a fresh one
    assert sent.upstream == 1


@pytest.mark.parametrize("service, pick", sorted(NOT_A_ROLE))
def test_a_refusal_that_is_not_a_missing_role_gets_no_rbac_hint(through_keyless, fake_azure,
                                                                 refusing, service, pick):
    target = refusing[service]
    refusals = through_keyless.metric("keyless_upstream_refusals_total", service=service)
    sent = send(through_keyless, fake_azure, target, pick)
    assert not sent.problems, sent.problems
    counted = through_keyless.metric("keyless_upstream_refusals_total", service=service)
    assert counted - refusals == (0 if NOT_A_ROLE[service, pick] is None else 1)
    status = target.answers[pick].status
    assert sent.status == status
    assert sent.rbac == []
    assert sent.denials == 0
    meaning = NOT_A_ROLE[service, pick]
    if meaning is None:
        assert sent.refused == []
        return
    assert len(sent.refused) == 1, sent.refused
    line = sent.refused[0]
    assert line.startswith("Refused: identity default may not ")
    assert f"{service} {target.host.split('.')[0]} ({status}, " in line
    assert meaning in line, line
    assert "assign the built-in role" not in line


def test_every_service_with_roles_has_a_refusal_that_is_not_one():
    tested = {service for service, _ in NOT_A_ROLE}
    untested = {name for name in ROLES if not name.startswith("storage-")} - tested
    assert "storage-blob" in tested and not untested, untested
