"""Reading a service's refusal of a converted request: a missing role, or something else?

Per service, only the answers documented (or seen in public reports) to mean "this identity
lacks a data-plane role" count as one. Network rules, disabled key auth, rejected tokens and
the rest are told apart where the service says which; where it does not, the refusal stays
unclassified: no hint is better than a wrong one. Sources are named next to each rule;
"unverified" marks a shape taken from reports that no Microsoft document confirms.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

Header = Callable[[str], str | None]


class RefusalKind(StrEnum):
    MISSING_ROLE = "missing_role"  # assign a data-plane role
    ACCESS_POLICY = "access_policy"  # Key Vault in the access-policy model: no role helps
    NETWORK_RULES = "network_rules"  # the resource's firewall / private endpoint settings
    LOCAL_AUTH_DISABLED = "local_auth_disabled"  # key-based auth off; keyless sent a token
    TOKEN_REJECTED = "token_rejected"  # the token itself (audience, tenant, expiry)
    OTHER = "other"  # anything else, or the service does not say


MEANINGS: dict[RefusalKind, str] = {
    RefusalKind.MISSING_ROLE: "the identity lacks a data-plane role",
    RefusalKind.ACCESS_POLICY: "the vault uses access policies, not Azure RBAC: give the "
                               "identity an access policy on the vault (or switch the vault "
                               "to Azure RBAC and assign a role)",
    RefusalKind.NETWORK_RULES: "the service's firewall refused keyless' address (network "
                               "rules, public network access or private endpoints)",
    RefusalKind.LOCAL_AUTH_DISABLED: "key-based auth is disabled on the resource; expected "
                                     "for keys, but keyless sent this request with a token: "
                                     "please report it",
    RefusalKind.TOKEN_REJECTED: "the service rejected the token itself (audience, tenant or "
                                "expiry), not its permissions",
    RefusalKind.OTHER: "not recognised as a missing role",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: RefusalKind
    code: str  # the service's own name for it: short, never empty, safe to log
    detail: str = ""  # a more precise meaning than the kind's, when the service gives one

    @property
    def meaning(self) -> str:
        return self.detail or MEANINGS[self.kind]


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    header: Header
    data: Any  # the JSON body, or None
    text: str  # the body's start, lower case

    @property
    def error(self) -> dict[str, Any]:
        """The `error` object of Azure's usual JSON error body (empty if none)."""
        error = self.data.get("error") if isinstance(self.data, dict) else None
        return error if isinstance(error, dict) else {}

    @property
    def error_code(self) -> str:
        return str(self.error.get("code") or "")

    @property
    def inner_code(self) -> str:
        inner = self.error.get("innererror")
        return str(inner.get("code") or "") if isinstance(inner, dict) else ""

    def has(self, *phrases: str) -> bool:
        return any(phrase in self.text for phrase in phrases)


_UNSAFE = re.compile(r"[^A-Za-z0-9 ._:()/-]")


def _safe(code: str, fallback: str) -> str:
    """Service-chosen text goes into logs: keep it short and plain."""
    return _UNSAFE.sub("", code)[:64].strip() or fallback


def _status_code(answer: _Answer) -> str:
    return "Unauthorized" if answer.status == 401 else "Forbidden"


def _default(answer: _Answer, code: str = "", detail: str = "") -> Refusal:
    """A 401 is about the token (the 401 replay handles it); a 403 stays unclassified."""
    kind = RefusalKind.TOKEN_REJECTED if answer.status == 401 else RefusalKind.OTHER
    return Refusal(kind, _safe(code, _status_code(answer)), detail)


# -- per service ---------------------------------------------------------------------------------

# Storage: `x-ms-error-code`. AuthorizationPermissionMismatch ("not authorized to perform this
# operation using this permission") is the answer to a token whose identity lacks a data role
# (widely reported, e.g. microsoft/AzureStorageExplorer#1104; the SAS table in
# rest/api/storageservices/sas-error-codes uses it for a SAS lacking the permission).
# AuthorizationFailure is Storage's name for "other authorization errors" (same table) and what
# its network rules answer (widely reported; no Microsoft page lists it: unverified), hence the
# hedged detail. AuthenticationFailed is a 403 about the credential itself;
# KeyBasedAuthenticationNotPermitted when shared key is off (microsoft/rag-experiment-
# accelerator#866, Azure/AI-Landing-Zones#64). The
# Authorization*Mismatch codes other than Permission are SAS constraints (source IP, protocol,
# service, resource type): a converted request carries no SAS, so they stay "other".
_STORAGE: dict[str, tuple[RefusalKind, str]] = {
    "AuthorizationPermissionMismatch": (RefusalKind.MISSING_ROLE, ""),
    "AuthorizationFailure": (RefusalKind.NETWORK_RULES,
                             "the storage firewall refused keyless' address (Storage also "
                             "uses this code for other authorization failures)"),
    "AuthenticationFailed": (RefusalKind.TOKEN_REJECTED, ""),
    "InvalidAuthenticationInfo": (RefusalKind.TOKEN_REJECTED, ""),
    "KeyBasedAuthenticationNotPermitted": (RefusalKind.LOCAL_AUTH_DISABLED, ""),
}


