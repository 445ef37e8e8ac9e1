"""Which Azure resource each service's calls hit, and which built-in role an identity needs.

Data only. Role definition GUIDs are given where checked against Microsoft's published list;
elsewhere the report prints the command that looks the GUID up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServiceRoles:
    resource_type: str  # the ARM type of the resource named by the host's first label
    read: str  # role for reading
    write: str  # role for writing
    write_covers_read: bool = True  # Service Bus/Event Hubs: Sender cannot receive


ROLES: dict[str, ServiceRoles] = {
    "storage-blob": ServiceRoles("Microsoft.Storage/storageAccounts",
                                 "Storage Blob Data Reader", "Storage Blob Data Contributor"),
    "storage-dfs": ServiceRoles("Microsoft.Storage/storageAccounts",
                                "Storage Blob Data Reader", "Storage Blob Data Contributor"),
    "storage-queue": ServiceRoles("Microsoft.Storage/storageAccounts",
                                  "Storage Queue Data Reader", "Storage Queue Data Contributor"),
    "storage-table": ServiceRoles("Microsoft.Storage/storageAccounts",
                                  "Storage Table Data Reader", "Storage Table Data Contributor"),
    "storage-file": ServiceRoles("Microsoft.Storage/storageAccounts",
                                 "Storage File Data Privileged Reader",
                                 "Storage File Data Privileged Contributor"),
    "cosmos": ServiceRoles("Microsoft.DocumentDB/databaseAccounts",
                           "Cosmos DB Built-in Data Reader", "Cosmos DB Built-in Data Contributor"),
    "servicebus": ServiceRoles("Microsoft.ServiceBus/namespaces",
                               "Azure Service Bus Data Receiver", "Azure Service Bus Data Sender",
                               write_covers_read=False),
    "eventhubs": ServiceRoles("Microsoft.EventHub/namespaces",
                              "Azure Event Hubs Data Receiver", "Azure Event Hubs Data Sender",
                              write_covers_read=False),
    "eventgrid": ServiceRoles("Microsoft.EventGrid/topics",
                              "EventGrid Data Sender", "EventGrid Data Sender"),
    "appconfig": ServiceRoles("Microsoft.AppConfiguration/configurationStores",
                              "App Configuration Data Reader", "App Configuration Data Owner"),
    "openai": ServiceRoles("Microsoft.CognitiveServices/accounts",
                           "Cognitive Services OpenAI User", "Cognitive Services OpenAI User"),
    "search": ServiceRoles("Microsoft.Search/searchServices",
                           "Search Index Data Reader", "Search Index Data Contributor"),
    "communication": ServiceRoles("Microsoft.Communication/communicationServices",
                                  "Communication and Email Service Owner",
                                  "Communication and Email Service Owner"),
    "maps": ServiceRoles("Microsoft.Maps/accounts",
                         "Azure Maps Data Reader", "Azure Maps Data Contributor"),
    "signalr": ServiceRoles("Microsoft.SignalRService/signalR",
                            "SignalR App Server", "SignalR App Server"),
    "webpubsub": ServiceRoles("Microsoft.SignalRService/webPubSub",
                              "Web PubSub Service Owner", "Web PubSub Service Owner"),
    "keyvault": ServiceRoles("Microsoft.KeyVault/vaults",
                             "Key Vault Secrets User", "Key Vault Secrets Officer"),
}

# Databases and caches: no Azure RBAC role; the identity becomes a database principal (or a
# cache access-policy assignment), and the login user is its name.
LOGIN_SETUP: dict[str, tuple[str, ...]] = {
    "postgres": (
        "set a Microsoft Entra admin on the server (az postgres flexible-server ad-admin create)",
        "as that admin, in the postgres database: SELECT * FROM "
        "pgaadauth_create_principal('<identity name>', false, false);",
        "grant the new role what the app's old user had; the app (or ?user=) logs in as "
        "'<identity name>'",
        "then switch off password authentication: az postgres flexible-server update "
        "--password-auth Disabled",
    ),
    "mysql": (
        "set a Microsoft Entra admin on the server (az mysql flexible-server ad-admin create)",
        "as that admin: CREATE AADUSER '<identity name>' IDENTIFIED BY '<client id>'; then "
        "GRANT what the app's old user had",
        "the app (or ?user=) logs in as '<identity name>'",
    ),
    "redis": (
        "enable Microsoft Entra authentication on the cache (az redis update "
        "--set redisConfiguration.aad-enabled=true)",
        "az redis access-policy-assignment create --name <cache> --resource-group <group> "
        "--policy-name \"Data Contributor\" --object-id <principal id> --object-id-alias "
        "<identity name> --access-policy-assignment-name <identity name>",
        "then switch off access keys: az redis update --disable-access-key-authentication true",
    ),
}

# Role definition GUIDs checked against Microsoft's published list.
ROLE_IDS: dict[str, str] = {
    "Storage Blob Data Contributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
    "Storage Blob Data Reader": "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Azure Service Bus Data Sender": "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39",
    "Azure Service Bus Data Receiver": "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0",
    "Azure Event Hubs Data Sender": "2b629674-e913-4c01-ae53-ef4638d8f975",
    "Key Vault Secrets User": "4633458b-17de-408a-b874-0445c86b69e6",
}

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def operation_kind(service: str, method: str, path: str, headers_get) -> str:
    """"read" or "write", by method, with the read-shaped POSTs and DELETEs services use."""
    method = method.upper()
    route = path.partition("?")[0].lower()
    if method in READ_METHODS:
        return "read"
    if service == "search" and any(p in route for p in ("/docs/search", "/docs/suggest",
                                                        "/docs/autocomplete")):
        return "read"
    if service in ("servicebus", "eventhubs") and route.endswith("/messages/head"):
        return "read"  # receive (and receive-and-delete) needs the Receiver role
    if service == "cosmos" and (headers_get("x-ms-documentdb-isquery") or "").lower() == "true":
        return "read"
    if service == "openai":
        return "read"  # inference: one role covers it
    return "write"
