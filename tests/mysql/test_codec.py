"""The MySQL wire codec: round trips, scrambles against PyMySQL's own, limits, fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymysql import _auth

from proxy.mysql import codec

NONCE = b"0123456789abcdefghij"
TOKEN = b"eyJ0eXAiOiJKV1QifQ." + b"x" * 1400 + b".sig"


def test_packet_framing_round_trip():
    packet = codec.encode_packet(3, b"hello")
    assert packet == b"\x05\x00\x00\x03hello"
    assert codec.decode_header(packet[:4]) == (5, 3)
    assert codec.encode_packet(256, b"")[3] == 0  # sequence ids wrap at 256


def test_lengths_above_the_limit_are_refused_before_reading():
    with pytest.raises(codec.PacketTooLarge):
        codec.decode_header(b"\xff\xff\xff\x00")  # 16 MiB - 1, far above the 1 MiB login limit
    header = (codec.MAX_AUTH_PACKET + 1).to_bytes(3, "little") + b"\x01"
    with pytest.raises(codec.PacketTooLarge):
        codec.decode_header(header)
    assert codec.decode_header(codec.MAX_AUTH_PACKET.to_bytes(3, "little") + b"\x01") == (
        codec.MAX_AUTH_PACKET, 1)
    assert codec.decode_header(b"\xff\xff\xff\x00", limit=codec.MAX_MESSAGE) == (0xFFFFFF, 0)
    with pytest.raises(codec.ProtocolError):
        codec.encode_packet(0, b"\0" * codec.MAX_PAYLOAD)


def test_a_large_message_is_split_into_full_packets():
    payload = b"a" * (codec.MAX_PAYLOAD + 10)
    packets = codec.split_message(5, payload)
    assert packets[:4] == b"\xff\xff\xff\x05"
    tail = packets[4 + codec.MAX_PAYLOAD:]
    assert tail[:4] == b"\x0a\x00\x00\x06" and tail[4:] == b"a" * 10
    # exactly 0xFFFFFF bytes needs an empty packet after it
    exact = codec.split_message(0, b"b" * codec.MAX_PAYLOAD)
    assert exact[-4:] == b"\x00\x00\x00\x01"


def test_handshake_round_trip():
    greeting = codec.Handshake("5.5.5-10.11.19-MariaDB", 42, NONCE,
                               codec.CLIENT_PROTOCOL_41 | codec.CLIENT_SECURE_CONNECTION
                               | codec.CLIENT_PLUGIN_AUTH | codec.CLIENT_SSL
                               | codec.CLIENT_DEPRECATE_EOF, 45, 2, codec.NATIVE)
    assert codec.decode_handshake(codec.encode_handshake(greeting)) == greeting


def test_handshake_of_a_real_server():
    # Debian's MariaDB 10.11 greeting, captured from tests/support/mysql_server.py MariaDB
    packet = bytes.fromhex(
        "640000000a352e352e352d31302e31312e31392d4d6172696144422d302b6465623132753100050000"
        "007c7b7456312f366300feff080200ff81150000000000001d000000702b7e6044702a7b505f6a7900"
        "6d7973716c5f6e61746976655f70617373776f726400")
    assert codec.decode_header(packet[:4]) == (len(packet) - 4, 0)
    greeting = codec.decode_handshake(packet[4:])
    assert greeting.server_version == "5.5.5-10.11.19-MariaDB-0+deb12u1"
    assert greeting.connection_id == 5
    assert greeting.nonce == b"|{tV1/6cp+~`Dp*{P_jy"
    assert greeting.auth_plugin == codec.NATIVE
    assert greeting.capabilities & codec.REQUIRED_UPSTREAM == codec.REQUIRED_UPSTREAM
    assert not greeting.capabilities & codec.CLIENT_LONG_PASSWORD  # MariaDB's "not MySQL"
    assert greeting.reserved[-4:] == b"\x1d\0\0\0"  # its extended capabilities
    # re-encoded, the greeting is byte for byte the server's
    assert codec.encode_handshake(greeting) == packet[4:]


def test_handshake_response_round_trips_every_optional_part():
    full = codec.HandshakeResponse(
        codec.CLIENT_PROTOCOL_41 | codec.CLIENT_SECURE_CONNECTION | codec.CLIENT_PLUGIN_AUTH
        | codec.CLIENT_CONNECT_WITH_DB | codec.CLIENT_CONNECT_ATTRS
        | codec.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA,
        16 * 1024 * 1024, 45, "app@contoso", codec.clear_password(TOKEN), "orders",
        codec.CLEAR, (("_client_name", "pymysql"), ("program_name", "orders-api")))
    assert codec.decode_handshake_response(codec.encode_handshake_response(full)) == full
    short = codec.HandshakeResponse(codec.CLIENT_PROTOCOL_41 | codec.CLIENT_SECURE_CONNECTION,
                                    1 << 24, 33, "u", b"s" * 20)
    assert codec.decode_handshake_response(codec.encode_handshake_response(short)) == short
    # a token does not fit the one-byte length of the old form
    with pytest.raises(codec.ProtocolError):
        codec.encode_handshake_response(short.with_auth(codec.CLEAR, TOKEN))


def test_ssl_request_is_the_short_response():
    request = codec.encode_ssl_request(codec.CLIENT_PROTOCOL_41, 1 << 24, 45)
    assert len(request) == 32 and codec.is_ssl_request(request)
    assert not codec.is_ssl_request(request[:31])
    assert not codec.is_ssl_request(b"\0" * 32)


def test_auth_switch_and_more_data_round_trip():
    switch = codec.AuthSwitch(codec.NATIVE, NONCE + b"\0")
    decoded = codec.decode_auth_switch(codec.encode_auth_switch(switch))
    assert decoded == switch and decoded.nonce == NONCE
    assert codec.decode_auth_switch(codec.encode_auth_switch(
        codec.AuthSwitch(codec.CLEAR, b""))).plugin == codec.CLEAR
    with pytest.raises(codec.ProtocolError):
        codec.decode_auth_switch(b"\xfe")  # the old-password switch
    assert codec.decode_auth_more_data(codec.encode_auth_more_data(b"\x04")) == b"\x04"


def test_ok_and_err_round_trip():
    ok = codec.Ok(affected_rows=300, last_insert_id=70000, status=0x4002, warnings=1,
                  info=b"Rows matched: 1")
    assert codec.decode_ok(codec.encode_ok(ok)) == ok
    err = codec.Err(1045, "28000", "KeylessTokenUnavailable: no token")
    encoded = codec.encode_err(err)
    assert encoded[:9] == b"\xff\x15\x04#28000"
    assert codec.decode_err(encoded) == err


def test_lenenc_integers():
    for value in (0, 250, 251, 0xFFFF, 0x10000, 0xFFFFFF, 0x1000000, 2**63):
        assert codec.Cursor(codec.lenenc_int(value), "t").lenenc_int() == value


@pytest.mark.parametrize("password", [b"secret", TOKEN, b"\xffbinary\x00"])
def test_native_scramble_matches_pymysql(password):
    assert codec.scramble_native(password, NONCE) == _auth.scramble_native_password(
        password, NONCE)
    assert codec.scramble_native(password, NONCE) != codec.scramble_native(password, NONCE[::-1])


def test_scramble_known_vectors():
    # computed once with PyMySQL's _auth.scramble_native_password / scramble_caching_sha2
    assert codec.scramble_native(b"secret", NONCE).hex() == (
        "f5cac3f3b3df2133feb57db682c71e6ed433a988")
    assert codec.scramble_caching_sha2(b"secret", NONCE).hex() == (
        "7e4adda2f2d5ef09b4147518becb0cee2939376203650a8c2bb2815959364bd0")
    assert codec.scramble_native(b"", NONCE) == b""
    assert codec.scramble_caching_sha2(b"", NONCE) == b""


@pytest.mark.parametrize("password", [b"secret", TOKEN])
def test_caching_sha2_scramble_matches_pymysql(password):
    assert codec.scramble_caching_sha2(password, NONCE) == _auth.scramble_caching_sha2(
        password, NONCE)


def test_auth_response_per_plugin():
    assert codec.auth_response(codec.CLEAR, TOKEN, NONCE) == TOKEN + b"\0"
    assert codec.auth_response(codec.SHA256, TOKEN, NONCE) == TOKEN + b"\0"
    assert len(codec.auth_response(codec.NATIVE, TOKEN, NONCE)) == 20
    assert len(codec.auth_response(codec.CACHING_SHA2, TOKEN, NONCE)) == 32
    with pytest.raises(codec.ProtocolError, match="client_ed25519"):
        codec.auth_response("client_ed25519", TOKEN, NONCE)


def test_unrelayable_choices_of_a_blind_greeting():
    pymysql_flags = (codec.CLIENT_LONG_PASSWORD | codec.CLIENT_LONG_FLAG | codec.CLIENT_PROTOCOL_41
                     | codec.CLIENT_TRANSACTIONS | codec.CLIENT_SECURE_CONNECTION
                     | codec.CLIENT_MULTI_RESULTS | codec.CLIENT_PLUGIN_AUTH
                     | codec.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | codec.CLIENT_CONNECT_ATTRS)
    mariadb = 0x81FFFFFE  # MariaDB 10.11's flags: no CLIENT_LONG_PASSWORD ("not MySQL")
    assert codec.unrelayable_choices(pymysql_flags, mariadb) == 0
    assert codec.unrelayable_choices(codec.OFFERED_BLIND, mariadb) == 0
    old = mariadb & ~codec.CLIENT_DEPRECATE_EOF & ~codec.CLIENT_CONNECT_ATTRS
    missing = codec.unrelayable_choices(pymysql_flags | codec.CLIENT_DEPRECATE_EOF, old)
    assert missing == codec.CLIENT_DEPRECATE_EOF  # attributes only shape the login
    assert codec.flag_names(missing) == "DEPRECATE_EOF"
    assert not codec.OFFERED_BLIND & codec.NOT_RELAYABLE


DECODERS = [codec.decode_handshake, codec.decode_handshake_response, codec.decode_auth_switch,
            codec.decode_ok, codec.decode_err, codec.decode_auth_more_data]


@given(st.sampled_from(DECODERS), st.binary(max_size=300))
def test_decoders_fail_only_with_protocol_errors(decoder, data):
    # anything else (IndexError, UnicodeError, struct.error) would escape the session's handling
    with contextlib.suppress(codec.ProtocolError):
        decoder(data)


@given(st.binary(min_size=4, max_size=4))
def test_headers_never_exceed_the_limit(header):
    try:
        length, _ = codec.decode_header(header)
    except codec.PacketTooLarge:
        return
    assert length <= codec.MAX_AUTH_PACKET


# what a decoder can return: text without NULs (C strings on the wire) or lone surrogates
NAME = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
TEXT = st.characters(blacklist_categories=("Cs",))


@given(user=st.text(alphabet=NAME, max_size=40),
       database=st.none() | st.text(alphabet=NAME, min_size=1, max_size=40),
       auth=st.binary(max_size=2000),
       attrs=st.lists(st.tuples(st.text(TEXT, max_size=20), st.text(TEXT, max_size=60)),
                      max_size=5))
def test_handshake_response_round_trip_fuzzed(user, database, auth, attrs):
    caps = (codec.CLIENT_PROTOCOL_41 | codec.CLIENT_SECURE_CONNECTION | codec.CLIENT_PLUGIN_AUTH
            | codec.CLIENT_CONNECT_ATTRS | codec.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
            | (codec.CLIENT_CONNECT_WITH_DB if database else 0))
    response = codec.HandshakeResponse(caps, 1 << 24, 45, user, auth, database, codec.NATIVE,
                                       tuple(attrs))
    assert codec.decode_handshake_response(codec.encode_handshake_response(response)) == response
