"""proxy/amqp/stream.py on a SASL PLAIN connection (sans I/O, any chunking): keyless answers
PLAIN itself, logs in upstream with ANONYMOUS, runs its own CBS session on the top channel,
holds the app's frames after its open until its put-token is answered, renews the token when
`due()` says so, and never lets the key (the PLAIN password) or a token reach the app."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.amqp import cbs
from proxy.amqp.codec import (
    PROTOCOL_AMQP,
    PROTOCOL_SASL,
    AmqpProtocolError,
    Map,
    Symbol,
    Typed,
    described,
    encode_section,
    parse_message,
    uint,
)
from proxy.amqp.stream import HOLD_CAP, AmqpConverter
from proxy.tokens import Token, TokenUnavailable
from tests.amqp.test_stream import NS, attach, frame, frames
from tests.support import entra

KEY = b"d3JvbmcgU0FTIGtleQ=="
PLAIN_INIT = frame("sasl-init", [Symbol("PLAIN"), b"\x00RootManageSharedAccessKey\x00" + KEY])
APP_SASL = PROTOCOL_SASL + PLAIN_INIT
APP_AMQP = (PROTOCOL_AMQP + frame("open", ["app", "localhost", uint(1 << 20)])
            + frame("begin", [None, uint(0), uint(100), uint(100)], 0)
            + attach("orders-sender", 0, False, "sender", "orders", channel=0))
SERVICE_SASL = PROTOCOL_SASL + frame("sasl-mechanisms",
                                     [Symbol("ANONYMOUS")])  # as the list came (one symbol)
SERVICE_OUTCOME = frame("sasl-outcome", [Typed("ubyte", 0)])
TOP = 9  # the service's channel-max: keyless' own channel
SERVICE_OPEN = PROTOCOL_AMQP + frame("open", ["svc", None, uint(262144), Typed("ushort", TOP)])
OWN = 3  # the service's channel for keyless' session
SERVICE_OWN_SESSION = (
    frame("begin", [Typed("ushort", TOP), uint(0), uint(100), uint(100)], OWN)
    + frame("attach", ["k-sender", uint(5), True, None, None, described(0x28, ["x"]),
                       described(0x29, ["$cbs"])], OWN)
    + frame("attach", ["k-receiver", uint(6), False, None, None, described(0x28, ["$cbs"]),
                       described(0x29, ["x"])], OWN)
    + frame("flow", [uint(0), uint(100), uint(0), uint(100), uint(5), uint(0), uint(50)], OWN))


class Tokens:
    def __init__(self, lifetime: float = 3600, fail: str | None = None,
                 clock=lambda: 1_000_000.0) -> None:
        self.calls: list[tuple[str, float | None]] = []
        self.lifetime, self.fail, self.clock = lifetime, fail, clock

    async def __call__(self, scope: str, valid_until: float | None) -> Token:
        self.calls.append((scope, valid_until))
        if self.fail:
            raise TokenUnavailable(self.fail)
        now = self.clock()
        return Token(entra.mint(scope.removesuffix("/.default")), now + self.lifetime,
                     now + self.lifetime / 2)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def converter(tokens, events=None, clock=None, **kwargs):
    record = events.append if events is not None else (lambda e: None)
    return AmqpConverter(NS, tokens, local_authority="*", identity="keyless-test-identity",
                         on_event=lambda kind, details: record((kind, details)),
                         clock=clock or (lambda: 1_000_000.0), **kwargs)


def feed_app(conv, data, chunk):
    out = [run(conv.from_app(data[i:i + chunk])) for i in range(0, len(data), chunk)]
    return (b"".join(o.to_service for o in out), b"".join(o.to_app for o in out),
            any(o.close for o in out))


def feed_service(conv, data, chunk):
    out = [conv.from_service(data[i:i + chunk]) for i in range(0, len(data), chunk)]
    return (b"".join(o.to_service for o in out), b"".join(o.to_app for o in out),
            any(o.close for o in out))


def put_tokens(data: bytes):
    """(message-id, application-properties, body) of each put-token transfer in `data`."""
    found = []
    for perf, raw in frames(data):
        if perf.name == "transfer":
            sections = parse_message(raw.body[perf.payload_offset:])
            found.append((sections[0].value[0], sections[1].value, sections[2].value, raw))
    return found


def cbs_reply(message_id, status=200, description="OK", settled=True, delivery=0):
    payload = (encode_section(0x73, [None, None, None, None, None, message_id])
               + encode_section(0x74, Map((("status-code", Typed("int", status)),
                                           ("status-description", description)))))
    return frame("transfer", [uint(6), uint(delivery), b"r", uint(0), settled, False], OWN,
                 payload)


def ready(conv, chunk=1000, events=None):
    """Runs a PLAIN connection to the point where keyless' put-token is in flight; returns
    what went upstream and to the app, and the put-token's message-id."""
    up, back, _ = feed_app(conv, APP_SASL, chunk)
    up2, back2, _ = feed_service(conv, SERVICE_SASL + SERVICE_OUTCOME, chunk)
    up3, back3, _ = feed_app(conv, APP_AMQP, chunk)
    up4, back4, _ = feed_service(conv, SERVICE_OPEN + SERVICE_OWN_SESSION, chunk)
    upstream = up + up2 + up3 + up4
    (message_id, *_), = put_tokens(upstream)
    return upstream, back + back2 + back3 + back4, message_id


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 100000])
def test_plain_is_answered_locally_and_keyless_puts_the_token_before_the_first_attach(chunk):
    events = []
    tokens = Tokens()
    conv = converter(tokens, events)
    up, back, close = feed_app(conv, APP_SASL, chunk)
    # upstream: the SASL header and keyless' own ANONYMOUS init; the key never
    assert KEY not in up and b"RootManage" not in up and not close
    assert up == PROTOCOL_SASL + frame("sasl-init", [Symbol("ANONYMOUS")])
    assert back == b""  # the app's outcome waits for the service's
    assert tokens.calls == [("https://servicebus.azure.net/.default", None)]
    up, back, _ = feed_service(conv, SERVICE_SASL, chunk)
    assert back == SERVICE_SASL and up == b""  # the mechanisms pass to the app
    up, back, _ = feed_service(conv, SERVICE_OUTCOME, chunk)
    assert back == frame("sasl-outcome", [Typed("ubyte", 0)]) and up == b""
    up, back, _ = feed_app(conv, APP_AMQP, chunk)
    # the header and open go; the begin and the attach wait for keyless' put-token's reply
    opened = frames(up)
    assert up.startswith(PROTOCOL_AMQP) and [p.name for p, _ in opened] == ["open"]
    assert opened[0][0].fields[1] == NS
    up, back, _ = feed_service(conv, SERVICE_OPEN, chunk)
    # the app is told one channel less; keyless begins on the top channel and attaches
    shown = frames(back)
    assert [p.name for p, _ in shown] == ["open"] and shown[0][0].fields[3] == Typed("ushort",
                                                                                      TOP - 1)
    own = frames(up)
    assert [(p.name, f.channel) for p, f in own] == [("begin", TOP), ("attach", TOP),
                                                     ("attach", TOP)]
    sender, receiver = own[1][0], own[2][0]
    assert sender.fields[2] is False and sender.fields[6].value[0] == "$cbs"
    assert receiver.fields[2] is True and receiver.fields[5].value[0] == "$cbs"
    reply_to = receiver.fields[6].value[0]
    up, back, _ = feed_service(conv, SERVICE_OWN_SESSION, chunk)
    assert back == b""  # the service's frames on keyless' session never reach the app
    (message_id, props, body, raw), = put_tokens(up)  # sent once the service gave credit
    assert raw.channel == TOP
    assert props.get("operation") == "put-token" and props.get("type") == "jwt"
    assert props.get("name") == f"sb://{NS}/"
    assert entra.verify(body, "https://servicebus.azure.net") == []
    assert parse_message(raw.body[frames(up)[-1][0].payload_offset:])[0].value[4] == reply_to
    assert next(p.name for p, _ in frames(up)) == "flow"  # credit for the replies first
    assert not [e for e in events if e[0] == "put_token_converted"]
    up, back, _ = feed_service(conv, cbs_reply(message_id), chunk)
    assert back == b""
    released = [(p.name, f.channel) for p, f in frames(up)]
    assert released[-2:] == [("begin", 0), ("attach", 0)]  # the app's, in order, now
    assert ("put_token_converted", {"audience": f"sb://{NS}/", "service": "servicebus",
                                    "scheme": "SASL PLAIN"}) in events
    assert ("sasl_plain", {"key_name": "RootManageSharedAccessKey",
                           "audience": f"sb://{NS}/"}) in events
    # afterwards app frames pass at once
    flow = frame("flow", [uint(0), uint(100), uint(1), uint(100)], 0)
    assert run(conv.from_app(flow)).to_service == flow


