"""One AMQP connection's conversion, both directions, with any chunking: the app's SAS
put-tokens become Entra put-tokens, and (local endpoint) its local host name and addresses
become the namespace's.

Frames are kept one in, one out, so transfer-ids, delivery-ids and flow windows stay right:
only the frames that must change are re-encoded (the open with its hostname, attaches with
their addresses, the put-token transfer, and the service's reply to a put-token keyless could
not convert); every other frame passes as the bytes it came in.

Fail closed: when keyless has no token, the put-token still goes upstream (the frame numbering
needs it) with `type="jwt"` and the body "KeylessTokenUnavailable" — no secret — and the
service's reply (correlation-id = its message-id) gets the status-description
"KeylessTokenUnavailable: <reason>", keeping the service's failure status-code. The SAS never
goes upstream (except under --audit, which changes nothing and reports the key name).

SASL: ANONYMOUS and MSSBCBS pass through (the service's mechanism list too). PLAIN carries
the key itself, so it never goes upstream: keyless gets the identity's token (none: the app
gets `sasl-outcome auth` and the connection closes), sends its own sasl-init ANONYMOUS, keeps
the service's outcome and answers the app `ok` when the service said ok; the app's AMQP header
and open then go on. On the service's open keyless begins its own CBS session on the top
channel the service allows (proxy/amqp/own_cbs.py; the app is shown a channel-max one lower),
puts the token for the namespace (`sb://NS/`), and holds the app's frames after its open until
the reply (200/202: they go; else the app's connection is closed with
`amqp:unauthorized-access`). Any other mechanism is answered `auth` failure locally and the
connection closes.

Renewals: keyless puts a fresh token itself, on that own session (begun when first needed; the
top channel is reserved on every converted connection), for the PLAIN connection's namespace
and for any audience whose converted put-token got a JWT that expires before the app's SAS
(the app re-sends only on the SAS's schedule). `due()` says when; the I/O layer calls `tick()`
then and sends what it returns.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.amqp import cbs
from proxy.amqp.codec import (
    ATTACH_HANDLE,
    ATTACH_ROLE,
    ATTACH_SOURCE,
    ATTACH_TARGET,
    CODE_OF,
    DETACH_HANDLE,
    FRAME_AMQP,
    FRAME_SASL,
    OPEN_HOSTNAME,
    OPEN_MAX_FRAME_SIZE,
    PROTOCOL_AMQP,
    PROTOCOL_SASL,
    SASL_INIT_MECHANISM,
    TERMINUS_ADDRESS,
    TRANSFER_HANDLE,
    TRANSFER_MORE,
    AmqpProtocolError,
    Described,
    Frame,
    Performative,
    Symbol,
    Typed,
    encode_frame,
    encode_performative,
    encode_value,
    frame_size,
    parse_frame,
    parse_performative,
)
from proxy.amqp.own_cbs import OwnCbsSession, Reply, close_frame
from proxy.tokens import Token, TokenUnavailable

PRE_OPEN_CAP = 1024 * 1024  # frames before the peer's open said its max-frame-size
ABSOLUTE_CAP = 16 * 1024 * 1024  # whatever a peer says, keyless holds no bigger frame
MAX_PENDING = 256  # put-tokens awaiting the service's reply, per connection
SERVICE_SCOPES = {"servicebus": "https://servicebus.azure.net/.default",
                  "eventhubs": "https://eventhubs.azure.net/.default"}
SASL_PASS = frozenset(("ANONYMOUS", "MSSBCBS"))
SASL_AUTH_FAILED = 1
SASL_OK = 0
OPEN_CHANNEL_MAX = 3
DEFAULT_CHANNEL_MAX = 65535
HOLD_CAP = 1024 * 1024  # app bytes held until keyless' own put-token is answered (PLAIN)
RENEW_RETRY = 5.0  # seconds between renewal attempts when no fresher token came
CBS = "$cbs"
OK_STATUS = (200, 202)


@dataclass(frozen=True)
class Output:
    to_service: bytes = b""  # bytes to send upstream (in order)
    to_app: bytes = b""  # bytes to send back to the app (e.g. keyless' own answers)
    close: bool = False  # after sending these, close both sides (keyless refused the app)


def _servicebus(_audience: str) -> str:
    return "servicebus"


def _ignore(_kind: str, _details: dict) -> None:
    return None


class _Splitter:
    """Cuts one direction's bytes into protocol headers and whole frames; holds at most one
    frame, and refuses a frame larger than the limit before waiting for its bytes."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.buffer = bytearray()
        self.expect_header = True
        self.limit = PRE_OPEN_CAP

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self.buffer += data
        items: list[tuple[str, bytes]] = []
        while True:
            if self.expect_header or self.buffer[:4] == b"AMQP":
                if len(self.buffer) < 8:
                    if self.buffer[:4] != b"AMQP"[:len(self.buffer)]:
                        raise AmqpProtocolError(f"the {self.side} sent no AMQP protocol header")
                    return items
                header = bytes(self.buffer[:8])
                if header[:4] != b"AMQP":
                    raise AmqpProtocolError(f"the {self.side} sent no AMQP protocol header")
                del self.buffer[:8]
                self.expect_header = False
                items.append(("header", header))
                continue
            if len(self.buffer) < 4:
                return items
            size = frame_size(self.buffer)
            if size < 8:
                raise AmqpProtocolError(
                    f"the {self.side} sent an AMQP frame shorter than its header")
            if size > self.limit:
                raise AmqpProtocolError(
                    f"the {self.side} sent an AMQP frame of {size} bytes, over the limit of "
                    f"{self.limit}")
            if len(self.buffer) < size:
                return items
            items.append(("frame", bytes(self.buffer[:size])))
            del self.buffer[:size]


