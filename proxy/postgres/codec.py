"""The PostgreSQL v3 wire messages keyless reads while it logs in: pure encode and decode.

Only the start of a connection is parsed (the startup packets a client sends before its first
typed message, and the server's authentication exchange); after ReadyForQuery bytes are
relayed unparsed. Every length is checked before anything is allocated or read: a decoder
raises `CodecError` (a clear, secret-free message) for anything malformed or truncated, and
never another exception.

Startup packets (no type byte): Int32 length (itself included), Int32 code, body.
Typed messages: Byte1 type, Int32 length (itself included, not the type byte), body.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_MAJOR = 3  # 196608 = 3.0; minor versions (3.2 in PG 18) pass through unchanged

# A startup or authentication message longer than this is refused before it is read. The
# server's own limit for a startup packet is 10,000 bytes; SASL messages are a few hundred.
MAX_MESSAGE_LENGTH = 1 << 20
MAX_CANCEL_KEY_LENGTH = 256  # protocol 3.2 allows keys of up to 256 bytes

# Authentication request codes (the Int32 after 'R').
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12
AUTH_METHOD_NAMES = {
    AUTH_OK: "no password (AuthenticationOk)",
    AUTH_KERBEROS_V5: "Kerberos V5",
    AUTH_CLEARTEXT_PASSWORD: "a cleartext password",
    AUTH_MD5_PASSWORD: "an MD5 password",
    AUTH_GSS: "GSSAPI",
    AUTH_SSPI: "SSPI",
    AUTH_SASL: "SASL (SCRAM)",
}


class CodecError(ValueError):
    """Malformed, truncated or oversized input. The message names the problem, never the
    bytes (a password may be among them)."""


# -- startup packets (client → server, before the first typed message) ---------------------


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class StartupMessage:
    version: int  # major << 16 | minor
    parameters: tuple[tuple[str, str], ...]  # in the client's order

    def get(self, name: str) -> str | None:
        return next((value for key, value in self.parameters if key == name), None)

    def with_parameter(self, name: str, value: str) -> StartupMessage:
        """The same message with `name` set to `value` (replaced in place, else appended)."""
        if self.get(name) is None:
            return StartupMessage(self.version, (*self.parameters, (name, value)))
        return StartupMessage(self.version, tuple(
            (key, value if key == name else old) for key, old in self.parameters))


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def startup_length(header: bytes) -> int:
    """The total length of a startup packet from its first 4 bytes; refuses absurd values."""
    if len(header) != 4:
        raise CodecError("truncated startup packet header")
    (length,) = struct.unpack("!I", header)
    if length < 8:
        raise CodecError(f"startup packet length {length} is too short")
    if length > MAX_MESSAGE_LENGTH:
        raise CodecError(f"startup packet length {length} exceeds the {MAX_MESSAGE_LENGTH}-byte "
                         "limit")
    return length


def decode_startup(packet: bytes) -> StartupPacket:
    """One whole startup packet, its length prefix included."""
    length = startup_length(packet[:4])
    if len(packet) != length:
        raise CodecError(f"startup packet is {len(packet)} bytes, its header says {length}")
    (code,) = struct.unpack("!I", packet[4:8])
    body = packet[8:]
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if body:
            raise CodecError("SSLRequest/GSSENCRequest must be exactly 8 bytes")
        return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if not 8 <= len(body) <= 4 + MAX_CANCEL_KEY_LENGTH:
            raise CodecError("CancelRequest has a bad length")
        (pid,) = struct.unpack("!I", body[:4])
        return CancelRequest(pid, body[4:])
    if code >> 16 != PROTOCOL_MAJOR:
        raise CodecError(f"unsupported protocol version {code >> 16}.{code & 0xFFFF}")
    return StartupMessage(code, _parameters(body))


def _parameters(body: bytes) -> tuple[tuple[str, str], ...]:
    # name\0value\0 ... \0  — the list ends with an empty name.
    if not body.endswith(b"\0"):
        raise CodecError("StartupMessage parameters are not terminated")
    parts = body[:-1].split(b"\0")
    if parts == [b""]:
        parts = []
    elif parts[-1] != b"" or len(parts) % 2 != 1:
        raise CodecError("StartupMessage parameters are not name/value pairs")
    else:
        parts = parts[:-1]
    pairs: list[tuple[str, str]] = []
    for index in range(0, len(parts), 2):
        name, value = _text(parts[index]), _text(parts[index + 1])
        if not name:
            raise CodecError("StartupMessage has an empty parameter name")
        pairs.append((name, value))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise CodecError("StartupMessage repeats a parameter")
    if "user" not in names:
        raise CodecError("StartupMessage has no user")
    return tuple(pairs)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("text is not UTF-8") from None


def encode_startup(message: StartupMessage) -> bytes:
    body = b"".join(_cstring(name) + _cstring(value) for name, value in message.parameters)
    return _startup_packet(message.version, body + b"\0")


def encode_ssl_request() -> bytes:
    return _startup_packet(SSL_REQUEST_CODE, b"")


def encode_gssenc_request() -> bytes:
    return _startup_packet(GSSENC_REQUEST_CODE, b"")


def encode_cancel(request: CancelRequest) -> bytes:
    return _startup_packet(CANCEL_REQUEST_CODE, struct.pack("!I", request.pid) + request.secret)


def _startup_packet(code: int, body: bytes) -> bytes:
    return struct.pack("!II", 8 + len(body), code) + body


def _cstring(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        raise CodecError("a string holds a NUL byte")
    return raw + b"\0"


# -- typed messages -------------------------------------------------------------------------


def message_header(header: bytes) -> tuple[bytes, int]:
    """(type byte, body length) from a typed message's first 5 bytes; refuses absurd values."""
    if len(header) != 5:
        raise CodecError("truncated message header")
    kind = header[:1]
    (length,) = struct.unpack("!I", header[1:])
    if length < 4:
        raise CodecError(f"message length {length} is too short")
    if length > MAX_MESSAGE_LENGTH:
        raise CodecError(f"message length {length} exceeds the {MAX_MESSAGE_LENGTH}-byte limit")
    return kind, length - 4