def test_the_whole_app_side_in_one_write_waits_for_the_service():
    conv = converter(Tokens())
    up, back, _ = feed_app(conv, APP_SASL + APP_AMQP, 100000)
    assert up == PROTOCOL_SASL + frame("sasl-init", [Symbol("ANONYMOUS")])  # nothing more
    assert back == b""
    up, _, _ = feed_service(conv, SERVICE_SASL + SERVICE_OUTCOME, 100000)
    assert [p.name for p, _ in frames(up)] == ["open"] and up.startswith(PROTOCOL_AMQP)


def test_no_token_answers_the_app_auth_failure_and_nothing_goes_upstream():
    events = []
    conv = converter(Tokens(fail="the identity endpoint is down"), events)
    out = run(conv.from_app(APP_SASL + APP_AMQP))
    assert out.close and out.to_service == PROTOCOL_SASL
    assert out.to_app == frame("sasl-outcome", [Typed("ubyte", 1)])
    assert events == [("token_unavailable", {"audience": f"sb://{NS}/",
                                             "reason": "the identity endpoint is down"})]
    with pytest.raises(AmqpProtocolError):
        run(conv.from_app(APP_AMQP))


def test_a_refused_put_token_closes_the_app_with_what_keyless_tried():
    events = []
    conv = converter(Tokens(), events)
    _, _, message_id = ready(conv)
    out = conv.from_service(cbs_reply(message_id, 401, "no role for this identity"))
    assert out.close and all(f.channel == TOP for _, f in frames(out.to_service))  # the
    # app's held frames never go
    (close, _), = frames(out.to_app)
    condition, description = close.fields[0].value[:2]
    assert close.name == "close" and condition == "amqp:unauthorized-access"
    assert f"sb://{NS}/" in description and "keyless-test-identity" in description
    assert "401 no role" in description and "eyJ" not in description
    assert ("put_token_rejected", {"audience": f"sb://{NS}/", "status": 401,
                                   "description": "no role for this identity"}) in events


