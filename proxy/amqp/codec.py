"""AMQP 1.0 types, frames and performatives (OASIS AMQP 1.0 part 1 and 2), pure.

Decoding keeps each value's type where the type is not implied by the Python value
(`Typed("uint", 5)`), so a decoded performative or section encodes back to an equivalent one.
Encoding picks the compact form (str8 up to 255 bytes, else str32; list0/list8/list32), which
every AMQP peer must accept. Every length and count is checked against the bytes actually
there before anything is sliced: a length prefix never makes keyless allocate.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from typing import Any


class AmqpProtocolError(Exception):
    """Garbage or a limit: the message is safe to log (it never quotes the bytes)."""


PROTOCOL_AMQP = b"AMQP\x00\x01\x00\x00"
PROTOCOL_TLS = b"AMQP\x02\x01\x00\x00"
PROTOCOL_SASL = b"AMQP\x03\x01\x00\x00"
PROTOCOL_HEADERS = (PROTOCOL_AMQP, PROTOCOL_TLS, PROTOCOL_SASL)
FRAME_AMQP, FRAME_SASL = 0, 1
HEARTBEAT = b"\x00\x00\x00\x08\x02\x00\x00\x00"
MAX_DEPTH = 32  # nesting of lists/maps/described values keyless accepts

PERFORMATIVES = {0x10: "open", 0x11: "begin", 0x12: "attach", 0x13: "flow", 0x14: "transfer",
                 0x15: "disposition", 0x16: "detach", 0x17: "end", 0x18: "close",
                 0x40: "sasl-mechanisms", 0x41: "sasl-init", 0x42: "sasl-challenge",
                 0x43: "sasl-response", 0x44: "sasl-outcome"}
CODE_OF = {name: code for code, name in PERFORMATIVES.items()}
SECTIONS = {0x70: "header", 0x71: "delivery-annotations", 0x72: "message-annotations",
            0x73: "properties", 0x74: "application-properties", 0x75: "data",
            0x76: "amqp-sequence", 0x77: "amqp-value", 0x78: "footer"}
SOURCE, TARGET = 0x28, 0x29
# Field positions in the described lists keyless reads or rewrites.
OPEN_HOSTNAME, OPEN_MAX_FRAME_SIZE = 1, 2
ATTACH_NAME, ATTACH_HANDLE, ATTACH_ROLE, ATTACH_SOURCE, ATTACH_TARGET = 0, 1, 2, 5, 6
TRANSFER_HANDLE, TRANSFER_MORE = 0, 5
DETACH_HANDLE = 0
TERMINUS_ADDRESS = 0
PROPERTIES_MESSAGE_ID, PROPERTIES_CORRELATION_ID = 0, 5
SASL_INIT_MECHANISM = 0


class Symbol(str):
    """An AMQP symbol (ASCII), as opposed to a string."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Typed:
    """A scalar whose AMQP type the Python value does not say (uint vs ulong, timestamp...)."""

    type: str
    value: Any


@dataclass(frozen=True, slots=True)
class Described:
    descriptor: Any  # Typed("ulong", code) or Symbol
    value: Any

    @property
    def code(self) -> int | None:
        descriptor = self.descriptor
        if isinstance(descriptor, Typed) and descriptor.type == "ulong":
            return int(descriptor.value)
        return None


@dataclass(frozen=True, slots=True)
class Map:
    """An AMQP map, in order (keys may be any AMQP value)."""

    items: tuple[tuple[Any, Any], ...] = ()

    def get(self, key: Any, default: Any = None) -> Any:
        for k, v in self.items:
            if k == key:
                return v
        return default

    def replace(self, key: Any, value: Any) -> Map:
        items = [(k, value if k == key else v) for k, v in self.items]
        if not any(k == key for k, _ in self.items):
            items.append((key, value))
        return Map(tuple(items))


@dataclass(frozen=True, slots=True)
class Array:
    """An AMQP array: one element type for all (`element` is the type name)."""

    element: str
    items: tuple[Any, ...] = field(default=())


def ulong(value: int) -> Typed:
    return Typed("ulong", value)


def uint(value: int) -> Typed:
    return Typed("uint", value)


