"""proxy/amqp/codec.py: every type, performative and section the SDKs send round-trips, bytes
from an independent encoder (azure-servicebus' pyamqp) decode, and garbage gives a clear
AmqpProtocolError (fuzzed with the repo's hypothesis profiles)."""

from __future__ import annotations

import uuid

import pytest
from azure.servicebus._pyamqp import _decode as pyamqp_decode
from azure.servicebus._pyamqp import _encode as pyamqp_encode
from azure.servicebus._pyamqp.endpoints import Source, Target
from azure.servicebus._pyamqp.message import Message, Properties
from azure.servicebus._pyamqp.performatives import AttachFrame, OpenFrame, TransferFrame
from hypothesis import given
from hypothesis import strategies as st

from proxy.amqp.codec import (
    CODE_OF,
    SECTIONS,
    AmqpProtocolError,
    Array,
    Described,
    Map,
    Symbol,
    Typed,
    decode_value,
    described,
    encode_frame,
    encode_performative,
    encode_section,
    encode_value,
    parse_frame,
    parse_message,
    parse_performative,
    uint,
    ulong,
)

SCALARS = [None, True, False, Typed("ubyte", 7), Typed("ushort", 65535), uint(0), uint(9),
           uint(70000), ulong(0), ulong(3), ulong(2**40), Typed("byte", -3),
           Typed("short", -300), Typed("int", -5), Typed("int", 2**30), Typed("long", -2),
           Typed("long", 2**40), Typed("float", 1.5), Typed("double", -2.25),
           Typed("timestamp", 1796170000000), Typed("uuid", uuid.UUID(int=12345)),
           Typed("char", 0x263a), b"", b"bin", b"x" * 300, "", "text", "é" * 200,
           "s" * 300, Symbol("sym"), Symbol("y" * 300), [], [uint(1), "a"],
           ["x" * 300, uint(2)], Map(), Map(((Symbol("k"), "v"), ("n", Typed("int", 1)))),
           Array("symbol", (Symbol("ANONYMOUS"), Symbol("MSSBCBS"))),
           Array("symbol", (Symbol("z" * 300),)), Array("uint", (uint(1), uint(2**31))),
           Array("string", ("a", "b")), described(0x29, ["$cbs"]),
           Described(Symbol("com.microsoft:session-filter"), "s1")]


@pytest.mark.parametrize("value", SCALARS, ids=lambda v: type(v).__name__)
def test_every_type_round_trips(value):
    encoded = encode_value(value)
    decoded, end = decode_value(encoded)
    assert end == len(encoded)
    assert decoded == value
    assert encode_value(decoded) == encoded


def test_str8_and_str32_are_chosen_by_length():
    assert encode_value("a" * 255)[:1] == b"\xa1"
    assert encode_value("a" * 256)[:1] == b"\xb1"
    assert decode_value(b"\xb1\x00\x00\x00\x02hi")[0] == "hi"  # str32 short: still decodes


@pytest.mark.parametrize("name", sorted(CODE_OF))
def test_every_performative_round_trips(name):
    kind = 1 if name.startswith("sasl-") else 0
    fields = [Symbol("ANONYMOUS")] if kind else ["container", "host", uint(1 << 20)]
    payload = encode_section(0x77, "body") if name == "transfer" else b""
    raw = encode_frame(kind, 3, encode_performative(name, fields, payload))
    frame = parse_frame(raw)
    perf = parse_performative(frame)
    assert (frame.channel, perf.name, perf.fields) == (3, name, fields)
    assert frame.body[perf.payload_offset:] == payload


@pytest.mark.parametrize("code", sorted(SECTIONS))
def test_every_section_round_trips(code):
    value = Map(((Symbol("x-opt"), "v"),)) if code in (0x71, 0x72, 0x74, 0x78) else (
        b"data" if code == 0x75 else ["a", uint(1)])
    raw = encode_section(code, value)
    (section,) = parse_message(raw)
    assert (section.code, section.value, section.raw) == (code, value, raw)


def pyamqp_frame(performative) -> bytes:
    header, body = pyamqp_encode.encode_frame(performative)
    return header + b"\x00\x00" + (body or b"")  # its transport adds the channel