def test_the_service_refusing_anonymous_is_shown_to_the_app():
    conv = converter(Tokens())
    feed_app(conv, APP_SASL, 100)
    failed = frame("sasl-outcome", [Typed("ubyte", 1)])
    _, back, _ = feed_service(conv, SERVICE_SASL + failed, 100)
    assert back == SERVICE_SASL + failed


def test_an_unsettled_reply_is_settled_and_credit_renewed():
    conv = converter(Tokens())
    _, _, message_id = ready(conv)
    out = conv.from_service(cbs_reply(message_id, settled=False, delivery=4))
    names = [(p.name, f.channel) for p, f in frames(out.to_service)]
    assert names[:2] == [("disposition", TOP), ("flow", TOP)]
    disposition = frames(out.to_service)[0][0]
    assert disposition.fields[0] is True and disposition.fields[1] == uint(4)
    assert disposition.fields[3] is True


def test_renewal_when_due_with_a_fresher_token():
    clock, events = Clock(), []
    tokens = Tokens(lifetime=30, clock=clock)
    conv = converter(tokens, events, clock=clock)
    _, _, message_id = ready(conv)
    assert conv.due() is None  # nothing to renew before the first put-token is answered
    conv.from_service(cbs_reply(message_id))
    first_expiry = clock.now + 30
    assert conv.due() == pytest.approx(first_expiry - 6)  # 80 % of 30 s
    assert run(conv.tick()).to_service == b""  # not yet due
    clock.now += 24
    out = run(conv.tick())
    (renewal_id, props, body, raw), = put_tokens(out.to_service)
    assert raw.channel == TOP and props.get("name") == f"sb://{NS}/"
    assert tokens.calls[-1] == ("https://servicebus.azure.net/.default", first_expiry + 1)
    assert entra.verify(body, "https://servicebus.azure.net") == []
    assert conv.due() is None  # one renewal in flight at a time
    back = conv.from_service(cbs_reply(renewal_id, delivery=1))
    assert back.to_app == b"" and not back.close
    assert ("renewed", {"audience": f"sb://{NS}/"}) in events
    assert conv.due() == pytest.approx(clock.now + 30 - 6)


