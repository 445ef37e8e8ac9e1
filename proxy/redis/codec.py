"""The Redis wire protocol (RESP2 and RESP3), pure: no I/O, no asyncio.

Two kinds of parsing, for two jobs:

- `ReplyScanner` and `CommandScanner` are what the relay uses. They find where each server
  reply and each client command ends in a byte stream, incrementally (any split of the stream
  gives the same answer) and without copying or decoding what they pass over: a bulk string is
  skipped by its length, whatever its size, so the relay forwards bytes in the chunks it read
  them in. The command scanner keeps the few arguments keyless acts on (AUTH, HELLO, CLIENT
  REPLY ...), nothing else.
- `decode`/`encode` turn whole frames into typed values and back, for the few small replies
  keyless reads itself (its own AUTH, HELLO) and for tests.

Limits, as redis-server's own: a bulk string longer than 512 MiB or an aggregate of more than
1M elements is a `ProtocolError` (the connection is closed); a length prefix never allocates.
Inline commands (telnet style) are lines of at most 64 KiB.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

MAX_BULK = 512 * 1024 * 1024
MAX_AGGREGATE = 1024 * 1024
MAX_DEPTH = 128  # nested aggregates; redis-server's own replies nest a few levels at most
MAX_INLINE = 64 * 1024
MAX_HEADER = 32  # "$536870912\r\n" and the like; anything longer is not a length
MAX_LINE = 64 * 1024 * 1024  # a simple string, error, number (MONITOR lines can be long)

# Reply types: line types end at CRLF; length types carry a payload; aggregates a count.
LINE_TYPES = frozenset(b"+-:_,#(")
BLOB_TYPES = frozenset(b"$!=")
AGGREGATE_TYPES = frozenset(b"*%~>|")
PUSH = ord(">")
SIMPLE = ord("+")
ATTRIBUTE = ord("|")
ERROR_TYPES = frozenset(b"-!")


class ProtocolError(Exception):
    """The peer broke the protocol. The message names the problem, never the payload."""


def _length(header: bytes, kind: str, limit: int) -> int:
    try:
        value = int(header)
    except ValueError:
        raise ProtocolError(f"invalid {kind} length") from None
    if value < -1:
        raise ProtocolError(f"invalid {kind} length")
    if value > limit:
        raise ProtocolError(f"{kind} length {value} exceeds the limit of {limit}")
    return value


@dataclass(slots=True)
class _Open:
    remaining: int
    attribute: bool = False


class ReplyScanner:
    """Where server frames end, fed chunk by chunk.

    `feed(data)` returns `(end, kind)` for each top-level frame that ends in `data`: `end` is
    the offset just past it in `data`, `kind` the frame's type byte (an attribute `|` counts
    as part of the frame it precedes, whose type is reported). Push frames (`>`) are frames
    like any other here; the session tells them from replies by `kind`.
    """

    __slots__ = (
        "_crlf",
        "_header",
        "_header_type",
        "_kind",
        "_line_length",
        "_mode",
        "_skip",
        "_stack",
    )

    def __init__(self) -> None:
        self._mode = 0  # 0 type byte, 1 header digits, 2 line, 3 blob payload, 4 blob CRLF
        self._header = b""
        self._header_type = 0
        self._skip = 0
        self._stack: list[_Open] = []
        self._line_length = 0
        self._kind = 0  # type byte of the top-level frame being read
        self._crlf = 0

    @property
    def at_boundary(self) -> bool:
        return self._mode == 0 and not self._stack

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        frames: list[tuple[int, int]] = []
        pos = 0
        size = len(data)
        stack = self._stack
        if self._mode == 0 and not stack:  # the common replies, whole, fast
            pos = _simple_frames(data, frames)
        while pos < size:
            mode = self._mode
            if mode == 0:
                kind = data[pos]
                if not stack:
                    self._kind = kind
                if kind in LINE_TYPES:
                    self._header_type = kind
                    self._line_length = 0
                    self._mode = 2
                    pos += 1
                elif kind in BLOB_TYPES or kind in AGGREGATE_TYPES:
                    self._header_type = kind
                    self._header = b""
                    self._mode = 1
                    pos += 1
                else:
                    raise ProtocolError(f"unknown reply type byte 0x{kind:02x}")
            elif mode == 2:  # a line whose content the relay does not need
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._line_length += size - pos
                    if self._line_length > MAX_LINE:
                        raise ProtocolError("reply line exceeds the limit")
                    pos = size
                else:
                    pos = nl + 1
                    self._mode = 0
                    if self._done():
                        frames.append((pos, self._kind))
            elif mode == 1:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._header += data[pos:]
                    if len(self._header) > MAX_HEADER:
                        raise ProtocolError("length header too long")
                    pos = size
                    continue
                header = self._header + data[pos:nl]
                self._header = b""
                pos = nl + 1
                if len(header) > MAX_HEADER or not header.endswith(b"\r"):
                    raise ProtocolError("malformed length header")
                header = header[:-1]
                kind = self._header_type
                self._mode = 0
                if kind in BLOB_TYPES:
                    length = _length(header, "bulk", MAX_BULK)
                    if length == -1:
                        if self._done():
                            frames.append((pos, self._kind))
                    else:
                        self._skip = length
                        self._mode = 3
                else:
                    count = _length(header, "aggregate", MAX_AGGREGATE)
                    if kind == ord("%") or kind == ATTRIBUTE:
                        count *= 2
                    if count <= 0:  # empty or RESP2 null aggregate: complete at once
                        if kind == ATTRIBUTE:
                            continue  # an empty attribute: the frame follows
                        if self._done():
                            frames.append((pos, self._kind))
                    else:
                        if len(stack) >= MAX_DEPTH:
                            raise ProtocolError("aggregates nested too deep")
                        stack.append(_Open(count, kind == ATTRIBUTE))
            elif mode == 3:
                take = min(self._skip, size - pos)
                self._skip -= take
                pos += take
                if self._skip == 0:
                    self._mode = 4
                    self._crlf = 0
            else:  # mode 4: the CRLF after a blob
                expected = 13 if self._crlf == 0 else 10
                if data[pos] != expected:
                    raise ProtocolError("bulk payload not followed by CRLF")
                pos += 1
                self._crlf += 1
                if self._crlf == 2:
                    self._mode = 0
                    if self._done():
                        frames.append((pos, self._kind))
        return frames

    def _done(self) -> bool:
        """One element ended; close the aggregates it completes. True: a top-level frame ended."""
        stack = self._stack
        while stack:
            top = stack[-1]
            top.remaining -= 1
            if top.remaining > 0:
                return False
            stack.pop()
            if top.attribute:
                return False  # an attribute is followed by the element it describes
        return True


_SIMPLE_REPLY = re.compile(rb"[+\-:][^\r\n]{0,1024}\r\n|\$([0-9]{1,9})\r\n")


def _simple_frames(data: bytes, frames: list[tuple[int, int]]) -> int:
    """Whole simple strings, errors, integers and bulk strings from the start of `data`
    (their ends go to `frames`); the offset where anything else, or a partial frame, begins."""
    pos = 0
    size = len(data)
    match = _SIMPLE_REPLY.match
    while pos < size:
        found = match(data, pos)
        if found is None:
            return pos
        digits = found.group(1)
        if digits is None:
            end = found.end()
        else:
            length = int(digits)
            end = found.end() + length + 2
            if length > MAX_BULK or end > size or not data.startswith(b"\r\n", end - 2):
                return pos  # the careful path decides (streams it, or refuses it)
        frames.append((end, data[pos]))
        pos = end
    return pos


# -- client commands ---------------------------------------------------------------------------

# Commands whose arguments keyless reads (all of them) and may rewrite or act on (AUTH, HELLO,
# CLIENT REPLY) or follow with its own (RESET); they are held until complete. Every other
# command streams through once its name is known.
CAPTURE_ALL = frozenset((b"auth", b"hello", b"client", b"reset"))
MAX_CAPTURE = 64 * 1024  # an AUTH or HELLO longer than this is not a login
MAX_NAME = 64 * 1024  # a first argument longer than this is no command name keyless knows


@dataclass(slots=True)
class Command:
    """A complete client command and what keyless needs of it.

    `args` holds every argument after the name for held commands (AUTH, HELLO, CLIENT, inline
    ones), none for others (`argc` counts the name and all arguments). `raw` is set when the
    command was held back: its exact bytes, which the caller forwards or replaces; other
    commands' bytes follow their `Command` in the scanner's pass-through slices.
    """

    name: bytes  # lower-case; b"" for an empty command (no reply) or an unknown long name
    argc: int
    args: list[bytes]
    raw: bytes = b""
    inline: bool = False


class _Streaming:
    """The rest of a command whose bytes stream through: count its bulk strings."""

    __slots__ = ("bulks_left", "crlf", "header", "mode", "skip")

    def __init__(self, bulks_left: int) -> None:
        self.bulks_left = bulks_left
        self.mode = 0  # 0 bulk header, 1 payload, 2 CRLF
        self.header = b""
        self.skip = 0
        self.crlf = 0

    def advance(self, data: bytes, pos: int) -> int:
        """Consume `data` from `pos`; the offset just past the command's end, or -1."""
        size = len(data)
        while pos < size:
            if self.mode == 0:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self.header += data[pos:]
                    if len(self.header) > MAX_HEADER:
                        raise ProtocolError("bulk header too long")
                    return -1
                header = self.header + data[pos:nl]
                self.header = b""
                pos = nl + 1
                length = _bulk_header(header)
                self.skip = length
                self.mode = 1 if length else 2
                self.crlf = 0
            elif self.mode == 1:
                take = min(self.skip, size - pos)
                self.skip -= take
                pos += take
                if self.skip == 0:
                    self.mode = 2
            else:
                if data[pos] != (13 if self.crlf == 0 else 10):
                    raise ProtocolError("bulk argument not followed by CRLF")
                pos += 1
                self.crlf += 1
                if self.crlf == 2:
                    self.crlf = 0
                    self.mode = 0
                    self.bulks_left -= 1
                    if self.bulks_left == 0:
                        return pos
        return -1


