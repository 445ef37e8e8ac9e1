"""The PostgreSQL wire codec: round trips, the startup packets, the limits, and fuzzing.

Random, truncated and oversized input gives a clear CodecError (never another exception, and
never the bytes themselves in the message), and a session fed such input from a client never
asks for a token nor dials the upstream. `HYPOTHESIS_PROFILE=fuzz` runs 10,000 examples each.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.listeners.upstream import UpstreamError
from proxy.postgres import codec, session
from proxy.postgres.codec import (
    Authentication,
    BackendKeyData,
    CancelRequest,
    CodecError,
    ErrorResponse,
    GSSENCRequest,
    NegotiateProtocolVersion,
    ParameterStatus,
    ReadyForQuery,
    SSLRequest,
    StartupMessage,
)
from proxy.tokens import TokenUnavailable

PARAMS = (("user", "app_user"), ("database", "appdb"), ("application_name", "psql"),
          ("client_encoding", "UTF8"))
STARTUP = StartupMessage(196608, PARAMS)
SECRET_PASSWORD = "s3cret-Passw0rd"


# -- startup packets ------------------------------------------------------------------------


def test_startup_message_round_trips_with_its_parameters_in_order():
    raw = codec.encode_startup(STARTUP)
    assert raw[:8] == struct.pack("!II", len(raw), 196608)
    assert raw.endswith(b"UTF8\0\0")
    decoded = codec.decode_startup(raw)
    assert decoded == STARTUP
    assert decoded.get("database") == "appdb"
    assert decoded.get("options") is None


def test_protocol_minor_versions_pass_through():
    message = StartupMessage(196610, (("user", "u"), ("_pq_.x", "1")))  # 3.2 (PG 18)
    assert codec.decode_startup(codec.encode_startup(message)) == message


def test_with_parameter_replaces_in_place_or_appends():
    replaced = STARTUP.with_parameter("user", "identity_role")
    assert replaced.parameters[0] == ("user", "identity_role")
    assert replaced.parameters[1:] == PARAMS[1:]
    added = StartupMessage(196608, (("user", "u"),)).with_parameter("database", "d")
    assert added.parameters == (("user", "u"), ("database", "d"))


@pytest.mark.parametrize(("raw", "expected"), [
    (bytes.fromhex("0000000804d2162f"), SSLRequest()),
    (bytes.fromhex("0000000804d21630"), GSSENCRequest()),
])
def test_ssl_and_gssenc_requests_are_the_documented_bytes(raw, expected):
    # 80877103 = 0x04d2162f, 80877104 = 0x04d21630 (protocol docs, "Message Formats")
    assert codec.decode_startup(raw) == expected
    encoder = codec.encode_ssl_request if expected == SSLRequest() else codec.encode_gssenc_request
    assert encoder() == raw


def test_cancel_request_round_trips_with_a_4_byte_and_a_long_key():
    for secret in (b"\x01\x02\x03\x04", bytes(range(32))):
        request = CancelRequest(4242, secret)
        raw = codec.encode_cancel(request)
        assert raw[:8] == struct.pack("!II", 12 + len(secret), 80877102)
        assert codec.decode_startup(raw) == request


@pytest.mark.parametrize(("raw", "message"), [
    (struct.pack("!II", 8, 196608) + b"\0", "is 9 bytes, its header says 8"),
    (struct.pack("!II", 9, 196608) + b"\0", "has no user"),
    (struct.pack("!II", 11, 196608) + b"u\0v", "not terminated"),
    (struct.pack("!II", 11, 196608) + b"u\0\0", "not name/value pairs"),
    (codec._startup_packet(196608, b"user\0a\0\xff\0\0"), "not name/value pairs"),
    (codec._startup_packet(196608, b"user\0\xff\xfe\0\0"), "not UTF-8"),
    (codec._startup_packet(196608, b"user\0a\0user\0b\0\0"), "repeats a parameter"),
    (codec._startup_packet(196608, b"\0a\0\0"), "empty parameter name"),
    (codec._startup_packet(131072, b"user\0a\0\0"), "unsupported protocol version 2.0"),
    (codec._startup_packet(80877103, b"x"), "exactly 8 bytes"),
    (codec._startup_packet(80877102, b"\0\0\0\1"), "CancelRequest has a bad length"),
    (codec._startup_packet(80877102, b"\0" * 300), "CancelRequest has a bad length"),
    (struct.pack("!I", 7) + b"\0\0\0", "too short"),
])
def test_malformed_startup_packets_are_clear_errors(raw, message):
    with pytest.raises(CodecError, match=message):
        codec.decode_startup(raw)


def test_length_limit_is_checked_on_the_header_alone():
    assert codec.startup_length(struct.pack("!I", codec.MAX_MESSAGE_LENGTH)) \
        == codec.MAX_MESSAGE_LENGTH
    with pytest.raises(CodecError, match="1073741824 exceeds the 1048576-byte limit"):
        codec.startup_length(struct.pack("!I", 1 << 30))
    with pytest.raises(CodecError, match="exceeds"):
        codec.message_header(b"p" + struct.pack("!I", codec.MAX_MESSAGE_LENGTH + 5))
    assert codec.message_header(b"p" + struct.pack("!I", 4)) == (b"p", 0)
    with pytest.raises(CodecError, match="too short"):
        codec.message_header(b"p" + struct.pack("!I", 3))
    with pytest.raises(CodecError, match="truncated"):
        codec.message_header(b"p\0\0")


# -- backend messages -----------------------------------------------------------------------


def test_backend_messages_round_trip():
    key = BackendKeyData(77, b"\xde\xad\xbe\xef")
    cases = [
        (codec.encode_authentication(codec.AUTH_CLEARTEXT_PASSWORD), Authentication(3)),
        (codec.encode_authentication(codec.AUTH_MD5_PASSWORD, b"salt"), Authentication(5, b"salt")),
        (codec.encode_parameter_status("server_version", "15.18"),
         ParameterStatus("server_version", "15.18")),
        (codec.encode_backend_key(key), key),
        (codec.encode_ready(b"T"), ReadyForQuery(b"T")),
    ]
    for raw, expected in cases:
        kind, length = codec.message_header(raw[:5])
        assert length == len(raw) - 5
        assert codec.decode_backend(kind, raw[5:]) == expected


def test_sasl_request_names_its_mechanisms():
    raw = codec.encode_authentication(codec.AUTH_SASL, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
    message = codec.decode_backend(b"R", raw[5:])
    assert message.method == "SASL (SCRAM-SHA-256-PLUS, SCRAM-SHA-256)"
    assert Authentication(5).method == "an MD5 password"
    assert Authentication(99).method == "authentication code 99"


def test_error_response_round_trips_its_fields():
    raw = codec.encode_error("28P01", 'password authentication failed for user "x"',
                             hint="check it")
    assert raw[:1] == b"E"
    error = codec.decode_backend(b"E", raw[5:])
    assert isinstance(error, ErrorResponse) and not error.notice
    assert error.sqlstate == "28P01"
    assert error.message == 'password authentication failed for user "x"'
    assert error.get("S") == error.get("V") == "FATAL"
    assert error.get("H") == "check it"
    assert codec.decode_backend(b"N", raw[5:]).notice


@pytest.mark.parametrize("body", [b"", b"SFATAL", b"SFATAL\0", b"\0\0", b"CX\0\0\0"[:3]])
def test_malformed_error_responses_are_clear_errors(body):
    with pytest.raises(CodecError, match="ErrorResponse"):
        codec.decode_backend(b"E", body)


def test_negotiate_protocol_version():
    body = struct.pack("!II", 0, 1) + b"_pq_.unknown\0"
    assert codec.decode_backend(b"v", body) == NegotiateProtocolVersion(0, ("_pq_.unknown",))
    with pytest.raises(CodecError):
        codec.decode_backend(b"v", struct.pack("!II", 0, 2) + b"a\0")


def test_password_message_and_nul_bytes():
    assert codec.encode_password("tok") == b"p\0\0\0\x08tok\0"
    with pytest.raises(CodecError, match="NUL"):
        codec.encode_password("a\0b")


# -- fuzzing --------------------------------------------------------------------------------


def clear_error_or_result(decode, *args):
    try:
        return decode(*args)
    except CodecError as exc:
        text = str(exc)
        assert text, "a CodecError without a message is no clear error"
        assert SECRET_PASSWORD not in text
        return None


valid_startups = st.sampled_from([
    codec.encode_startup(STARTUP),
    codec.encode_ssl_request(),
    codec.encode_gssenc_request(),
    codec.encode_cancel(CancelRequest(1, b"abcd")),
    codec.encode_startup(StartupMessage(196608, (("user", SECRET_PASSWORD),))),
])


@st.composite
def mangled(draw, valid):
    raw = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, 3))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw[:draw(st.integers(0, len(raw)))])


@given(st.binary(max_size=300) | mangled(valid_startups))
def test_fuzz_decode_startup(raw):
    decoded = clear_error_or_result(codec.decode_startup, raw)
    if decoded is not None:
        assert len(raw) == struct.unpack("!I", raw[:4])[0]


valid_backend = st.sampled_from([
    codec.encode_authentication(codec.AUTH_SASL, b"SCRAM-SHA-256\0\0"),
    codec.encode_error("28000", 'role "x" does not exist'),
    codec.encode_parameter_status("a", "b"),
    codec.encode_backend_key(BackendKeyData(1, b"1234")),
    codec.encode_ready(),
    codec.encode_message(b"v", struct.pack("!II", 0, 1) + b"x\0"),
])


@given(st.binary(max_size=300) | mangled(valid_backend))
def test_fuzz_decode_backend(raw):
    header = clear_error_or_result(codec.message_header, raw[:5])
    if header is not None and len(raw) - 5 >= header[1]:
        clear_error_or_result(codec.decode_backend, header[0], raw[5:5 + header[1]])


# -- a session fed garbage never reaches the token or the upstream ---------------------------


@dataclass
class _Spec:
    upstream: tuple[str, int] = ("keylesspg.postgres.database.azure.com", 5432)
    user: str | None = None
    client_tls: bool = False


@dataclass
class RecordingConnection:
    """Connection's surface, recording what the session asked of it."""

    spec: _Spec = field(default_factory=_Spec)
    peer: str = "127.0.0.1:1"
    audit: bool = False
    transparent: bool = False
    asked: list[str] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)

    async def token(self):
        self.asked.append("token")
        raise TokenUnavailable("the fake has none")

    async def open_upstream(self, tls):
        self.asked.append("open_upstream")
        raise UpstreamError("refused")

    def login(self, result):
        self.logins.append(result)