def encode_message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", 4 + len(body)) + body


@dataclass(frozen=True, slots=True)
class Authentication:
    code: int
    data: bytes = b""  # MD5 salt, SASL mechanism list or SASL data

    @property
    def method(self) -> str:
        if self.code == AUTH_SASL:
            return f"SASL ({', '.join(self.mechanisms()) or 'no mechanism'})"
        return AUTH_METHOD_NAMES.get(self.code, f"authentication code {self.code}")

    def mechanisms(self) -> list[str]:
        return [m.decode("ascii", "replace") for m in self.data.split(b"\0") if m]


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: bytes  # b"I" idle, b"T" in a transaction, b"E" failed transaction


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    fields: tuple[tuple[str, str], ...]  # (field code, value), e.g. ("C", "28P01")
    notice: bool = False  # a NoticeResponse ('N') has the same shape

    def get(self, code: str) -> str:
        return next((value for key, value in self.fields if key == code), "")

    @property
    def sqlstate(self) -> str:
        return self.get("C")

    @property
    def message(self) -> str:
        return self.get("M")


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unrecognized: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OtherMessage:
    kind: bytes
    body: bytes


BackendMessage = (Authentication | ParameterStatus | BackendKeyData | ReadyForQuery
                  | ErrorResponse | NegotiateProtocolVersion | OtherMessage)


def decode_backend(kind: bytes, body: bytes) -> BackendMessage:
    """A server message of the login phase (type byte and body, without the length)."""
    if kind == b"R":
        if len(body) < 4:
            raise CodecError("Authentication message is too short")
        (code,) = struct.unpack("!I", body[:4])
        return Authentication(code, body[4:])
    if kind == b"S":
        name, value = _cstrings(body, 2, "ParameterStatus")
        return ParameterStatus(name, value)
    if kind == b"K":
        if not 8 <= len(body) <= 4 + MAX_CANCEL_KEY_LENGTH:
            raise CodecError("BackendKeyData has a bad length")
        (pid,) = struct.unpack("!I", body[:4])
        return BackendKeyData(pid, body[4:])
    if kind == b"Z":
        if len(body) != 1 or body not in (b"I", b"T", b"E"):
            raise CodecError("ReadyForQuery has a bad status")
        return ReadyForQuery(body)
    if kind in (b"E", b"N"):
        return ErrorResponse(_error_fields(body), notice=kind == b"N")
    if kind == b"v":
        if len(body) < 8:
            raise CodecError("NegotiateProtocolVersion is too short")
        minor, count = struct.unpack("!II", body[:8])
        if count > 1000:
            raise CodecError("NegotiateProtocolVersion lists too many options")
        names = _cstrings(body[8:], count, "NegotiateProtocolVersion")
        return NegotiateProtocolVersion(minor, tuple(names))
    return OtherMessage(kind, body)


def _cstrings(body: bytes, count: int, what: str) -> list[str]:
    parts = body.split(b"\0")
    if len(parts) != count + 1 or parts[-1] != b"":
        raise CodecError(f"{what} does not hold {count} terminated strings")
    return [_text(part) for part in parts[:-1]]


def _error_fields(body: bytes) -> tuple[tuple[str, str], ...]:
    # (Byte1 code, String value)* then a zero byte.
    if not body.endswith(b"\0"):
        raise CodecError("ErrorResponse is not terminated")
    fields: list[tuple[str, str]] = []
    position, terminator = 0, len(body) - 1
    while position < terminator:
        code = body[position:position + 1]
        end = body.find(b"\0", position + 1)
        # The field's own NUL must come before the message's final one.
        if code == b"\0" or end == terminator:
            raise CodecError("ErrorResponse field is malformed")
        fields.append((code.decode("latin-1"), body[position + 1:end].decode("utf-8", "replace")))
        position = end + 1
    return tuple(fields)


def encode_error(sqlstate: str, message: str, *, severity: str = "FATAL",
                 hint: str | None = None) -> bytes:
    """An ErrorResponse ('E') as the server would send it."""
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
    if hint:
        fields.append(("H", hint))
    body = b"".join(code.encode("ascii") + _cstring(value) for code, value in fields)
    return encode_message(b"E", body + b"\0")


def encode_authentication(code: int, data: bytes = b"") -> bytes:
    return encode_message(b"R", struct.pack("!I", code) + data)


def encode_parameter_status(name: str, value: str) -> bytes:
    return encode_message(b"S", _cstring(name) + _cstring(value))


def encode_backend_key(key: BackendKeyData) -> bytes:
    return encode_message(b"K", struct.pack("!I", key.pid) + key.secret)


def encode_ready(status: bytes = b"I") -> bytes:
    return encode_message(b"Z", status)


def encode_password(password: str) -> bytes:
    """PasswordMessage ('p'): the cleartext password answer to AuthenticationCleartextPassword."""
    return encode_message(b"p", _cstring(password))