def _storage(answer: _Answer) -> Refusal:
    code = answer.header("x-ms-error-code") or ""
    kind, detail = _STORAGE.get(code, (None, ""))
    if kind is None or (kind is RefusalKind.MISSING_ROLE and answer.status != 403):
        return _default(answer, code)
    return Refusal(kind, code, detail)


# Cosmos DB: 403 substatus 5301 "principal does not have required RBAC permissions"; 5300
# "cannot be authorized by AAD token in data plane" (a management operation, not a role);
# the firewall's 403 says "Request originated from IP ... blocked by your Cosmos DB account
# firewall settings" (learn.microsoft.com/azure/cosmos-db/nosql/troubleshoot-forbidden;
# Azure/azure-cosmos-dotnet-v3#3110, dotnet/efcore#32197). 401 "Local Authorization is
# disabled" answers keys (Azure/data-api-builder#1939).
def _cosmos(answer: _Answer) -> Refusal:
    substatus = _safe(answer.header("x-ms-substatus") or "", "none")
    code = f"{_status_code(answer)} (substatus {substatus})"
    if answer.status == 401 and answer.has("local authorization is disabled"):
        return Refusal(RefusalKind.LOCAL_AUTH_DISABLED, code)
    if answer.status == 403:
        if substatus == "5301":
            return Refusal(RefusalKind.MISSING_ROLE, code)
        if answer.has("firewall settings", "request originated from"):
            return Refusal(RefusalKind.NETWORK_RULES, code)
        if substatus == "5300":
            return Refusal(RefusalKind.OTHER, code, "an Entra token cannot authorize this "
                           "operation on the data plane (manage it through Azure Resource "
                           "Manager)")
    return _default(answer, code)


# Key Vault: 403 `Forbidden` with inner error ForbiddenByRbac (RBAC vault, no role),
# ForbiddenByFirewall (learn.microsoft.com/azure/key-vault/general/common-error-codes),
# AccessDenied (access-policy vault: "does not have secrets get permission"), ForbiddenByPolicy
# (e.g. an on-behalf-of requirement). Seen in hashicorp/terraform-provider-azurerm#20742,
# turbot/steampipe-plugin-azure#127, SparebankenVest/azure-key-vault-to-kubernetes#232.
_KEYVAULT: dict[str, tuple[RefusalKind, str]] = {
    "ForbiddenByRbac": (RefusalKind.MISSING_ROLE, ""),
    "ForbiddenByFirewall": (RefusalKind.NETWORK_RULES, ""),
    "AccessDenied": (RefusalKind.ACCESS_POLICY, ""),
    "ForbiddenByPolicy": (RefusalKind.OTHER, "a vault policy refused the caller (e.g. it "
                                             "requires the on-behalf-of flow)"),
}


def _keyvault(answer: _Answer) -> Refusal:
    inner = answer.inner_code
    kind, detail = _KEYVAULT.get(inner, (None, ""))
    if answer.status != 403 or kind is None:
        return _default(answer, inner or answer.error_code)
    return Refusal(kind, _safe(inner, "Forbidden"), detail)


# Azure OpenAI / AI services: `PermissionDenied` ("The principal ... lacks the required data
# action"), as 401 or 403 (MicrosoftDocs/azure-docs#114370, microsoft-foundry/foundry-samples
# #155). Network rules answer 403 with code "403" and a message naming them
# (Azure-Samples/azure-sql-db-chatbot#3, continuedev/continue#12547,
# TabularEditor/TabularEditor3#1557). AuthenticationTypeDisabled for keys on a resource with
# local auth off: unverified.
_AI_NETWORK = ("virtual network/firewall rules", "virtual network is configured",
               "public access is disabled", "approved private endpoint")


def _openai(answer: _Answer) -> Refusal:
    code = answer.error_code
    if code == "PermissionDenied":
        return Refusal(RefusalKind.MISSING_ROLE, code)
    if answer.status == 403 and answer.has(*_AI_NETWORK):
        return Refusal(RefusalKind.NETWORK_RULES, _safe(code, "Forbidden"))
    if code == "AuthenticationTypeDisabled":  # unverified
        return Refusal(RefusalKind.LOCAL_AUTH_DISABLED, code)
    return _default(answer, code)


# Service Bus / Event Hubs REST: 401 "Unauthorized access. 'Send' claim(s) are required to
# perform this operation" when the token's identity lacks the Sender/Receiver role
# (Azure/azure-service-bus#354, Azure/azure-sdk-for-net#60290). The IP filter's and disabled
# local auth's HTTP answers are not documented: the phrases below are unverified.
_MESSAGING_NETWORK = ("ip has been prevented", "ipfilter", "ip filter",
                      "public network access is disabled")


