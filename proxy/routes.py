"""User routes from the TOML config: teach keyless hosts the catalog does not know.

    [[route]]
    host = "*.blob.contoso.internal"   # exact name, or * for one name part
    service = "storage-blob"           # reuse a catalog service's conversion and scope ...
    scope = "https://storage.azure.com/.default"   # ... or give the scope yourself
    strip = ["SharedKey", "SAS"]       # which key schemes to remove (default: the service's)
    token-format = "bearer"            # or "cosmos"
    client-id = "00000000-…"           # a user-assigned identity for this route

Routes are tried in order, before the built-in catalog.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from proxy.catalog import CHALLENGE_SCOPE, Catalog, Service, fill_scope
from proxy.conversions import STRIPPERS, TOKEN_FORMATS, Conversion
from proxy.tokens import Identity

ROUTE_KEYS = {"host", "service", "scope", "strip", "token-format", "client-id"}
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def glob_to_regex(glob: str) -> str:
    """`*` stands for one or more characters of a single DNS label."""
    if not re.fullmatch(r"[a-z0-9*.-]+", glob) or glob.startswith(".") or glob.endswith("."):
        raise ValueError(f"host {glob!r}: use a lowercase DNS name, with * for one name part")
    return "".join(r"[a-z0-9-]+" if part == "*" else re.escape(part)
                   for part in re.split(r"(\*)", glob))


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def parse_route(raw: Any, index: int, catalog: Catalog) -> Service:
    where = f"route {index + 1}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table with host and service or scope")
    if unknown := sorted(set(raw) - ROUTE_KEYS):
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(ROUTE_KEYS))}")
    host = raw.get("host")
    if not isinstance(host, str) or not host:
        raise ValueError(f"{where}: host is required")
    where = f"route {index + 1} ({host})"
    try:
        host_pattern = glob_to_regex(host.lower())
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None

    base: Service | None = None
    if "service" in raw:
        base = catalog.by_name(str(raw["service"]))
        if base is None:
            names = ", ".join(s.name for s in catalog.services)
            raise ValueError(f"{where}: unknown service {raw['service']!r}; known: {names}")
    scope = raw.get("scope")
    if scope is not None and (not isinstance(scope, str) or "://" not in scope):
        raise ValueError(f"{where}: scope must look like https://resource/.default")
    if base is None and scope is None:
        raise ValueError(f"{where}: give a service or a scope")
    if scope is None and base is not None:
        scope = base.scope
        if scope != CHALLENGE_SCOPE and _placeholders(scope):
            try:  # cloud-only templates default to the public cloud
                scope = fill_scope(scope, {})
            except KeyError:
                raise ValueError(
                    f"{where}: service {base.name} derives its scope from the Azure host "
                    "name; give an explicit scope for a custom host") from None

    conversion = base.conversion if base is not None else None
    if "strip" in raw or "token-format" in raw or conversion is None:
        names = raw.get("strip", [])
        if not isinstance(names, list) or not names or any(n not in STRIPPERS for n in names):
            raise ValueError(f"{where}: strip must list key schemes from: "
                             f"{', '.join(STRIPPERS)}")
        token_format = raw.get("token-format", "bearer")
        if token_format not in TOKEN_FORMATS:
            raise ValueError(f"{where}: token-format must be one of {', '.join(TOKEN_FORMATS)}")
        fixes = conversion.fixes if conversion is not None else ()
        conversion = Conversion(tuple(STRIPPERS[n] for n in names), token_format, fixes)

    identity = None
    if "client-id" in raw:
        client_id = raw["client-id"]
        if not isinstance(client_id, str) or not _GUID.fullmatch(client_id):
            raise ValueError(f"{where}: client-id must be a GUID")
        identity = Identity(client_id.lower())

    name = base.name if base is not None else f"route:{host}"
    template = base or Service(name, host_pattern, scope, conversion)
    return replace(template, name=name, host_pattern=host_pattern, scope=scope,
                   conversion=conversion, path_pattern=None, identity=identity)


def parse_routes(raw: Iterable[Any], catalog: Catalog) -> tuple[Service, ...]:
    return tuple(parse_route(entry, i, catalog) for i, entry in enumerate(raw))
