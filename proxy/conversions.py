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
from typing import Protocol, runtime_checkable
from urllib.parse import quote, unquote, urlsplit

from proxy.wire import RequestHead, auth_scheme, remove_query_params, split_authority

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

# Any Azure Storage endpoint, in every cloud (the catalog's Storage hosts, all five services):
# only a copy source on such a host is the Storage conversion's business.
STORAGE_HOST = re.compile(
    r"[a-z0-9]{3,24}(?:-secondary)?(?:\.privatelink)?\.(?:blob|queue|table|file|dfs)"
    r"\.(?:core\.windows\.net|core\.chinacloudapi\.cn|core\.usgovcloudapi\.net)"
    r"|[a-z0-9]{3,24}\.z\d{2}\.(?:blob|queue|table|file|dfs)\.storage\.azure\.net"
)
# Headers naming, as a URL, the object an operation reads from: Copy Blob, Copy Blob From
# URL, Put Blob/Block/Page From URL, Append Block From URL, Copy File, Put Range From URL
# (x-ms-copy-source); Rename File/Directory (x-ms-file-rename-source).
SOURCE_URL_HEADERS = ("x-ms-copy-source", "x-ms-file-rename-source")
# Data Lake Rename Path names its source as "/{filesystem}/{path}" in the same account.
SOURCE_PATH_HEADERS = ("x-ms-rename-source",)
SOURCE_AUTHORIZATION = "x-ms-copy-source-authorization"
SOURCE_TOKEN_VERSION = "2020-10-02"  # x-ms-copy-source-authorization needs this version
# Operations that read their source themselves and take a token for it: the `comp` of
# Put Block / Append Block / Put Page (Blob) and Put Range (Files) From URL.
_FROM_URL_COMPS = frozenset({"block", "appendblock", "page", "range"})


@runtime_checkable
class AttachesToken(Protocol):
    """A stripper paired with its attach step: it puts the token where it removed a key."""

    def __call__(self, request: RequestHead) -> Found: ...
    def attach(self, request: RequestHead, token: str, stripped: Stripped) -> None: ...


def storage_source_scheme(value: str) -> str | None:
    """The scheme of a source URL on an Azure Storage host; None for anything else (which
    is left alone)."""
    try:
        parts = urlsplit(value.strip())
        host = (parts.hostname or "").lower()
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    return scheme if scheme in ("https", "http") and STORAGE_HOST.fullmatch(host) else None


def takes_source_token(request: RequestHead) -> bool:
    """Whether the operation accepts `x-ms-copy-source-authorization` (REST specs as of
    2020-10-02; the SDKs send it only for these): the *From URL operations and the
    synchronous Copy Blob From URL. Asynchronous Copy Blob / Copy File take none."""
    query = request.path.partition("?")[2]
    comps = {piece.partition("=")[2].lower() for piece in query.split("&")
             if piece.partition("=")[0].lower() == "comp"}
    if comps:
        return bool(comps & _FROM_URL_COMPS)
    headers = request.headers
    return ((headers.get("x-ms-requires-sync") or "").lower() == "true"  # Copy Blob From URL
            or (headers.get("x-ms-blob-type") or "").lower() == "blockblob")  # Put Blob From URL


@dataclass(frozen=True, slots=True)
class StorageSas:
    """A Storage SAS on the request's own query, and on the source an operation reads from.

    A SAS on a copy or rename source is removed when the source is an Azure Storage host
    (any account: the token's scope is the same for all); other sources are left alone.
    `attach` gives the source the token where the operation takes one.
    """

    query: KeyQuery

    @property
    def names(self) -> frozenset[str]:
        """The SAS parameter names (those of the request's own query)."""
        return self.query.names

    def __call__(self, request: RequestHead) -> Found:
        found, facts = self.query(request)
        labels = list(found)
        for name in SOURCE_URL_HEADERS:
            value = request.headers.get(name)
            scheme = storage_source_scheme(value) if value is not None else None
            if value is None or scheme is None:
                continue
            cleaned, removed = remove_query_params(value, STORAGE_SAS_PARAMS)
            if removed:
                request.headers[name] = cleaned
                labels.append("CopySourceSAS")
                if name == "x-ms-copy-source" and scheme == "https":  # a token only over TLS
                    facts = {**facts, "copy_source_sas": "1"}
        for name in SOURCE_PATH_HEADERS:
            value = request.headers.get(name)
            if value is not None and value.startswith("/"):
                cleaned, removed = remove_query_params(value, STORAGE_SAS_PARAMS)
                if removed:
                    request.headers[name] = cleaned
                    labels.append("CopySourceSAS")
        return sorted(set(labels)), facts

    def attach(self, request: RequestHead, token: str, stripped: Stripped) -> None:
        if not stripped.facts.get("copy_source_sas"):
            return
        if not takes_source_token(request):
            # Asynchronous Copy Blob / Copy File / Incremental Copy take no source token: a
            # source in the same account is read with the request's own token; one in
            # another account must be public, and the service says CannotVerifyCopySource.
            source = urlsplit(request.headers.get("x-ms-copy-source") or "").hostname or ""
            own = split_authority(request.headers.get("host") or "", 443)
            if own is not None and source.lower() != own[0]:
                logger.warning("asynchronous copy from another account (%s): its SAS was "
                               "removed and this operation takes no token for its source; "
                               "use a synchronous copy (Copy Blob From URL) or a public "
                               "source", source[:100])
            return
        request.headers[SOURCE_AUTHORIZATION] = f"Bearer {token}"
        current = request.headers.get("x-ms-version") or ""
        if not _VERSION.fullmatch(current) or current < SOURCE_TOKEN_VERSION:
            request.headers["x-ms-version"] = SOURCE_TOKEN_VERSION