def test_renewal_waits_when_the_cache_has_nothing_fresher():
    clock = Clock()
    tokens = Tokens(lifetime=30, clock=clock)
    conv = converter(tokens, clock=clock)
    _, _, message_id = ready(conv)
    conv.from_service(cbs_reply(message_id))
    clock.now += 24
    tokens.clock = lambda: 1_000_000.0  # the same expiry as the one on the connection
    assert run(conv.tick()).to_service == b""
    assert conv.due() == pytest.approx(clock.now + 5)
    tokens.fail = "down"
    clock.now += 5
    assert run(conv.tick()).to_service == b""
    assert conv.due() == pytest.approx(clock.now + 5)


def test_the_app_may_not_use_keyless_channel():
    conv = converter(Tokens())
    _, _, message_id = ready(conv)
    conv.from_service(cbs_reply(message_id))
    with pytest.raises(AmqpProtocolError, match="channel 9"):
        run(conv.from_app(frame("begin", [None, uint(0), uint(100), uint(100)], TOP)))


def test_the_app_may_not_flood_keyless_while_it_waits():
    conv = converter(Tokens())
    ready(conv)
    big = frame("transfer", [uint(0), uint(0), b"t", uint(0), True, False], 0, b"x" * 60000)
    with pytest.raises(AmqpProtocolError, match="before keyless' own put-token"):
        for _ in range(HOLD_CAP // len(big) + 2):  # bounded
            run(conv.from_app(big))


def test_the_service_ending_keyless_session_fails_the_connection():
    conv = converter(Tokens())
    _, _, message_id = ready(conv)
    conv.from_service(cbs_reply(message_id))
    with pytest.raises(AmqpProtocolError, match="ended keyless' CBS session"):
        conv.from_service(frame("end", [], OWN))


def test_audit_forwards_plain_as_it_came():
    events = []
    conv = converter(Tokens(), events, audit=True)
    out = run(conv.from_app(APP_SASL))
    assert out.to_service == APP_SASL
    assert events == [("sas_seen", {"key_name": "RootManageSharedAccessKey",
                                    "mechanism": "PLAIN"})]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["sasl", "open", "ready"]))
def test_fuzz_garbage_after_plain(garbage, where):
    """Random bytes from the app or the service at any stage of a PLAIN connection: an
    Output or a clear AmqpProtocolError, and the key never goes upstream."""
    conv = converter(Tokens())
    sent = bytearray()
    try:
        if where == "sasl":
            sent += run(conv.from_app(APP_SASL + garbage)).to_service
        else:
            upstream, _, message_id = ready(conv)
            sent += upstream
            if where == "ready":
                sent += conv.from_service(cbs_reply(message_id)).to_service
            sent += conv.from_service(garbage).to_service
            sent += run(conv.from_app(garbage)).to_service
    except AmqpProtocolError as exc:
        assert str(exc)
    assert KEY not in sent and b"RootManage" not in sent
    assert cbs.PLACEHOLDER.encode() not in sent


def own_session(channel, service_channel=7):
    """The service's side of keyless' own session begun on `channel`."""
    return (frame("begin", [Typed("ushort", channel), uint(0), uint(100), uint(100)],
                  service_channel)
            + frame("attach", ["k-sender", uint(0), True, None, None, described(0x28, ["x"]),
                               described(0x29, ["$cbs"])], service_channel)
            + frame("attach", ["k-receiver", uint(1), False, None, None,
                               described(0x28, ["$cbs"]), described(0x29, ["x"])],
                    service_channel)
            + frame("flow", [uint(0), uint(100), uint(0), uint(100), uint(0), uint(0),
                             uint(10)], service_channel))


