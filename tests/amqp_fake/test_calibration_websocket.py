"""Calibration of the fake's AMQP-over-WebSocket way in (wss, /$servicebus/websocket,
AMQPWSB10) with azure-servicebus' async client (aiohttp WebSockets) in its Entra mode."""

from __future__ import annotations

import asyncio
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