def _bulk_header(header: bytes) -> int:
    if len(header) > MAX_HEADER or not header.startswith(b"$") or not header.endswith(b"\r"):
        raise ProtocolError("expected a bulk string in the command")
    length = _length(header[1:-1], "bulk", MAX_BULK)
    if length < 0:
        raise ProtocolError("invalid bulk length")
    return length


class CommandScanner:
    """Client commands in a byte stream: multibulk arrays of bulk strings, or inline lines.

    `feed(data)` returns, in stream order, `bytes` to forward as they are and `Command`s: a
    held command carries its bytes in `raw`; any other comes just before its own bytes (so the
    caller may put something in front of it). Bytes of a command whose name is not known yet
    are carried over to the next feed, so nothing of an AUTH or HELLO is ever in the
    pass-through bytes.

    `feed(data, exact=False)` cuts the bytes only before held commands and those named in
    `positioned`, and exactly after the first of those: other commands' `Command`s still come
    in stream order, but their bytes stay in one slice with their neighbours' (fewer, larger
    writes). For callers that put nothing in front of such commands.
    """

    def __init__(self, positioned: frozenset[bytes] = frozenset()) -> None:
        self._carry = b""
        self._stream: _Streaming | None = None
        self._positioned = positioned

    @property
    def at_boundary(self) -> bool:
        """No command is partly read (nor partly forwarded)."""
        return not self._carry and self._stream is None

    def feed(self, data: bytes, exact: bool = True) -> list[bytes | Command]:
        out: list[bytes | Command] = []
        positioned = self._positioned
        if self._carry:
            data = self._carry + data
            self._carry = b""
        pos = 0
        size = len(data)
        if self._stream is not None:
            end = self._stream.advance(data, 0)
            if end < 0:
                return [data]
            self._stream = None
            pos = end
        forward_from = 0  # start of pass-through bytes not yet put in `out`
        while pos < size:
            if data[pos] == 42:  # "*"
                result = self._multibulk(data, pos)
                if result is None:  # the command's head (or all of an AUTH/HELLO) is not here
                    if forward_from < pos:
                        out.append(data[forward_from:pos])
                    self._carry = data[pos:]
                    return out
                command, end = result
                if not exact and end > 0 and not command.raw and \
                        command.name not in positioned:
                    out.append(command)  # its bytes stay in the slice being gathered
                    pos = end
                    continue
                if forward_from < pos:
                    out.append(data[forward_from:pos])
                out.append(command)
                exact = True  # what the caller does here may change what it needs after it
                if command.raw:
                    forward_from = end
                elif end < 0:  # streams on into the next feed
                    out.append(data[pos:])
                    return out
                else:
                    forward_from = pos  # its bytes go out with the next slice
                pos = end
            else:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    if size - pos > MAX_INLINE:
                        raise ProtocolError("inline command too long")
                    if forward_from < pos:
                        out.append(data[forward_from:pos])
                    self._carry = data[pos:]
                    return out
                if nl + 1 - pos > MAX_INLINE:
                    raise ProtocolError("inline command too long")
                line = data[pos:nl + 1]
                if forward_from < pos:
                    out.append(data[forward_from:pos])
                args = split_inline(line)
                name = args[0].lower() if args else b""
                out.append(Command(name, len(args), args[1:], bytes(line), inline=True))
                pos = forward_from = nl + 1
        if forward_from < size:
            out.append(data[forward_from:])
        return out

    def _multibulk(self, data: bytes, pos: int) -> tuple[Command, int] | None:
        """The command at `pos`: complete (end offset), streaming (end -1; state kept), or
        None when its head is incomplete."""
        fast = _complete_command(data, pos)
        if fast is not None:
            return fast
        size = len(data)
        nl = data.find(b"\n", pos)
        if nl < 0:
            if size - pos > MAX_HEADER:
                raise ProtocolError("multibulk header too long")
            return None
        header = data[pos + 1:nl]
        if len(header) > MAX_HEADER or not header.endswith(b"\r"):
            raise ProtocolError("malformed multibulk header")
        argc = _length(header[:-1], "multibulk", MAX_AGGREGATE)
        p = nl + 1
        if argc <= 0:  # redis-server ignores an empty command and sends no reply
            return Command(b"", 0, []), p
        name: bytes | None = None
        capture_all = False
        args: list[bytes] = []
        for index in range(argc):
            nl = data.find(b"\n", p)
            if nl < 0:
                if size - p > MAX_HEADER:
                    raise ProtocolError("bulk header too long")
                if name is None or capture_all:
                    return None
                stream = _Streaming(argc - index)
                stream.header = data[p:]
                self._stream = stream
                return Command(name, argc, []), -1
            length = _bulk_header(data[p:nl])
            start = nl + 1
            end = start + length
            if size < end + 2:  # this argument goes on in the next chunk
                if capture_all and end + 2 - pos > MAX_CAPTURE:
                    raise ProtocolError("AUTH or HELLO command too long")
                if capture_all or (name is None and length <= MAX_NAME):
                    return None
                if name is None:
                    name = b""  # a name this long is no command keyless acts on
                stream = _Streaming(argc - index)
                stream.skip = max(0, end - size)
                if stream.skip:
                    stream.mode = 1
                else:  # the payload is here; part of its CRLF is not
                    stream.mode = 2
                    stream.crlf = size - start - length
                    if stream.crlf == 1 and data[end] != 13:
                        raise ProtocolError("bulk argument not followed by CRLF")
                self._stream = stream
                return Command(name, argc, []), -1
            if data[end:end + 2] != b"\r\n":
                raise ProtocolError("bulk argument not followed by CRLF")
            if name is None:
                name = bytes(data[start:end]).lower() if length <= MAX_NAME else b""
                capture_all = name in CAPTURE_ALL
            elif capture_all:
                args.append(bytes(data[start:end]))
            p = end + 2
            if capture_all and p - pos > MAX_CAPTURE:
                raise ProtocolError("AUTH or HELLO command too long")
        assert name is not None
        return Command(name, argc, args, bytes(data[pos:p]) if capture_all else b""), p


