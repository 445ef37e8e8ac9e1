"""Calibration of the fake's AMQP-over-WebSocket way in (wss, /$servicebus/websocket,
AMQPWSB10) with azure-servicebus' async client (aiohttp WebSockets) in its Entra mode."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import time
import uuid

import pytest
from azure.core.credentials import AccessToken
from azure.servicebus import ServiceBusMessage, TransportType
from azure.servicebus.aio import ServiceBusClient

from tests.support import entra

pytestmark = pytest.mark.e2e
WAIT = 10


class AsyncMintingCredential:
    async def get_token(self, *scopes: str, **_: object) -> AccessToken:
        token = entra.mint(scopes[0].removesuffix("/.default").rstrip("/"))
        return AccessToken(token, int(time.time()) + 3600)

    async def close(self) -> None:
        pass


async def round_trip(namespace, body: str) -> list[str]:
    client = ServiceBusClient(
        namespace.namespace, AsyncMintingCredential(),
        transport_type=TransportType.AmqpOverWebsocket,
        custom_endpoint_address=f"https://127.0.0.1:{namespace.wss_port}",
        connection_verify=namespace.ca_pem_path, retry_total=0)
    async with client:
        async with client.get_queue_sender("orders") as sender:
            await sender.send_messages(ServiceBusMessage(body))
        async with client.get_queue_receiver("orders", max_wait_time=WAIT) as receiver:
            received = await receiver.receive_messages(max_message_count=1, max_wait_time=WAIT)
            for message in received:
                await receiver.complete_message(message)
            return [str(m) for m in received]


def test_websocket_entra_send_receive(namespace):
    body = f"ws-{uuid.uuid4()}"
    assert asyncio.run(asyncio.wait_for(round_trip(namespace, body), 60)) == [body]
    upgrades = namespace.events("websocket")
    assert upgrades and all(u["accepted"] and u["path"] == "/$servicebus/websocket"
                            and "AMQPWSB10" in u["protocols"] for u in upgrades)
    assert {o["transport"] for o in namespace.events("open")} == {"wss"}
    assert {p["token_kind"] for p in namespace.events("put_token") if p["accepted"]} == {"jwt"}


def upgrade_status(namespace, target: str) -> bytes:
    """The status line the fake answers a WebSocket upgrade for `target` with."""
    context = ssl.create_default_context(cafile=namespace.ca_pem_path)
    with (socket.create_connection(("127.0.0.1", namespace.wss_port), timeout=10) as raw,
          context.wrap_socket(raw, server_hostname=namespace.namespace) as conn):
        key = base64.b64encode(os.urandom(16)).decode()
        conn.sendall(f"GET {target} HTTP/1.1\r\nHost: {namespace.namespace}\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Protocol: AMQPWSB10\r\n\r\n".encode())
        return conn.recv(4096).split(b"\r\n", 1)[0]


def test_websocket_upgrade_targets(namespace):
    """Origin-form and absolute-form (the Java SDK's) for the namespace are upgraded; an
    absolute-form target naming another host, or another path, is refused."""
    ns = namespace.namespace
    assert upgrade_status(namespace, "/$servicebus/websocket").startswith(b"HTTP/1.1 101")
    assert upgrade_status(namespace, f"https://{ns}/$servicebus/websocket").startswith(
        b"HTTP/1.1 101")
    assert upgrade_status(namespace, f"https://{ns}:443/$servicebus/websocket").startswith(
        b"HTTP/1.1 101")
    assert upgrade_status(namespace, "https://other.example/$servicebus/websocket").startswith(
        b"HTTP/1.1 400")
    assert upgrade_status(namespace, f"https://{ns}/elsewhere").startswith(b"HTTP/1.1 400")
    assert [u["accepted"] for u in namespace.events("websocket")] == [
        True, True, True, False, False]
