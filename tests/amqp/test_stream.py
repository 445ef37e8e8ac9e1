"""proxy/amqp/stream.py AmqpConverter on hand-built connections (frames from the codec, the
put-token as the Python SDK encodes it): conversion, local-endpoint rewrites, fail closed,
SASL, limits, any chunking."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.amqp import cbs
from proxy.amqp.codec import (
    FRAME_AMQP,
    FRAME_SASL,
    PROTOCOL_AMQP,
    PROTOCOL_SASL,
    AmqpProtocolError,
    Map,
    Symbol,
    Typed,
    described,
    encode_frame,
    encode_performative,
    encode_section,
    parse_frame,
    parse_message,
    parse_performative,
    uint,
)
from proxy.amqp.stream import AmqpConverter
from proxy.tokens import Token, TokenUnavailable
from tests.support import entra

NS = "keylessbus.servicebus.windows.net"
SAS = ("SharedAccessSignature sr=sb%3A%2F%2Flocalhost%3A5672%2Forders&sig=c2VjcmV0c2ln"
       "&se={se}&skn=RootManageSharedAccessKey")
SIG = "c2VjcmV0c2ln"


def frame(name, fields, channel=0, payload=b""):
    kind = FRAME_SASL if name.startswith("sasl-") else FRAME_AMQP
    return encode_frame(kind, channel, encode_performative(name, fields, payload))


def attach(name, handle, role, source, target, channel=1):
    return frame("attach", [name, uint(handle), role, None, None, described(0x28, [source]),
                            described(0x29, [target])], channel)


def put_token(se, message_id="m-1", audience="sb://localhost:5672/orders", body=None):
    payload = (encode_section(0x73, [message_id, None, None, None, Symbol("cbs")])
               + encode_section(0x74, Map((("operation", "put-token"), ("type", "jwt"),
                                           ("name", audience),
                                           ("expiration", Typed("timestamp", se * 1000)))))
               + encode_section(0x77, body if body is not None else SAS.format(se=se)))
    return frame("transfer", [uint(1), uint(0), b"\x00\x00\x00\x01", uint(0), False, False],
                 1, payload)


APP_START = (PROTOCOL_SASL + frame("sasl-init", [Symbol("ANONYMOUS")]) + PROTOCOL_AMQP
             + frame("open", ["app", "localhost", uint(1 << 20)])
             + frame("begin", [None, uint(0), uint(100), uint(100)], 1)
             + attach("cbs-sender", 1, False, "$cbs", "$cbs")
             + attach("cbs-receiver", 2, True, "$cbs", "$cbs")
             + attach("orders", 3, False, "sender-link", "amqps://localhost:5672/orders"))
SERVICE_START = (PROTOCOL_SASL + frame("sasl-mechanisms", [Symbol("ANONYMOUS")])
                 + frame("sasl-outcome", [Typed("ubyte", 0)]) + PROTOCOL_AMQP
                 + frame("open", ["svc", None, uint(262144)])
                 + frame("begin", [Typed("ushort", 1), uint(0), uint(100), uint(100)], 0)
                 + attach("cbs-receiver", 0, False, "$cbs", "$cbs", channel=0))


def reply(correlation_id, status, description):
    payload = (encode_section(0x73, [None, None, None, None, None, correlation_id])
               + encode_section(0x74, Map((("status-code", Typed("int", status)),
                                           ("status-description", description)))))
    return frame("transfer", [uint(0), uint(0), b"0", uint(0), False, False], 0, payload)


def frames(data: bytes):
    """(performative, frame) of every frame in `data`, protocol headers skipped."""
    out, pos = [], 0
    while pos < len(data):
        if data[pos:pos + 4] == b"AMQP":
            pos += 8
            continue
        size = int.from_bytes(data[pos:pos + 4], "big")
        parsed = parse_frame(data[pos:pos + size])
        out.append((parse_performative(parsed), parsed))
        pos += size
    return out


class Tokens:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple[str, float | None]] = []
        self.fail = fail

    async def __call__(self, scope: str, valid_until: float | None) -> Token:
        self.calls.append((scope, valid_until))
        if self.fail:
            raise TokenUnavailable(self.fail)
        audience = scope.removesuffix("/.default")
        return Token(entra.mint(audience), time.time() + 3600, time.time() + 3000)


def run(coro):
    return asyncio.run(coro)


def converter(tokens, events=None, **kwargs):
    record = events.append if events is not None else (lambda e: None)
    return AmqpConverter(NS, tokens, local_authority="*",
                         on_event=lambda kind, details: record((kind, details)), **kwargs)


def test_sas_put_token_becomes_an_entra_put_token():
    tokens, events = Tokens(), []
    conv = converter(tokens, events)
    se = int(time.time()) + 3600
    out = run(conv.from_app(APP_START + put_token(se)))
    assert SIG not in out.to_service.decode("latin-1")
    assert b"localhost" not in out.to_service  # hostname, addresses and audience rewritten
    parsed = frames(out.to_service)
    open_perf = next(p for p, _ in parsed if p.name == "open")
    assert open_perf.fields[1] == NS
    addresses = [p.fields[6].value[0] for p, _ in parsed if p.name == "attach"]
    assert addresses == ["$cbs", "$cbs", f"amqps://{NS}/orders"]
    transfer, raw = next((p, f) for p, f in parsed if p.name == "transfer")
    assert transfer.fields[1] == uint(0) and transfer.fields[2] == b"\x00\x00\x00\x01"
    sections = parse_message(raw.body[transfer.payload_offset:])
    props = sections[1].value
    assert props.get("type") == "jwt" and props.get("name") == f"sb://{NS}/orders"
    assert props.get("operation") == "put-token"
    assert props.get("expiration") == Typed("timestamp", se * 1000)  # kept as sent
    assert sections[0].value[0] == "m-1"
    assert entra.verify(sections[2].value, "https://servicebus.azure.net") == []
    assert tokens.calls == [("https://servicebus.azure.net/.default", float(se))]
    # the service accepts: counted as converted once
    conv.from_service(SERVICE_START + reply("m-1", 202, "Accepted"))
    assert [e for e in events if e[0] != "attach"] == [
        ("put_token_converted", {"audience": f"sb://{NS}/orders"})]
    assert ("attach", {"role": "send", "address": f"amqps://{NS}/orders"}) in events


def test_event_hubs_scope_by_service_for():
    tokens = Tokens()
    conv = converter(tokens, service_for=lambda audience: "eventhubs")
    run(conv.from_app(APP_START + put_token(int(time.time()) + 60)))
    assert tokens.calls[0][0] == "https://eventhubs.azure.net/.default"


def test_byte_by_byte_gives_the_same_bytes():
    se = int(time.time()) + 3600
    data = APP_START + put_token(se) + frame("flow", [uint(0)], 1)
    whole = run(converter(Tokens()).from_app(data)).to_service
    conv = converter(Tokens())
    pieces = b"".join(run(conv.from_app(data[i:i + 1])).to_service for i in range(len(data)))
    strip = [(p.name, p.fields[:2]) for p, _ in frames(whole)]
    assert [(p.name, p.fields[:2]) for p, _ in frames(pieces)] == strip
    assert len(pieces) == len(whole)


def test_no_token_fails_closed_and_the_reply_says_why():
    events = []
    conv = converter(Tokens(fail="the identity endpoint is unreachable"), events)
    out = run(conv.from_app(APP_START + put_token(int(time.time()) + 60)))
    assert SIG.encode() not in out.to_service and b"SharedAccessSignature" not in out.to_service
    transfer, raw = next((p, f) for p, f in frames(out.to_service) if p.name == "transfer")
    sections = parse_message(raw.body[transfer.payload_offset:])
    assert sections[2].value == cbs.PLACEHOLDER
    back = conv.from_service(SERVICE_START + reply("m-1", 401, "InvalidToken"))
    last, raw = frames(back.to_app)[-1]
    props = parse_message(raw.body[last.payload_offset:])[1].value
    assert props.get("status-code") == Typed("int", 401)
    assert props.get("status-description") == (
        "KeylessTokenUnavailable: the identity endpoint is unreachable")
    assert [kind for kind, _ in events if kind != "attach"] == [
        "token_unavailable", "put_token_refused"]



def test_no_token_reply_says_why_under_both_spellings_of_the_status():
    """A reply with statusCode/statusDescription too (Service Bus' $management spelling):
    the Java SDK reads those first, so keyless' reason goes in both."""
    conv = converter(Tokens(fail="the identity endpoint is unreachable"))
    run(conv.from_app(APP_START + put_token(int(time.time()) + 60)))
    payload = (encode_section(0x73, [None, None, None, None, None, "m-1"])
               + encode_section(0x74, Map((("status-code", Typed("int", 401)),
                                           ("status-description", "InvalidToken"),
                                           ("statusCode", Typed("int", 401)),
                                           ("statusDescription", "InvalidToken")))))
    service_reply = frame("transfer", [uint(0), uint(0), b"0", uint(0), False, False], 0,
                          payload)
    back = conv.from_service(SERVICE_START + service_reply)
    last, raw = frames(back.to_app)[-1]
    props = parse_message(raw.body[last.payload_offset:])[1].value
    said = "KeylessTokenUnavailable: the identity endpoint is unreachable"
    assert props.get("status-description") == said and props.get("statusDescription") == said
    assert props.get("statusCode") == Typed("int", 401)


def test_a_reply_with_only_the_legacy_status_is_read():
    legacy = (encode_section(0x73, [None, None, None, None, None, "m-9"])
              + encode_section(0x74, Map((("statusCode", Typed("int", 401)),
                                          ("statusDescription", "no role")))))
    reply_read = cbs.read_reply(legacy)
    assert (reply_read.status_code, reply_read.description) == (401, "no role")
    rewritten = cbs.reply_with_description(reply_read, "KeylessTokenUnavailable: x")
    props = parse_message(rewritten)[1].value
    assert props.get("statusDescription") == "KeylessTokenUnavailable: x"

def test_service_refusal_of_a_converted_token_is_reported():
    events = []
    conv = converter(Tokens(), events)
    run(conv.from_app(APP_START + put_token(int(time.time()) + 60)))
    back = conv.from_service(SERVICE_START + reply("m-1", 401, "no role"))
    assert back.to_app.endswith(reply("m-1", 401, "no role"))  # passed as it came
    assert [e for e in events if e[0] != "attach"] == [
        ("put_token_rejected", {"audience": f"sb://{NS}/orders", "status": 401,
                                              "description": "no role"})]


def test_a_jwt_put_token_passes_unchanged():
    tokens = Tokens()
    data = APP_START + put_token(0, body=entra.mint("https://servicebus.azure.net"))
    out = run(converter(tokens).from_app(data))
    assert out.to_service.endswith(data[-200:]) and tokens.calls == []


def test_split_put_token_is_refused():
    split = put_token(int(time.time()) + 60)
    perf = parse_performative(parse_frame(split))
    more = frame("transfer", [*perf.fields[:5], True], 1, b"\x00Sw\xa1\x05Share")
    with pytest.raises(AmqpProtocolError, match="split over several transfers"):
        run(converter(Tokens()).from_app(APP_START + more))


def test_transparent_mode_rewrites_nothing_but_the_token():
    conv = AmqpConverter(NS, Tokens(), local_authority=None)
    data = APP_START + put_token(int(time.time()) + 60)
    out = run(conv.from_app(data))
    parsed = frames(out.to_service)
    assert next(p for p, _ in parsed if p.name == "open").fields[1] == "localhost"
    assert out.to_service[:len(APP_START)] == APP_START


@pytest.mark.parametrize("mechanism", ["EXTERNAL", "SCRAM-SHA-256", "XOAUTH2"])
def test_other_sasl_mechanisms_are_refused_locally(mechanism):
    events = []
    conv = converter(Tokens(), events)
    init = frame("sasl-init", [Symbol(mechanism), b"\x00RootManageSharedAccessKey\x00secretkey"])
    out = run(conv.from_app(PROTOCOL_SASL + init))
    assert out.to_service == PROTOCOL_SASL and b"secretkey" not in out.to_service
    assert out.close and parse_performative(parse_frame(out.to_app)).name == "sasl-outcome"
    assert events == [("sasl_refused", {"mechanism": mechanism})]


def test_audit_changes_nothing_and_reports_the_key_name():
    events = []
    conv = converter(Tokens(), events, audit=True)
    request = put_token(int(time.time()) + 60)
    assert run(conv.from_app(APP_START + request)).to_service.endswith(request)  # as sent
    assert ("sas_seen", {"key_name": "RootManageSharedAccessKey",
                         "audience": "sb://localhost:5672/orders"}) in events


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00",
                                     PROTOCOL_AMQP + b"\xff\xff\xff\xff\x02\x00\x00\x00",
                                     PROTOCOL_AMQP + b"\x00\x00\x00\x0c\x02\x00\x00\x00\x00"
                                     b"\x53\x10\x40"])