def test_pyamqp_frames_decode():
    """Bytes from an independent encoder (the Python SDK's) decode to the same fields."""
    open_frame = OpenFrame(container_id="c1", hostname="localhost", max_frame_size=1048576,
                           channel_max=65535, idle_timeout=None, outgoing_locales=None,
                           incoming_locales=None, offered_capabilities=None,
                           desired_capabilities=None, properties={b"product": "sdk"})
    raw = pyamqp_frame(open_frame)
    perf = parse_performative(parse_frame(raw))
    assert perf.name == "open" and perf.fields[:3] == ["c1", "localhost", uint(1048576)]
    attach = AttachFrame(name="link", handle=1, role=False, send_settle_mode=0,
                         rcv_settle_mode=0, source=Source(address="$cbs"),
                         target=Target(address="$cbs"), unsettled=None,
                         incomplete_unsettled=None, initial_delivery_count=None,
                         max_message_size=None, offered_capabilities=None,
                         desired_capabilities=None, properties=None)
    perf = parse_performative(parse_frame(pyamqp_frame(attach)))
    assert perf.fields[5].value[0] == "$cbs" and perf.fields[6].value[0] == "$cbs"
    message = Message(value="SharedAccessSignature sr=a&sig=b&se=1&skn=k",
                      properties=Properties(message_id="m1"),
                      application_properties={"operation": "put-token", "type": "jwt",
                                              "name": "sb://localhost:5672/orders"})
    payload = pyamqp_encode.encode_payload(bytearray(), message)
    transfer = TransferFrame(handle=1, delivery_id=0, delivery_tag=b"\x00\x00\x00\x01",
                             message_format=0, settled=False, more=False, payload=payload)
    frame = parse_frame(pyamqp_frame(transfer))
    perf = parse_performative(frame)
    sections = parse_message(frame.body[perf.payload_offset:])
    assert [s.code for s in sections] == [0x73, 0x74, 0x77]
    assert sections[2].value.startswith("SharedAccessSignature ")
    # and what keyless encodes, pyamqp decodes
    ours = encode_section(0x74, Map((("status-code", Typed("int", 200)),))) + \
        encode_section(0x77, "x" * 2000)
    decoded = pyamqp_decode.decode_payload(memoryview(ours))
    assert decoded.value == b"x" * 2000 or decoded.value == "x" * 2000


@pytest.mark.parametrize("raw", [
    b"\xa1\x05ab",  # string shorter than its length
    b"\xb1\xff\xff\xff\xffab",  # a 4 GiB length prefix: refused, not allocated
    b"\xd0\xff\xff\xff\xf0\xff\xff\xff\xf0",  # a huge list
    b"\xc0\x02\xff\x40",  # more elements than bytes
    b"\xc1\x02\x01\x40",  # a map with an odd count
    b"\x01",  # unknown code
    b"\xa3\x01\xff",  # a symbol that is no ASCII
    b"\x00" * 100,  # descriptors all the way down
    b"\xf0\x00\x00\x00\x05\xff\xff\xff\xff\x40",  # 4 billion zero-width nulls: no loop
    b"",
])
def test_garbage_is_a_clear_error(raw):
    with pytest.raises(AmqpProtocolError) as error:
        decode_value(raw)
    assert str(error.value) and "\\x" not in str(error.value)


def test_frame_header_checks():
    with pytest.raises(AmqpProtocolError):
        parse_frame(b"\x00\x00\x00\x09\x02\x00\x00\x00")  # size disagrees with bytes
    with pytest.raises(AmqpProtocolError):
        parse_frame(b"\x00\x00\x00\x08\x01\x00\x00\x00")  # data offset below the header
    with pytest.raises(AmqpProtocolError):
        parse_frame(b"\x00\x00\x00\x08\x02\x07\x00\x00")  # unknown frame type
    assert parse_frame(b"\x00\x00\x00\x08\x02\x00\x00\x00").heartbeat


values = st.recursive(
    st.none() | st.booleans() | st.text(max_size=300) | st.binary(max_size=300)
    | st.integers(0, 2**32 - 1).map(uint) | st.integers(0, 2**64 - 1).map(ulong)
    | st.integers(-2**63, 2**63 - 1).map(lambda v: Typed("long", v))
    | st.text(alphabet="abcxyz:-", max_size=300).map(Symbol),
    lambda inner: st.lists(inner, max_size=5)
    | st.lists(st.tuples(inner, inner), max_size=4).map(lambda kv: Map(tuple(kv)))
    | st.tuples(st.integers(0, 0x78), inner).map(lambda dv: Described(ulong(dv[0]), dv[1])),
    max_leaves=20)


@given(values)
def test_fuzz_round_trip(value):
    encoded = encode_value(value)
    assert decode_value(encoded) == (value, len(encoded))


@given(st.binary(max_size=400))
def test_fuzz_decoder_random_bytes(raw):
    try:
        decode_value(raw)
    except AmqpProtocolError as exc:
        assert str(exc)


@given(values, st.data())
def test_fuzz_decoder_truncated(value, data):
    encoded = encode_value(value)
    cut = data.draw(st.integers(0, max(0, len(encoded) - 1)))
    with pytest.raises(AmqpProtocolError):
        decode_value(encoded[:cut])
