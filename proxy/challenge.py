"""Scopes learned from a service's own 401 challenge (Key Vault's `WWW-Authenticate`)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*"([^"]*)"')
# Resources a vault may name: never let a challenge point a token anywhere else.
VAULT_RESOURCE_HOSTS = (
    "vault.azure.net", "vault.azure.cn", "vault.usgovcloudapi.net",
    "managedhsm.azure.net", "managedhsm.azure.cn", "managedhsm.usgovcloudapi.net",
)


def scope_from_challenge(header: str) -> str | None:
    """The scope a Bearer challenge asks for, if it names a known vault resource."""
    if not header.strip().lower().startswith("bearer"):
        return None
    params = {k.lower(): v for k, v in _PARAM.findall(header)}
    scope = params.get("scope") or (params["resource"].rstrip("/") + "/.default"
                                    if params.get("resource") else None)
    if scope is None:
        return None
    parts = urlsplit(scope)
    if parts.scheme != "https" or (parts.hostname or "") not in VAULT_RESOURCE_HOSTS:
        return None
    return scope


class ChallengeScopes:
    """Per host: the scope its last Bearer challenge asked for."""

    def __init__(self, maxsize: int = 1024) -> None:
        self._scopes: dict[str, str] = {}
        self._maxsize = maxsize

    def get(self, host: str) -> str | None:
        return self._scopes.get(host)

    def learn(self, host: str, header: str) -> str | None:
        scope = scope_from_challenge(header)
        if scope is not None and (host in self._scopes or len(self._scopes) < self._maxsize):
            self._scopes[host] = scope
        return scope