def _messaging(answer: _Answer) -> Refusal:
    if answer.has("claim(s) are required"):
        return Refusal(RefusalKind.MISSING_ROLE, "MissingClaims")
    if answer.has(*_MESSAGING_NETWORK):  # unverified
        return Refusal(RefusalKind.NETWORK_RULES, _status_code(answer))
    return _default(answer)


# Event Grid: a token whose identity lacks EventGrid Data Sender gets 401 `Unauthorized`, "The
# principal associated with access token ... does not have permission to send data"
# (Azure/azure-sdk-for-net#22831). Network rules answer 403 "... is rejected due to IpAddress
# filtering rules" or "... no matching private endpoint connection"
# (learn.microsoft.com/azure/event-grid/troubleshoot-errors).
def _eventgrid(answer: _Answer) -> Refusal:
    code = answer.error_code
    if answer.status == 401 and answer.has("does not have permission to send data"):
        return Refusal(RefusalKind.MISSING_ROLE, _safe(code, "Unauthorized"))
    if answer.status == 403 and answer.has("ipaddress filtering rules",
                                           "matching private endpoint connection"):
        return Refusal(RefusalKind.NETWORK_RULES, _safe(code, "Forbidden"))
    return _default(answer, code)


# App Configuration: the missing role is a bare 403 (rest-api-authorization-azure-ad "Errors";
# Azure/AppConfiguration#410, #206 show Content-Length: 0); network rules answer 403
# problem+json of type https://azconfig.io/errors/ip-address-rejected or nsp-rejected
# (learn.microsoft.com/azure/azure-app-configuration/network-access-errors).
_APPCONFIG_NETWORK = ("ip-address-rejected", "nsp-rejected")


def _appconfig(answer: _Answer) -> Refusal:
    problem = answer.data.get("type") if isinstance(answer.data, dict) else None
    problem_name = str(problem).rstrip("/").rsplit("/", 1)[-1] if problem else ""
    if answer.status == 403:
        if problem_name in _APPCONFIG_NETWORK:
            return Refusal(RefusalKind.NETWORK_RULES, problem_name)
        if not answer.text.strip():
            return Refusal(RefusalKind.MISSING_ROLE, "Forbidden")
    return _default(answer, problem_name or answer.error_code)


# AI Search: 403 {"error": {"code": "", "message": "Authorization failed."}} for a token without
# a data-plane role (microsoft/sample-app-aoai-chatGPT#624, relayed by Azure OpenAI: unverified
# for a direct call). The IP firewall's answer is not documented: stays unclassified.
def _search(answer: _Answer) -> Refusal:
    message = str(answer.error.get("message") or "").strip().lower()
    if answer.status == 403 and message == "authorization failed.":
        return Refusal(RefusalKind.MISSING_ROLE, _safe(answer.error_code, "AuthorizationFailed"))
    return _default(answer, answer.error_code)


# Communication Services, Maps, SignalR, Web PubSub: nothing documents an answer that tells a
# missing role from the resource's network rules (Maps answers "Permission, capacity, or
# authentication issues.", Azure-Samples/Azure-Maps-AzureAD-Samples#4). Unclassified.
_SILENT = "the service does not say whether a role, its network rules or something else " \
          "refused it"


def _silent(answer: _Answer) -> Refusal:
    return _default(answer, answer.error_code, _SILENT if answer.status == 403 else "")


def _generic(answer: _Answer) -> Refusal:
    """A service keyless has no rules for (e.g. a custom route): never a role."""
    return _default(answer, answer.error_code)


_READERS: dict[str, Callable[[_Answer], Refusal]] = {
    "cosmos": _cosmos,
    "keyvault": _keyvault,
    "openai": _openai,
    "servicebus": _messaging,
    "eventhubs": _messaging,
    "eventgrid": _eventgrid,
    "appconfig": _appconfig,
    "search": _search,
    "communication": _silent,
    "maps": _silent,
    "signalr": _silent,
    "webpubsub": _silent,
}


def _json(body: bytes) -> Any:
    try:
        return json.loads(body[:65536] or b"null")
    except ValueError:
        return None


def read_refusal(service: str, status: int, header: Header, body: bytes) -> Refusal | None:
    """What a 401 or 403 from `service` to a token-bearing request means; None otherwise."""
    if status not in (401, 403):
        return None
    answer = _Answer(status, header, _json(body), body[:4096].decode("utf-8", "replace").lower())
    if service.startswith("storage-"):
        return _storage(answer)
    return _READERS.get(service, _generic)(answer)


def rbac_denial(service: str, status: int, header: Header, body: bytes) -> str | None:
    """The service's own name for an RBAC denial, or None when the refusal is something else
    (network rules, a bad token, disabled key auth, or a refusal the service does not explain)."""
    refusal = read_refusal(service, status, header, body)
    return refusal.code if refusal is not None and refusal.kind is RefusalKind.MISSING_ROLE \
        else None
