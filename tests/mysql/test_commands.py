"""COM_CHANGE_USER never reaches the server; every other byte passes unchanged, however the
app's stream is cut into reads."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.mysql import codec
from proxy.mysql.commands import COM_CHANGE_USER, AppCommands


class Replies:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


class Chunks:
    """The app's stream as the socket delivered it: one read per chunk (a StreamReader
    would join them)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    async def read(self, n: int = -1) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


async def through(chunks: list[bytes]) -> tuple[bytes, bytes]:
    reader = Chunks(chunks)
    replies = Replies()
    commands = AppCommands(reader, replies, "test")  # type: ignore[arg-type]
    out = bytearray()
    for _ in range(10_000):
        data = await commands.read(65536)
        if not data:
            break
        out += data
    return bytes(out), bytes(replies.data)


def change_user(password: bytes = b"the-apps-password") -> bytes:
    body = bytes((COM_CHANGE_USER,)) + b"other\0" + bytes((len(password) + 1,)) + password + b"\0"
    return codec.encode_packet(0, body)


def query(sql: bytes) -> bytes:
    return codec.encode_packet(0, b"\x03" + sql)


def test_change_user_is_answered_here_and_never_forwarded():
    stream = query(b"SELECT 1") + change_user() + query(b"SELECT 2")
    out, replies = asyncio.run(through([stream]))
    assert out == query(b"SELECT 1") + query(b"SELECT 2")
    assert b"the-apps-password" not in out
    assert replies[3] == 1  # the answer to the app's command (seq 0) has seq 1
    assert codec.decode_err(replies[4:]).code == 1235


def test_only_commands_are_examined():
    # 0x11 as the first byte of a non-command packet (LOAD DATA contents, seq 2) passes
    data_packet = codec.encode_packet(2, bytes((COM_CHANGE_USER,)) + b"file contents")
    # and of a packet continuing a 16 MiB one, whatever its sequence id
    big = codec.split_message(0, b"\x03" + b"x" * (codec.MAX_PAYLOAD - 1) + b"\x11tail")
    out, replies = asyncio.run(through([data_packet + big]))
    assert out == data_packet + big and replies == b""


def test_an_empty_packet_has_no_command_byte():
    # found by the fuzzing below: the byte after an empty packet's header is the next header's
    stream = codec.encode_packet(0, b"") + query(b"\0" * 16)  # 17 bytes long: 0x11
    out, replies = asyncio.run(through([stream]))
    assert out == stream and replies == b""


def test_an_oversized_change_user_ends_the_connection():
    header = (codec.MAX_AUTH_PACKET + 1).to_bytes(3, "little") + b"\x00\x11"
    with pytest.raises(ConnectionError):
        asyncio.run(through([header]))


PACKETS = st.lists(st.one_of(
    st.builds(query, st.binary(max_size=40)),
    st.builds(change_user, st.binary(max_size=30).filter(lambda p: b"\0" not in p)),
    st.builds(codec.encode_packet, st.integers(1, 255), st.binary(max_size=40)),
    st.just(codec.encode_packet(0, b"")),
), max_size=12)


@given(PACKETS, st.lists(st.integers(1, 60), max_size=30))
def test_any_cut_of_the_stream(packets, cuts):
    stream = b"".join(packets)
    chunks, offset = [], 0
    for cut in cuts:
        chunks.append(stream[offset:offset + cut])
        offset += cut
    chunks.append(stream[offset:])
    out, replies = asyncio.run(through([c for c in chunks if c]))
    refused = [p for p in packets if p[3] == 0 and p[4:5] == bytes((COM_CHANGE_USER,))]
    assert out == b"".join(p for p in packets if p not in refused)
    answers = []
    while replies:
        length, seq = codec.decode_header(replies[:4])
        answers.append((seq, codec.decode_err(replies[4:4 + length]).code))
        replies = replies[4 + length:]
    assert answers == [(1, 1235)] * len(refused)