def test_garbage_from_the_app_is_refused_and_nothing_more_passes(garbage):
    conv = converter(Tokens())
    with pytest.raises(AmqpProtocolError) as error:
        run(conv.from_app(garbage))
    assert str(error.value)
    with pytest.raises(AmqpProtocolError):
        run(conv.from_app(APP_START))


def test_a_frame_over_the_services_max_frame_size_is_refused_before_buffering():
    conv = converter(Tokens())
    run(conv.from_app(APP_START))
    conv.from_service(SERVICE_START)  # max-frame-size 262144
    big = (300000).to_bytes(4, "big") + b"\x02\x00\x00\x01"
    with pytest.raises(AmqpProtocolError, match="over the limit of 262144"):
        run(conv.from_app(big))


@given(st.binary(max_size=600), st.integers(0, 3))
def test_fuzz_converter_random_frames(garbage, cut):
    """Random bytes after a valid start: an Output or a clear AmqpProtocolError, never another
    exception; after an error nothing more passes."""
    conv = converter(Tokens())
    start = APP_START[:len(APP_START) - cut * 7]
    try:
        run(conv.from_app(start + garbage))
    except AmqpProtocolError as exc:
        assert str(exc)
        with pytest.raises(AmqpProtocolError):
            run(conv.from_app(b"AMQP"))


@given(st.data())
def test_fuzz_converter_truncated_put_token(data):
    """A put-token cut anywhere and the rest never sent: its SAS never passes in part."""
    request = put_token(int(time.time()) + 60)
    cut = data.draw(st.integers(0, len(request) - 1))
    out = run(converter(Tokens()).from_app(APP_START + request[:cut]))
    assert SIG.encode() not in out.to_service and b"SharedAccess" not in out.to_service