def test_a_sas_apps_token_shorter_than_its_sas_is_renewed_by_keyless():
    """The app's SAS lasts an hour, the identity's tokens 30 s: keyless re-puts a fresh token
    for the app's audience on its own session before the first expires."""
    from tests.amqp.test_stream import APP_START, SERVICE_START, put_token, reply

    clock, events = Clock(), []
    tokens = Tokens(lifetime=30, clock=clock)
    conv = converter(tokens, events, clock=clock)
    sas_expiry = int(clock.now) + 3600
    run(conv.from_app(APP_START + put_token(sas_expiry)))
    assert tokens.calls == [("https://servicebus.azure.net/.default", float(sas_expiry))]
    back = conv.from_service(SERVICE_START + reply("m-1", 200, "OK"))
    shown_open = next(p for p, _ in frames(back.to_app) if p.name == "open")
    assert shown_open.fields[3] == Typed("ushort", 65534)  # the top channel is keyless'
    first_expiry = clock.now + 30
    assert conv.due() == pytest.approx(first_expiry - 6)
    clock.now += 24
    out = run(conv.tick())
    assert tokens.calls[-1] == ("https://servicebus.azure.net/.default", float(sas_expiry))
    assert [(p.name, f.channel) for p, f in frames(out.to_service)] == [
        ("begin", 65535), ("attach", 65535), ("attach", 65535)]
    answer = conv.from_service(own_session(65535))
    assert answer.to_app == b""
    (message_id, props, body, raw), = put_tokens(answer.to_service)
    assert raw.channel == 65535 and props.get("name") == f"sb://{NS}/orders"
    assert entra.verify(body, "https://servicebus.azure.net") == []
    payload = (encode_section(0x73, [None, None, None, None, None, message_id])
               + encode_section(0x74, Map((("status-code", Typed("int", 200)),
                                           ("status-description", "OK")))))
    back = conv.from_service(frame("transfer", [uint(1), uint(0), b"r", uint(0), True, False],
                                   7, payload))
    assert back.to_app == b""  # keyless' reply, not the app's
    assert ("renewed", {"audience": f"sb://{NS}/orders"}) in events
    assert conv.due() == pytest.approx(clock.now + 30 - 6)
    # the app renews on its own (its next SAS): a token covering it ends keyless' renewals
    tokens.lifetime = 7200
    run(conv.from_app(put_token(sas_expiry + 3600, message_id="m-2")))
    conv.from_service(reply("m-2", 200, "OK"))
    assert conv.due() is None


def test_a_token_that_covers_the_sas_needs_no_renewal():
    from tests.amqp.test_stream import APP_START, SERVICE_START, put_token, reply

    clock = Clock()
    conv = converter(Tokens(lifetime=7200, clock=clock), clock=clock)
    run(conv.from_app(APP_START + put_token(int(clock.now) + 3600)))
    conv.from_service(SERVICE_START + reply("m-1", 200, "OK"))
    assert conv.due() is None


def test_keyless_request_waits_for_the_services_reply_link():
    """Credit for keyless' sender can come before the service attached its reply link: the
    put-token waits for that link (and keyless' credit on it), or its reply could not come."""
    conv = converter(Tokens())
    feed_app(conv, APP_SASL, 1000)
    feed_service(conv, SERVICE_SASL + SERVICE_OUTCOME, 1000)
    feed_app(conv, APP_AMQP, 1000)
    conv.from_service(SERVICE_OPEN)
    early = (frame("begin", [Typed("ushort", TOP), uint(0), uint(100), uint(100)], OWN)
             + frame("attach", ["k-sender", uint(5), True, None, None, described(0x28, ["x"]),
                                described(0x29, ["$cbs"])], OWN)
             + frame("flow", [uint(0), uint(100), uint(0), uint(100), uint(5), uint(0),
                              uint(50)], OWN))
    assert put_tokens(conv.from_service(early).to_service) == []
    late = frame("attach", ["k-receiver", uint(6), False, None, None,
                            described(0x28, ["$cbs"]), described(0x29, ["x"])], OWN)
    out = conv.from_service(late).to_service
    assert [p.name for p, _ in frames(out)] == ["flow", "transfer"]
    assert len(put_tokens(out)) == 1