def described(code: int, fields: list[Any]) -> Described:
    return Described(ulong(code), fields)


# ---------------------------------------------------------------- decoding

_FIXED = {  # code -> (type name, struct format)
    0x50: ("ubyte", ">B"), 0x60: ("ushort", ">H"), 0x70: ("uint", ">I"), 0x52: ("uint", ">B"),
    0x80: ("ulong", ">Q"), 0x53: ("ulong", ">B"), 0x51: ("byte", ">b"), 0x61: ("short", ">h"),
    0x71: ("int", ">i"), 0x54: ("int", ">b"), 0x81: ("long", ">q"), 0x55: ("long", ">b"),
    0x72: ("float", ">f"), 0x82: ("double", ">d"), 0x83: ("timestamp", ">q"),
    0x73: ("char", ">I"),
}
_ZERO = {0x43: "uint", 0x44: "ulong"}
_FIXED_WIDTH = {0x74: ("decimal32", 4), 0x84: ("decimal64", 8), 0x94: ("decimal128", 16)}


class _Reader:
    __slots__ = ("data", "end")

    def __init__(self, data: bytes | memoryview, end: int) -> None:
        self.data = data
        self.end = end

    def need(self, pos: int, count: int) -> None:
        if count < 0 or pos + count > self.end:
            raise AmqpProtocolError("AMQP value truncated or its length is wrong")


def decode_value(data: bytes | memoryview, pos: int = 0, end: int | None = None) -> tuple[Any, int]:
    """One AMQP value at `pos` (within `end`): (value, position after it)."""
    reader = _Reader(data, len(data) if end is None else end)
    return _decode(reader, pos, 0)


