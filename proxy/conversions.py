"""Credential conversions: pure strip/attach pairs built from small, named parts.

A `Conversion` is a list of strippers (each removes one family of key material and says what
it found), a token format, and fixes the service needs once a token is attached. `strip`
returns None when the request carried no key material: keyless then leaves it alone. Nothing
here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from proxy.wire import RequestHead, auth_scheme, remove_query_params

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stripped:
    """What `strip` removed: the scheme names (for metrics and logs) and non-secret facts."""

    schemes: tuple[str, ...]
    facts: dict[str, str] = field(default_factory=dict)


# A stripper removes its kind of key material from the request and returns the scheme names it
# found (empty when none) plus non-secret facts for the fixes.
Found = tuple[list[str], dict[str, str]]
Stripper = Callable[[RequestHead], Found]
Fix = Callable[[RequestHead, Stripped], None]
NOTHING: Found = ([], {})


@dataclass(frozen=True, slots=True)
class AuthorizationScheme:
    """Authorization headers whose scheme word is one of `schemes` ({lowercase: label})."""

    schemes: dict[str, str]

    def __call__(self, request: RequestHead) -> Found:
        found = [self.schemes.get(auth_scheme(v)) for v in request.headers.get_all("authorization")]
        labels = sorted({label for label in found if label})
        if labels:
            del request.headers["authorization"]
        return labels, {}


@dataclass(frozen=True, slots=True)
class KeyHeaders:
    """Headers that carry a key. `companions` go with them (e.g. the key's region)."""

    label: str
    names: tuple[str, ...]
    companions: tuple[str, ...] = ()

    def __call__(self, request: RequestHead) -> Found:
        present = [name for name in self.names if name in request.headers]
        if not present:
            return NOTHING
        for name in (*present, *self.companions):
            if name in request.headers:
                del request.headers[name]
        return [self.label], {}


@dataclass(frozen=True, slots=True)
class KeyQuery:
    """Query parameters that carry a key or signature; `facts` maps a parameter to a fact."""

    label: str
    names: frozenset[str]
    facts: dict[str, str] = field(default_factory=dict)
    version_pattern: re.Pattern[str] = re.compile(r"\d{4}-\d{2}-\d{2}")

    def __call__(self, request: RequestHead) -> Found:
        request.path, removed = remove_query_params(request.path, self.names)
        if not removed:
            return NOTHING
        facts = {fact: removed[name] for name, fact in self.facts.items()
                 if self.version_pattern.fullmatch(removed.get(name, ""))}
        return [self.label], facts


def strip_cosmos_key(request: RequestHead) -> Found:
    """Cosmos DB master-key or resource-token signatures (`type=master|resource&ver=…&sig=…`)."""
    value = request.headers.get("authorization")
    if value is None:
        return NOTHING
    kind = unquote(value).strip().lower()
    if not (kind.startswith("type=master&") or kind.startswith("type=resource&")):
        return NOTHING
    del request.headers["authorization"]
    return ["CosmosMasterKey" if kind.startswith("type=master") else "CosmosResourceToken"], {}


def _jwt_algorithm(token: str) -> str | None:
    header = token.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error):
        return None
    return decoded.get("alg") if isinstance(decoded, dict) else None


def strip_access_key_jwt(request: RequestHead) -> Found:
    """Bearer JWTs signed with a service access key (HS256: SignalR, Web PubSub).

    Entra tokens are signed with RS256; a token signed with a shared secret is key material.
    """
    value = request.headers.get("authorization") or ""
    if auth_scheme(value) != "bearer":
        return NOTHING
    algorithm = _jwt_algorithm(value.strip()[len("bearer"):].strip())
    if not (isinstance(algorithm, str) and algorithm.upper().startswith("HS")):
        return NOTHING
    del request.headers["authorization"]
    return ["AccessKeyJwt"], {}


def strip_bearer(request: RequestHead) -> Found:
    """Any Bearer token (Key Vault: the app's own token is swapped for the identity's)."""
    if not any(auth_scheme(v) == "bearer" for v in request.headers.get_all("authorization")):
        return NOTHING
    del request.headers["authorization"]
    return ["Bearer"], {}


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

