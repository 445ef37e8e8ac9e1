"""Blob Batch bodies: every sub-request signed the way an Entra-mode client signs it.

A Blob Batch (`POST …?comp=batch`, `multipart/mixed`) carries one embedded HTTP request per
part, and the SDKs sign each of them with the app's own credential: `Authorization: SharedKey`
in key mode, the SAS on each sub-request's URL in SAS mode. An Entra-mode client instead puts
`Authorization: Bearer <token>` (the outer request's token) on every sub-request and nothing
else. `rewrite_batch` turns the first form into the second.

The parser is strict on purpose: a body it cannot read completely is refused (`BatchError`),
never forwarded, because key material could hide in what it did not understand. Nothing here
does I/O, and no error message carries any part of the body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.conversions import STORAGE_SAS_PARAMS
from proxy.wire import remove_query_params

# The service's own limits (Blob Batch REST reference): at most 256 sub-requests, 4 MiB.
MAX_BATCH_BYTES = 4 * 1024 * 1024
MAX_SUBREQUESTS = 256

MALFORMED = "KeylessBatchMalformed"
TOO_LARGE = "KeylessBatchTooLarge"

CRLF = b"\r\n"
# RFC 2046 boundary: 1-70 characters from bchars, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHOD = re.compile(rb"[A-Z]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_FORBIDDEN_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_KEY_SCHEMES = ("sharedkey", "sharedkeylite")


class BatchError(Exception):
    """A batch keyless refuses: `code` and `status` for the app, a message without secrets."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def malformed(message: str) -> BatchError:
    return BatchError(MALFORMED, f"the Blob Batch body cannot be read: {message}; "
                                 "keyless refuses it rather than forward its signatures")


def is_batch(method: str, path: str) -> bool:
    """A Blob Batch request: POST with `comp=batch` in the query."""
    if method.upper() != "POST":
        return False
    query = path.partition("?")[2]
    return any(piece.lower() == "comp=batch" for piece in query.split("&"))


def boundary_of(content_type: str | None) -> str:
    """The multipart boundary of a `multipart/mixed; boundary=…` Content-Type."""
    if not content_type:
        raise malformed("no Content-Type")
    kind, *params = content_type.split(";")
    if kind.strip().lower() != "multipart/mixed":
        raise malformed("the Content-Type is not multipart/mixed")
    boundaries = []
    for param in params:
        name, sep, value = param.strip().partition("=")
        if sep and name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            boundaries.append(value)
    if len(boundaries) != 1 or not _BOUNDARY.fullmatch(boundaries[0]):
        raise malformed("no valid multipart boundary")
    return boundaries[0]


def check_length(content_length: str | None) -> None:
    """Refuse before buffering: the body must declare its length, within the service's cap."""
    if content_length is None or not content_length.isdigit():
        raise BatchError(MALFORMED, "a Blob Batch needs a Content-Length: keyless buffers "
                                    "batches (at most 4 MiB) to re-sign their sub-requests",
                         status=411)
    if int(content_length) > MAX_BATCH_BYTES:
        raise too_large(f"the body is {int(content_length)} bytes")


def too_large(what: str) -> BatchError:
    return BatchError(TOO_LARGE, f"{what}; a Blob Batch holds at most {MAX_SUBREQUESTS} "
                                 f"sub-requests and {MAX_BATCH_BYTES} bytes", status=413)


@dataclass(frozen=True, slots=True)
class SubRequest:
    """One part: its MIME headers (kept byte for byte), the embedded request line and
    headers, and the line ending that closed it (kept too)."""

    mime_headers: bytes
    request_line: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    ending: bytes

    @property
    def target(self) -> bytes:
        return self.request_line.split(b" ")[1]


def _header_lines(lines: list[bytes], where: str) -> list[tuple[bytes, bytes]]:
    fields = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise malformed(f"a {where} header line is not 'name: value'")
        if _FORBIDDEN_IN_VALUE.search(value):
            raise malformed(f"a {where} header value has a control character")
        fields.append((name, value.strip(b" \t")))
    return fields


