"""How the addon maps WebSocket messages onto the converter's byte streams (a frame split
across messages, several frames in one, keyless' own answers, errors), with a stand-in
converter that frames like AMQP (4-byte big-endian size first). The real conversion through
the real keyless, SDK and fake namespace is in test_e2e.py."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import pytest
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from addons.amqp_websocket import AmqpOverWebSocket
from proxy import metrics
from proxy.amqp.stream import AmqpProtocolError
from proxy.catalog import Catalog
from proxy.flowstate import flow_state, start_state
from proxy.tokens import Identity, TokenCache

NAMESPACE = "keylessbus.servicebus.windows.net"


@dataclass(frozen=True)
class Output:
    to_service: bytes = b""
    to_app: bytes = b""
    close: bool = False


def frame(body: bytes) -> bytes:
    return struct.pack(">I", 4 + len(body)) + body


@dataclass
class FramingConverter:
    """Forwards whole frames only; answers a b"ask" frame itself (to the app)."""

    namespace: str
    app: bytearray = field(default_factory=bytearray)
    seen: list[bytes] = field(default_factory=list)

    async def from_app(self, data: bytes) -> Output:
        self.seen.append(data)
        self.app += data
        onward, back = b"", b""
        while len(self.app) >= 4 and len(self.app) >= (size := int.from_bytes(self.app[:4])):
            one, self.app = bytes(self.app[:size]), self.app[size:]
            if one[4:] == b"garbage":
                raise AmqpProtocolError("not an AMQP frame")
            if one[4:] == b"bug":
                raise RuntimeError("a converter bug quoting SharedAccessSignature sr=...")
            if one[4:] == b"sasl-plain":
                return Output(to_service=onward, to_app=frame(b"sasl-outcome: auth"),
                              close=True)
            if one[4:] == b"ask":
                back += frame(b"answer")
            else:
                onward += one
        return Output(to_service=onward, to_app=back)

    def from_service(self, data: bytes) -> Output:
        self.seen.append(data)
        return Output(to_app=data.replace(b"secret", b"******"))


class Harness:
    def __init__(self, broken_factory: bool = False) -> None:
        self.injected: list[tuple[bool, bytes]] = []
        self.closed = 0
        self.converters: list[FramingConverter] = []

        def converter(namespace, tokens, *, service, audit, on_event):
            if broken_factory:
                raise ImportError("no proxy.amqp")
            self.converters.append(FramingConverter(namespace))
            return self.converters[-1]

        self.addon = AmqpOverWebSocket(
            Catalog(), TokenCache(self._no_token), Identity(None), converter=converter,
            inject=lambda flow, to_client, data: self.injected.append((to_client, data)),
            close=lambda flow: setattr(self, "closed", self.closed + 1))
        self.flow = tflow.twebsocketflow(messages=False)
        request = self.flow.request
        request.host, request.port, request.scheme = NAMESPACE, 443, "https"
        request.path = "/$servicebus/websocket"
        start_state(self.flow, "servicebus", "keylessbus")
        self.addon.websocket_start(self.flow)

    @staticmethod
    async def _no_token(*_):
        raise AssertionError("the stand-in fetches no token")

    def send(self, from_client: bool, content: bytes, text: bool = False,
             injected: bool = False) -> WebSocketMessage:
        message = WebSocketMessage(Opcode.TEXT if text else Opcode.BINARY, from_client,
                                   content, injected=injected)
        assert self.flow.websocket is not None
        self.flow.websocket.messages.append(message)
        asyncio.run(self.addon.websocket_message(self.flow))
        return message


def test_a_frame_split_across_messages_leaves_whole_and_once():
    h = Harness()
    assert h.converters[0].namespace == NAMESPACE
    one, two = frame(b"open-frame"), frame(b"begin")
    first = h.send(True, one[:3])
    assert first.dropped  # nothing whole yet: nothing goes on
    second = h.send(True, one[3:] + two[:5])
    assert not second.dropped and second.content == one
    third = h.send(True, two[5:])
    assert third.content == two
    assert h.injected == [] and h.closed == 0


def test_keyless_own_answer_goes_back_to_the_app_and_is_not_converted_again():
    h = Harness()
    message = h.send(True, frame(b"ask") + frame(b"attach"))
    assert message.content == frame(b"attach")
    assert h.injected == [(True, frame(b"answer"))]  # to the client
    fed = list(h.converters[0].seen)
    answer = h.send(False, frame(b"answer"), injected=True)  # mitmproxy's hook for it
    assert h.converters[0].seen == fed
    assert answer.content == frame(b"answer") and not answer.dropped


def test_the_services_messages_go_through_from_service():
    h = Harness()
    message = h.send(False, b"a secret value")
    assert message.content == b"a ****** value" and not message.dropped


def test_a_converter_error_closes_the_flow_and_nothing_more_is_forwarded():
    h = Harness()
    before = metrics.LISTENER_LOGINS.labels(listener="websocket:443", protocol="amqp",
                                            result="client_error")._value.get()
    assert h.send(True, frame(b"garbage")).dropped
    assert h.closed == 1
    assert flow_state(h.flow).amqp_failed
    assert h.send(True, frame(b"attach")).dropped
    assert h.send(False, b"from the service").dropped
    after = metrics.LISTENER_LOGINS.labels(listener="websocket:443", protocol="amqp",
                                           result="client_error")._value.get()
    assert after == before + 1


def test_text_messages_are_not_amqp_and_are_dropped():
    h = Harness()
    assert h.send(True, b"hello", text=True).dropped
    assert h.converters[0].seen == []


@pytest.mark.parametrize("path", ["/$servicebus/websocket/", "/$SERVICEBUS/WebSocket",
                                  "/$servicebus/websocket?x=1"])
def test_spellings_of_the_amqp_path_are_converted_too(path: str):
    flow = tflow.twebsocketflow(messages=False)
    start_state(flow, "servicebus", "keylessbus")
    flow.request.path = path
    h = Harness()
    h.addon.websocket_start(flow)
    assert flow_state(flow).amqp is not None


def test_other_websockets_are_left_alone():
    h = Harness()
    flow = tflow.twebsocketflow(messages=False)
    start_state(flow, "servicebus", "keylessbus")
    flow.request.path = "/other"
    h.addon.websocket_start(flow)
    assert flow_state(flow).amqp is None
    asyncio.run(h.addon.websocket_message(flow))  # no message, no converter: no error
    assert len(h.converters) == 1


def test_an_unexpected_converter_failure_also_closes_and_is_not_quoted(
        caplog: pytest.LogCaptureFixture):
    h = Harness()
    assert h.send(True, frame(b"bug")).dropped
    assert h.closed == 1
    assert h.send(True, frame(b"attach")).dropped
    assert "SharedAccessSignature" not in caplog.text
    assert "RuntimeError" in caplog.text


def test_without_a_converter_nothing_passes():
    h = Harness(broken_factory=True)
    assert h.closed == 1
    assert h.send(True, frame(b"put-token with a SAS")).dropped
    assert h.send(False, frame(b"open")).dropped


def test_a_refusal_reaches_the_app_then_the_flow_closes():
    h = Harness()
    message = h.send(True, frame(b"sasl-plain"))
    assert message.dropped
    assert h.injected == [(True, frame(b"sasl-outcome: auth"))]
    assert h.closed == 1
    assert h.send(True, frame(b"open")).dropped


def upgrade_flow(host_header: str = NAMESPACE, tls: bool = True):
    flow = tflow.twebsocketflow(messages=False)
    flow.response = None  # the upgrade request, before the service answered
    request = flow.request
    request.host, request.port = NAMESPACE, 443
    request.scheme = "https" if tls else "http"
    request.path = "/$servicebus/websocket"
    request.headers["host"] = host_header
    flow.client_conn.sni = NAMESPACE if tls else None
    flow.client_conn.timestamp_tls_setup = 946681200.5 if tls else None
    flow.server_conn.address = (NAMESPACE, 443)
    start_state(flow, "servicebus", "keylessbus")
    return flow


def test_an_upgrade_to_the_agreed_namespace_goes_on():
    flow = upgrade_flow()
    Harness().addon.requestheaders(flow)
    assert flow.response is None and not flow_state(flow).refused


def test_an_upgrade_whose_names_disagree_is_refused_before_any_sas_can_leave():
    flow = upgrade_flow(host_header="other.servicebus.windows.net")
    Harness().addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 421
    assert flow_state(flow).refused


def test_a_plain_ws_upgrade_is_refused():
    flow = upgrade_flow(tls=False)
    Harness().addon.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403


def test_a_long_connection_keeps_only_the_current_message():
    h = Harness()
    for n in range(5):
        h.send(True, frame(b"transfer %d" % n))
        h.send(False, b"flow %d" % n)
    assert h.flow.websocket is not None
    assert [m.content for m in h.flow.websocket.messages] == [b"flow 4"]
