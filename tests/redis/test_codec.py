"""The Redis wire codec: every RESP2/RESP3 type round-trips, the scanners find frame and
command ends however the stream is split, and length prefixes past the limits are refused
without allocating."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.redis.codec import (
    MAX_AGGREGATE,
    MAX_BULK,
    Command,
    CommandScanner,
    Frame,
    ProtocolError,
    ReplyScanner,
    decode,
    encode,
    encode_command,
    split_inline,
)

line_text = st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
scalars = st.one_of(
    st.builds(Frame, st.sampled_from("+-"), line_text),
    st.builds(Frame, st.sampled_from(":("), st.integers(-(2**70), 2**70)),
    st.builds(Frame, st.sampled_from("$!"), st.one_of(st.none(), st.binary(max_size=40))),
    st.just(Frame("_", None)),
    st.builds(Frame, st.just(","), st.floats(allow_nan=True)),
    st.builds(Frame, st.just("#"), st.booleans()),
    st.builds(Frame, st.just("="), st.tuples(st.sampled_from([b"txt", b"mkd"]),
                                             st.binary(max_size=30))),
)


def _aggregates(children: st.SearchStrategy[Frame]) -> st.SearchStrategy[Frame]:
    items = st.lists(children, max_size=4)
    pairs = st.lists(st.tuples(children, children), max_size=3)
    return st.one_of(
        st.builds(Frame, st.sampled_from("*~>"), items),
        st.just(Frame("*", None)),
        st.builds(Frame, st.just("%"), pairs),
        st.builds(Frame, st.just("|"), st.tuples(pairs.filter(bool), children)),
    )


frames = st.recursive(scalars, _aggregates, max_leaves=12)


def same(a: Frame, b: Frame) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == "," and math.isnan(a.value):
        return math.isnan(b.value)
    if a.kind in "*~>" and a.value is not None:
        return b.value is not None and len(a.value) == len(b.value) and all(
            same(x, y) for x, y in zip(a.value, b.value, strict=True))
    if a.kind == "%":
        return len(a.value) == len(b.value) and all(
            same(x1, y1) and same(x2, y2)
            for (x1, x2), (y1, y2) in zip(a.value, b.value, strict=True))
    if a.kind == "|":
        return same(Frame("%", a.value[0]), Frame("%", b.value[0])) and same(a.value[1], b.value[1])
    return bool(a.value == b.value)


def reported_kind(frame: Frame) -> int:
    while frame.kind == "|":  # an attribute belongs to the frame it describes
        frame = frame.value[1]
    return ord(frame.kind)


def scan(chunks: list[bytes]) -> list[tuple[int, int]]:
    """Frame ends as absolute offsets over all chunks."""
    scanner = ReplyScanner()
    ends: list[tuple[int, int]] = []
    offset = 0
    for chunk in chunks:
        ends += [(offset + end, kind) for end, kind in scanner.feed(chunk)]
        offset += len(chunk)
    assert scanner.at_boundary
    return ends


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(frames)
def test_every_resp3_type_round_trips(frame: Frame) -> None:
    data = encode(frame)
    got = decode(data)
    assert got is not None
    decoded, end = got
    assert end == len(data)
    assert same(decoded, frame)
    assert decode(data[:-1]) is None  # one byte short: incomplete, not an error


@given(st.lists(frames, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=8))
def test_reply_scanner_finds_each_frame_end_however_split(items: list[Frame],
                                                          cuts: list[int]) -> None:
    encoded = [encode(f) for f in items]
    data = b"".join(encoded)
    expected, offset = [], 0
    for frame, blob in zip(items, encoded, strict=True):
        offset += len(blob)
        expected.append((offset, reported_kind(frame)))
    assert scan(split(data, cuts)) == expected


def test_reply_scanner_byte_by_byte() -> None:
    stream = (b"+OK\r\n$5\r\nhello\r\n*2\r\n:1\r\n$-1\r\n"
              b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n"
              b"|1\r\n+ttl\r\n:3\r\n%1\r\n+a\r\n#t\r\n_\r\n,1.5\r\n(12345678901234567890\r\n"
              b"=7\r\ntxt:abc\r\n!3\r\nbad\r\n-ERR x\r\n*-1\r\n~0\r\n")
    ends = scan([stream[i:i + 1] for i in range(len(stream))])
    kinds = "".join(chr(k) for _, k in ends)
    assert kinds == "+$*>%_,(=!-*~"
    assert scan([stream]) == ends


@pytest.mark.parametrize("header, problem", [
    (b"$1073741824\r\n", "exceeds the limit"),  # 1 GiB: refused before any payload arrives
    (b"$%d\r\n" % (MAX_BULK + 1), "exceeds the limit"),
    (b"*%d\r\n" % (MAX_AGGREGATE + 1), "exceeds the limit"),
    (b"%%%d\r\n" % (MAX_AGGREGATE + 1), "exceeds the limit"),
    (b"$-2\r\n", "invalid bulk length"),
    (b"$abc\r\n", "invalid bulk length"),
    (b"$" + b"9" * 40, "header too long"),
    (b"?3\r\n", "unknown reply type"),
    (b"$3\r\nabcXY", "not followed by CRLF"),
    (b"*1\r\n" * 200, "nested too deep"),
])
def test_reply_limits_are_clear_errors(header: bytes, problem: str) -> None:
    tracemalloc.start()
    with pytest.raises(ProtocolError, match=problem):
        ReplyScanner().feed(header)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1024 * 1024  # nothing was allocated from the length prefix
    if b"\r\n" in header:
        with pytest.raises(ProtocolError, match=problem):
            decode(header + b"\r\n")


def test_a_bulk_at_the_limit_streams_without_being_held() -> None:
    scanner = ReplyScanner()
    assert scanner.feed(b"$%d\r\n" % MAX_BULK) == []
    chunk = b"x" * 65536
    for _ in range(16):
        assert scanner.feed(chunk) == []
    assert not scanner.at_boundary


# -- client commands ---------------------------------------------------------------------------

args = st.lists(st.binary(max_size=80), min_size=1, max_size=5)
names = st.sampled_from([b"GET", b"set", b"AUTH", b"hello", b"PING", b"multi", b"EXEC", b"client",
                         b"SUBSCRIBE", b"BLPOP"])
commands = st.tuples(names, args).map(lambda c: [c[0], *c[1]])


def run(chunks: list[bytes]) -> tuple[bytes, list[Command]]:
    """What the scanner lets through (held commands by their raw bytes) and its commands."""
    scanner = CommandScanner()
    out: list[bytes] = []
    found: list[Command] = []
    for chunk in chunks:
        for item in scanner.feed(chunk):
            if isinstance(item, Command):
                found.append(item)
                out.append(item.raw)
            else:
                out.append(item)
    assert scanner.at_boundary
    return b"".join(out), found


@given(st.lists(commands, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=8))
def test_command_scanner_however_split(cmds: list[list[bytes]], cuts: list[int]) -> None:
    data = b"".join(encode_command(*c) for c in cmds)
    through, found = run(split(data, cuts))
    assert through == data  # unchanged, in order, nothing lost or repeated
    assert [c.name for c in found] == [c[0].lower() for c in cmds]
    assert [c.argc for c in found] == [len(c) for c in cmds]
    for command, sent in zip(found, cmds, strict=True):
        if command.name in (b"auth", b"hello", b"client", b"reset"):
            assert command.raw == encode_command(*sent)  # held whole, so it can be replaced
            assert command.args == sent[1:]
        else:
            assert command.raw == b""
            assert command.args == []


def test_auth_bytes_never_pass_through_byte_by_byte() -> None:
    data = encode_command("GET", "k") + encode_command("AUTH", "default", "s3cret-key") + \
        encode_command("HELLO", "3", "AUTH", "u", "s3cret-key") + b"AUTH s3cret-key\r\n"
    scanner = CommandScanner()
    passed = b""
    held: list[Command] = []
    for i in range(len(data)):
        for item in scanner.feed(data[i:i + 1]):
            if isinstance(item, Command):
                if item.raw:
                    held.append(item)
            else:
                passed += item
    assert b"s3cret" not in passed
    assert passed == encode_command("GET", "k")
    assert [(c.name, c.args, c.inline) for c in held] == [
        (b"auth", [b"default", b"s3cret-key"], False),
        (b"hello", [b"3", b"AUTH", b"u", b"s3cret-key"], False),
        (b"auth", [b"s3cret-key"], True),
    ]


def test_a_large_value_streams_in_the_chunks_read() -> None:
    scanner = CommandScanner()
    value = b"v" * (1024 * 1024)
    data = encode_command(b"SET", b"key", value)
    first = scanner.feed(data[:4096])
    assert isinstance(first[0], Command) and first[0].name == b"set" and first[0].argc == 3
    assert first[1:] == [data[:4096]]  # the command marker comes before its bytes
    assert not scanner.at_boundary
    middle = scanner.feed(data[4096:-10])
    assert middle == [data[4096:-10]]
    assert scanner.feed(data[-10:]) == [data[-10:]]
    assert scanner.at_boundary


def test_inline_commands() -> None:
    assert split_inline(b'SET k "a b\\x41\\n" \'it\\\'s\'\r\n') == [
        b"SET", b"k", b"a bA\n", b"it's"]
    through, found = run([b"PING\r\nset  a   1\n", b"\r\n"])
    assert through == b"PING\r\nset  a   1\n\r\n"
    assert [(c.name, c.argc, c.inline) for c in found] == [
        (b"ping", 1, True), (b"set", 3, True), (b"", 0, True)]
    with pytest.raises(ProtocolError, match="unbalanced quotes"):
        CommandScanner().feed(b'GET "k\r\n')


def test_empty_multibulk_is_no_command() -> None:
    through, found = run([b"*0\r\n*1\r\n$4\r\nPING\r\n"])
    assert through == b"*0\r\n*1\r\n$4\r\nPING\r\n"
    assert [(c.name, c.argc) for c in found] == [(b"", 0), (b"ping", 1)]


@pytest.mark.parametrize("data, problem", [
    (b"*1\r\n$1073741824\r\n", "exceeds the limit"),  # 1 GiB prefix: refused, nothing allocated
    (b"*%d\r\n" % (MAX_AGGREGATE + 1), "exceeds the limit"),
    (b"*2\r\n$3\r\nGET\r\n:1\r\n", "expected a bulk string"),
    (b"*1\r\n$3\r\nGETXX", "not followed by CRLF"),
    (b"*1\r\n$-1\r\n", "invalid bulk length"),
    (b"x" * (64 * 1024 + 1), "inline command too long"),
    (b"*2\r\n$4\r\nAUTH\r\n$70000\r\n", "too long"),
])
def test_command_limits_are_clear_errors(data: bytes, problem: str) -> None:
    tracemalloc.start()
    with pytest.raises(ProtocolError, match=problem):
        CommandScanner().feed(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1024 * 1024


@given(st.lists(commands, min_size=1, max_size=8), st.lists(st.integers(0, 10_000), max_size=8))
def test_gathered_slices_keep_the_stream_and_the_order(cmds: list[list[bytes]],
                                                       cuts: list[int]) -> None:
    data = b"".join(encode_command(*c) for c in cmds)
    scanner = CommandScanner(positioned=frozenset((b"ping", b"multi")))
    through: list[bytes] = []
    names: list[bytes] = []
    for chunk in split(data, cuts):
        items = scanner.feed(chunk, exact=False)
        for index, item in enumerate(items):
            if isinstance(item, Command):
                names.append(item.name)
                if item.raw:
                    through.append(item.raw)
                elif item.name in (b"ping", b"multi"):  # positioned: its bytes come next
                    following = items[index + 1] if index + 1 < len(items) else b""
                    assert isinstance(following, bytes) and following.startswith(b"*")
            else:
                through.append(item)
    assert b"".join(through) == data
    assert names == [c[0].lower() for c in cmds]