_MULTIBULK = re.compile(rb"\*([1-9][0-9]{0,6})\r\n\$([0-9]{1,5})\r\n")
_BULK = re.compile(rb"\$([0-9]{1,9})\r\n")


def _complete_command(data: bytes, pos: int) -> tuple[Command, int] | None:
    """The common case, fast: a whole well-formed command that keyless does not hold, in
    `data` at `pos`. None for anything else (the careful parser then decides)."""
    head = _MULTIBULK.match(data, pos)
    if head is None:
        return None
    argc = int(head.group(1))
    length = int(head.group(2))
    start = head.end()
    end = start + length
    if argc > MAX_AGGREGATE or length > MAX_NAME or not data.startswith(b"\r\n", end):
        return None
    name = data[start:end].lower()
    if name in CAPTURE_ALL:
        return None
    p = end + 2
    match = _BULK.match
    for _ in range(argc - 1):
        bulk = match(data, p)
        if bulk is None:
            return None
        length = int(bulk.group(1))
        end = bulk.end() + length
        if length > MAX_BULK or not data.startswith(b"\r\n", end):
            return None
        p = end + 2
    return Command(name, argc, []), p


def split_inline(line: bytes) -> list[bytes]:
    """An inline command's arguments, split like redis-server's sdssplitargs: spaces separate,
    "double quotes" allow \\n \\r \\t \\b \\a \\\\ \\" \\xHH escapes, 'single quotes' only \\'."""
    text = line.rstrip(b"\r\n")
    args: list[bytes] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in b" \t\r\n\v\f":
            i += 1
        if i >= n:
            return args
        current = bytearray()
        if text[i] == ord('"'):
            i += 1
            while True:
                if i >= n:
                    raise ProtocolError("unbalanced quotes in inline command")
                c = text[i]
                if c == ord("\\") and i + 3 < n and text[i + 1] == ord("x") and \
                        _is_hex(text[i + 2:i + 4]):
                    current.append(int(text[i + 2:i + 4], 16))
                    i += 4
                elif c == ord("\\") and i + 1 < n:
                    current.append({ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8,
                                    ord("a"): 7}.get(text[i + 1], text[i + 1]))
                    i += 2
                elif c == ord('"'):
                    i += 1
                    if i < n and text[i] not in b" \t\r\n\v\f":
                        raise ProtocolError("unbalanced quotes in inline command")
                    break
                else:
                    current.append(c)
                    i += 1
        elif text[i] == ord("'"):
            i += 1
            while True:
                if i >= n:
                    raise ProtocolError("unbalanced quotes in inline command")
                c = text[i]
                if c == ord("\\") and i + 1 < n and text[i + 1] == ord("'"):
                    current.append(ord("'"))
                    i += 2
                elif c == ord("'"):
                    i += 1
                    if i < n and text[i] not in b" \t\r\n\v\f":
                        raise ProtocolError("unbalanced quotes in inline command")
                    break
                else:
                    current.append(c)
                    i += 1
        else:
            while i < n and text[i] not in b" \t\r\n\v\f":
                current.append(text[i])
                i += 1
        args.append(bytes(current))


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def encode_command(*args: bytes | str) -> bytes:
    """A client command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


# -- whole frames as values (small replies keyless reads itself; tests) ------------------------

@dataclass(frozen=True, slots=True)
class Frame:
    """One RESP value: `kind` is its type byte as a str ("+", "$", "%", ...).

    value by kind: + - bytes; : ( int; $ ! bytes, or None for RESP2's null bulk ($-1);
    * ~ > list of Frame, or None for RESP2's null array (*-1); % list of (Frame, Frame);
    _ None; , float; # bool; = (format bytes, text bytes); | (list of (Frame, Frame), Frame).
    """

    kind: str
    value: Any

    @property
    def is_error(self) -> bool:
        return self.kind in ("-", "!")


def encode(frame: Frame) -> bytes:
    kind, value = frame.kind, frame.value
    k = kind.encode()
    if kind in "+-":
        return k + value + b"\r\n"
    if kind in ":(":
        return b"%s%d\r\n" % (k, value)
    if kind == "_":
        return b"_\r\n"
    if kind == "#":
        return b"#t\r\n" if value else b"#f\r\n"
    if kind == ",":
        if math.isnan(value):
            text = b"nan"
        elif math.isinf(value):
            text = b"inf" if value > 0 else b"-inf"
        else:
            text = repr(value).encode()
        return b"," + text + b"\r\n"
    if kind in "$!":
        if value is None:
            return k + b"-1\r\n"
        return b"%s%d\r\n%s\r\n" % (k, len(value), value)
    if kind == "=":
        fmt, text = value
        body = fmt + b":" + text
        return b"=%d\r\n%s\r\n" % (len(body), body)
    if kind in "*~>":
        if value is None:
            return k + b"-1\r\n"
        return b"%s%d\r\n" % (k, len(value)) + b"".join(encode(item) for item in value)
    if kind == "%":
        return b"%%%d\r\n" % len(value) + b"".join(encode(a) + encode(b) for a, b in value)
    if kind == "|":
        pairs, described = value
        return (b"|%d\r\n" % len(pairs) + b"".join(encode(a) + encode(b) for a, b in pairs)
                + encode(described))
    raise ValueError(f"unknown frame kind {kind!r}")


def decode(data: bytes, pos: int = 0, depth: int = 0) -> tuple[Frame, int] | None:
    """The frame at `pos` and the offset after it, or None if `data` ends before it does."""
    if depth > MAX_DEPTH:
        raise ProtocolError("aggregates nested too deep")
    if pos >= len(data):
        return None
    kind = chr(data[pos])
    nl = data.find(b"\r\n", pos)
    if nl < 0:
        if len(data) - pos > MAX_LINE:
            raise ProtocolError("reply line exceeds the limit")
        return None
    line = data[pos + 1:nl]
    after = nl + 2
    if kind in "+-":
        return Frame(kind, bytes(line)), after
    if kind in ":(":
        try:
            return Frame(kind, int(line)), after
        except ValueError:
            raise ProtocolError("invalid integer") from None
    if kind == "_":
        return Frame("_", None), after
    if kind == "#":
        if line not in (b"t", b"f"):
            raise ProtocolError("invalid boolean")
        return Frame("#", line == b"t"), after
    if kind == ",":
        try:
            return Frame(",", float(line)), after
        except ValueError:
            raise ProtocolError("invalid double") from None
    if kind in "$!=":
        if len(line) > MAX_HEADER:
            raise ProtocolError("length header too long")
        length = _length(line, "bulk", MAX_BULK)
        if length == -1:
            return Frame(kind, None), after
        end = after + length
        if len(data) < end + 2:
            return None
        if data[end:end + 2] != b"\r\n":
            raise ProtocolError("bulk payload not followed by CRLF")
        body = bytes(data[after:end])
        if kind == "=":
            if len(body) < 4 or body[3:4] != b":":
                raise ProtocolError("invalid verbatim string")
            return Frame("=", (body[:3], body[4:])), end + 2
        return Frame(kind, body), end + 2
    if kind in "*~>%|":
        if len(line) > MAX_HEADER:
            raise ProtocolError("length header too long")
        count = _length(line, "aggregate", MAX_AGGREGATE)
        if count == -1:
            return Frame(kind, None), after
        items: list[Frame] = []
        pos = after
        for _ in range(count * 2 if kind in "%|" else count):
            got = decode(data, pos, depth + 1)
            if got is None:
                return None
            item, pos = got
            items.append(item)
        if kind in "*~>":
            return Frame(kind, items), pos
        pairs = list(zip(items[::2], items[1::2], strict=True))
        if kind == "%":
            return Frame("%", pairs), pos
        got = decode(data, pos, depth + 1)
        if got is None:
            return None
        described, pos = got
        return Frame("|", (pairs, described)), pos
    raise ProtocolError(f"unknown reply type byte 0x{data[pos]:02x}")
