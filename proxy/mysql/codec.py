"""The MySQL client/server protocol, as far as a login needs it: pure encode/decode.

Every packet is a 3-byte little-endian payload length, a 1-byte sequence id and the payload.
A login is: the server's HandshakeV10 (seq 0); the client's SSLRequest (the first 32 bytes of
a HandshakeResponse41 with CLIENT_SSL; TLS starts right after it) and HandshakeResponse41;
then the server's OK 0x00, ERR 0xFF, AuthSwitchRequest 0xFE or AuthMoreData 0x01, each
answered by the client until OK or ERR. Sequence ids count up by one per packet, per
direction change, starting at 0 with the greeting.

Nothing here does I/O; proxy/mysql/session.py reads and writes the packets.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, replace

# -- capability flags (the ones a login relay must understand) ---------------------------------
CLIENT_LONG_PASSWORD = 1 << 0  # MariaDB: unset = "CLIENT_MYSQL", extended flags in the filler
CLIENT_FOUND_ROWS = 1 << 1
CLIENT_LONG_FLAG = 1 << 2
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_NO_SCHEMA = 1 << 4
CLIENT_COMPRESS = 1 << 5
CLIENT_ODBC = 1 << 6
CLIENT_LOCAL_FILES = 1 << 7
CLIENT_IGNORE_SPACE = 1 << 8
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_INTERACTIVE = 1 << 10
CLIENT_SSL = 1 << 11
CLIENT_IGNORE_SIGPIPE = 1 << 12
CLIENT_TRANSACTIONS = 1 << 13
CLIENT_RESERVED = 1 << 14
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_MULTI_STATEMENTS = 1 << 16
CLIENT_MULTI_RESULTS = 1 << 17
CLIENT_PS_MULTI_RESULTS = 1 << 18
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_CONNECT_ATTRS = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
CLIENT_SESSION_TRACK = 1 << 23
CLIENT_DEPRECATE_EOF = 1 << 24
CLIENT_OPTIONAL_RESULTSET_METADATA = 1 << 25
CLIENT_ZSTD_COMPRESSION_ALGORITHM = 1 << 26
CLIENT_QUERY_ATTRIBUTES = 1 << 27
CLIENT_MULTI_FACTOR_AUTHENTICATION = 1 << 28
CLIENT_SSL_VERIFY_SERVER_CERT = 1 << 30
CLIENT_REMEMBER_OPTIONS = 1 << 31

# What keyless cannot relay: compression changes the framing of everything after the login
# and is negotiated between the two ends keyless splits; a second factor has packets
# (AuthNextFactor) keyless cannot answer with a token; TLS is per side, never end to end.
NOT_RELAYABLE = (CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION_ALGORITHM
                 | CLIENT_MULTI_FACTOR_AUTHENTICATION | CLIENT_SSL | CLIENT_SSL_VERIFY_SERVER_CERT)
# What keyless offers an app before it knows the server (transparent mode: the app's TLS
# server name names it): what every MySQL >= 5.7 and MariaDB >= 10.2 has.
OFFERED_BLIND = (
    CLIENT_LONG_PASSWORD | CLIENT_FOUND_ROWS | CLIENT_LONG_FLAG | CLIENT_CONNECT_WITH_DB
    | CLIENT_NO_SCHEMA | CLIENT_ODBC | CLIENT_LOCAL_FILES | CLIENT_IGNORE_SPACE
    | CLIENT_PROTOCOL_41 | CLIENT_INTERACTIVE | CLIENT_IGNORE_SIGPIPE | CLIENT_TRANSACTIONS
    | CLIENT_RESERVED | CLIENT_SECURE_CONNECTION | CLIENT_MULTI_STATEMENTS
    | CLIENT_MULTI_RESULTS | CLIENT_PS_MULTI_RESULTS | CLIENT_PLUGIN_AUTH
    | CLIENT_CONNECT_ATTRS | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    | CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS | CLIENT_SESSION_TRACK | CLIENT_DEPRECATE_EOF)
BLIND_VERSION = "8.0.0-keyless"
# Flags that only shape the login (or mean nothing to the server): an app may have chosen
# them although the server lacks them. Any other flag changes what the relayed bytes mean.
LOGIN_ONLY = (CLIENT_LONG_PASSWORD | CLIENT_CONNECT_WITH_DB | CLIENT_NO_SCHEMA | CLIENT_ODBC
              | CLIENT_IGNORE_SPACE | CLIENT_SSL | CLIENT_IGNORE_SIGPIPE | CLIENT_RESERVED
              | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH | CLIENT_CONNECT_ATTRS
              | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS
              | CLIENT_SSL_VERIFY_SERVER_CERT | CLIENT_REMEMBER_OPTIONS | CLIENT_INTERACTIVE)
# What keyless needs from the server (and sets itself in its response upstream).
REQUIRED_UPSTREAM = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH | CLIENT_SSL

HEADER_SIZE = 4
MAX_PAYLOAD = 0xFFFFFF  # a payload of exactly this length continues in the next packet
MAX_MESSAGE = 16 * 1024 * 1024  # a relayed message made of several packets: refused above
MAX_AUTH_PACKET = 1024 * 1024  # every packet of the login phase: refused above, never read
SSL_REQUEST_SIZE = 32

NATIVE = "mysql_native_password"
CACHING_SHA2 = "caching_sha2_password"
SHA256 = "sha256_password"
CLEAR = "mysql_clear_password"

OK = 0x00
AUTH_MORE_DATA = 0x01
AUTH_SWITCH = 0xFE
ERR = 0xFF
# caching_sha2_password's AuthMoreData bodies
FAST_AUTH_OK = b"\x03"
PERFORM_FULL_AUTH = b"\x04"
REQUEST_PUBLIC_KEY = b"\x02"

# Error codes keyless sends itself
ER_ACCESS_DENIED = 1045  # SQLSTATE 28000
ER_HANDSHAKE = 1043  # SQLSTATE 08S01 "Bad handshake"


class ProtocolError(ValueError):
    """Bytes that are not the packet the login expects. The message never holds the bytes."""


class PacketTooLarge(ProtocolError):
    """A length prefix above the limit: refused before any of the payload is read."""


def unrelayable_choices(app_flags: int, server_flags: int) -> int:
    """Flags the app chose that the server lacks and that change what relayed bytes mean."""
    return app_flags & ~server_flags & ~LOGIN_ONLY


FLAG_NAMES = {value: name.removeprefix("CLIENT_") for name, value in dict(globals()).items()
              if name.startswith("CLIENT_") and isinstance(value, int)}


def flag_names(flags: int) -> str:
    return ", ".join(FLAG_NAMES.get(1 << bit, f"bit {bit}") for bit in range(32)
                     if flags & (1 << bit))


# -- framing ------------------------------------------------------------------------------------

def encode_packet(seq: int, payload: bytes) -> bytes:
    """One packet (the login's packets are far below 16 MiB; `split_message` for larger)."""
    if len(payload) >= MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes needs splitting")
    return struct.pack("<I", len(payload))[:3] + bytes((seq & 0xFF,)) + payload


def decode_header(header: bytes, limit: int = MAX_AUTH_PACKET) -> tuple[int, int]:
    """(payload length, sequence id) of a 4-byte header; a length above `limit` is refused."""
    if len(header) != HEADER_SIZE:
        raise ProtocolError(f"packet header of {len(header)} bytes")
    length = int.from_bytes(header[:3], "little")
    if length > limit:
        raise PacketTooLarge(f"packet of {length} bytes, more than the {limit} allowed here")
    return length, header[3]


def split_message(seq: int, payload: bytes) -> bytes:
    """A message of any size as packets: 0xFFFFFF-byte chunks and a shorter last one."""
    out = bytearray()
    offset = 0
    while True:
        chunk = payload[offset:offset + MAX_PAYLOAD]
        out += struct.pack("<I", len(chunk))[:3] + bytes((seq & 0xFF,)) + chunk
        seq += 1
        offset += len(chunk)
        if len(chunk) < MAX_PAYLOAD:
            return bytes(out)


# -- primitive types ----------------------------------------------------------------------------

class Cursor:
    """Reads fields from a payload; every read past the end is a ProtocolError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise ProtocolError(f"{self.what}: truncated")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "little")

    def nul_string(self) -> bytes:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError(f"{self.what}: string without its NUL")
        chunk = self.data[self.pos:end]
        self.pos = end + 1
        return chunk

    def lenenc_int(self) -> int:
        first = self.uint(1)
        if first < 0xFB:
            return first
        if first == 0xFC:
            return self.uint(2)
        if first == 0xFD:
            return self.uint(3)
        if first == 0xFE:
            return self.uint(8)
        raise ProtocolError(f"{self.what}: bad length-encoded integer")

    def lenenc_bytes(self) -> bytes:
        return self.take(self.lenenc_int())

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.data)


def lenenc_int(value: int) -> bytes:
    if value < 0xFB:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + value.to_bytes(2, "little")
    if value < 1 << 24:
        return b"\xfd" + value.to_bytes(3, "little")
    return b"\xfe" + value.to_bytes(8, "little")


def lenenc_bytes(value: bytes) -> bytes:
    return lenenc_int(len(value)) + value


# -- HandshakeV10 (the server's greeting) -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Handshake:
    server_version: str
    connection_id: int
    nonce: bytes = field(repr=False)  # auth-plugin-data, 20 bytes in practice
    capabilities: int
    charset: int
    status: int
    auth_plugin: str
    reserved: bytes = b"\0" * 10  # MariaDB keeps its extended capabilities in the last 4


def encode_handshake(h: Handshake) -> bytes:
    nonce = h.nonce
    # part 1 is 8 bytes; part 2 holds the rest and a NUL, at least 13 bytes together
    part2 = nonce[8:] + b"\0"
    part2 += b"\0" * max(0, 13 - len(part2))
    data_len = len(nonce) + 1 if h.capabilities & CLIENT_PLUGIN_AUTH else 0
    payload = (
        b"\x0a" + h.server_version.encode() + b"\0"
        + struct.pack("<I", h.connection_id)
        + nonce[:8] + b"\0"
        + struct.pack("<H", h.capabilities & 0xFFFF)
        + bytes((h.charset,))
        + struct.pack("<H", h.status)
        + struct.pack("<H", h.capabilities >> 16)
        + bytes((data_len,))
        + h.reserved
    )
    if h.capabilities & CLIENT_SECURE_CONNECTION:
        payload += part2
    if h.capabilities & CLIENT_PLUGIN_AUTH:
        payload += h.auth_plugin.encode() + b"\0"
    return payload


def decode_handshake(payload: bytes) -> Handshake:
    c = Cursor(payload, "server greeting")
    if payload[:1] == b"\xff":
        raise ProtocolError("server greeting: the server sent an error instead")
    if c.uint(1) != 10:
        raise ProtocolError("server greeting: not protocol version 10")
    version = c.nul_string().decode("utf-8", "replace")
    connection_id = c.uint(4)
    nonce = c.take(8)
    c.take(1)
    capabilities = c.uint(2)
    charset = c.uint(1) if not c.at_end else 0
    status = c.uint(2) if not c.at_end else 0
    capabilities |= c.uint(2) << 16 if not c.at_end else 0
    data_len = c.uint(1) if not c.at_end else 0
    reserved = c.take(10) if not c.at_end else b"\0" * 10
    plugin = ""
    if capabilities & CLIENT_SECURE_CONNECTION and not c.at_end:
        part2 = c.take(max(13, data_len - 8))
        nonce += part2[:-1]  # its last byte is a NUL
    if capabilities & CLIENT_PLUGIN_AUTH and not c.at_end:
        rest = c.rest()
        plugin = rest.split(b"\0", 1)[0].decode("ascii", "replace")
    return Handshake(version, connection_id, nonce, capabilities, charset, status,
                     plugin or NATIVE, reserved)


# -- SSLRequest and HandshakeResponse41 (the client's answer) -----------------------------------

@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    capabilities: int
    max_packet: int
    charset: int
    user: str
    auth_response: bytes = field(repr=False)
    database: str | None = None
    auth_plugin: str | None = None
    attributes: tuple[tuple[str, str], ...] | None = None
    filler: bytes = b"\0" * 23  # MariaDB clients put extended capabilities in the last 4

    def with_auth(self, plugin: str, auth_response: bytes) -> HandshakeResponse:
        return replace(self, auth_plugin=plugin, auth_response=auth_response)


def encode_ssl_request(capabilities: int, max_packet: int, charset: int,
                       filler: bytes = b"\0" * 23) -> bytes:
    return (struct.pack("<IIB", capabilities | CLIENT_SSL, max_packet, charset)
            + filler[:23].ljust(23, b"\0"))


def is_ssl_request(payload: bytes) -> bool:
    """The short, 32-byte response a client sends before TLS."""
    return len(payload) == SSL_REQUEST_SIZE and bool(
        int.from_bytes(payload[:4], "little") & CLIENT_SSL)


def encode_handshake_response(r: HandshakeResponse) -> bytes:
    caps = r.capabilities
    out = bytearray(struct.pack("<IIB", caps, r.max_packet, r.charset))
    out += r.filler[:23].ljust(23, b"\0")
    out += r.user.encode() + b"\0"
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        out += lenenc_bytes(r.auth_response)
    elif caps & CLIENT_SECURE_CONNECTION:
        if len(r.auth_response) > 255:
            raise ProtocolError("auth response longer than 255 bytes needs "
                                "CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA")
        out += bytes((len(r.auth_response),)) + r.auth_response
    else:
        out += r.auth_response + b"\0"
    if caps & CLIENT_CONNECT_WITH_DB:
        out += (r.database or "").encode() + b"\0"
    if caps & CLIENT_PLUGIN_AUTH:
        out += (r.auth_plugin or "").encode() + b"\0"
    if caps & CLIENT_CONNECT_ATTRS:
        attrs = b"".join(lenenc_bytes(k.encode()) + lenenc_bytes(v.encode())
                         for k, v in r.attributes or ())
        out += lenenc_bytes(attrs)
    return bytes(out)


def decode_handshake_response(payload: bytes) -> HandshakeResponse:
    c = Cursor(payload, "client handshake response")
    caps = c.uint(4)
    if not caps & CLIENT_PROTOCOL_41:
        raise ProtocolError("client handshake response: not protocol 4.1 (too old a client)")
    max_packet = c.uint(4)
    charset = c.uint(1)
    filler = c.take(23)
    user = c.nul_string().decode("utf-8", "replace")
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        auth = c.lenenc_bytes()
    elif caps & CLIENT_SECURE_CONNECTION:
        auth = c.take(c.uint(1))
    else:
        auth = c.nul_string()
    database = None
    if caps & CLIENT_CONNECT_WITH_DB and not c.at_end:
        database = c.nul_string().decode("utf-8", "replace")
    plugin = None
    if caps & CLIENT_PLUGIN_AUTH and not c.at_end:
        plugin = c.nul_string().decode("ascii", "replace")
    attributes = None
    if caps & CLIENT_CONNECT_ATTRS and not c.at_end:
        block = Cursor(c.lenenc_bytes(), "client connection attributes")
        pairs = []
        while not block.at_end:
            key = block.lenenc_bytes().decode("utf-8", "replace")
            pairs.append((key, block.lenenc_bytes().decode("utf-8", "replace")))
        attributes = tuple(pairs)
    return HandshakeResponse(caps, max_packet, charset, user, auth, database, plugin,
                             attributes, filler)


# -- the server's answers during the login --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AuthSwitch:
    plugin: str
    data: bytes = field(repr=False)  # the new nonce, for the scramble plugins

    @property
    def nonce(self) -> bytes:
        # servers send the 20-byte nonce followed by a NUL
        return self.data[:-1] if self.data.endswith(b"\0") else self.data


def encode_auth_switch(s: AuthSwitch) -> bytes:
    return b"\xfe" + s.plugin.encode() + b"\0" + s.data


def decode_auth_switch(payload: bytes) -> AuthSwitch:
    if payload[:1] != b"\xfe" or len(payload) < 2:
        # a bare 0xFE is the pre-4.1 "old password" switch nobody can answer securely
        raise ProtocolError("auth switch request without a plugin name (old passwords)")
    c = Cursor(payload[1:], "auth switch request")
    plugin = c.nul_string().decode("ascii", "replace")
    return AuthSwitch(plugin, c.rest())


def encode_auth_more_data(data: bytes) -> bytes:
    return b"\x01" + data


def decode_auth_more_data(payload: bytes) -> bytes:
    if payload[:1] != b"\x01":
        raise ProtocolError("not an AuthMoreData packet")
    return payload[1:]


@dataclass(frozen=True, slots=True)
class Ok:
    affected_rows: int = 0
    last_insert_id: int = 0
    status: int = 0x0002  # SERVER_STATUS_AUTOCOMMIT
    warnings: int = 0
    info: bytes = b""


def encode_ok(ok: Ok = Ok()) -> bytes:
    return (b"\x00" + lenenc_int(ok.affected_rows) + lenenc_int(ok.last_insert_id)
            + struct.pack("<HH", ok.status, ok.warnings) + ok.info)


def decode_ok(payload: bytes) -> Ok:
    if payload[:1] not in (b"\x00", b"\xfe"):
        raise ProtocolError("not an OK packet")
    c = Cursor(payload[1:], "OK packet")
    return Ok(c.lenenc_int(), c.lenenc_int(), c.uint(2), c.uint(2), c.rest())


@dataclass(frozen=True, slots=True)
class Err:
    code: int
    sqlstate: str
    message: str


def encode_err(err: Err) -> bytes:
    state = err.sqlstate.encode("ascii")[:5].ljust(5, b"0")
    return (b"\xff" + struct.pack("<H", err.code) + b"#" + state
            + err.message.encode("utf-8", "replace"))


def decode_err(payload: bytes) -> Err:
    if payload[:1] != b"\xff" or len(payload) < 3:
        raise ProtocolError("not an ERR packet")
    code = int.from_bytes(payload[1:3], "little")
    rest = payload[3:]
    state = ""
    if rest[:1] == b"#":
        state, rest = rest[1:6].decode("ascii", "replace"), rest[6:]
    return Err(code, state, rest.decode("utf-8", "replace"))


# -- auth responses ---------------------------------------------------------------------------

def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def scramble_native(password: bytes, nonce: bytes) -> bytes:
    """mysql_native_password: SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))); empty for no password."""
    if not password:
        return b""
    stage1 = hashlib.sha1(password).digest()
    stage2 = hashlib.sha1(stage1).digest()
    return _xor(stage1, hashlib.sha1(nonce[:20] + stage2).digest())


def scramble_caching_sha2(password: bytes, nonce: bytes) -> bytes:
    """caching_sha2_password's fast path: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce)."""
    if not password:
        return b""
    p1 = hashlib.sha256(password).digest()
    p2 = hashlib.sha256(p1).digest()
    return _xor(p1, hashlib.sha256(p2 + nonce[:20]).digest())


def clear_password(password: bytes) -> bytes:
    """mysql_clear_password, sha256_password and caching_sha2's full auth over TLS."""
    return password + b"\0"


# Plugins keyless can answer with a token, and how (their first response).
FIRST_RESPONSE = {
    NATIVE: scramble_native,
    CACHING_SHA2: scramble_caching_sha2,
    CLEAR: lambda password, _nonce: clear_password(password),
    SHA256: lambda password, _nonce: clear_password(password),  # in clear: TLS always
}


def auth_response(plugin: str, password: bytes, nonce: bytes) -> bytes:
    try:
        return FIRST_RESPONSE[plugin](password, nonce)
    except KeyError:
        raise ProtocolError(f"the server asked for the auth plugin {plugin!r}, "
                            "which keyless cannot answer with a token") from None