class _Writer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass


def run_session(client_bytes: bytes) -> tuple[RecordingConnection, bytes]:
    async def go() -> tuple[RecordingConnection, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(client_bytes)
        reader.feed_eof()
        writer = _Writer()
        conn = RecordingConnection()
        await session.serve(conn, reader, writer)  # type: ignore[arg-type]
        return conn, bytes(writer.data)
    return asyncio.run(go())


def startup_prefix_is_valid(raw: bytes) -> bool:
    """Whether `raw` starts with optional negotiation requests and then a StartupMessage."""
    position = 0
    for _ in range(3):
        try:
            length = codec.startup_length(raw[position:position + 4])
            packet = codec.decode_startup(raw[position:position + length])
        except CodecError:
            return False
        if isinstance(packet, StartupMessage):
            return True
        if isinstance(packet, CancelRequest):
            return False
        position += length
    return False


@given(st.binary(max_size=200) | mangled(valid_startups)
       | st.builds(lambda a, b: a + b, valid_startups, st.binary(max_size=40)))
def test_fuzz_session_startup_garbage_reaches_nothing(raw):
    conn, answered = run_session(raw)
    if startup_prefix_is_valid(raw):
        assert conn.asked == ["token"] and conn.logins == ["token_unavailable"]
        assert answered.rstrip(b"N").endswith(b"KeylessTokenUnavailable: the fake has none\0\0")
    else:
        assert conn.asked == [], (raw, conn.asked)
        assert set(answered) <= set(b"N")
    assert SECRET_PASSWORD.encode() not in answered


def test_one_gib_length_prefix_is_refused_unread():
    conn, answered = run_session(struct.pack("!I", 1 << 30) + b"\0" * 100)
    assert conn.asked == [] and conn.logins == ["client_error"]
    assert answered == b""


def test_ssl_request_is_answered_n_on_loopback_and_gss_too():
    raw = codec.encode_gssenc_request() + codec.encode_ssl_request()
    conn, answered = run_session(raw)  # then EOF before the StartupMessage
    assert answered == b"NN"
    assert conn.asked == [] and conn.logins == ["client_error"]


def test_data_pipelined_after_ssl_request_is_refused():
    conn, answered = run_session(codec.encode_ssl_request() + codec.encode_startup(STARTUP))
    assert answered == b"" and conn.logins == ["client_error"] and conn.asked == []


def test_a_bare_connect_and_close_is_not_counted():
    conn, answered = run_session(b"")
    assert conn.logins == [] and answered == b""


def test_a_header_then_close_is_a_client_error():
    conn, _ = run_session(codec.encode_startup(STARTUP)[:4])
    assert conn.logins == ["client_error"] and conn.asked == []


def test_login_startup_puts_the_listener_user_in_and_keeps_the_apps_database():
    conn = RecordingConnection(spec=_Spec(user="identity_role"))
    sent = session.login_startup(conn, STARTUP)  # type: ignore[arg-type]
    assert sent.parameters == (("user", "identity_role"), *PARAMS[1:])
    # no database: the server would take the user's name; keep the app's user's name
    bare = StartupMessage(196608, (("user", "app_user"),))
    assert session.login_startup(conn, bare).parameters == (  # type: ignore[arg-type]
        ("user", "identity_role"), ("database", "app_user"))
    # no listener user, or audit mode: the app's StartupMessage unchanged
    assert session.login_startup(RecordingConnection(), bare) is bare  # type: ignore[arg-type]
    audited = RecordingConnection(spec=_Spec(user="identity_role"), audit=True)
    assert session.login_startup(audited, bare) is bare  # type: ignore[arg-type]


def test_cancel_keys_name_their_upstream_while_the_connection_lives():
    from proxy.postgres.cancel import CancelKeys
    keys = CancelKeys()
    a, b = ("a.postgres.database.azure.com", 5432), ("b.postgres.database.azure.com", 5432)
    keys.remember(a, 7, b"k1")
    assert keys.knows(a, 7, b"k1") and not keys.knows(b, 7, b"k1")
    assert not keys.knows(a, 7, b"k2") and not keys.knows(a, 8, b"k1")
    assert keys.upstream_of(5432, 7, b"k1") == a
    assert keys.upstream_of(6432, 7, b"k1") is None  # another port: not this listener's
    keys.remember(b, 7, b"k1")  # the same key on two servers: ambiguous without a name
    assert keys.upstream_of(5432, 7, b"k1") is None
    keys.forget(b, 7, b"k1")
    keys.forget(a, 7, b"k1")
    assert len(keys) == 0 and not keys.knows(a, 7, b"k1")