@dataclass(slots=True)
class _Pending:
    audience: str
    reason: str | None  # None: converted; else why keyless had no token
    scope: str = ""
    token_expires: float | None = None  # the JWT's expiry
    until: float | None = None  # the SAS's: the app re-sends its put-token then


@dataclass(slots=True)
class _Renewal:
    """A token on the connection that keyless renews itself: the PLAIN connection's (until
    None), or one an app's put-token got that expires before the app's SAS would."""

    scope: str
    expires: float  # the token on the connection for this audience
    until: float | None  # the app renews itself then (its SAS's expiry); None: keyless always
    renew_at: float
    in_flight: bool = False


@dataclass(slots=True)
class _Plain:
    """A SASL PLAIN app's connection: keyless answered its login and owns its put-tokens."""

    audience: str  # the namespace: sb://NS/
    service: str
    scope: str
    token: Token  # the token of the first put-token
    phase: str = "sasl"  # sasl: upstream ANONYMOUS under way; amqp: open exchange; ready
    held: list[tuple[str, bytes]] = field(default_factory=list)  # app bytes not yet sent
    held_size: int = 0
    open_sent: bool = False


class AmqpConverter:
    """One AMQP connection's conversion: feed it the app's bytes and the service's bytes as
    they come (any chunking); it returns what to send where. Frames are kept one in, one out."""

    def __init__(self, namespace: str, tokens: Callable[[str, float | None], Awaitable[Token]],
                 *, local_authority: str | None = None,
                 service_for: Callable[[str], str] = _servicebus,
                 audit: bool = False, on_event: Callable[[str, dict], None] = _ignore,
                 identity: str = "", clock: Callable[[], float] = time.time) -> None:
        self.namespace = namespace
        self.tokens = tokens
        self.local_authority = local_authority
        self.service_for = service_for
        self.audit = audit
        self.on_event = on_event
        self.identity = identity  # its label, for errors the app sees
        self.clock = clock
        self._plain: _Plain | None = None
        self._own_channel: int | None = None  # reserved for keyless' own CBS session
        self._own: OwnCbsSession | None = None
        self._own_pending: dict[str, tuple[str, Token, bool]] = {}  # id → audience, token, first
        self._renewals: dict[str, _Renewal] = {}  # audience → the token keyless renews
        self._app = _Splitter("app")
        self._service = _Splitter("service")
        self._app_cbs: set[tuple[int, int]] = set()  # (app channel, handle) sending to $cbs
        self._service_cbs: set[tuple[int, int]] = set()  # (service channel, handle) from $cbs
        self._pending: OrderedDict[Any, _Pending] = OrderedDict()
        self._broken = False

    # ------------------------------------------------------------ app → service

    async def from_app(self, data: bytes) -> Output:
        self._check()
        try:
            to_service = bytearray()
            for kind, raw in self._app.feed(data):
                if kind == "header":
                    if raw not in (PROTOCOL_AMQP, PROTOCOL_SASL):
                        raise AmqpProtocolError(
                            "the app asked for an AMQP protocol keyless does not relay "
                            "(TLS inside AMQP: use amqps to keyless' endpoint, or plain AMQP)")
                    to_service += self._onward("header", raw)
                    continue
                frame = parse_frame(raw)
                if frame.heartbeat:
                    to_service += self._onward("frame", raw)
                    continue
                perf = parse_performative(frame)
                if frame.type == FRAME_SASL:
                    if self._plain is not None:
                        raise AmqpProtocolError("the app sent SASL frames after its PLAIN login")
                    up, back = await self._app_sasl(perf)
                    if back:  # keyless refused the login
                        self._broken = True
                        return Output(bytes(to_service), back, close=True)
                    to_service += raw if up is None else up
                    continue
                if self._own_channel is not None and frame.channel >= self._own_channel:
                    raise AmqpProtocolError(
                        f"the app used channel {frame.channel}, above the channel-max keyless "
                        "told it (the top channel is keyless' own CBS session)")
                out = await self._app_frame(frame, perf, raw)
                to_service += self._onward("open" if perf.name == "open" else "frame", out)
            return Output(to_service=bytes(to_service))
        except AmqpProtocolError:
            self._broken = True
            raise

    def _onward(self, kind: str, raw: bytes) -> bytes:
        """What of the app's converted bytes goes upstream now: all of it, except on a PLAIN
        connection, whose bytes wait for the service's SASL outcome (the header and open) and
        for keyless' own put-token's reply (everything after the open)."""
        plain = self._plain
        if plain is None:
            return raw
        plain.held.append((kind, raw))
        plain.held_size += len(raw)
        if plain.held_size > HOLD_CAP:
            raise AmqpProtocolError(
                f"the app sent over {HOLD_CAP} bytes before keyless' own put-token was "
                "answered")
        return self._release()

    def _release(self) -> bytes:
        plain = self._plain
        assert plain is not None
        out = bytearray()
        while plain.held and plain.phase != "sasl" and (plain.phase == "ready"
                                                        or not plain.open_sent):
            kind, raw = plain.held.pop(0)
            plain.held_size -= len(raw)
            out += raw
            if kind == "open":
                plain.open_sent = True
        return bytes(out)

    async def _app_sasl(self, perf: Performative) -> tuple[bytes | None, bytes]:
        """(what goes upstream instead of the frame, None: the frame itself; the answer to
        the app when keyless refuses)."""
        if perf.name != "sasl-init":
            return None, b""
        mechanism = str(perf.field(SASL_INIT_MECHANISM) or "")
        if mechanism.upper() in SASL_PASS:
            return None, b""
        key_name = _plain_user(perf.field(1)) if mechanism.upper() == "PLAIN" else None
        if self.audit:
            self.on_event("sas_seen", {"key_name": key_name or "", "mechanism": mechanism})
            return None, b""
        if mechanism.upper() == "PLAIN":
            return await self._plain_login(key_name or "")
        self.on_event("sasl_refused", {"mechanism": mechanism[:32]})
        return b"", _sasl_outcome(SASL_AUTH_FAILED)

    async def _plain_login(self, key_name: str) -> tuple[bytes | None, bytes]:
        """SASL PLAIN holds the key: it never goes upstream. keyless logs in with ANONYMOUS
        and, after the open, puts the identity's token for the whole namespace itself."""
        audience = f"sb://{self.namespace}/"
        service = self.service_for(audience)
        scope = SERVICE_SCOPES.get(service, SERVICE_SCOPES["servicebus"])
        try:
            token = await self.tokens(scope, None)
        except TokenUnavailable as exc:
            self.on_event("token_unavailable", {"audience": audience,
                                                "reason": str(exc)[:300] or "no token"})
            return b"", _sasl_outcome(SASL_AUTH_FAILED)
        self.on_event("sasl_plain", {"key_name": key_name, "audience": audience})
        self._plain = _Plain(audience, service, scope, token)
        init = encode_performative("sasl-init", [Symbol("ANONYMOUS")])
        return encode_frame(FRAME_SASL, 0, init), b""

    async def _app_frame(self, frame: Frame, perf: Performative, raw: bytes) -> bytes:
        if perf.name == "open":
            self._service.limit = _limit(perf.field(OPEN_MAX_FRAME_SIZE))
            hostname = perf.field(OPEN_HOSTNAME)
            new = cbs.rewrite_hostname(hostname, self.namespace, self.local_authority)
            if new != hostname:
                return _reencoded(frame, perf, {OPEN_HOSTNAME: new})
            return raw
        if perf.name == "attach":
            key = (frame.channel, _int(perf.field(ATTACH_HANDLE)))
            if perf.field(ATTACH_ROLE) is False and _address(perf.field(ATTACH_TARGET)) == CBS:
                self._app_cbs.add(key)
            changes = {}
            for index in (ATTACH_SOURCE, ATTACH_TARGET):
                terminus = perf.field(index)
                address = _address(terminus)
                if address is None:
                    continue
                new = cbs.rewrite_address(address, self.namespace, self.local_authority)
                if new != address:
                    changes[index] = _with_address(terminus, new)
            # the app's own link to an entity (role false: the app sends; true: it receives),
            # for the report's Sender/Receiver roles
            sends = perf.field(ATTACH_ROLE) is False
            entity = _address(perf.field(ATTACH_TARGET if sends else ATTACH_SOURCE))
            if entity and not entity.startswith("$"):
                self.on_event("attach", {"role": "send" if sends else "receive",
                                         "address": cbs.rewrite_address(
                                             entity, self.namespace, self.local_authority)})
            return _reencoded(frame, perf, changes) if changes else raw
        if perf.name == "detach":
            self._app_cbs.discard((frame.channel, _int(perf.field(DETACH_HANDLE))))
            return raw
        if perf.name == "end":
            self._app_cbs = {k for k in self._app_cbs if k[0] != frame.channel}
            return raw
        link = (frame.channel, _int(perf.field(TRANSFER_HANDLE)))
        if perf.name == "transfer" and link in self._app_cbs:
            return await self._cbs_transfer(frame, perf, raw)
        return raw

    async def _cbs_transfer(self, frame: Frame, perf: Performative, raw: bytes) -> bytes:
        if perf.field(TRANSFER_MORE) is True:
            raise AmqpProtocolError(
                "a CBS put-token split over several transfers: keyless converts put-tokens "
                "that fit one frame only")
        payload = frame.body[perf.payload_offset:]
        request = cbs.read_put_token(payload)
        if request is None or request.sas is None:
            return raw  # not a put-token, or already an Entra token
        if self.audit:
            self.on_event("sas_seen", {"key_name": request.sas.key_name or "",
                                       "audience": request.audience})
            return raw
        audience = cbs.rewrite_address(request.audience, self.namespace, self.local_authority)
        service = self.service_for(audience)
        scope = SERVICE_SCOPES.get(service, SERVICE_SCOPES["servicebus"])
        try:
            token = await self.tokens(scope, request.sas.expiry)
            body, reason = token.value, None
        except TokenUnavailable as exc:
            body, reason = cbs.PLACEHOLDER, str(exc)[:300] or "no token"
            self.on_event("token_unavailable", {"audience": audience, "reason": reason})
        self._remember(request.message_id, _Pending(
            audience, reason, scope, token.expires_on if reason is None else None,
            request.sas.expiry))
        message = cbs.rewritten_put_token(request, body, audience)
        out = encode_frame(FRAME_AMQP, frame.channel, frame.body[:perf.payload_offset] + message)
        if len(out) > self._app.limit:
            raise AmqpProtocolError("the converted put-token does not fit the service's "
                                    "max-frame-size")
        if reason is None and request.message_id is None:
            self.on_event("put_token_converted", {"audience": audience, "service": service})
        return out

    def _remember(self, message_id: Any, pending: _Pending) -> None:
        if message_id is None:
            return
        self._pending[message_id] = pending
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    # ------------------------------------------------------------ service → app

    def from_service(self, data: bytes) -> Output:
        self._check()
        try:
            to_app, to_service = bytearray(), bytearray()
            for kind, raw in self._service.feed(data):
                if kind == "header":
                    to_app += raw
                    continue
                frame = parse_frame(raw)
                if frame.heartbeat:
                    to_app += raw
                    continue
                perf = parse_performative(frame)
                if frame.type == FRAME_SASL:
                    back, onward = self._service_sasl(perf, raw)
                    to_app += back
                    to_service += onward
                    continue
                if self._own is not None and self._own.owns(frame, perf):
                    answer, reply = self._own.from_service(frame, perf)
                    to_service += answer
                    if reply is not None:
                        back, onward, close = self._own_reply(reply)
                        to_app += back
                        to_service += onward
                        if close:
                            self._broken = True
                            return Output(bytes(to_service), bytes(to_app), close=True)
                    continue
                if perf.name == "open" and not self.audit:
                    back, onward = self._service_open(frame, perf)
                    to_app += back
                    to_service += onward
                    continue
                to_app += self._service_frame(frame, perf, raw)
            return Output(to_service=bytes(to_service), to_app=bytes(to_app))
        except AmqpProtocolError:
            self._broken = True
            raise

    def _service_sasl(self, perf: Performative, raw: bytes) -> tuple[bytes, bytes]:
        """The service's SASL frames pass, except, on a PLAIN connection, the outcome of
        keyless' ANONYMOUS login: the app gets its PLAIN login's outcome from keyless, and
        its AMQP header and open (if it sent them already) go on. (to the app, upstream)"""
        plain = self._plain
        if plain is None or plain.phase != "sasl" or perf.name != "sasl-outcome":
            return raw, b""
        if _int(perf.field(0)) != SASL_OK:
            self.on_event("put_token_rejected", {
                "audience": plain.audience, "status": _int(perf.field(0)),
                "description": "the service refused the SASL ANONYMOUS login"})
            return raw, b""  # the app sees the failure
        plain.phase = "amqp"
        return _sasl_outcome(SASL_OK), self._release()

    def _service_open(self, frame: Frame, perf: Performative) -> tuple[bytes, bytes]:
        """The service's open: keyless reserves the top channel the service allows for its
        own CBS session (the app is shown a channel-max one lower); on a PLAIN connection it
        begins that session now and puts its token. (to the app, upstream)"""
        plain = self._plain
        self._app.limit = _limit(perf.field(OPEN_MAX_FRAME_SIZE))
        channel_max = _int(perf.field(OPEN_CHANNEL_MAX))
        channel_max = DEFAULT_CHANNEL_MAX if channel_max < 0 else channel_max
        if channel_max < 1:
            if plain is not None:
                raise AmqpProtocolError("the service allows one channel only: keyless needs "
                                        "a second one for its own CBS session (SASL PLAIN)")
            return encode_frame(frame.type, frame.channel, frame.body), b""
        self._own_channel = channel_max
        to_app = _reencoded(frame, perf, {OPEN_CHANNEL_MAX: Typed("ushort", channel_max - 1)})
        if plain is None:
            return to_app, b""
        return to_app, self._own_put(plain.audience, plain.token, first=True)

    def _own_put(self, audience: str, token: Token, *, first: bool = False) -> bytes:
        """A put-token on keyless' own session (begun on first use)."""
        assert self._own_channel is not None
        start = b""
        if self._own is None:
            self._own = OwnCbsSession(self._own_channel, "keyless")
            start = self._own.start()
        message_id, now = self._own.put_token(token.value, audience, token.expires_on)
        self._own_pending[message_id] = (audience, token, first)
        return start + now

    def _own_reply(self, reply: Reply) -> tuple[bytes, bytes, bool]:
        """The service's answer to keyless' own put-token: (to the app, upstream, close)."""
        entry = self._own_pending.pop(reply.message_id, None)
        if entry is None:
            return b"", b"", False
        audience, token, first = entry
        ok = reply.status_code in OK_STATUS
        if first:
            return self._plain_reply(ok, reply, token)
        renewal = self._renewals.get(audience)
        if renewal is None:
            return b"", b"", False
        renewal.in_flight = False
        if not ok:
            del self._renewals[audience]  # the app's links for it end when its token does
            self.on_event("renew_failed", {
                "audience": audience, "reason": f"the service answered {reply.status_code} "
                                                f"{reply.description}"})
            return b"", b"", False
        self.on_event("renewed", {"audience": audience})
        self._track(audience, renewal.scope, token.expires_on, renewal.until)
        return b"", b"", False

    def _plain_reply(self, ok: bool, reply: Reply, token: Token) -> tuple[bytes, bytes, bool]:
        plain = self._plain
        assert plain is not None
        if ok:
            plain.phase = "ready"
            self._track(plain.audience, plain.scope, token.expires_on, None)
            self.on_event("put_token_converted", {"audience": plain.audience,
                                                  "service": plain.service,
                                                  "scheme": "SASL PLAIN"})
            return b"", self._release(), False
        self.on_event("put_token_rejected", {"audience": plain.audience,
                                             "status": reply.status_code,
                                             "description": reply.description})
        description = (f"keyless put the Entra token of identity {self.identity or '?'} for "
                       f"{plain.audience} (scope {plain.scope}) on this connection; the service "
                       f"answered {reply.status_code} {reply.description}")
        return close_frame("amqp:unauthorized-access", description), b"", True

    def _track(self, audience: str, scope: str, expires: float, until: float | None) -> None:
        """Renew this audience's token before it expires, unless the app renews first."""
        if self._own_channel is None or (until is not None and expires >= until - 1):
            self._renewals.pop(audience, None)
            return
        if audience not in self._renewals and len(self._renewals) >= MAX_PENDING:
            return
        self._renewals[audience] = _Renewal(scope, expires, until,
                                            _renew_at(expires, self.clock()))

    def due(self) -> float | None:
        """When keyless must put a fresh token itself (clock seconds), or None: the I/O
        layer calls `tick` then."""
        if self._broken:
            return None
        times = [r.renew_at for r in self._renewals.values() if not r.in_flight]
        return min(times) if times else None

    async def tick(self) -> Output:
        """Renew the earliest due token: one that outlives the current one (a fresh one if
        the cache would hand back one expiring first)."""
        due = self.due()
        if due is None or self.clock() < due:
            return Output()
        audience, renewal = min(((a, r) for a, r in self._renewals.items() if not r.in_flight),
                                key=lambda item: item[1].renew_at)
        renewal.in_flight = True
        try:
            token = await self.tokens(renewal.scope, renewal.until or renewal.expires + 1)
        except TokenUnavailable as exc:
            self.on_event("renew_failed", {"audience": audience,
                                           "reason": str(exc)[:300] or "no token"})
            token = None
        if self._broken or self._renewals.get(audience) is not renewal:
            return Output()  # the app put a token of its own meanwhile
        if token is None or token.expires_on <= renewal.expires:  # nothing fresher yet
            renewal.in_flight = False
            renewal.renew_at = self.clock() + RENEW_RETRY
            return Output()
        return Output(to_service=self._own_put(audience, token))

    def _service_frame(self, frame: Frame, perf: Performative, raw: bytes) -> bytes:
        if perf.name == "open":
            self._app.limit = _limit(perf.field(OPEN_MAX_FRAME_SIZE))
            return raw
        if perf.name == "attach":
            if perf.field(ATTACH_ROLE) is False and _address(perf.field(ATTACH_SOURCE)) == CBS:
                self._service_cbs.add((frame.channel, _int(perf.field(ATTACH_HANDLE))))
            return raw
        if perf.name == "detach":
            self._service_cbs.discard((frame.channel, _int(perf.field(DETACH_HANDLE))))
            return raw
        if perf.name == "end":
            self._service_cbs = {k for k in self._service_cbs if k[0] != frame.channel}
            return raw
        key = (frame.channel, _int(perf.field(TRANSFER_HANDLE)))
        if perf.name != "transfer" or key not in self._service_cbs or perf.field(TRANSFER_MORE):
            return raw
        payload = frame.body[perf.payload_offset:]
        reply = cbs.read_reply(payload)
        pending = (self._pending.pop(reply.correlation_id, None)
                   if reply.correlation_id is not None else None)
        if pending is None:
            return raw
        if pending.reason is None:
            if reply.status_code in OK_STATUS:
                self.on_event("put_token_converted", {"audience": pending.audience})
                if pending.token_expires is not None:
                    # a JWT shorter than the SAS: keyless re-puts it before it expires
                    self._track(pending.audience, pending.scope, pending.token_expires,
                                pending.until if pending.until is not None
                                else pending.token_expires)
            else:
                self.on_event("put_token_rejected", {
                    "audience": pending.audience, "status": reply.status_code,
                    "description": (reply.description or "")[:300]})
            return raw
        self.on_event("put_token_refused", {"audience": pending.audience, "reason": pending.reason})
        body = frame.body[:perf.payload_offset] + cbs.reply_with_description(
            reply, f"{cbs.PLACEHOLDER}: {pending.reason}")
        return encode_frame(FRAME_AMQP, frame.channel, body)

    def _check(self) -> None:
        if self._broken:
            raise AmqpProtocolError("this AMQP connection already failed")


