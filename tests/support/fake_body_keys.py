"""A fake Blob endpoint that checks what Azurite cannot: copy-source authorization, and Blob
Batch sub-requests read with an independent parser (the standard library's MIME parser).

It judges the way the service does. Copy Blob From URL, Put Blob From URL and Put Block From
URL read their source themselves: a source SAS must be valid or absent, and without one the
source is read with `x-ms-copy-source-authorization: Bearer <token>` (a storage token). The
asynchronous Copy Blob takes no source token: a source in the same account is read with the
request's own token, one in another account only when public or with a valid SAS (this fake
has no public sources, so it answers `CannotVerifyCopySource`). Every SAS the test app makes
is signed with a wrong key, so any SAS that arrives here is refused: the real service would
refuse it too. Each batch sub-request needs the outer request's Bearer token and nothing
key-based, or it fails inside the 202 answer (`AuthenticationFailed`), as on Azure.
"""

from __future__ import annotations

import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qsl, urlsplit

from tests.support.fake_azure import (
    KEY_AUTH_SCHEMES,
    Expect,
    FakeAzure,
    FakeRequest,
    FakeResponse,
    token_of,
)
from tests.support.identity_endpoint import decode

STORAGE_AUDIENCE = "https://storage.azure.com"
SAS_NAMES = frozenset({"sv", "ss", "srt", "sp", "st", "se", "sip", "spr", "sr", "si", "sig",
                       "ses", "skoid", "sktid", "skt", "ske", "sks", "skv", "sdd"})
FROM_URL_COMPS = {"block", "appendblock", "page", "range"}  # range: Files Put Range From URL


def storage_token_problems(value: str | None, what: str) -> list[str]:
    if value is None or not value.startswith("Bearer "):
        return [f"{what} is not a Bearer token"]
    try:
        claims = decode(value[len("Bearer "):])
    except Exception as exc:  # an undecodable token is a finding
        return [f"{what} is not a JWT: {exc}"]
    problems = []
    if claims.get("aud") != STORAGE_AUDIENCE:
        problems.append(f"{what} audience {claims.get('aud')!r}")
    if not claims.get("iss", "").startswith("https://sts.windows.net/"):
        problems.append(f"{what} issuer {claims.get('iss')!r}")
    if claims.get("exp", 0) <= time.time() or claims.get("nbf", 0) > time.time():
        problems.append(f"{what} expired or not yet valid")
    return problems


def _comp(request: FakeRequest) -> str:
    return dict((k.lower(), v.lower()) for k, v in request.query).get("comp", "")


def reads_source_itself(request: FakeRequest) -> bool:
    """The synchronous copies: the ones that take x-ms-copy-source-authorization."""
    return (_comp(request) in FROM_URL_COMPS
            or (request.header("x-ms-requires-sync") or "").lower() == "true"
            or (request.header("x-ms-blob-type") or "").lower() == "blockblob")


def copy_source_problems(request: FakeRequest) -> list[str]:
    source = request.header("x-ms-copy-source")
    if source is None:
        return []
    source_parts = urlsplit(source)
    source_auth = request.header("x-ms-copy-source-authorization")
    if not (source_parts.hostname or "").endswith(".core.windows.net"):
        # Not Azure Storage: the service fetches it as given; a storage token must not
        # travel with it.
        return ["a storage token for a source outside Azure Storage"] if source_auth else []
    if {k.lower() for k, _ in parse_qsl(source_parts.query)} & SAS_NAMES:
        return ["the copy source carries a SAS (signed with the app's wrong key)"]
    if reads_source_itself(request):
        problems = storage_token_problems(source_auth, "x-ms-copy-source-authorization")
        if (request.header("x-ms-version") or "") < "2020-10-02":
            problems.append("x-ms-copy-source-authorization needs x-ms-version 2020-10-02")
        return problems
    if source_auth is not None:
        return ["asynchronous Copy Blob takes no x-ms-copy-source-authorization"]
    return []


