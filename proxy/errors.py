"""Azure-style error answers keyless gives the app itself."""

from __future__ import annotations

import json

from proxy.redact import redact


class StartupError(Exception):
    """keyless cannot start (a port taken, a bad option); the message says why. Here, not in
    proxy/mitm.py, so the --workers supervisor never imports mitmproxy (~33 MB RSS)."""


def error_response(code: str, message: str) -> tuple[dict[str, str], bytes]:
    """Headers and body of an Azure-style JSON error. The message is redacted defensively."""
    body = json.dumps({"error": {"code": code, "message": redact(message, limit=1000)}})
    headers = {
        "content-type": "application/json; charset=utf-8",
        "x-ms-error-code": code,
        "cache-control": "no-store",
    }
    return headers, body.encode()


TOKEN_UNAVAILABLE = "KeylessTokenUnavailable"
NOT_CONFIGURED = "KeylessNotConfigured"
MISDIRECTED = "KeylessMisdirectedRequest"
PLAIN_HTTP = "KeylessPlainHttpRefused"
UPSTREAM_FAILED = "KeylessUpstreamFailed"
KEY_NOT_CONVERTED = "KeylessKeyNotConverted"