def _renew_at(expires: float, now: float) -> float:
    """80 % into the token's life, and at most 60 s before it expires."""
    left = expires - now
    return expires - max(1.0, min(60.0, 0.2 * left))


def _sasl_outcome(code: int) -> bytes:
    return encode_frame(FRAME_SASL, 0, encode_performative("sasl-outcome",
                                                           [Typed("ubyte", code)]))


def _plain_user(response: Any) -> str | None:
    """The authcid of a PLAIN response (`authzid NUL user NUL password`): the key name; the
    password (the key) is not read."""
    if not isinstance(response, bytes):
        return None
    parts = response.split(b"\x00")
    return parts[1].decode("utf-8", "replace")[:128] if len(parts) == 3 else None


def _limit(max_frame_size: Any) -> int:
    value = _int(max_frame_size) if max_frame_size is not None else None
    if value is None or value <= 0:
        return ABSOLUTE_CAP
    return max(512, min(value, ABSOLUTE_CAP))


def _int(value: Any) -> int:
    if isinstance(value, Typed) and isinstance(value.value, int):
        return value.value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return -1


def _address(terminus: Any) -> str | None:
    if not isinstance(terminus, Described) or not isinstance(terminus.value, list):
        return None
    fields = terminus.value
    address = fields[TERMINUS_ADDRESS] if fields else None
    return str(address) if isinstance(address, str) else None


def _with_address(terminus: Described, address: str) -> Described:
    fields = list(terminus.value)
    fields[TERMINUS_ADDRESS] = address
    return replace(terminus, value=fields)


def _reencoded(frame: Frame, perf: Performative, changes: dict[int, Any]) -> bytes:
    fields = list(perf.fields)
    for index, value in changes.items():
        fields.extend([None] * (index + 1 - len(fields)))
        fields[index] = value
    body = encode_value(Described(Typed("ulong", CODE_OF[perf.name]), fields))
    return encode_frame(frame.type, frame.channel, body + frame.body[perf.payload_offset:])

