"""keyless' own CBS session on an app's AMQP connection (SASL PLAIN apps): one session on a
channel the app cannot use, a sender link to `$cbs` and a receiver link from it, put-tokens of
keyless' own and their replies. Pure: it turns the service's frames on that channel into the
frames to send back, and says when a put-token was answered.

The channel is the top one the service allows (its open's channel-max); the app is shown a
channel-max one lower, so its sessions never use it. Every frame the service sends on the
session's channel is keyless' and never reaches the app.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from proxy.amqp import cbs
from proxy.amqp.codec import (
    ATTACH_HANDLE,
    ATTACH_ROLE,
    FRAME_AMQP,
    TRANSFER_HANDLE,
    AmqpProtocolError,
    Frame,
    Map,
    Performative,
    Symbol,
    Typed,
    described,
    encode_frame,
    encode_performative,
    encode_section,
    uint,
)

SENDER, RECEIVER = 0, 1  # keyless' link handles on its session
WINDOW = 64  # session windows and the receiver's credit: replies are few
BEGIN_REMOTE_CHANNEL, BEGIN_NEXT_OUTGOING_ID = 0, 1
FLOW_HANDLE, FLOW_DELIVERY_COUNT, FLOW_LINK_CREDIT = 4, 5, 6
TRANSFER_DELIVERY_ID, TRANSFER_SETTLED = 1, 4
ACCEPTED = 0x24
CLOSE_ERROR = 0x1d


@dataclass(frozen=True, slots=True)
class Reply:
    message_id: str
    status_code: int | None
    description: str


class OwnCbsSession:
    """keyless' session on `channel` (keyless → service). Feed it the service's frames that
    `owns` says are its own; `put_token` queues a request, sent once the service gave credit."""

    def __init__(self, channel: int, name: str) -> None:
        self.channel = channel  # keyless' outgoing channel
        self.name = name  # for the link names, so the service's logs can tell them apart
        self.reply_to = f"keyless-cbs-{uuid.uuid4().hex[:12]}"
        self.service_channel: int | None = None  # the service's channel for this session
        self._next_outgoing_id = 0  # transfers keyless sent on this session
        self._next_incoming_id: int | None = None
        self._sender_credit = 0
        self._delivery_count = 0  # of keyless' sender link
        self._receiver_count = 0  # transfers received on keyless' receiver link
        self._queued: list[tuple[str, bytes]] = []  # (message-id, message bytes) awaiting credit
        # the service's handles of the two links (its own numbering, which its flow and
        # transfer frames use): the receiving end of keyless' sender, the sending end of its
        # receiver
        self._service_receiver: int | None = None
        self._service_sender: int | None = None
        self.closed = False

    def start(self) -> bytes:
        """The begin and the two attaches (sent right after the service's open)."""
        begin = encode_performative("begin", [None, uint(0), uint(WINDOW), uint(WINDOW),
                                              uint(RECEIVER)])
        sender = encode_performative("attach", [
            f"{self.name}-cbs-sender", uint(SENDER), False, Typed("ubyte", 1), None,
            described(0x28, [self.reply_to]), described(0x29, [cbs.CBS_NODE]),
            None, None, uint(0)])
        receiver = encode_performative("attach", [
            f"{self.name}-cbs-receiver", uint(RECEIVER), True, None, None,
            described(0x28, [cbs.CBS_NODE]), described(0x29, [self.reply_to])])
        return b"".join(encode_frame(FRAME_AMQP, self.channel, body)
                        for body in (begin, sender, receiver))

    def owns(self, frame: Frame, perf: Performative) -> bool:
        """Whether a frame from the service belongs to this session (and not to the app)."""
        if self.service_channel is not None:
            return frame.channel == self.service_channel
        return perf.name == "begin" and _int(perf.field(BEGIN_REMOTE_CHANNEL)) == self.channel

    def put_token(self, token: str, audience: str, expires_on: float) -> tuple[str, bytes]:
        """Queues a put-token; returns its message-id and what can be sent now."""
        message_id = f"keyless-put-token-{uuid.uuid4().hex[:12]}"
        message = (encode_section(cbs.PROPERTIES, [message_id, None, None, None, self.reply_to])
                   + encode_section(cbs.APPLICATION_PROPERTIES, Map((
                       ("operation", "put-token"), ("type", "jwt"), ("name", audience),
                       ("expiration", Typed("timestamp", int(expires_on * 1000))))))
                   + encode_section(cbs.AMQP_VALUE, token))
        self._queued.append((message_id, message))
        return message_id, self._send_queued()

    def from_service(self, frame: Frame, perf: Performative) -> tuple[bytes, Reply | None]:
        """The service's frame on this session: what keyless answers, and a CBS reply if it
        was one. A detach, end or close of keyless' session raises: without it the
        connection's token cannot be renewed."""
        if perf.name == "begin":
            self.service_channel = frame.channel
            self._next_incoming_id = _int(perf.field(BEGIN_NEXT_OUTGOING_ID))
            return b"", None
        if perf.name == "attach":
            handle = _int(perf.field(ATTACH_HANDLE))
            if perf.field(ATTACH_ROLE) is False:
                self._service_sender = handle
                # the service's sender of replies: credit first, then any waiting request
                return self._flow() + self._send_queued(), None
            self._service_receiver = handle
            return b"", None
        if perf.name == "flow":
            handle = _int(perf.field(FLOW_HANDLE))
            if handle >= 0 and handle == self._service_receiver:
                count = _int(perf.field(FLOW_DELIVERY_COUNT))
                credit = _int(perf.field(FLOW_LINK_CREDIT))
                self._sender_credit = max(0, (count if count >= 0 else 0) + max(credit, 0)
                                          - self._delivery_count)
                return self._send_queued(), None
            return b"", None
        if perf.name == "transfer":
            return self._reply(frame, perf)
        if perf.name in ("detach", "end"):
            self.closed = True
            error = perf.field(2 if perf.name == "detach" else 0)
            raise AmqpProtocolError(f"the service ended keyless' CBS session ({perf.name}"
                                    f"{_error_text(error)})")
        return b"", None  # disposition (our transfers are pre-settled) and anything else

    def _reply(self, frame: Frame, perf: Performative) -> tuple[bytes, Reply | None]:
        if self._next_incoming_id is not None:
            self._next_incoming_id += 1
        out = b""
        if _int(perf.field(TRANSFER_HANDLE)) != self._service_sender:
            return out, None
        self._receiver_count += 1
        if perf.field(TRANSFER_SETTLED) is not True:
            delivery_id = _int(perf.field(TRANSFER_DELIVERY_ID))
            out += encode_frame(FRAME_AMQP, self.channel, encode_performative(
                "disposition", [True, uint(max(delivery_id, 0)), None, True,
                                described(ACCEPTED, [])]))
        out += self._flow()  # keep the window and the credit open
        try:
            reply = cbs.read_reply(frame.body[perf.payload_offset:])
        except AmqpProtocolError:
            return out, None
        correlation = reply.correlation_id
        if not isinstance(correlation, str):
            return out, None
        return out, Reply(correlation, reply.status_code, (reply.description or "")[:300])

    def _flow(self) -> bytes:
        return encode_frame(FRAME_AMQP, self.channel, encode_performative("flow", [
            uint(self._next_incoming_id or 0), uint(WINDOW), uint(self._next_outgoing_id),
            uint(WINDOW), uint(RECEIVER), uint(self._receiver_count), uint(WINDOW)]))

    def _send_queued(self) -> bytes:
        out = bytearray()
        # a request goes once the service can answer it: its reply link attached, with credit
        while self._queued and self._sender_credit > 0 and self._service_sender is not None:
            _message_id, message = self._queued.pop(0)
            delivery = self._next_outgoing_id
            out += encode_frame(FRAME_AMQP, self.channel, encode_performative(
                "transfer", [uint(SENDER), uint(delivery), delivery.to_bytes(4, "big"),
                             uint(0), True], message))
            self._next_outgoing_id += 1
            self._delivery_count += 1
            self._sender_credit -= 1
        return bytes(out)


def close_frame(condition: str, description: str) -> bytes:
    """A connection close with an error, for the app (channel 0)."""
    error = described(CLOSE_ERROR, [Symbol(condition), description[:1000]])
    return encode_frame(FRAME_AMQP, 0, encode_performative("close", [error]))


def _error_text(error: Any) -> str:
    if not hasattr(error, "value") or not isinstance(error.value, list) or not error.value:
        return ""
    fields = error.value
    text = f": {fields[0]}"
    if len(fields) > 1 and isinstance(fields[1], str):
        text += f" {fields[1][:200]}"
    return text


def _int(value: Any) -> int:
    if isinstance(value, Typed) and isinstance(value.value, int):
        return value.value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return -1
