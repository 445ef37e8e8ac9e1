"""One AMQP client connection (Service Bus, Event Hubs): the app's plain AMQP in, AMQPS to the
namespace out, every SAS put-token converted to an Entra one on the way (proxy/amqp/stream.py).

Local endpoint (`--reverse PORT=amqps://NS`): the app's connection string says
`Endpoint=sb://localhost:PORT;...;UseDevelopmentEmulator=true`, so its open hostname, link
addresses and CBS audiences name the local endpoint: all become the namespace. Transparent
mode: they already name the namespace, nothing is rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from proxy import metrics
from proxy.amqp.codec import AmqpProtocolError
from proxy.amqp.stream import AmqpConverter, Output
from proxy.listeners.connection import Connection
from proxy.listeners.upstream import UpstreamError
from proxy.redact import redact

logger = logging.getLogger("proxy.amqp")

CHUNK = 64 * 1024
RENEW_POLL = 1.0  # seconds: how often a connection looks whether its token is due
FIX = {
    "servicebus": ("assign the role 'Azure Service Bus Data Sender' and/or 'Azure Service Bus "
                   "Data Receiver' on the namespace (or the entity) to identity {identity}"),
    "eventhubs": ("assign the role 'Azure Event Hubs Data Sender' and/or 'Azure Event Hubs "
                  "Data Receiver' on the namespace (or the event hub) to identity {identity}; "
                  "and check the namespace's route says service = \"eventhubs\""),
}


class _Events:
    """The converter's events as keyless' metrics, logs and audit records."""

    def __init__(self, conn: Connection, service_for) -> None:
        self.conn = conn
        self.service_for = service_for
        self.audited = False

    def __call__(self, kind: str, details: dict) -> None:
        conn = self.conn
        service = self.service_for(details.get("audience") or details.get("address") or "")
        if kind == "put_token_converted":
            conn.login("converted")
            # the HTTP families too, by service: a put-token is the AMQP request that carries
            # the key
            metrics.REQUESTS.labels(service=service, outcome="converted").inc()
            metrics.KEY_MATERIAL_STRIPPED.labels(
                service=service, scheme=details.get("scheme", "SAS")).inc()
        elif kind in ("token_unavailable", "put_token_refused"):
            if kind == "token_unavailable":
                conn.login("token_unavailable")
            metrics.REQUESTS.labels(service=service, outcome="refused").inc()
        elif kind == "attach":
            # what the app does with the key it thinks it uses: `keyless report` plans the
            # Sender/Receiver roles from it (audited: the SAS went as it was)
            conn.record_call(service, "SAS", "write" if details["role"] == "send" else "read",
                             "audited" if conn.audit else "converted")
        elif kind == "put_token_rejected":
            service = self.service_for(details.get("audience", ""))
            conn.refused(f"put-token for {details.get('audience')} answered "
                         f"{details.get('status')} {details.get('description', '')}",
                         FIX.get(service, FIX["servicebus"]).format(
                             identity=conn.spec.identity.label))
        elif kind == "sasl_plain":
            logger.info("amqp client %s logs in with SASL PLAIN as %r: answered by keyless, "
                        "which logs in to %s with ANONYMOUS and the Entra token of identity %s",
                        conn.peer, redact(details.get("key_name", ""))[:64],
                        conn.spec.upstream[0], conn.spec.identity.label)
        elif kind == "renewed":
            conn.reauth("ok")
        elif kind == "renew_failed":
            conn.reauth("failed")
            logger.warning("amqp %s: no fresh token for %s yet: %s", conn.peer,
                           details.get("audience"), redact(details.get("reason", ""), limit=300))
        elif kind == "sasl_refused":
            conn.login("client_error")
            logger.warning("amqp client %s asked for SASL %s: keyless relays ANONYMOUS and "
                           "MSSBCBS, and answers PLAIN itself (use the SDK's connection "
                           "string; its SAS put-token is converted)", conn.peer,
                           redact(details.get("mechanism", "")))
        elif kind == "sas_seen" and not self.audited:
            self.audited = True
            metrics.REQUESTS.labels(service=service, outcome="audited").inc()
            conn.login("audited")
            logger.info("audit: amqp client %s uses the SAS key %r for %s", conn.peer,
                        redact(details.get("key_name", ""))[:64], conn.spec.upstream[0])


async def serve(conn: Connection, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    try:
        up_reader, up_writer = await conn.open_upstream(tls=True)
    except UpstreamError as exc:
        conn.login("upstream_failed")
        logger.warning("amqp upstream %s for %s: %s", conn.spec.upstream[0], conn.peer,
                       redact(str(exc), limit=300))
        return
    service_for = getattr(conn, "service_for", lambda _audience: "servicebus")
    converter = AmqpConverter(
        conn.spec.upstream[0], conn.token_for,
        local_authority=None if conn.transparent else "*",
        service_for=service_for, audit=conn.audit, on_event=_Events(conn, service_for),
        identity=conn.spec.identity.label)
    to_upstream = metrics.LISTENER_BYTES.labels(listener=conn.spec.name, direction="to_upstream")
    to_client = metrics.LISTENER_BYTES.labels(listener=conn.spec.name, direction="to_client")

    async def send(out: Output) -> None:
        if out.to_service:
            up_writer.write(out.to_service)
            to_upstream.inc(len(out.to_service))
        if out.to_app:
            writer.write(out.to_app)
            to_client.inc(len(out.to_app))
        await asyncio.gather(up_writer.drain(), writer.drain())

    async def app_side() -> None:
        while data := await reader.read(CHUNK):
            try:
                out = await converter.from_app(data)
            except AmqpProtocolError as exc:
                conn.login("client_error")
                logger.warning("amqp client %s: %s", conn.peer, exc)
                return
            await send(out)
            if out.close:
                return

    async def service_side() -> None:
        while data := await up_reader.read(CHUNK):
            try:
                out = converter.from_service(data)
            except AmqpProtocolError as exc:
                logger.warning("amqp service %s for %s: %s", conn.spec.upstream[0], conn.peer,
                               exc)
                return
            await send(out)
            if out.close:  # keyless' own put-token was refused: the app was told why
                return

    async def renewals() -> None:
        # the tokens keyless renews itself (SASL PLAIN; identity tokens shorter than the
        # SAS): the converter says when
        while True:
            due = converter.due()
            wait = RENEW_POLL if due is None else min(RENEW_POLL, max(0.0, due - time.time()))
            await asyncio.sleep(wait)
            try:
                out = await converter.tick()
            except AmqpProtocolError:
                continue  # the connection failed: its other sides end it
            await send(out)

    tasks = [asyncio.ensure_future(app_side()), asyncio.ensure_future(service_side()),
             asyncio.ensure_future(renewals())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if exc is not None and not isinstance(exc, ConnectionError | OSError):
                raise exc
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        up_writer.close()
        writer.close()