def batch_subrequest_problems(request: FakeRequest,
                              revoked: frozenset[str] = frozenset()) -> list[list[str]]:
    """Per sub-request, what the service would refuse (outer auth is checked by `Expect`)."""
    outer = request.header("authorization")
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + (request.header("content-type") or "").encode() + b"\r\n\r\n"
        + request.body)
    results = []
    for part in message.iter_parts():
        raw = part.get_payload(decode=True)
        request_line, _, rest = raw.partition(b"\r\n")
        target = request_line.split(b" ")[1].decode()
        auth = [line.split(b":", 1)[1].strip().decode() for line in rest.split(b"\r\n")
                if line.lower().startswith(b"authorization:")]
        problems = []
        if {k.lower() for k, _ in parse_qsl(urlsplit(target).query)} & SAS_NAMES:
            problems.append("a SAS on the sub-request")
        if len(auth) != 1:
            problems.append(f"{len(auth)} Authorization headers")
        for value in auth:
            if value in revoked:
                problems.append("the sub-request token was revoked")
            if value.split(" ", 1)[0].lower() in KEY_AUTH_SCHEMES:
                problems.append("a key-signed sub-request (wrong key)")
            problems += storage_token_problems(value, "the sub-request token")
            if value != outer:
                problems.append("the sub-request token is not the outer request's")
        results.append(problems)
    return results


class FakeBlobBodies:
    """Blob operations on one FakeAzure: copies and batches, judged as above."""

    def __init__(self, fake: FakeAzure, host_regex: str) -> None:
        self.fake = fake
        self.batch_problems: list[list[str]] = []
        self.revoke_next = False  # the next token seen is revoked (a 401, as after a reset)
        self.revoked: set[str] = set()
        fake.add(host_regex, Expect(STORAGE_AUDIENCE, extra_checks=(copy_source_problems,)),
                 self.handle)

    def handle(self, request: FakeRequest) -> FakeResponse:
        token = request.header("authorization") or ""
        if self.revoke_next:
            self.revoke_next = False
            self.revoked.add(token)
        if token in self.revoked:
            return FakeResponse(401, b"", {"x-ms-error-code": "InvalidAuthenticationInfo"})
        if _comp(request) == "batch":
            return self._batch(request)
        common = {"x-ms-request-id": str(uuid.uuid4()), "x-ms-version": "2026-10-06",
                  "etag": '"0x8D0"', "last-modified": "Tue, 01 Dec 2026 21:00:00 GMT"}
        source = request.header("x-ms-copy-source")
        if source is not None and not reads_source_itself(request):
            source_host = (urlsplit(source).hostname or "").lower()
            if source_host != request.host and source_host.endswith(".core.windows.net"):
                return FakeResponse(403, b"", {**common,
                                               "x-ms-error-code": "CannotVerifyCopySource"})
            return FakeResponse(202, b"", {**common, "x-ms-copy-id": str(uuid.uuid4()),
                                           "x-ms-copy-status": "pending"})
        if source is not None and (request.header("x-ms-requires-sync") or "").lower() == "true":
            return FakeResponse(202, b"", {**common, "x-ms-copy-id": str(uuid.uuid4()),
                                           "x-ms-copy-status": "success"})
        return FakeResponse(201, b"", {**common, "x-ms-request-server-encrypted": "true"})

    def _batch(self, request: FakeRequest) -> FakeResponse:
        boundary = f"batchresponse_{uuid.uuid4()}"
        per_part = batch_subrequest_problems(request, frozenset(self.revoked))
        self.batch_problems.extend(p for p in per_part if p)
        chunks = []
        for index, problems in enumerate(per_part):
            status = "403 Server failed to authenticate the request." if problems \
                else "202 Accepted"
            error = "x-ms-error-code: AuthenticationFailed\r\n" if problems else ""
            chunks.append(f"--{boundary}\r\nContent-Type: application/http\r\n"
                          f"Content-ID: {index}\r\n\r\nHTTP/1.1 {status}\r\n{error}"
                          f"x-ms-version: 2026-10-06\r\n\r\n")
        body = ("".join(chunks) + f"--{boundary}--\r\n").encode()
        return FakeResponse(202, body, {"content-type": f"multipart/mixed; boundary={boundary}",
                                        "x-ms-request-id": str(uuid.uuid4())})


def outer_token(request: FakeRequest) -> str | None:
    return token_of(request, "bearer")[0]


# Beyond Storage: what the survey found in request headers other than Authorization ---------

SERVICEBUS_AUDIENCE = "https://servicebus.azure.net"
EVENTGRID_AUDIENCE = "https://eventgrid.azure.net"
SUPPLEMENTARY = ("ServiceBusSupplementaryAuthorization", "ServiceBusDlqSupplementaryAuthorization")


