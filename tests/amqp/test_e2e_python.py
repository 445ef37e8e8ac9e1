"""Python azure-servicebus and azure-eventhub apps with a WRONG key, through the real keyless
process, to the fake namespace, which accepts only the identity's Entra tokens."""

from __future__ import annotations

import uuid

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage

from tests.amqp.conftest import Through

pytestmark = pytest.mark.e2e


def test_servicebus_send_and_receive_peek_lock(through: Through) -> None:
    body = f"order-{uuid.uuid4()}"
    converted = through.logins("converted")
    with ServiceBusClient.from_connection_string(through.connection_string()) as client:
        with client.get_queue_sender("orders") as sender:
            sender.send_messages(ServiceBusMessage(body))
        with client.get_queue_receiver("orders", max_wait_time=10) as receiver:
            received = receiver.receive_messages(max_message_count=1, max_wait_time=10)
            assert [str(m) for m in received] == [body]
            receiver.complete_message(received[0])
    assert through.logins("converted") >= converted + 2
    puts = through.namespace.events("put_token")
    assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
