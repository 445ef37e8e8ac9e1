"""Per service: which refusals mean "the identity lacks a role", and what the others mean.

The answers are the services' own shapes, from the sources named in proxy/diagnosis.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.diagnosis import MEANINGS, RefusalKind, rbac_denial, read_refusal

ROLE = RefusalKind.MISSING_ROLE
NETWORK = RefusalKind.NETWORK_RULES
LOCAL_AUTH = RefusalKind.LOCAL_AUTH_DISABLED
TOKEN = RefusalKind.TOKEN_REJECTED
POLICY = RefusalKind.ACCESS_POLICY
OTHER = RefusalKind.OTHER


def body(data: Any) -> bytes:
    return data if isinstance(data, bytes) else json.dumps(data).encode()


def error(code: str, message: str = "", inner: str | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {"code": code, "message": message}
    if inner is not None:
        found["innererror"] = {"code": inner}
    return {"error": found}


def storage_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}\nRequestId:0f0e</Message></Error>").encode()


def cosmos_error(message: str) -> dict[str, Any]:
    return {"code": "Forbidden", "message": message}


KV_RBAC = ("Caller is not authorized to perform action on resource.\r\nIf role assignments, "
           "deny assignments or role definitions were changed recently, please observe "
           "propagation time.\r\nAction: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'")
SB_CLAIMS = (b"<Error><Code>401</Code><Detail>Unauthorized access. 'Send' claim(s) are required "
             b"to perform this operation. Resource: 'sb://ns.servicebus.windows.net/q'."
             b"</Detail></Error>")

# id: (service, status, headers, body, kind, code)
CASES: dict[str, tuple[str, int, dict[str, str], Any, RefusalKind, str]] = {
    # -- Storage (x-ms-error-code decides, for every storage-* service) --
    "storage-role": ("storage-blob", 403, {"x-ms-error-code": "AuthorizationPermissionMismatch"},
                     storage_error("AuthorizationPermissionMismatch", "This request is not "
                                   "authorized to perform this operation using this "
                                   "permission."), ROLE, "AuthorizationPermissionMismatch"),
    "storage-queue-role": ("storage-queue", 403,
                           {"x-ms-error-code": "AuthorizationPermissionMismatch"}, b"", ROLE,
                           "AuthorizationPermissionMismatch"),
    "storage-firewall": ("storage-blob", 403, {"x-ms-error-code": "AuthorizationFailure"},
                         storage_error("AuthorizationFailure", "This request is not authorized "
                                       "to perform this operation."), NETWORK,
                         "AuthorizationFailure"),
    "storage-bad-token": ("storage-table", 403, {"x-ms-error-code": "AuthenticationFailed"},
                          storage_error("AuthenticationFailed", "Server failed to authenticate "
                                        "the request."), TOKEN, "AuthenticationFailed"),
    "storage-shared-key-off": ("storage-file", 403,
                               {"x-ms-error-code": "KeyBasedAuthenticationNotPermitted"},
                               storage_error("KeyBasedAuthenticationNotPermitted", "Key based "
                                             "authentication is not permitted on this storage "
                                             "account."), LOCAL_AUTH,
                               "KeyBasedAuthenticationNotPermitted"),
    "storage-sas-ip": ("storage-blob", 403, {"x-ms-error-code": "AuthorizationSourceIPMismatch"},
                       b"", OTHER, "AuthorizationSourceIPMismatch"),
    "storage-sas-protocol": ("storage-dfs", 403,
                             {"x-ms-error-code": "AuthorizationProtocolMismatch"}, b"", OTHER,
                             "AuthorizationProtocolMismatch"),
    "storage-no-code": ("storage-blob", 403, {}, b"", OTHER, "Forbidden"),
    "storage-401": ("storage-blob", 401, {"x-ms-error-code": "InvalidAuthenticationInfo"}, b"",
                    TOKEN, "InvalidAuthenticationInfo"),
    # -- Cosmos DB (substatus, and the firewall's message) --
    "cosmos-role": ("cosmos", 403, {"x-ms-substatus": "5301"},
                    cosmos_error("Request blocked by Auth acct : Request is blocked because "
                                 "principal [p] does not have required RBAC permissions to "
                                 "perform action [Microsoft.DocumentDB/databaseAccounts/"
                                 "readMetadata] on resource [/]."), ROLE,
                    "Forbidden (substatus 5301)"),
    "cosmos-firewall": ("cosmos", 403, {"x-ms-substatus": "0"},
                        cosmos_error("Request originated from IP 203.0.113.9 through public "
                                     "internet. This is blocked by your Cosmos DB account "
                                     "firewall settings."), NETWORK, "Forbidden (substatus 0)"),
    "cosmos-firewall-no-substatus": ("cosmos", 403, {},
                                     cosmos_error("Request originated from client VNET through "
                                                  "private endpoint."), NETWORK,
                                     "Forbidden (substatus none)"),
    "cosmos-not-data-plane": ("cosmos", 403, {"x-ms-substatus": "5300"},
                              cosmos_error("Request blocked by Auth acct : The given request "
                                           "[POST /dbs] cannot be authorized by AAD token in "
                                           "data plane."), OTHER, "Forbidden (substatus 5300)"),
    "cosmos-partition-full": ("cosmos", 403, {"x-ms-substatus": "1014"},
                              cosmos_error("Partition key reached maximum size of 20 GB"), OTHER,
                              "Forbidden (substatus 1014)"),
    "cosmos-local-auth-off": ("cosmos", 401, {"x-ms-substatus": "5202"},
                              {"code": "Unauthorized", "message": "Local Authorization is "
                               "disabled. Use an AAD token to authorize all requests."},
                              LOCAL_AUTH, "Unauthorized (substatus 5202)"),
    "cosmos-401": ("cosmos", 401, {}, {"code": "Unauthorized"}, TOKEN,
                   "Unauthorized (substatus none)"),
    # -- Key Vault (inner error code) --
    "keyvault-role": ("keyvault", 403, {}, error("Forbidden", KV_RBAC, "ForbiddenByRbac"), ROLE,
                      "ForbiddenByRbac"),
    "keyvault-firewall": ("keyvault", 403, {},
                          error("Forbidden", "Client address is not authorized and caller is "
                                "not a trusted service.", "ForbiddenByFirewall"), NETWORK,
                          "ForbiddenByFirewall"),
    "keyvault-access-policy": ("keyvault", 403, {},
                               error("Forbidden", "The user, group or application '...' does "
                                     "not have secrets get permission on key vault 'v'.",
                                     "AccessDenied"), POLICY, "AccessDenied"),
    "keyvault-policy": ("keyvault", 403, {},
                        error("Forbidden", "The policy requires the caller to use on-behalf-of "
                              "(OBO) flow.", "ForbiddenByPolicy"), OTHER, "ForbiddenByPolicy"),
    "keyvault-no-inner": ("keyvault", 403, {}, error("Forbidden", "Forbidden"), OTHER,
                          "Forbidden"),
    "keyvault-401": ("keyvault", 401, {},
                     error("Unauthorized", "AKV10022: Invalid audience."), TOKEN,
                     "Unauthorized"),
    # -- Azure OpenAI / AI services --
    "openai-role": ("openai", 403, {},
                    error("PermissionDenied", "The principal `p` lacks the required data "
                          "action `Microsoft.CognitiveServices/accounts/OpenAI/deployments/"
                          "chat/completions/action`."), ROLE, "PermissionDenied"),
    "openai-role-401": ("openai", 401, {},
                        error("PermissionDenied", "Principal does not have access to "
                              "API/Operation."), ROLE, "PermissionDenied"),
    "openai-firewall": ("openai", 403, {"policy-id": "ThrowExceptionDueToTrafficDenied"},
                        error("403", "Access denied due to Virtual Network/Firewall rules."),
                        NETWORK, "403"),
    "openai-vnet": ("openai", 403, {},
                    {"error": {"code": "403", "message": "A Virtual Network is configured for "
                               "this resource. Please use the correct endpoint for making "
                               "requests."}}, NETWORK, "403"),
    "openai-private-endpoint": ("openai", 403, {},
                                error("403", "Traffic is not from an approved private "
                                      "endpoint."), NETWORK, "403"),
    "openai-public-access-off": ("openai", 403, {},
                                 error("403", "Public access is disabled. Please configure "
                                       "private endpoint."), NETWORK, "403"),
    "openai-local-auth-off": ("openai", 403, {},
                              error("AuthenticationTypeDisabled", "Key based authentication "
                                    "is disabled for this resource."), LOCAL_AUTH,
                              "AuthenticationTypeDisabled"),
    "openai-quota-403": ("openai", 403, {}, error("Forbidden", "Out of quota."), OTHER,
                         "Forbidden"),
    "openai-401": ("openai", 401, {}, error("401", "Access denied due to invalid subscription "
                                            "key or wrong API endpoint."), TOKEN, "401"),
    # -- Service Bus / Event Hubs --
    "servicebus-role": ("servicebus", 401, {}, SB_CLAIMS, ROLE, "MissingClaims"),
    "eventhubs-role": ("eventhubs", 401, {},
                       error("401", "Unauthorized access. 'Send' claim(s) are required to "
                             "perform this operation."), ROLE, "MissingClaims"),
    "servicebus-ip-filter": ("servicebus", 403, {},
                             b"<Error><Code>403</Code><Detail>Ip has been prevented to connect "
                             b"to the endpoint.</Detail></Error>", NETWORK, "Forbidden"),
    "eventhubs-ip-filter": ("eventhubs", 403, {},
                            b"<Error><Code>403</Code><Detail>The client is rejected by "
                            b"IpFilter.</Detail></Error>", NETWORK, "Forbidden"),
    "servicebus-other-403": ("servicebus", 403, {},
                             b"<Error><Code>403</Code><Detail>Quota exceeded.</Detail></Error>",
                             OTHER, "Forbidden"),
    "servicebus-401": ("servicebus", 401, {},
                       b"<Error><Code>401</Code><Detail>ExpiredToken: The token is expired."
                       b"</Detail></Error>", TOKEN, "Unauthorized"),
    # -- Event Grid --
    "eventgrid-role": ("eventgrid", 401, {},
                       error("Unauthorized", "The principal associated with access token "
                             "presented with the incoming request does not have permission to "
                             "send data to /subscriptions/s/topics/t."), ROLE, "Unauthorized"),
    "eventgrid-ip-filter": ("eventgrid", 403, {},
                            error("Forbidden", "Publishing to t by client 203.0.113.9 is "
                                  "rejected due to IpAddress filtering rules."), NETWORK,
                            "Forbidden"),
    "eventgrid-private-endpoint": ("eventgrid", 403, {},
                                   error("Forbidden", "Publishing to t by client is rejected "
                                         "since request came from private endpoint and no "
                                         "matching private endpoint connection found."),
                                   NETWORK, "Forbidden"),
    "eventgrid-other-403": ("eventgrid", 403, {}, error("Forbidden", "Forbidden"), OTHER,
                            "Forbidden"),
    "eventgrid-401": ("eventgrid", 401, {}, error("Unauthorized", "Token expired."), TOKEN,
                      "Unauthorized"),
    # -- App Configuration --
    "appconfig-role": ("appconfig", 403, {}, b"", ROLE, "Forbidden"),
    "appconfig-ip": ("appconfig", 403, {"content-type": "application/problem+json"},
                     {"type": "https://azconfig.io/errors/ip-address-rejected",
                      "title": "Access to this resource is governed by a network access "
                               "policy.", "status": 403}, NETWORK, "ip-address-rejected"),
    "appconfig-nsp": ("appconfig", 403, {"content-type": "application/problem+json"},
                      {"type": "https://azconfig.io/errors/nsp-rejected",
                       "title": "Access to this resource is governed by a Network Security "
                                "Perimeter.", "status": 403}, NETWORK, "nsp-rejected"),
    "appconfig-other-problem": ("appconfig", 403, {},
                                {"type": "https://azconfig.io/errors/read-only",
                                 "status": 403}, OTHER, "read-only"),
    "appconfig-401": ("appconfig", 401, {}, b"", TOKEN, "Unauthorized"),
    # -- AI Search --
    "search-role": ("search", 403, {}, error("", "Authorization failed."), ROLE,
                    "AuthorizationFailed"),
    "search-bare-403": ("search", 403, {}, b"", OTHER, "Forbidden"),
    "search-other-403": ("search", 403, {}, error("Forbidden", "Forbidden"), OTHER, "Forbidden"),
    # -- services that do not say why --
    "maps-403": ("maps", 403, {}, error("403 Forbidden", "Permission, capacity, or "
                                        "authentication issues."), OTHER, "403 Forbidden"),
    "communication-403": ("communication", 403, {}, error("Forbidden", "Forbidden"), OTHER,
                          "Forbidden"),
    "signalr-403": ("signalr", 403, {}, b"", OTHER, "Forbidden"),
    "webpubsub-403": ("webpubsub", 403, {}, b"", OTHER, "Forbidden"),
    "signalr-401": ("signalr", 401, {}, b"", TOKEN, "Unauthorized"),
    # -- a service keyless knows nothing about (a custom route's own name) --
    "custom-403": ("route-b", 403, {}, error("PermissionDenied", "no"), OTHER,
                   "PermissionDenied"),
}


def headers_of(headers: dict[str, str]):
    lowered = {k.lower(): v for k, v in headers.items()}
    return lambda name: lowered.get(name.lower())


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_refusal_is_read_as_what_the_service_means(case):
    service, status, headers, data, kind, code = CASES[case]
    refusal = read_refusal(service, status, headers_of(headers), body(data))
    assert refusal is not None
    assert (refusal.kind, refusal.code) == (kind, code)
    assert refusal.meaning  # every refusal explains itself in the log
    # rbac_denial (the RBAC hint, the metric, "no 401 replay") only for a missing role
    expected = code if kind is ROLE else None
    assert rbac_denial(service, status, headers_of(headers), body(data)) == expected


def family(service: str) -> str:
    return "storage" if service.startswith("storage-") else service


SERVICES = {family(case[0]) for case in CASES.values()}


@pytest.mark.parametrize("service", sorted(SERVICES - {"route-b"}))
def test_every_service_has_a_missing_role_case_or_none_at_all(service):
    """A service either has a documented missing-role answer (tested above) or never gets a
    hint: no 403 shape of a 'silent' service is read as a role."""
    kinds = {kind for s, _, _, _, kind, _ in CASES.values() if family(s) == service}
    silent = service in ("maps", "communication", "signalr", "webpubsub")
    assert (ROLE not in kinds) == silent, kinds
    assert kinds - {ROLE}, f"{service}: no refusal other than a missing role is tested"


@pytest.mark.parametrize("service", ["storage-blob", "cosmos", "keyvault", "openai",
                                     "servicebus", "eventhubs", "eventgrid", "appconfig",
                                     "search", "maps"])
@pytest.mark.parametrize("status", [200, 400, 404, 409, 429, 500])
def test_answers_other_than_401_and_403_are_no_refusal(service, status):
    role_like = body(error("PermissionDenied", "'Send' claim(s) are required", "ForbiddenByRbac"))
    headers = headers_of({"x-ms-error-code": "AuthorizationPermissionMismatch",
                          "x-ms-substatus": "5301"})
    assert read_refusal(service, status, headers, role_like) is None
    assert rbac_denial(service, status, headers, role_like) is None


def test_the_same_code_means_a_role_only_where_that_service_uses_it():
    """Codes are read per service: Storage's header code on Key Vault means nothing, Key
    Vault's inner code on OpenAI means nothing."""
    storage_header = headers_of({"x-ms-error-code": "AuthorizationPermissionMismatch"})
    assert rbac_denial("keyvault", 403, storage_header, b"") is None
    assert rbac_denial("openai", 403, headers_of({}),
                       body(error("Forbidden", "", "ForbiddenByRbac"))) is None
    assert rbac_denial("cosmos", 403, headers_of({"x-ms-substatus": "5300"}), b"") is None
    assert rbac_denial("storage-blob", 401, storage_header, b"") is None


def test_service_text_in_codes_is_short_and_plain():
    """The code goes into a log line: no control characters, no unbounded service text."""
    nasty = "Forbidden\r\nRBAC: fake line" + "x" * 500
    refusal = read_refusal("keyvault", 403, headers_of({}), body(error(nasty)))
    assert refusal is not None and refusal.kind is OTHER
    assert "\n" not in refusal.code and "\r" not in refusal.code and len(refusal.code) <= 64
    assert read_refusal("storage-blob", 403, headers_of({"x-ms-error-code": "\n\t"}),
                        b"").code == "Forbidden"


def test_bodies_that_are_not_json_or_not_utf8_are_read_safely():
    for data in (b"\xff\xfe\x00garbage", b"{not json", b"[1, 2]", b'"text"', b"null",
                 b"x" * 200_000):
        refusal = read_refusal("openai", 403, headers_of({}), data)
        assert refusal is not None and refusal.kind is OTHER


def test_every_kind_has_a_meaning():
    assert set(MEANINGS) == set(RefusalKind)