def _decode(r: _Reader, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise AmqpProtocolError("AMQP value nested too deeply")
    r.need(pos, 1)
    code = r.data[pos]
    pos += 1
    if code == 0x00:
        descriptor, pos = _decode(r, pos, depth + 1)
        if isinstance(descriptor, Described):
            raise AmqpProtocolError("AMQP descriptor is itself described")
        value, pos = _decode(r, pos, depth + 1)
        return Described(descriptor, value), pos
    return _decode_constructed(r, code, pos, depth)


def _decode_constructed(r: _Reader, code: int, pos: int, depth: int) -> tuple[Any, int]:
    if code == 0x40:
        return None, pos
    if code == 0x41:
        return True, pos
    if code == 0x42:
        return False, pos
    if code == 0x56:
        r.need(pos, 1)
        if r.data[pos] > 1:
            raise AmqpProtocolError("AMQP boolean is neither 0 nor 1")
        return r.data[pos] == 1, pos + 1
    if code in _ZERO:
        return Typed(_ZERO[code], 0), pos
    if code in _FIXED:
        name, fmt = _FIXED[code]
        size = struct.calcsize(fmt)
        r.need(pos, size)
        (value,) = struct.unpack_from(fmt, r.data, pos)
        return Typed(name, value), pos + size
    if code in _FIXED_WIDTH:
        name, size = _FIXED_WIDTH[code]
        r.need(pos, size)
        return Typed(name, bytes(r.data[pos:pos + size])), pos + size
    if code == 0x98:
        r.need(pos, 16)
        return Typed("uuid", uuid.UUID(bytes=bytes(r.data[pos:pos + 16]))), pos + 16
    if code in (0xa0, 0xa1, 0xa3, 0xb0, 0xb1, 0xb3):
        width = 1 if code < 0xb0 else 4
        r.need(pos, width)
        size = r.data[pos] if width == 1 else struct.unpack_from(">I", r.data, pos)[0]
        pos += width
        r.need(pos, size)
        raw = bytes(r.data[pos:pos + size])
        pos += size
        if code in (0xa0, 0xb0):
            return raw, pos
        try:
            if code in (0xa1, 0xb1):
                return raw.decode("utf-8"), pos
            return Symbol(raw.decode("ascii")), pos
        except UnicodeDecodeError:
            raise AmqpProtocolError("AMQP string or symbol is not valid text") from None
    if code == 0x45:
        return [], pos
    if code in (0xc0, 0xd0, 0xc1, 0xd1):
        width = 1 if code < 0xd0 else 4
        size, count, pos, end = _compound_header(r, pos, width)
        items: list[Any] = []
        sub = _Reader(r.data, end)
        for _ in range(count):
            value, pos = _decode(sub, pos, depth + 1)
            items.append(value)
        if pos != end:
            raise AmqpProtocolError("AMQP list or map size disagrees with its content")
        if code in (0xc0, 0xd0):
            return items, pos
        if count % 2:
            raise AmqpProtocolError("AMQP map has an odd number of elements")
        return Map(tuple(zip(items[0::2], items[1::2], strict=True))), pos
    if code in (0xe0, 0xf0):
        width = 1 if code == 0xe0 else 4
        size, count, pos, end = _compound_header(r, pos, width)
        sub = _Reader(r.data, end)
        sub.need(pos, 1)
        element_code = sub.data[pos]
        pos += 1
        descriptor = None
        if element_code == 0x00:
            descriptor, pos = _decode(sub, pos, depth + 1)
            sub.need(pos, 1)
            element_code = sub.data[pos]
            pos += 1
        elements = []
        for _ in range(count):
            value, pos = _decode_constructed(sub, element_code, pos, depth + 1)
            elements.append(value if descriptor is None else Described(descriptor, value))
        if pos != end:
            raise AmqpProtocolError("AMQP array size disagrees with its content")
        return Array(_element_name(element_code, elements), tuple(elements)), pos
    raise AmqpProtocolError(f"unknown AMQP type code 0x{code:02x}")


def _compound_header(r: _Reader, pos: int, width: int) -> tuple[int, int, int, int]:
    r.need(pos, 2 * width)
    fmt = ">B" if width == 1 else ">I"
    (size,) = struct.unpack_from(fmt, r.data, pos)
    (count,) = struct.unpack_from(fmt, r.data, pos + width)
    r.need(pos + width, size)
    if size < width:
        raise AmqpProtocolError("AMQP list or map size is too small")
    end = pos + width + size
    if count > size:  # at least a byte per element: never believe a count the bytes cannot hold
        raise AmqpProtocolError("AMQP element count exceeds its size")
    return size, count, pos + 2 * width, end


def _element_name(code: int, elements: list[Any]) -> str:
    if code in (0xa3, 0xb3):
        return "symbol"
    if code in (0xa1, 0xb1):
        return "string"
    if code in (0xa0, 0xb0):
        return "binary"
    if code in (0x56, 0x41, 0x42):
        return "boolean"
    if code in (0xc0, 0xd0, 0x45):
        return "list"
    if code in (0xc1, 0xd1):
        return "map"
    if code == 0x40:
        return "null"
    if code in _FIXED:
        return _FIXED[code][0]
    if code in _ZERO:
        return _ZERO[code]
    if code == 0x98:
        return "uuid"
    if code in _FIXED_WIDTH:
        return _FIXED_WIDTH[code][0]
    raise AmqpProtocolError(f"AMQP array of unsupported element type 0x{code:02x}")


# ---------------------------------------------------------------- encoding

_ENCODE_FIXED = {"ubyte": (0x50, ">B"), "ushort": (0x60, ">H"), "byte": (0x51, ">b"),
                 "short": (0x61, ">h"), "float": (0x72, ">f"), "double": (0x82, ">d"),
                 "timestamp": (0x83, ">q"), "char": (0x73, ">I")}
_DECIMAL = {"decimal32": 0x74, "decimal64": 0x84, "decimal128": 0x94}


def encode_value(value: Any) -> bytes:
    if value is None:
        return b"\x40"
    if value is True:
        return b"\x41"
    if value is False:
        return b"\x42"
    if isinstance(value, Described):
        return b"\x00" + encode_value(value.descriptor) + encode_value(value.value)
    if isinstance(value, Typed):
        return _encode_typed(value)
    if isinstance(value, int):  # a bare Python int: long
        return _encode_typed(Typed("long", value))
    if isinstance(value, Symbol):
        raw = value.encode("ascii")
        return _variable(raw, 0xa3, 0xb3)
    if isinstance(value, str):
        return _variable(value.encode("utf-8"), 0xa1, 0xb1)
    if isinstance(value, bytes | bytearray):
        return _variable(bytes(value), 0xa0, 0xb0)
    if isinstance(value, list | tuple):
        if not value:
            return b"\x45"
        return _compound([encode_value(v) for v in value], 0xc0, 0xd0)
    if isinstance(value, Map):
        parts = []
        for k, v in value.items:
            parts += [encode_value(k), encode_value(v)]
        return _compound(parts, 0xc1, 0xd1)
    if isinstance(value, Array):
        return _encode_array(value)
    raise TypeError(f"cannot encode {type(value).__name__} as AMQP")


def _encode_typed(value: Typed) -> bytes:
    kind, v = value.type, value.value
    if kind == "uint":
        if v == 0:
            return b"\x43"
        return b"\x52" + bytes([v]) if v < 256 else b"\x70" + struct.pack(">I", v)
    if kind == "ulong":
        if v == 0:
            return b"\x44"
        return b"\x53" + bytes([v]) if v < 256 else b"\x80" + struct.pack(">Q", v)
    if kind == "int":
        return b"\x54" + struct.pack(">b", v) if -128 <= v < 128 else b"\x71" + struct.pack(">i", v)
    if kind == "long":
        return b"\x55" + struct.pack(">b", v) if -128 <= v < 128 else b"\x81" + struct.pack(">q", v)
    if kind == "uuid":
        return b"\x98" + v.bytes
    if kind in _DECIMAL:
        return bytes([_DECIMAL[kind]]) + v
    if kind == "boolean":
        return encode_value(bool(v))
    code, fmt = _ENCODE_FIXED[kind]
    return bytes([code]) + struct.pack(fmt, v)


def _variable(raw: bytes, short: int, wide: int) -> bytes:
    if len(raw) <= 255:
        return bytes([short, len(raw)]) + raw
    return bytes([wide]) + struct.pack(">I", len(raw)) + raw


def _compound(parts: list[bytes], short: int, wide: int) -> bytes:
    body = b"".join(parts)
    if len(body) + 1 <= 255 and len(parts) <= 255:
        return bytes([short, len(body) + 1, len(parts)]) + body
    return bytes([wide]) + struct.pack(">II", len(body) + 4, len(parts)) + body


_ARRAY_CODES = {"symbol": (0xa3, 0xb3), "string": (0xa1, 0xb1), "binary": (0xa0, 0xb0)}


def _encode_array(array: Array) -> bytes:
    items = list(array.items)
    descriptor = b""
    if items and isinstance(items[0], Described):
        descriptor = b"\x00" + encode_value(items[0].descriptor)
        items = [item.value for item in items]
    if array.element in _ARRAY_CODES:
        short, wide = _ARRAY_CODES[array.element]
        raws = [(str(i).encode("ascii") if array.element == "symbol" else
                 i.encode("utf-8") if array.element == "string" else bytes(i)) for i in items]
        if all(len(raw) <= 255 for raw in raws):
            constructor, body = bytes([short]), b"".join(bytes([len(r)]) + r for r in raws)
        else:
            constructor = bytes([wide])
            body = b"".join(struct.pack(">I", len(r)) + r for r in raws)
    else:
        encoded = [encode_value(i) for i in items]
        wide_forms = {"uint": (0x70, ">I"), "ulong": (0x80, ">Q"), "int": (0x71, ">i"),
                      "long": (0x81, ">q")}
        if array.element in wide_forms:  # one constructor for all: the wide form
            code, fmt = wide_forms[array.element]
            constructor = bytes([code])
            body = b"".join(struct.pack(fmt, i.value) for i in items)
        elif array.element == "boolean":
            constructor, body = b"\x56", b"".join(b"\x01" if i else b"\x00" for i in items)
        elif array.element in ("list", "map"):
            encoded = [encode_value(i) for i in items]
            wide = b"\xd0" if array.element == "list" else b"\xd1"
            constructor = wide
            body = b"".join(_rewiden(e, array.element) for e in encoded)
        elif encoded:
            constructor = encoded[0][:1]
            body = b"".join(e[1:] for e in encoded)
        else:
            constructor = b"\x40"
            body = b""
    payload = descriptor + constructor + body
    if len(payload) + 1 <= 255 and len(items) <= 255:
        return bytes([0xe0, len(payload) + 1, len(items)]) + payload
    return b"\xf0" + struct.pack(">II", len(payload) + 4, len(items)) + payload


def _rewiden(encoded: bytes, kind: str) -> bytes:
    """A list/map element of an array, in the 32-bit form without its constructor."""
    value, _ = decode_value(encoded)
    parts = ([encode_value(v) for v in value] if kind == "list" else
             [encode_value(x) for kv in value.items for x in kv])
    body = b"".join(parts)
    return struct.pack(">II", len(body) + 4, len(parts)) + body


# ---------------------------------------------------------------- frames

@dataclass(frozen=True, slots=True)
class Frame:
    type: int  # FRAME_AMQP or FRAME_SASL
    channel: int
    body: bytes  # after the header (and any extended header)

    @property
    def heartbeat(self) -> bool:
        return not self.body


@dataclass(frozen=True, slots=True)
class Performative:
    name: str
    fields: list[Any]
    payload_offset: int  # where the payload (a transfer's message bytes) starts in the body

    def field(self, index: int) -> Any:
        return self.fields[index] if index < len(self.fields) else None


def frame_size(head: bytes | memoryview) -> int:
    """The size a frame header announces (needs 4 bytes)."""
    return struct.unpack_from(">I", head, 0)[0]


def parse_frame(raw: bytes | memoryview) -> Frame:
    """One whole frame (exactly `frame_size` bytes)."""
    if len(raw) < 8:
        raise AmqpProtocolError("AMQP frame shorter than its header")
    size, doff, kind, channel = struct.unpack_from(">IBBH", raw, 0)
    if size != len(raw):
        raise AmqpProtocolError("AMQP frame size disagrees with its bytes")
    if doff < 2 or doff * 4 > size:
        raise AmqpProtocolError("AMQP frame data offset is invalid")
    if kind not in (FRAME_AMQP, FRAME_SASL):
        raise AmqpProtocolError(f"unknown AMQP frame type {kind}")
    return Frame(kind, channel, bytes(raw[doff * 4:]))


def encode_frame(kind: int, channel: int, body: bytes) -> bytes:
    return struct.pack(">IBBH", len(body) + 8, 2, kind, channel) + body


def parse_performative(frame: Frame) -> Performative:
    value, end = decode_value(frame.body)
    if not isinstance(value, Described) or value.code not in PERFORMATIVES:
        raise AmqpProtocolError("AMQP frame body is not a known performative")
    if not isinstance(value.value, list):
        raise AmqpProtocolError("AMQP performative is not a list")
    name = PERFORMATIVES[value.code]
    if (frame.type == FRAME_SASL) != name.startswith("sasl-"):
        raise AmqpProtocolError("AMQP performative in the wrong frame type")
    if end != len(frame.body) and name != "transfer":
        raise AmqpProtocolError("AMQP performative followed by unexpected bytes")
    return Performative(name, value.value, end)


def encode_performative(name: str, fields: list[Any], payload: bytes = b"") -> bytes:
    while fields and fields[-1] is None:  # trailing nulls may be omitted
        fields = fields[:-1]
    return encode_value(described(CODE_OF[name], list(fields))) + payload


# ---------------------------------------------------------------- message sections

@dataclass(frozen=True, slots=True)
class Section:
    code: int
    value: Any  # the section's described value's value
    raw: bytes  # the section as it came (kept as is unless rewritten)


def parse_message(payload: bytes) -> list[Section]:
    sections = []
    pos = 0
    while pos < len(payload):
        start = pos
        value, pos = decode_value(payload, pos)
        if not isinstance(value, Described) or value.code not in SECTIONS:
            raise AmqpProtocolError("AMQP message holds an unknown section")
        sections.append(Section(value.code, value.value, payload[start:pos]))
    return sections


def encode_section(code: int, value: Any) -> bytes:
    return encode_value(Described(ulong(code), value))


def section(sections: list[Section], code: int) -> Section | None:
    return next((s for s in sections if s.code == code), None)
