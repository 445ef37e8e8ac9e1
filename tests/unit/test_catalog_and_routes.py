"""The service catalog across clouds, user routes, and challenge-learned scopes."""

from __future__ import annotations

import pytest

from proxy.catalog import Catalog, builtin_services
from proxy.challenge import ChallengeScopes, scope_from_challenge
from proxy.routes import parse_routes
from proxy.tokens import Identity

CATALOG = Catalog(builtin_services(maps_client_id="3a3a3a3a-0000-4000-8000-00000000a71a",
                                   keyvault_swap_bearer=True))


@pytest.mark.parametrize(
    ("host", "path", "service", "scope"),
    [
        ("acct.documents.azure.com", "/dbs", "cosmos", "https://acct.documents.azure.com/.default"),
        ("acct-westus2.documents.azure.com", "/", "cosmos",
         "https://acct.documents.azure.com/.default"),
        ("my-db.documents.azure.cn", "/", "cosmos", "https://my-db.documents.azure.cn/.default"),
        ("acct-usgovvirginia.documents.azure.us", "/", "cosmos",
         "https://acct.documents.azure.us/.default"),
        ("ns.servicebus.windows.net", "/q/messages", "servicebus",
         "https://servicebus.azure.net/.default"),
        ("ns.servicebus.windows.net", "/hub/partitions/0/messages", "eventhubs",
         "https://eventhubs.azure.net/.default"),
        ("ns.servicebus.windows.net", "/hub/publishers/p1/messages", "eventhubs",
         "https://eventhubs.azure.net/.default"),
        ("ns.servicebus.usgovcloudapi.net", "/q/messages", "servicebus",
         "https://servicebus.azure.net/.default"),
        ("topic.westus2-1.eventgrid.azure.net", "/api/events", "eventgrid",
         "https://eventgrid.azure.net/.default"),
        ("store.azconfig.io", "/kv", "appconfig", "https://azconfig.io/.default"),
        ("store.appconfig.azure.com", "/kv", "appconfig", "https://appconfig.azure.com/.default"),
        ("store.azconfig.azure.us", "/kv", "appconfig", "https://azconfig.azure.us/.default"),
        ("res.openai.azure.com", "/", "openai", "https://cognitiveservices.azure.com/.default"),
        ("res.cognitiveservices.azure.com", "/", "openai",
         "https://cognitiveservices.azure.com/.default"),
        ("res.services.ai.azure.com", "/", "openai",
         "https://cognitiveservices.azure.com/.default"),
        ("res.openai.azure.us", "/", "openai", "https://cognitiveservices.azure.us/.default"),
        ("res.cognitiveservices.azure.cn", "/", "openai",
         "https://cognitiveservices.azure.cn/.default"),
        ("westus2.api.cognitive.microsoft.com", "/", "ai-regional", ""),
        ("svc.search.windows.net", "/", "search", "https://search.azure.com/.default"),
        ("svc.search.azure.us", "/", "search", "https://search.azure.us/.default"),
        ("acs.communication.azure.com", "/", "communication",
         "https://communication.azure.com/.default"),
        ("acs.unitedstates.communication.azure.com", "/", "communication",
         "https://communication.azure.com/.default"),
        ("atlas.microsoft.com", "/", "maps", "https://atlas.microsoft.com/.default"),
        ("eu.atlas.microsoft.com", "/", "maps", "https://atlas.microsoft.com/.default"),
        ("hub.service.signalr.net", "/api", "signalr", "https://signalr.azure.com/.default"),
        ("hub.webpubsub.azure.com", "/api", "webpubsub", "https://webpubsub.azure.com/.default"),
        ("kv.vault.azure.net", "/secrets/s", "keyvault", "challenge"),
        ("hsm.managedhsm.azure.net", "/keys", "keyvault", "challenge"),
    ],
)
def test_catalog_knows_each_service_and_its_scope(host, path, service, scope):
    target = CATALOG.match(host, path)
    assert target is not None and (target.service.name, target.scope) == (service, scope)
    assert CATALOG.intercepts(host)


@pytest.mark.parametrize(
    "host",
    ["acct.documents.azure.com.evil.test", "documents.azure.com", "a.b.documents.azure.com",
     "evilservicebus.windows.net", "ns.servicebus.windows.net.", "x.openai.azure.com.cn",
     "openai.azure.com", "atlas.microsoft.com.evil.test", "evil-atlas.microsoft.com",
     "kv.vault.azure.net.evil", "topic.eventgrid.azure.net", "store.azconfig.io.evil"],
)
def test_catalog_rejects_lookalikes(host):
    assert not CATALOG.intercepts(host)
    assert CATALOG.match(host) is None


