"""The catalog of Azure data-plane services keyless converts: data, not code.

Each entry names the service, the host names it answers on in every cloud we know of (a
regular expression over the whole lowercased host; named groups feed the scope template), an
optional path pattern, the token scope, and the conversion for the key schemes it accepts.
User routes (see `proxy.routes`) come first and may add hosts, scopes and identities.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from proxy.conversions import Conversion, MinimumStorageVersion, SetHeaders, conversion
from proxy.tokens import Identity

# Scope placeholder for services whose scope comes from the service's own 401 challenge.
CHALLENGE_SCOPE = "challenge"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    host_pattern: str
    scope: str  # may hold {group} placeholders filled from the host pattern's named groups
    conversion: Conversion | None  # None: reported, never converted
    path_pattern: str | None = None  # matched at the start of the path, when given
    identity: Identity | None = None  # None: the default identity
    not_configured: str | None = None  # a reason to refuse: keyless lacks a setting it needs
    note: str = ""


@dataclass(frozen=True, slots=True)
class Target:
    """What one request resolved to: the service and the scope for this host."""

    service: Service
    scope: str
    resource: str = ""  # the Azure resource's name: account, namespace, vault, ...


# Resource labels: any name under an Azure-owned zone is Microsoft's, so the zone is what makes
# a host Azure; per-service naming rules (lengths) would add no safety, only drift.
def _alternatives(*suffixes: str) -> str:
    return "(?:" + "|".join(re.escape(s) for s in suffixes) + ")"


# Storage ------------------------------------------------------------------------------------
STORAGE_SCOPE = "https://storage.azure.com/.default"
STORAGE_SUFFIXES = ("core.windows.net", "core.chinacloudapi.cn", "core.usgovcloudapi.net")


def _storage_hosts(endpoint: str) -> str:
    account = r"[a-z0-9]{3,24}"
    return (
        # {account}[-secondary][.privatelink].{endpoint}.{cloud suffix}
        rf"{account}(?:-secondary)?(?:\.privatelink)?\.{endpoint}\.{_alternatives(*STORAGE_SUFFIXES)}"
        # Azure DNS zone endpoints: {account}.z{NN}.{endpoint}.storage.azure.net
        rf"|{account}\.z\d{{2}}\.{endpoint}\.storage\.azure\.net"
    )


_STORAGE = conversion("SharedKey", "SAS", fixes=(MinimumStorageVersion("2017-11-09"),))
_FILES = conversion(
    "SharedKey", "SAS",
    fixes=(MinimumStorageVersion("2022-11-02"),
           SetHeaders((("x-ms-file-request-intent", "backup"),))),
)

# Cosmos DB: regional endpoints are {account}-{region}; the token is for the account.
_REGION_NAMES = (
    "eastus eastus2 eastus3 westus westus2 westus3 centralus northcentralus southcentralus "
    "westcentralus canadacentral canadaeast brazilsouth brazilsoutheast mexicocentral "
    "northeurope westeurope uksouth ukwest francecentral francesouth germanywestcentral "
    "germanynorth switzerlandnorth switzerlandwest norwayeast norwaywest swedencentral "
    "swedensouth polandcentral italynorth spaincentral austriaeast belgiumcentral "
    "denmarkeast finlandcentral greececentral eastasia southeastasia japaneast japanwest "
    "koreacentral koreasouth australiaeast australiasoutheast australiacentral "
    "australiacentral2 centralindia southindia westindia jioindiawest jioindiacentral "
    "uaenorth uaecentral qatarcentral israelcentral southafricanorth southafricawest "
    "newzealandnorth indonesiacentral malaysiawest taiwannorth chilecentral "
    "usgovvirginia usgovarizona usgovtexas usgoviowa usdodeast usdodcentral "
    "chinaeast chinaeast2 chinaeast3 chinanorth chinanorth2 chinanorth3"
)
AZURE_REGIONS = tuple(_REGION_NAMES.split())
_COSMOS_HOSTS = (
    rf"(?P<account>[a-z0-9][a-z0-9-]*?)(?:-(?:{'|'.join(AZURE_REGIONS)}))?"
    rf"\.(?P<suffix>documents\.azure\.com|documents\.azure\.cn|documents\.azure\.us)"
)
EVENT_HUBS_PATHS = r"/[^/?]+/(?:partitions|publishers|consumergroups)(?:[/?]|$)"
_SERVICE_BUS_HOSTS = r"[a-z0-9][a-z0-9-]*\.(?:servicebus\.windows\.net|" \
    r"servicebus\.usgovcloudapi\.net|servicebus\.chinacloudapi\.cn)"
_API_KEY = conversion("api-key", "api-key-query")
_HMAC = conversion("HMAC-SHA256")
_ACCESS_KEY_JWT = conversion("access-key-jwt")


def builtin_services(
    maps_client_id: str | None = None, keyvault_swap_bearer: bool = False
) -> tuple[Service, ...]:
    maps_fix = (SetHeaders((("x-ms-client-id", maps_client_id),)),) if maps_client_id else ()
    services = [
        Service("storage-blob", _storage_hosts("blob"), STORAGE_SCOPE, _STORAGE),
        Service("storage-dfs", _storage_hosts("dfs"), STORAGE_SCOPE, _STORAGE),
        Service("storage-queue", _storage_hosts("queue"), STORAGE_SCOPE, _STORAGE),
        Service("storage-table", _storage_hosts("table"), STORAGE_SCOPE, _STORAGE),
        Service("storage-file", _storage_hosts("file"), STORAGE_SCOPE, _FILES),
        Service("cosmos", _COSMOS_HOSTS, "https://{account}.{suffix}/.default",
                conversion("cosmos-key", token_format="cosmos")),
        # Event Hubs and Service Bus share the namespace suffix: paths that only Event Hubs
        # has decide; anything else is Service Bus unless a route says otherwise.
        Service("eventhubs", _SERVICE_BUS_HOSTS, "https://eventhubs.azure.net/.default",
                conversion("SharedAccessSignature"), path_pattern=EVENT_HUBS_PATHS),
        Service("servicebus", _SERVICE_BUS_HOSTS, "https://servicebus.azure.net/.default",
                conversion("SharedAccessSignature")),
        Service("eventgrid",
                r"[a-z0-9][a-z0-9-]*\.[a-z0-9]+-1\.eventgrid\.azure\.(?:net|us|cn)",
                "https://eventgrid.azure.net/.default",
                conversion("aeg-sas-key", "aeg-sas-key-query", "aeg-sas-token",
                           "SharedAccessSignature")),
        Service("appconfig",
                r"[a-z0-9][a-z0-9-]*\.(?P<audience>azconfig\.io|appconfig\.azure\.com"
                r"|azconfig\.azure\.us|appconfig\.azure\.us|azconfig\.azure\.cn"
                r"|appconfig\.azure\.cn)",
                "https://{audience}/.default", _HMAC),
        Service("openai",
                r"[a-z0-9][a-z0-9-]*\.(?:openai|cognitiveservices)"
                r"\.azure\.(?P<tld>com|us|cn)"
                r"|[a-z0-9][a-z0-9-]*\.services\.ai\.azure\.(?P<tld2>com)",
                "https://cognitiveservices.azure.{tld}/.default",
                conversion("api-key", "api-key-query", "Ocp-Apim-Subscription-Key")),
        Service("ai-regional",
                r"[a-z0-9]+\.api\.cognitive\.microsoft\.com|[a-z0-9]+\.api\.cognitive\.azure\.cn",
                "", None, note="regional Cognitive Services endpoints do not accept Entra "
                "tokens; use the resource's custom subdomain endpoint"),
        Service("search",
                r"[a-z0-9][a-z0-9-]*\.search\.(?:windows\.net|azure\.(?P<tld>us|cn))",
                "https://search.azure.{tld}/.default", _API_KEY),
        Service("communication",
                r"[a-z0-9][a-z0-9-]*(?:\.[a-z]+)?\.communication\.azure\.(?:com|us)",
                "https://communication.azure.com/.default", _HMAC),
        Service("maps", r"(?:(?:us|eu)\.)?atlas\.microsoft\.com|atlas\.azure\.us",
                "https://atlas.microsoft.com/.default",
                conversion("subscription-key", "subscription-key-query", fixes=maps_fix),
                not_configured=None if maps_client_id else
                "Azure Maps needs the account's client id: set maps-client-id"),
        Service("signalr",
                r"[a-z0-9][a-z0-9-]*\.service\.signalr\.net"
                r"|[a-z0-9][a-z0-9-]*\.signalr\.azure\.(?:us|cn)",
                "https://signalr.azure.com/.default", _ACCESS_KEY_JWT),
        Service("webpubsub", r"[a-z0-9][a-z0-9-]*\.webpubsub\.azure\.com",
                "https://webpubsub.azure.com/.default", _ACCESS_KEY_JWT),
    ]
    if keyvault_swap_bearer:
        services.append(Service(
            "keyvault",
            r"[a-z0-9][a-z0-9-]*\.(?:vault|managedhsm)\.(?:azure\.net|azure\.cn"
            r"|usgovcloudapi\.net)",
            CHALLENGE_SCOPE, conversion("bearer"),
        ))
    return tuple(services)


def fill_scope(template: str, groups: dict[str, str | None]) -> str:
    """Fill a scope template from a host match; unset cloud groups mean the public cloud."""
    values = {k: v for k, v in groups.items() if v is not None}
    if "tld" in template and "tld" not in values:
        values["tld"] = values.get("tld2") or "com"
    return template.format(**values)


class Catalog:
    """Finds the service a request belongs to. Exact, case-insensitive, no trailing dot."""

    def __init__(self, services: Iterable[Service] | None = None) -> None:
        self.services = tuple(builtin_services() if services is None else services)
        self._compiled = [
            (re.compile(s.host_pattern), re.compile(s.path_pattern) if s.path_pattern else None, s)
            for s in self.services
        ]
        self.intercepts = lru_cache(maxsize=4096)(self._intercepts)
        self._candidates = lru_cache(maxsize=4096)(self._candidates_for)

    def by_name(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    def _intercepts(self, host: str) -> bool:
        return bool(self._candidates(host.lower()))

    def _candidates_for(self, host: str) -> tuple[tuple[re.Pattern[str] | None, Target], ...]:
        found = []
        for host_re, path_re, service in self._compiled:
            if match := host_re.fullmatch(host):
                groups = match.groupdict()
                scope = service.scope and fill_scope(service.scope, groups)
                resource = groups.get("account") or host.split(".")[0].removesuffix("-secondary")
                found.append((path_re, Target(service, scope, resource)))
        return tuple(found)

    def match(self, host: str, path: str = "/") -> Target | None:
        for path_re, target in self._candidates(host.lower()):
            if path_re is None or path_re.match(path):
                return target
        return None

    def with_routes(self, routes: Iterable[Service]) -> Catalog:
        return Catalog((*routes, *self.services))

    def permitted_zones(self) -> tuple[str, ...]:
        """The DNS zones every host this catalog intercepts lies in (for the CA's X.509 Name
        Constraints): each host pattern's fixed tail, cut at a label boundary, narrowest
        zones folded into wider ones. A `*` inside a label (storage-*.contoso.internal) gives
        the parent zone (contoso.internal); a pattern with no fixed zone is refused."""
        zones: set[str] = set()
        for service in self.services:
            zones.update(host_pattern_zones(service.host_pattern))
        return fold_zones(zones)


# Permitted zones: read off the host patterns themselves (re's own parser), so a new catalog
# entry or route can never be forgotten in the CA's constraints.
_MAX_FORMS = 4096


def _literal_forms(items: list[tuple[object, object]]) -> set[str] | None:
    """Every string a regex sequence matches, when it only spells out fixed text (literals,
    alternatives, optional parts); None when it matches open-ended text."""
    from re import _constants as c  # private, but stable since Python 3.11

    forms = {""}
    for op, arg in items:
        if op is c.LITERAL:
            options: set[str] | None = {chr(arg)}  # type: ignore[arg-type]
        elif op is c.BRANCH:
            options = set()
            for alternative in arg[1]:  # type: ignore[index]
                found = _literal_forms(list(alternative))
                if found is None:
                    return None
                options |= found
        elif op is c.SUBPATTERN:
            options = _literal_forms(list(arg[3]))  # type: ignore[index]
        elif op is c.IN and all(o is c.LITERAL for o, _ in arg):  # type: ignore[attr-defined]
            options = {chr(v) for _, v in arg}  # type: ignore[attr-defined]
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT) and arg[:2] == (0, 1):  # type: ignore[index]
            found = _literal_forms(list(arg[2]))  # type: ignore[index]
            options = None if found is None else found | {""}
        else:
            return None
        if options is None or len(forms) * len(options) > _MAX_FORMS:
            return None
        forms = {head + tail for head in forms for tail in options}
    return forms


def host_pattern_zones(pattern: str) -> set[str]:
    """The zones of one host pattern: the fixed tail of each way it can match."""
    from re import _parser

    return _sequence_zones(list(_parser.parse(pattern)), {""}, pattern)


def _sequence_zones(items: list[tuple[object, object]], tails: set[str],
                    pattern: str) -> set[str]:
    from re import _constants as c

    start = len(items)
    while start > 0:
        op, arg = items[start - 1]
        forms = _literal_forms([items[start - 1]])
        if forms is not None and len(forms) * len(tails) <= _MAX_FORMS:
            tails = {head + tail for head in forms for tail in tails}
            start -= 1
        elif op is c.BRANCH:  # alternatives that are not all fixed text: follow each one
            return {zone for alternative in arg[1]  # type: ignore[index]
                    for zone in _sequence_zones([*items[:start - 1], *alternative], tails,
                                                pattern)}
        elif op is c.SUBPATTERN:
            return _sequence_zones([*items[:start - 1], *arg[3]], tails, pattern)  # type: ignore[index]
        else:
            break
    zones = set()
    for tail in tails:
        # The whole host fixed: that name itself; else the open part ends inside a label or
        # at a dot, and the zone starts after it.
        zone = tail if start == 0 else tail.partition(".")[2]
        if not zone or (start > 0 and "." not in zone):
            shown = pattern.replace("[a-z0-9-]+", "*").replace("\\", "")  # a route's glob
            raise ValueError(f"host {shown!r} has no DNS zone of at least two labels "
                             "(keyless' CA would be allowed to sign names under a whole "
                             "top-level domain)")
        zones.add(zone)
    return zones


def fold_zones(zones: Iterable[str]) -> tuple[str, ...]:
    """Drop zones inside other zones (a Name Constraint on a zone covers its subdomains)."""
    kept: list[str] = []
    for zone in sorted(set(zones), key=lambda z: (z.count("."), z)):
        if not any(zone == k or zone.endswith("." + k) for k in kept):
            kept.append(zone)
    return tuple(sorted(kept))
