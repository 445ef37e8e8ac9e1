"""The fail-closed invariant: key material never leaves for an Azure host.

Whatever way a request came in (proxy, reverse, transparent) and whatever path it leaves by
(mitmproxy's own upstream connection, the upstream pool, a 401 replay), a request to a catalog
host that still carries key material after conversion is refused. This module decides it; the
addon addons/failclosed.py applies it at the last point before a request goes upstream.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from proxy.catalog import Catalog
from proxy.wire import Headers

# Not key material: an app's own Entra token (Key Vault swaps it when it knows the scope, and
# passes it on while it learns the scope from the vault's challenge).
ENTRA_BEARER = "Bearer"
Leftover = tuple[str, tuple[str, ...]]  # (service name, key scheme labels)


class CopyableHeaders(Headers, Protocol):
    def copy(self) -> CopyableHeaders: ...


@dataclass(slots=True)
class _Head:
    path: str
    headers: Headers


def leftover_key_material(catalog: Catalog, names: Iterable[str | None], path: str,
                          headers: CopyableHeaders) -> Leftover | None:
    """(service, schemes) when a request that goes to any of `names` still carries key material
    one of their catalog services recognises; None when it carries none.

    `names` are every name the destination goes by (Host header, TLS server name, CONNECT
    target, request host): a request is checked against each, so no disagreement between them
    lets a key past. The request itself is left as it is (a copy is stripped).
    """
    seen: set[str] = set()
    for name in names:
        if not name or (name := name.lower().rstrip(".")) in seen:
            continue
        seen.add(name)
        target = catalog.match(name, path)
        if target is None or target.service.conversion is None:
            continue  # not Azure, or a host keyless reports but never converts
        head = _Head(path, headers.copy())
        stripped = target.service.conversion.strip(head)
        schemes = tuple(s for s in stripped.schemes if s != ENTRA_BEARER) if stripped else ()
        if schemes:
            return target.service.name, schemes
    return None