def test_key_vault_and_maps_need_settings():
    plain = Catalog()
    assert plain.match("kv.vault.azure.net") is None  # Key Vault is tunnelled unless enabled
    maps = plain.match("atlas.microsoft.com")
    assert maps is not None and "maps-client-id" in (maps.service.not_configured or "")
    assert CATALOG.match("atlas.microsoft.com").service.not_configured is None  # type: ignore


def test_routes_come_first_and_carry_their_identity():
    routes = parse_routes(
        [
            {"host": "ns1.servicebus.windows.net", "service": "eventhubs"},
            {"host": "storage-*.contoso.internal", "service": "storage-blob",
             "client-id": "AAAAAAAA-0000-4000-8000-00000000000A"},
            {"host": "api.contoso.internal", "scope": "api://x/.default", "strip": ["api-key"],
             "client-id": "bbbbbbbb-0000-4000-8000-00000000000b"},
            {"host": "cosmos.contoso.internal", "service": "cosmos",
             "scope": "https://acct.documents.azure.com/.default"},
        ],
        CATALOG,
    )
    catalog = CATALOG.with_routes(routes)
    assert catalog.match("ns1.servicebus.windows.net", "/q/messages").service.name == "eventhubs"  # type: ignore
    assert catalog.match("ns2.servicebus.windows.net", "/q/messages").service.name == "servicebus"  # type: ignore
    blob = catalog.match("storage-a.contoso.internal")
    assert blob is not None and blob.scope == "https://storage.azure.com/.default"
    assert blob.service.identity == Identity("aaaaaaaa-0000-4000-8000-00000000000a")
    assert catalog.match("storage-a.b.contoso.internal") is None  # * is one name part
    api = catalog.match("api.contoso.internal")
    assert api is not None and api.scope == "api://x/.default"
    assert api.service.name == "route:api.contoso.internal"
    assert api.service.conversion is not None and api.service.conversion.token_format == "bearer"
    search = parse_routes([{"host": "search.contoso.internal", "service": "search"}], CATALOG)
    assert search[0].scope == "https://search.azure.com/.default"  # public cloud by default
    cosmos = catalog.match("cosmos.contoso.internal")
    assert cosmos is not None and cosmos.service.conversion.token_format == "cosmos"  # type: ignore


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"service": "storage-blob"}, "host is required"),
        ({"host": "a.test"}, "give a service or a scope"),
        ({"host": "a.test", "service": "nope"}, "unknown service 'nope'"),
        ({"host": "a.test", "service": "cosmos"}, "explicit scope"),
        ({"host": "a.test", "scope": "https://x/.default"}, "strip must list"),
        ({"host": "a.test", "scope": "https://x/.default", "strip": ["password"]},
         "strip must list"),
        ({"host": "a.test", "service": "search", "client-id": "me"}, "client-id must be a GUID"),
        ({"host": "bad host.test", "service": "search"}, "lowercase DNS name"),
        ({"host": "a.test", "service": "search", "hosts": "x"}, "unknown key"),
        ({"host": "a.test", "scope": "https://x/.default", "strip": ["api-key"],
          "token-format": "basic"}, "token-format"),
    ],
)
def test_bad_routes_are_reported_clearly(route, message):
    with pytest.raises(ValueError, match=message):
        parse_routes([route], CATALOG)


@pytest.mark.parametrize(
    ("header", "scope"),
    [
        ('Bearer authorization="https://login.microsoftonline.com/t", '
         'resource="https://vault.azure.net"', "https://vault.azure.net/.default"),
        ('Bearer authorization="https://login.microsoftonline.com/t", '
         'scope="https://vault.azure.net/.default"', "https://vault.azure.net/.default"),
        ('Bearer resource="https://managedhsm.azure.net/"', "https://managedhsm.azure.net/.default"),
        ('Bearer resource="https://evil.test"', None),
        ('Bearer resource="http://vault.azure.net"', None),
        ('Basic realm="x"', None),
        ("Bearer", None),
    ],
)
def test_scope_from_a_key_vault_challenge(header, scope):
    assert scope_from_challenge(header) == scope


def test_challenge_scopes_are_remembered_per_host():
    scopes = ChallengeScopes()
    assert scopes.get("kv.vault.azure.net") is None
    scopes.learn("kv.vault.azure.net", 'Bearer resource="https://vault.azure.net"')
    scopes.learn("kv.vault.azure.net", 'Bearer resource="https://evil.test"')  # ignored
    assert scopes.get("kv.vault.azure.net") == "https://vault.azure.net/.default"
