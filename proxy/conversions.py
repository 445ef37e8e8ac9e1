"""Credential conversions: pure strip/attach pairs, one per key scheme family.

`strip` removes every piece of key material it knows from a request and says what it found
(None when the request carried none: keyless then leaves it alone). `attach` puts the Entra
token where the service expects it and applies the service's fixes. Neither does I/O.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Protocol

from proxy.wire import RequestHead, auth_scheme, remove_query_params

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stripped:
    """What `strip` removed: the scheme names (for metrics and logs) and non-secret facts."""

    schemes: tuple[str, ...]
    facts: dict[str, str] = field(default_factory=dict)


class Conversion(Protocol):
    def strip(self, request: RequestHead) -> Stripped | None: ...
    def attach(self, request: RequestHead, token: str, stripped: Stripped) -> None: ...


# Every query parameter a Storage SAS may carry (service, account, user delegation, table and
# Data Lake SAS, plus the response-header overrides that only a SAS may set).
STORAGE_SAS_PARAMS = frozenset(
    [
        "sv", "ss", "srt", "sp", "st", "se", "sip", "spr", "sr", "si", "sig", "ses",
        "rscc", "rscd", "rsce", "rscl", "rsct",
        "tn", "spk", "srk", "epk", "erk",
        "skoid", "sktid", "skt", "ske", "sks", "skv", "sdd",
        "saoid", "suoid", "scid",
    ]
)
STORAGE_KEY_SCHEMES = {"sharedkey": "SharedKey", "sharedkeylite": "SharedKeyLite"}
_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True, slots=True)
class StorageConversion:
    """Shared Key / Shared Key Lite headers and SAS query parameters → Bearer.

    OAuth needs a recent enough `x-ms-version`: an older (or missing) one is raised to
    `min_version`; a SAS-only request takes its `sv` as the version when that is recent enough.
    """

    min_version: str = "2017-11-09"
    extra_headers: tuple[tuple[str, str], ...] = ()

    def strip(self, request: RequestHead) -> Stripped | None:
        schemes: list[str] = []
        facts: dict[str, str] = {}
        auth_values = request.headers.get_all("authorization")
        key_schemes = [STORAGE_KEY_SCHEMES.get(auth_scheme(v)) for v in auth_values]
        if any(key_schemes):
            del request.headers["authorization"]
            schemes.extend(sorted({s for s in key_schemes if s}))
        request.path, removed = remove_query_params(request.path, STORAGE_SAS_PARAMS)
        if removed:
            schemes.append("SAS")
            if _VERSION.fullmatch(removed.get("sv", "")):
                facts["sas_version"] = removed["sv"]
        return Stripped(tuple(schemes), facts) if schemes else None

    def attach(self, request: RequestHead, token: str, stripped: Stripped) -> None:
        request.headers["authorization"] = f"Bearer {token}"
        current = request.headers.get("x-ms-version") or stripped.facts.get("sas_version", "")
        if not _VERSION.fullmatch(current) or current < self.min_version:
            if current:
                logger.info("raised x-ms-version %s to %s for OAuth",
                            current[:32], self.min_version)
            current = self.min_version
        request.headers["x-ms-version"] = current
        for name, value in self.extra_headers:
            request.headers[name] = value
