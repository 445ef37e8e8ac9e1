"""Acknowledge the app's bytes at once, so a proxied upload is not held back by Nagle.

urllib3 (so requests and every azure-core SDK) turns Nagle *on* for connections to a proxy
and writes an upload's head and body as two TLS records. Nagle then holds the body until the
head is ACKed, and the kernel delays that ACK (~40 ms) because keyless has nothing to send
back yet: every small upload through any proxy paid ~40 ms (docs/benchmarks.md). Re-arming
TCP_QUICKACK after each read on the app's socket sends the pending ACK now. Linux only;
elsewhere this does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from mitmproxy import connection, ctx

TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
logger = logging.getLogger(__name__)


def client_transport(client: connection.Client) -> asyncio.Transport | None:
    """The asyncio transport of an app connection. mitmproxy has no API for it: this is the
    one place that reaches into its proxy server (checked against mitmproxy 12.3)."""
    handler = ctx.master.addons.get("proxyserver").connections.get(client.id)
    io = handler.transports.get(client) if handler is not None else None
    writer = getattr(io, "writer", None)
    transport = getattr(writer, "transport", None)
    return transport if isinstance(transport, asyncio.Transport) else None


def quickack(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)


class QuickAck:
    def client_connected(self, client: connection.Client) -> None:
        if TCP_QUICKACK is None or client.transport_protocol != "tcp":
            return
        try:
            transport = client_transport(client)
        except (AttributeError, KeyError, TypeError) as exc:
            logger.debug("quick ACKs not set up: %r", exc)
            return
        sock = transport.get_extra_info("socket") if transport else None
        if transport is None or sock is None:
            return
        protocol = transport.get_protocol()
        received = protocol.data_received

        def data_received(data: bytes) -> None:
            quickack(sock)  # a single setting does not stick: re-arm after every read
            received(data)

        protocol.data_received = data_received  # type: ignore[method-assign]
        quickack(sock)