def supplementary_problems(request: FakeRequest) -> list[str]:
    """Service Bus reads the forward_to targets' authorization from these headers: a SAS
    (signed with the app's wrong key) fails; in Entra mode each holds the request's token."""
    problems = []
    for name in SUPPLEMENTARY:
        value = request.header(name)
        if value is None:
            continue
        if value.split(" ", 1)[0].lower() == "sharedaccesssignature":
            problems.append(f"{name} is a SAS (signed with the app's wrong key)")
        elif value != request.header("authorization"):
            problems.append(f"{name} is not the request's Bearer token")
    return problems


def no_shared_access_key(request: FakeRequest) -> list[str]:
    return [f"{name}: SharedAccessKey left" for name, value in request.headers
            if value.split(" ", 1)[0].lower() == "sharedaccesskey"]


class FakeServiceBusAdmin:
    """Service Bus entity management (ATOM): a created entity is answered as sent."""

    def __init__(self, fake: FakeAzure, host_regex: str) -> None:
        fake.add(host_regex, Expect(SERVICEBUS_AUDIENCE, extra_checks=(supplementary_problems,)),
                 self.handle)

    @staticmethod
    def handle(request: FakeRequest) -> FakeResponse:
        if request.method != "PUT":
            return FakeResponse(404, b"", {})
        return FakeResponse(201, request.body,
                            {"content-type": "application/atom+xml;type=entry;charset=utf-8"})


class FakeEventGridNamespace:
    """Event Grid namespace publishing (CloudEvents): a Bearer for Event Grid, no key."""

    def __init__(self, fake: FakeAzure, host_regex: str) -> None:
        fake.add(host_regex, Expect(EVENTGRID_AUDIENCE, extra_checks=(no_shared_access_key,)),
                 lambda request: FakeResponse.json({}))


# Data Lake and Files: rename sources, Put Range From URL, Copy File -------------------------

def _has_sas(url_or_path: str) -> bool:
    return bool({k.lower() for k, _ in parse_qsl(urlsplit(url_or_path).query)} & SAS_NAMES)


def rename_source_problems(request: FakeRequest) -> list[str]:
    problems = []
    for name in ("x-ms-rename-source", "x-ms-file-rename-source"):
        value = request.header(name)
        if value is not None and _has_sas(value):
            problems.append(f"{name} carries a SAS (signed with the app's wrong key)")
    return problems


def files_oauth_problems(request: FakeRequest) -> list[str]:
    """Files take a token only with the backup intent, from version 2022-11-02 on."""
    problems = []
    if (request.header("x-ms-file-request-intent") or "").lower() != "backup":
        problems.append("Files over OAuth need x-ms-file-request-intent: backup")
    if (request.header("x-ms-version") or "") < "2022-11-02":
        problems.append("Files over OAuth need x-ms-version 2022-11-02")
    return problems


class FakeDataLakeAndFiles:
    """Rename Path (dfs), Rename File, Put Range From URL and Copy File (file)."""

    def __init__(self, fake: FakeAzure, dfs_regex: str, file_regex: str) -> None:
        checks = (rename_source_problems, copy_source_problems)
        fake.add(dfs_regex, Expect(STORAGE_AUDIENCE, extra_checks=checks), self.handle)
        fake.add(file_regex, Expect(STORAGE_AUDIENCE,
                                    extra_checks=(*checks, files_oauth_problems)), self.handle)

    @staticmethod
    def handle(request: FakeRequest) -> FakeResponse:
        common = {"x-ms-request-id": str(uuid.uuid4()), "etag": '"0x8D1"',
                  "last-modified": "Tue, 01 Dec 2026 21:00:00 GMT"}
        if request.header("x-ms-rename-source") is not None:
            return FakeResponse(201, b"", common)
        if _comp(request) == "rename":
            return FakeResponse(200, b"", common)
        if _comp(request) == "range":
            return FakeResponse(201, b"", {**common, "x-ms-request-server-encrypted": "true"})
        if request.header("x-ms-copy-source") is not None:
            return FakeResponse(202, b"", {**common, "x-ms-copy-id": str(uuid.uuid4()),
                                           "x-ms-copy-status": "pending"})
        return FakeResponse(404, b"", {"x-ms-error-code": "ResourceNotFound"})
