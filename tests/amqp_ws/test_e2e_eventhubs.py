"""An Event Hubs app on AMQP over WebSockets with a WRONG key, through the real keyless (a route
says the namespace is Event Hubs: its put-tokens get Event Hubs tokens), to the fake namespace."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from azure.eventhub import EventData
from azure.eventhub import TransportType as HubTransport
from azure.eventhub.aio import EventHubConsumerClient, EventHubProducerClient

from tests.amqp_ws.conftest import HUBS, Through, bounded, wrong_key_connection_string
from tests.amqp_ws.test_e2e import put_tokens

pytestmark = pytest.mark.e2e


async def send_and_receive_event(connection_string: str, body: str,
                                 **options: object) -> list[str]:
    common = {"transport_type": HubTransport.AmqpOverWebsocket, **options}
    producer = EventHubProducerClient.from_connection_string(connection_string, **common)
    async with producer:
        batch = await producer.create_batch(partition_id="0")
        batch.add(EventData(body))
        await producer.send_batch(batch)
    got: list[str] = []
    done = asyncio.Event()

    async def on_event(_partition: object, event: EventData | None) -> None:
        if event is not None:
            got.append(event.body_as_str())
            if body in got:
                done.set()

    consumer = EventHubConsumerClient.from_connection_string(
        connection_string, consumer_group="$Default", **common)
    async with consumer:
        task = asyncio.create_task(consumer.receive(on_event, partition_id="0",
                                                    starting_position="-1"))
        try:
            await asyncio.wait_for(done.wait(), 30)
        finally:
            await consumer.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return got


def test_event_hub_send_and_receive_with_a_wrong_key(through: Through) -> None:
    fake = through.fakes[HUBS]
    seen = len(put_tokens(fake))
    body = f"reading-{uuid.uuid4()}"
    got = bounded(send_and_receive_event(wrong_key_connection_string(HUBS, "telemetry"), body,
                                         **through.proxy_options()))
    assert body in got
    tokens = put_tokens(fake, seen)
    assert tokens and all(t["token_kind"] == "jwt" and t["accepted"] for t in tokens), tokens
    assert through.identity.calls_for("https://eventhubs.azure.net")
    through.assert_no_secrets_logged()