@dataclass(frozen=True, slots=True)
class AnyOf:
    """One family of key material in its several forms, under one name."""

    parts: tuple[Stripper, ...]

    def __call__(self, request: RequestHead) -> Found:
        labels: list[str] = []
        facts: dict[str, str] = {}
        for part in self.parts:
            found, part_facts = part(request)
            labels += found
            facts.update(part_facts)
        return sorted(set(labels)), facts


# Service Bus entity management with `forward_to` / `forward_dead_lettered_messages_to`: the
# SDKs add a SAS for the target entity in these headers; in Entra mode they hold a Bearer.
SUPPLEMENTARY_HEADERS = ("servicebussupplementaryauthorization",
                         "servicebusdlqsupplementaryauthorization")


@dataclass(frozen=True, slots=True)
class SharedAccessSignature:
    """`Authorization: SharedAccessSignature …`, and Service Bus' supplementary SAS headers
    (which get the same token, as the SDK's Entra mode sends them)."""

    authorization: AuthorizationScheme

    def __call__(self, request: RequestHead) -> Found:
        labels, facts = self.authorization(request)
        removed = [name for name in SUPPLEMENTARY_HEADERS
                   if auth_scheme(request.headers.get(name) or "") == "sharedaccesssignature"]
        for name in removed:
            del request.headers[name]
        if removed:
            labels = [*labels, "SupplementarySAS"]
            facts = {**facts, "supplementary": ",".join(removed)}
        return labels, facts

    def attach(self, request: RequestHead, token: str, stripped: Stripped) -> None:
        for name in filter(None, stripped.facts.get("supplementary", "").split(",")):
            request.headers[name] = f"Bearer {token}"


# The named strippers: what a custom route may list under `strip`.
STRIPPERS: dict[str, Stripper] = {
    "SharedKey": AuthorizationScheme({"sharedkey": "SharedKey", "sharedkeylite": "SharedKeyLite"}),
    "SAS": StorageSas(KeyQuery("SAS", STORAGE_SAS_PARAMS, {"sv": "sas_version"})),
    "SharedAccessSignature": SharedAccessSignature(AuthorizationScheme(
        {"sharedaccesssignature": "SharedAccessSignature"}
    )),
    "HMAC-SHA256": AuthorizationScheme({"hmac-sha256": "HMAC-SHA256"}),
    "api-key": KeyHeaders("api-key", ("api-key",)),
    "api-key-query": KeyQuery("api-key", frozenset({"api-key"})),
    "Ocp-Apim-Subscription-Key": KeyHeaders(
        "Ocp-Apim-Subscription-Key", ("ocp-apim-subscription-key",),
        companions=("ocp-apim-subscription-region",),
    ),
    # Event Grid topics take the key as `aeg-sas-key`; namespaces as `SharedAccessKey`.
    "aeg-sas-key": AnyOf((KeyHeaders("aeg-sas-key", ("aeg-sas-key",)),
                          AuthorizationScheme({"sharedaccesskey": "SharedAccessKey"}))),
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
        for stripper in self.strippers:
            if isinstance(stripper, AttachesToken):
                stripper.attach(request, token, stripped)


def conversion(*stripper_names: str, token_format: str = "bearer",
               fixes: tuple[Fix, ...] = ()) -> Conversion:
    return Conversion(tuple(STRIPPERS[n] for n in stripper_names), token_format, fixes)
