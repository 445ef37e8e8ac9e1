"""AMQP over WebSockets (Service Bus and Event Hubs through HTTPS_PROXY) becomes passwordless.

An app with `TransportType.AmqpOverWebsocket` (or any SDK's WebSocket option) behind keyless
opens `wss://NAMESPACE/$servicebus/websocket` (subprotocol AMQPWSB10) and speaks AMQP 1.0 in
binary WebSocket messages: SASL, open, then CBS put-tokens carrying a SAS made from its key.
The AMQP stream goes through the same converter as the AMQP listener
(proxy/amqp/stream.py), which swaps each put-token's SAS for an Entra token. A message is not
an AMQP frame (a frame may span messages, a message may hold several): the converter buffers,
and this addon sends on what it returns, replacing, dropping or injecting messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from mitmproxy import ctx, http
from mitmproxy.proxy import events

from addons.answers import catalog_host, destination, keyless_answer
from proxy import metrics
from proxy.amqp.session import FIX
from proxy.amqp.stream import AmqpConverter, AmqpProtocolError
from proxy.audit import CallKey, CallLog
from proxy.catalog import Catalog
from proxy.errors import MISDIRECTED, PLAIN_HTTP
from proxy.flowstate import AmqpStream, FlowState, flow_state
from proxy.redact import redact
from proxy.tokens import Identity, Token, TokenCache

logger = logging.getLogger(__name__)

WEBSOCKET_PATH = "/$servicebus/websocket"
AMQP_SERVICES = frozenset({"servicebus", "eventhubs"})
LISTENER = "websocket:443"  # the keyless_listener_logins_total{listener} label
RENEW_POLL = 1.0  # seconds: how often a WebSocket's converter is asked whether a token is due
# The converter's events, as keyless_listener_logins_total results ("put_token_refused", the
# app's answer when keyless had no token, was counted as token_unavailable already).
LOGIN_RESULTS = {
    "put_token_converted": "converted",  # the service accepted keyless' token
    "token_unavailable": "token_unavailable",
    "put_token_rejected": "upstream_refused",  # the service refused keyless' token
    "sas_seen": "audited",  # --audit: a SAS (or SASL PLAIN key) went on as the app sent it
    "sasl_refused": "client_error",  # a SASL mechanism that would carry the key
}


class ConverterFactory(Protocol):
    def __call__(self, namespace: str, tokens: Callable[[str, float | None], Any], *,
                 service: str, audit: bool,
                 on_event: Callable[[str, dict[str, Any]], None]) -> AmqpStream: ...


def amqp_converter(namespace: str, tokens: Callable[[str, float | None], Any], *, service: str,
                   audit: bool, on_event: Callable[[str, dict[str, Any]], None]) -> AmqpStream:
    # The app names the real namespace (a proxy sees the real URL): nothing to rewrite. A
    # put-token's audience does not tell Service Bus from Event Hubs: the namespace's
    # catalog entry does (a route with service = "eventhubs"; Service Bus by default).
    return AmqpConverter(namespace, tokens, service_for=lambda _audience: service,
                         audit=audit, on_event=on_event)


def is_amqp_upgrade(flow: http.HTTPFlow, state: FlowState | None) -> bool:
    request = flow.request
    return (state is not None and state.service in AMQP_SERVICES
            # the gateway's spelling may vary: a variant must not pass unconverted
            and request.path.split("?", 1)[0].rstrip("/").lower() == WEBSOCKET_PATH
            and request.headers.get("upgrade", "").lower() == "websocket")


def inject(flow: http.HTTPFlow, to_client: bool, data: bytes) -> None:
    ctx.master.commands.call("inject.websocket", flow, to_client, data, False)


def close(flow: http.HTTPFlow) -> None:
    """End both sides of the WebSocket: mitmproxy has no command for it, so its layer is told
    the service hung up (it closes the app's WebSocket and both connections)."""
    server = ctx.master.addons.get("proxyserver")
    handler = server.connections.get(flow.client_conn.id) if server else None
    if handler is not None:
        task = asyncio.get_running_loop().create_task(
            handler.server_event(events.ConnectionClosed(flow.server_conn)))
        _closing.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()


class AmqpOverWebSocket:
    """requestheaders: an AMQP WebSocket upgrade goes only to the namespace every name agrees
    on; websocket_start: the flow's converter; websocket_message: the app's bytes through
    `from_app`, the service's through `from_service`; what they return is what is sent."""

    def __init__(self, catalog: Catalog, tokens: TokenCache, identity: Identity,
                 calls: CallLog | None = None, audit: bool = False,
                 converter: ConverterFactory = amqp_converter,
                 inject: Callable[[http.HTTPFlow, bool, bytes], None] = inject,
                 close: Callable[[http.HTTPFlow], None] = close) -> None:
        self.catalog, self.tokens, self.identity = catalog, tokens, identity
        self.calls = calls or CallLog(None)
        self.audit = audit
        self.converter, self.inject, self.close = converter, inject, close
        self._renewing: dict[str, asyncio.Task[None]] = {}  # flow id → its renewal driver

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if flow.response or not flow.live or not is_amqp_upgrade(flow, state) or self.audit:
            return
        assert state is not None
        host = destination(flow).agreed_host()
        if host == catalog_host(flow):
            return
        # A put-token's SAS must never reach a host keyless did not agree on, nor travel in
        # plain text: no WebSocket then.
        flow.request.stream = False
        state.refused = True
        if flow.request.scheme != "https" or not flow.client_conn.tls_established:
            flow.response = keyless_answer(
                403, PLAIN_HTTP, f"keyless converts AMQP over WebSockets only over TLS; use "
                f"wss:// for {flow.request.host}")
        else:
            flow.response = keyless_answer(
                421, MISDIRECTED, "the CONNECT target, TLS server name and Host header must "
                "name the same Service Bus/Event Hubs namespace on port 443")
        count("client_error")

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if not is_amqp_upgrade(flow, state):
            return
        assert state is not None
        namespace = catalog_host(flow)
        target = self.catalog.match(namespace, flow.request.path)
        identity = (target.service.identity if target else None) or self.identity
        service = target.service.name if target else state.service

        async def tokens(scope: str, valid_until: float | None) -> Token:
            return await self.tokens.get_token(identity, scope, valid_until=valid_until)

        state.identity = identity
        try:
            state.amqp = self.converter(
                namespace, tokens, service=service, audit=self.audit,
                on_event=FlowLogins(namespace, service, identity, self.calls))
        except Exception as exc:  # fail closed: without a converter no SAS may pass
            self._fail(flow, state, f"no converter ({type(exc).__name__})")
            return
        self._drive_renewals(flow, state)

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if flow.websocket is None or not is_amqp_upgrade(flow, state):
            return
        assert state is not None
        messages = flow.websocket.messages
        # mitmproxy keeps every message of a flow; an AMQP connection lives for days: keep
        # only the current one (the layer holds its own reference to it).
        del messages[:-1]
        message = messages[-1]
        if message.injected:
            return  # our own: already converted
        if state.amqp is None or state.amqp_failed or message.is_text:
            # AMQP is binary; without a working converter nothing is forwarded either way.
            message.drop()
            return
        try:
            if message.from_client:
                out = await state.amqp.from_app(message.content)
                back, onward = out.to_app, out.to_service
            else:
                out = state.amqp.from_service(message.content)
                back, onward = out.to_service, out.to_app
        except Exception as exc:  # fail closed: an unconverted message must not go on
            message.drop()
            known = isinstance(exc, AmqpProtocolError)  # its message is safe to log
            self._fail(flow, state, str(exc) if known else f"internal error "
                       f"({type(exc).__name__})")
            return
        if onward:
            message.content = onward
        else:
            message.drop()  # the converter holds a partial frame
        if back:
            self.inject(flow, message.from_client, back)  # back where it came from
        if getattr(out, "close", False):  # e.g. after refusing a SASL login that holds a key
            state.amqp_failed = True
            self.close(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if state is not None:
            state.amqp = None
        task = self._renewing.pop(flow.id, None)
        if task is not None:
            task.cancel()

    def _drive_renewals(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """The tokens keyless renews itself (SASL PLAIN, identity tokens shorter than the
        SAS): the converter says when (`due`), `tick` gives the frames to inject upstream."""
        if not hasattr(state.amqp, "due"):
            return  # a converter that renews nothing
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # outside an event loop (a unit test's direct call): nothing to drive
        task = loop.create_task(self._renewals(flow, state))
        self._renewing[flow.id] = task
        task.add_done_callback(lambda _task: self._renewing.pop(flow.id, None))

    async def _renewals(self, flow: http.HTTPFlow, state: FlowState) -> None:
        converter = state.amqp
        while state.amqp is converter and converter is not None and not state.amqp_failed:
            due = converter.due()
            await asyncio.sleep(RENEW_POLL if due is None
                                else min(RENEW_POLL, max(0.0, due - time.time())))
            if state.amqp is not converter or state.amqp_failed:
                return
            with contextlib.suppress(AmqpProtocolError):
                out = await converter.tick()
                if out.to_service and not state.amqp_failed:
                    self.inject(flow, False, out.to_service)

    def _fail(self, flow: http.HTTPFlow, state: FlowState, reason: str) -> None:
        state.amqp_failed = True
        count("client_error")
        logger.warning("AMQP over WebSocket to %s closed: %s", catalog_host(flow), reason)
        self.close(flow)



def count(result: str) -> None:
    metrics.LISTENER_LOGINS.labels(listener=LISTENER, protocol="amqp", result=result).inc()


class FlowLogins:
    """One WebSocket flow's converter events as keyless' metrics, logs and report records
    (as proxy/amqp/session.py does for the AMQP listener's connections)."""

    def __init__(self, namespace: str, service: str, identity: Identity,
                 calls: CallLog) -> None:
        self.namespace, self.service, self.identity, self.calls = (
            namespace, service, identity, calls)
        self.audited = False

    def __call__(self, kind: str, details: dict[str, Any]) -> None:
        if kind in ("renewed", "renew_failed"):  # keyless' own put-token of a fresh token
            metrics.LISTENER_REAUTHS.labels(
                listener=LISTENER, result="ok" if kind == "renewed" else "failed").inc()
            return
        result = LOGIN_RESULTS.get(kind)
        if result is None or (result == "audited" and self.audited):
            return  # an audited connection counts once, however many SAS it sends
        self.audited = self.audited or result == "audited"
        count(result)
        if result in ("converted", "audited"):
            self._record(result)
            logger.info("AMQP over WebSocket login to %s: %s%s", self.namespace, result,
                        f" (key name {str(details.get('key_name'))[:64]!r})"
                        if details.get("key_name") else "")
        elif result == "upstream_refused":
            logger.warning(
                "%s at %s refused the Entra login of identity %s: %s. Fix: %s", self.service,
                self.namespace, self.identity.label,
                redact(f"put-token for {details.get('audience')} answered "
                       f"{details.get('status')} {details.get('description', '')}", limit=500),
                FIX.get(self.service, FIX["servicebus"]).format(identity=self.identity.label))
        else:
            reason = details.get("reason") or details.get("mechanism") or ""
            logger.warning("AMQP over WebSocket login to %s: %s %s", self.namespace, result,
                           redact(str(reason), limit=300))

    def _record(self, handled: str) -> None:
        # The namespace's own entry (REST calls share it): one SAS still sent over AMQP keeps
        # `keyless report` from saying local auth can be switched off. A put-token does not
        # say whether the app sends or receives: operation "login".
        self.calls.record(CallKey(
            service=self.service, resource=self.namespace.split(".", 1)[0],
            host=self.namespace, scheme="SharedAccessSignature", operation="login",
            identity=self.identity.label, handled=handled))
