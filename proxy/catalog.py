"""The catalog of Azure data-plane services keyless converts: data, not code.

Each entry names the service, the host names it answers on in every cloud we know of, the
token scope, and the conversion (a strip/attach pair) for the key schemes it accepts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from proxy.conversions import Conversion, StorageConversion

STORAGE_SCOPE = "https://storage.azure.com/.default"
# Public, China (21Vianet) and US Government clouds.
STORAGE_SUFFIXES = ("core.windows.net", "core.chinacloudapi.cn", "core.usgovcloudapi.net")


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    host_pattern: str  # a regular expression matched against the whole lowercased host name
    scope: str
    conversion: Conversion


def _storage_hosts(endpoint: str) -> str:
    suffixes = "|".join(re.escape(s) for s in STORAGE_SUFFIXES)
    account = r"[a-z0-9]{3,24}"
    return (
        # {account}[-secondary][.privatelink].{endpoint}.{cloud suffix}
        rf"{account}(?:-secondary)?(?:\.privatelink)?\.{endpoint}\.(?:{suffixes})"
        # Azure DNS zone endpoints: {account}.z{NN}.{endpoint}.storage.azure.net
        rf"|{account}\.z\d{{2}}\.{endpoint}\.storage\.azure\.net"
    )


_BLOB_LIKE = StorageConversion()
_FILES = StorageConversion(
    min_version="2022-11-02", extra_headers=(("x-ms-file-request-intent", "backup"),)
)

BUILTIN_SERVICES: tuple[Service, ...] = (
    Service("storage-blob", _storage_hosts("blob"), STORAGE_SCOPE, _BLOB_LIKE),
    Service("storage-dfs", _storage_hosts("dfs"), STORAGE_SCOPE, _BLOB_LIKE),
    Service("storage-queue", _storage_hosts("queue"), STORAGE_SCOPE, _BLOB_LIKE),
    Service("storage-table", _storage_hosts("table"), STORAGE_SCOPE, _BLOB_LIKE),
    Service("storage-file", _storage_hosts("file"), STORAGE_SCOPE, _FILES),
)


class Catalog:
    """Finds the service a host name belongs to. Exact, case-insensitive, no trailing dot."""

    def __init__(self, services: Iterable[Service] = BUILTIN_SERVICES) -> None:
        self.services = tuple(services)
        self._patterns = [(re.compile(s.host_pattern), s) for s in self.services]
        self.match = lru_cache(maxsize=4096)(self._match)

    def _match(self, host: str) -> Service | None:
        host = host.lower()
        for pattern, service in self._patterns:
            if pattern.fullmatch(host):
                return service
        return None