# The named strippers: what a custom route may list under `strip`.
STRIPPERS: dict[str, Stripper] = {
    "SharedKey": AuthorizationScheme({"sharedkey": "SharedKey", "sharedkeylite": "SharedKeyLite"}),
    "SAS": KeyQuery("SAS", STORAGE_SAS_PARAMS, {"sv": "sas_version"}),
    "SharedAccessSignature": AuthorizationScheme(
        {"sharedaccesssignature": "SharedAccessSignature"}
    ),
    "HMAC-SHA256": AuthorizationScheme({"hmac-sha256": "HMAC-SHA256"}),
    "api-key": KeyHeaders("api-key", ("api-key",)),
    "api-key-query": KeyQuery("api-key", frozenset({"api-key"})),
    "Ocp-Apim-Subscription-Key": KeyHeaders(
        "Ocp-Apim-Subscription-Key", ("ocp-apim-subscription-key",),
        companions=("ocp-apim-subscription-region",),
    ),
    "aeg-sas-key": KeyHeaders("aeg-sas-key", ("aeg-sas-key",)),
    "aeg-sas-key-query": KeyQuery("aeg-sas-key", frozenset({"aeg-sas-key"})),
    "aeg-sas-token": KeyHeaders("aeg-sas-token", ("aeg-sas-token",)),
    "subscription-key": KeyHeaders("subscription-key", ("subscription-key",)),
    "subscription-key-query": KeyQuery("subscription-key", frozenset({"subscription-key"})),
    "cosmos-key": strip_cosmos_key,
    "access-key-jwt": strip_access_key_jwt,
    "bearer": strip_bearer,
}


def bearer(token: str) -> tuple[str, str]:
    return "authorization", f"Bearer {token}"


def cosmos_aad(token: str) -> tuple[str, str]:
    # Cosmos wants its own form, URL-encoded like the key signature it replaces.
    return "authorization", quote(f"type=aad&ver=1.0&sig={token}", safe="")


TOKEN_FORMATS: dict[str, Callable[[str], tuple[str, str]]] = {
    "bearer": bearer,
    "cosmos": cosmos_aad,
}

_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True, slots=True)
class MinimumStorageVersion:
    """OAuth needs a recent enough `x-ms-version`: raise an older or missing one.

    A SAS-only request takes its `sv` as the version when that is recent enough.
    """

    minimum: str

    def __call__(self, request: RequestHead, stripped: Stripped) -> None:
        current = request.headers.get("x-ms-version") or stripped.facts.get("sas_version", "")
        if not _VERSION.fullmatch(current) or current < self.minimum:
            if current:
                logger.info("raised x-ms-version %s to %s for OAuth", current[:32], self.minimum)
            current = self.minimum
        request.headers["x-ms-version"] = current


@dataclass(frozen=True, slots=True)
class SetHeaders:
    headers: tuple[tuple[str, str], ...]

    def __call__(self, request: RequestHead, stripped: Stripped) -> None:
        for name, value in self.headers:
            request.headers[name] = value


@dataclass(frozen=True, slots=True)
class Conversion:
    strippers: tuple[Stripper, ...]
    token_format: str = "bearer"
    fixes: tuple[Fix, ...] = ()

    def strip(self, request: RequestHead) -> Stripped | None:
        schemes: list[str] = []
        facts: dict[str, str] = {}
        for stripper in self.strippers:
            found, found_facts = stripper(request)
            schemes.extend(found)
            facts.update(found_facts)
        return Stripped(tuple(schemes), facts) if schemes else None

    def attach(self, request: RequestHead, token: str, stripped: Stripped) -> None:
        name, value = TOKEN_FORMATS[self.token_format](token)
        request.headers[name] = value
        for fix in self.fixes:
            fix(request, stripped)


def conversion(*stripper_names: str, token_format: str = "bearer",
               fixes: tuple[Fix, ...] = ()) -> Conversion:
    return Conversion(tuple(STRIPPERS[n] for n in stripper_names), token_format, fixes)