def _parse_part(part: bytes) -> SubRequest:
    mime, sep, message = part.partition(CRLF + CRLF)
    if not sep:
        raise malformed("a part has no blank line after its headers")
    mime_fields = _header_lines(mime.split(CRLF), "part") if mime else []
    if any(name.lower() == b"authorization" for name, _ in mime_fields):
        raise malformed("a part header carries Authorization")
    kinds = [value.lower() for name, value in mime_fields if name.lower() == b"content-type"]
    if kinds != [b"application/http"]:
        raise malformed("a part is not Content-Type: application/http")
    lines = message.split(CRLF)
    # The embedded request ends with its header block; its closing blank line may belong
    # to the next delimiter's CRLF (the REST reference's form) or be written out (the
    # Python SDK's). Anything after it would be a sub-request body: Delete Blob and Set
    # Blob Tier take none.
    ending = b""
    while lines and lines[-1] == b"" and len(ending) < 2 * len(CRLF):
        lines.pop()
        ending += CRLF
    if not lines or b"" in lines:
        raise malformed("a sub-request has a body or no request line")
    request_line, *header_lines = lines
    words = request_line.split(b" ")
    if len(words) != 3 or not _METHOD.fullmatch(words[0]) \
            or not words[1].startswith(b"/") or not _VERSION.fullmatch(words[2]):
        raise malformed("a sub-request line is not 'METHOD /path HTTP/1.1'")
    if _FORBIDDEN_IN_VALUE.search(words[1]) or any(c > 0x7E for c in words[1]):
        raise malformed("a sub-request target has a character URLs may not carry")
    return SubRequest(mime, request_line, tuple(_header_lines(header_lines, "sub-request")),
                      ending)


def parse_batch(body: bytes, boundary: str) -> list[SubRequest]:
    """The parts of a batch body; `BatchError` for anything not exactly a batch."""
    if len(body) > MAX_BATCH_BYTES:
        raise too_large(f"the body is {len(body)} bytes")
    dash = b"--" + boundary.encode("ascii")
    if not body.startswith(dash):
        raise malformed("the body does not start with the boundary")
    pieces = body[len(dash):].split(CRLF + dash)
    closing = pieces.pop()
    if not closing.startswith(b"--") or closing[2:].strip(b"\r\n") != b"":
        raise malformed("the body does not end with the closing boundary")
    if not pieces:
        raise malformed("the batch has no sub-request")
    if len(pieces) > MAX_SUBREQUESTS:
        raise too_large(f"the batch has {len(pieces)} sub-requests")
    parts = []
    for piece in pieces:
        # Transport padding (RFC 2046) may follow a delimiter; then its CRLF.
        padding, sep, part = piece.partition(CRLF)
        if not sep or padding.strip(b" \t"):
            raise malformed("a boundary line has trailing text")
        parts.append(_parse_part(part))
    return parts


def entra_subrequest(sub: SubRequest, token: str) -> bytes:
    """The part as an Entra-mode client writes it: SAS off the target, every Authorization
    replaced by the outer request's Bearer token, everything else as it was."""
    method, target, version = sub.request_line.split(b" ")
    path, _ = remove_query_params(target.decode("ascii"), STORAGE_SAS_PARAMS)
    if b"?" in target and "?" not in path:
        path += "?"  # the SDK's Entra-mode form keeps the empty query
    headers = [(name, value) for name, value in sub.headers if name.lower() != b"authorization"]
    # Where the Entra-mode SDK puts it: just before Content-Length (else last).
    lengths = [i for i, (name, _) in enumerate(headers) if name.lower() == b"content-length"]
    headers.insert(lengths[0] if lengths else len(headers),
                   (b"Authorization", b"Bearer " + token.encode("ascii")))
    head = [b" ".join((method, path.encode("ascii"), version))]
    head += [name + b": " + value for name, value in headers]
    return sub.mime_headers + CRLF + CRLF + CRLF.join(head) + sub.ending


def resign_batch(body: bytes, content_type: str | None, token: str) -> tuple[bytes, list[str]]:
    """The batch body with every sub-request carrying `token` and no key material, and
    the key schemes the sub-requests carried (once each, for metrics).

    Idempotent: a rewritten body rewritten with a fresh token carries only the fresh one
    (the 401 replay re-signs this way).
    """
    if not token or not token.isascii() or any(c in token for c in "\r\n "):
        raise BatchError(MALFORMED, "the outer request has no usable Bearer token", status=500)
    boundary = boundary_of(content_type)
    parts = parse_batch(body, boundary)
    dash = b"--" + boundary.encode("ascii")
    out = [dash + CRLF + entra_subrequest(part, token) for part in parts]
    return CRLF.join(out) + CRLF + dash + b"--" + CRLF, sorted(set(key_material(parts)))


def rewrite_batch(body: bytes, content_type: str | None, token: str) -> bytes:
    return resign_batch(body, content_type, token)[0]


def key_material(parts: list[SubRequest]) -> list[str]:
    """Which key material the parts still carry (for tests and checks): scheme names."""
    found = []
    for part in parts:
        for name, value in part.headers:
            if name.lower() == b"authorization":
                scheme = value.split(b" ", 1)[0].decode("latin-1").lower()
                if scheme in _KEY_SCHEMES:
                    found.append(scheme)
        query = part.target.partition(b"?")[2].decode("ascii")
        _, removed = remove_query_params("/?" + query, STORAGE_SAS_PARAMS)
        if removed:
            found.append("SAS")
    return found
