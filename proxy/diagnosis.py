"""Reading a service's refusal: does this 403 (or 401) mean "the identity lacks a role"?"""

from __future__ import annotations

import json
from collections.abc import Callable

# Services whose every 403 to a token-bearing request is an authorization (RBAC) decision.
_ANY_403 = {"eventgrid", "appconfig", "search", "communication", "maps", "signalr",
            "webpubsub", "eventhubs", "servicebus", "openai", "keyvault"}


def _json_error_code(body: bytes) -> str:
    try:
        data = json.loads(body[:65536] or b"null")
    except ValueError:
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        inner = error.get("innererror")
        if isinstance(inner, dict) and inner.get("code"):
            return str(inner["code"])
        return str(error.get("code") or "")
    return ""


def rbac_denial(service: str, status: int, header: Callable[[str], str | None],
                body: bytes) -> str | None:
    """The service's own name for an RBAC denial, or None when the refusal is something else
    (network rules, a bad token, a missing resource)."""
    if service.startswith("storage-"):
        code = header("x-ms-error-code") or ""
        return code if status == 403 and code == "AuthorizationPermissionMismatch" else None
    if service == "cosmos":
        return "Forbidden (substatus 5301)" if status == 403 and \
            header("x-ms-substatus") == "5301" else None
    text = body[:4096].decode("utf-8", "replace")
    if service in ("servicebus", "eventhubs") and status in (401, 403) \
            and "claim(s) are required" in text:
        return "MissingClaims"
    if status == 403 and service in _ANY_403:
        return _json_error_code(body) or "Forbidden"
    return None
