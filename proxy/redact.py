"""Keep secrets out of anything keyless writes: logs, metrics, error bodies."""

from __future__ import annotations

import re

# (pattern, replacement) pairs; group 1 keeps the harmless name in front of the secret.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # JWTs (Entra tokens, SignalR access-key tokens)
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "<redacted-jwt>"),
    # Authorization values: the credential after the scheme word
    (re.compile(
        r"(?i)\b(bearer|sharedkey|sharedkeylite|sharedaccesssignature|hmac-sha256)\s+[^\s\"',;]+"
    ), r"\1 <redacted>"),
    # signature-like query or header parameters
    (re.compile(
        r"(?i)\b(sig|signature|skn|aeg-sas-key|api-key|subscription-key|code)=[^&\s\"']+"
    ), r"\1=<redacted>"),
    # account keys in connection strings
    (re.compile(r"(?i)\b(accountkey|sharedaccesskey)=[^;\s\"']+"), r"\1=<redacted>"),
)


def redact(text: str, limit: int = 400) -> str:
    """Mask anything that looks like a token, key or signature, and bound the length."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
