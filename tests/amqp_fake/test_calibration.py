"""Calibration of the fake namespace (tests/support/fake_namespace.mjs) with the real SDKs.

Before the AMQP tests trust the fake, it must behave like Service Bus / Event Hubs for the
SDKs themselves: each SDK in its Entra mode (a TokenCredential) straight to the fake works,
and the same SDK with its SAS key is refused (local auth disabled: put-token 401). The
enforcement checks (tests/amqp_fake/test_enforcement.py) then show each rule bites.
"""

from __future__ import annotations

import threading
import uuid

import pytest
from azure.eventhub import EventData, EventHubConsumerClient, EventHubProducerClient
from azure.eventhub import TransportType as EventHubTransport
from azure.eventhub.exceptions import AuthenticationError as EventHubAuthenticationError
from azure.servicebus import ServiceBusClient, ServiceBusMessage, TransportType
from azure.servicebus.exceptions import ServiceBusError

from tests.amqp_fake.conftest import MintingCredential
from tests.support.fake_namespace import SAS_KEY, FakeNamespace

pytestmark = pytest.mark.e2e
WAIT = 10  # seconds an SDK waits for a message: a bound, not a speed target


def servicebus_entra(ns: FakeNamespace, credential=None) -> ServiceBusClient:
    return ServiceBusClient(
        fully_qualified_namespace=ns.namespace, credential=credential or MintingCredential(),
        custom_endpoint_address=f"sb://127.0.0.1:{ns.amqps_port}",
        connection_verify=ns.ca_pem_path, transport_type=TransportType.Amqp, retry_total=0)


def servicebus_sas(ns: FakeNamespace, key: str = SAS_KEY) -> ServiceBusClient:
    return ServiceBusClient.from_connection_string(
        ns.connection_string(key=key), custom_endpoint_address=f"sb://127.0.0.1:{ns.amqps_port}",
        connection_verify=ns.ca_pem_path, transport_type=TransportType.Amqp, retry_total=0)


def send_and_complete(client: ServiceBusClient, body: str, *, queue: str | None = None,
                      topic: str | None = None, subscription: str | None = None,
                      session_id: str | None = None) -> list[str]:
    """Send one message, receive it peek-lock and complete it; the bodies received."""
    with client:
        sender = client.get_queue_sender(queue) if queue else client.get_topic_sender(topic)
        with sender:
            sender.send_messages(ServiceBusMessage(body, session_id=session_id))
        receiver = (client.get_queue_receiver(queue, session_id=session_id, max_wait_time=WAIT)
                    if queue else client.get_subscription_receiver(topic, subscription,
                                                                   max_wait_time=WAIT))
        with receiver:
            received = receiver.receive_messages(max_message_count=1, max_wait_time=WAIT)
            for message in received:
                receiver.complete_message(message)
            return [str(m) for m in received]


def resources(scopes: list[str]) -> set[str]:
    """The resources asked for (azure-servicebus 7.15 asks for "...azure.net//.default")."""
    return {scope.removesuffix("/.default").rstrip("/") for scope in scopes}


def accepted_put_tokens(ns: FakeNamespace) -> list[dict]:
    return [e for e in ns.events("put_token") if e["accepted"]]


def test_servicebus_entra_queue_send_receive_complete(namespace):
    credential = MintingCredential()
    body = f"order {uuid.uuid4()}"
    client = servicebus_entra(namespace, credential)
    assert send_and_complete(client, body, queue="orders") == [body]
    assert resources(credential.scopes) == {"https://servicebus.azure.net"}
    tokens = accepted_put_tokens(namespace)
    assert tokens and {t["token_kind"] for t in tokens} == {"jwt"}
    assert {t["audience"] for t in tokens} == {f"sb://{namespace.namespace}/orders"}
    assert [e["outcome"] for e in namespace.events("settled")] == ["accepted"]
    # completed: a second receiver finds nothing left
    with servicebus_entra(namespace) as client, client.get_queue_receiver(
            "orders", max_wait_time=1) as receiver:
        assert receiver.receive_messages(max_message_count=1, max_wait_time=1) == []


def test_servicebus_entra_topic_subscription(namespace):
    body = f"event {uuid.uuid4()}"
    received = send_and_complete(servicebus_entra(namespace), body, topic="events",
                                 subscription="audit")
    assert received == [body]
    attaches = {e.get("entity") for e in namespace.events("attach") if e["accepted"]}
    assert {"events", "events/subscriptions/audit"} <= attaches


def test_servicebus_entra_session_queue(namespace):
    with servicebus_entra(namespace) as client, client.get_queue_sender("sessions") as sender:
        sender.send_messages([ServiceBusMessage("for b", session_id="b"),
                              ServiceBusMessage("for a", session_id="a")])
    # the session filter holds: session "a" sees only its own message
    assert send_and_complete(servicebus_entra(namespace), "a again", queue="sessions",
                             session_id="a") == ["for a"]


def test_servicebus_sas_is_refused(namespace):
    # azure-servicebus 7.15 reports a put-token 401 as a ServiceBusConnectionError
    # (condition amqp:client-error): the fake's own record says why.
    with pytest.raises(ServiceBusError):
        send_and_complete(servicebus_sas(namespace), "never", queue="orders")
    refused = namespace.events("put_token")
    assert refused and not any(e["accepted"] for e in refused)
    assert {(e["token_kind"], e["status"]) for e in refused} == {("sas", 401)}
    assert "disabled" in refused[0]["reason"]
    assert not any(e["event"] == "transfer" for e in namespace.events())


def test_servicebus_sas_works_when_local_auth_is_enabled(tmp_path, pki):
    """The SAS refusal is the local-auth setting, not a broken SAS path."""
    with FakeNamespace(tmp_path / "ns", pki, local_auth=True) as ns:
        assert send_and_complete(servicebus_sas(ns), "sas ok", queue="orders") == ["sas ok"]
    with FakeNamespace(tmp_path / "ns2", pki, local_auth=True) as ns:
        with pytest.raises(ServiceBusError):
            send_and_complete(servicebus_sas(ns, key="d3Jvbmcta2V5"), "never", queue="orders")
        assert {e["reason"] for e in ns.events("put_token")} == {"SAS signature does not verify"}


def eventhub_kwargs(ns: FakeNamespace) -> dict:
    return {"custom_endpoint_address": f"sb://127.0.0.1:{ns.amqps_port}",
            "connection_verify": ns.ca_pem_path, "transport_type": EventHubTransport.Amqp,
            "retry_total": 0}


def eventhub_round_trip(producer: EventHubProducerClient, consumer: EventHubConsumerClient,
                        body: str) -> list[str]:
    with producer:
        batch = producer.create_batch(partition_id="0")
        batch.add(EventData(body))
        producer.send_batch(batch)
    received: list[str] = []
    got_one = threading.Event()

    def on_event(partition_context, event):
        if event is not None:
            received.append(event.body_as_str())
            got_one.set()

    # receive() blocks until close(): run it aside, close once the event came (or WAIT passed)
    thread = threading.Thread(target=consumer.receive, kwargs={
        "on_event": on_event, "partition_id": "0", "starting_position": "-1",
        "max_wait_time": WAIT})
    thread.start()
    got_one.wait(WAIT)
    consumer.close()
    thread.join(WAIT)
    assert not thread.is_alive(), "the consumer did not stop"
    return received


def test_eventhub_entra_send_and_receive(namespace):
    credential = MintingCredential()
    body = f"reading {uuid.uuid4()}"
    producer = EventHubProducerClient(namespace.namespace, "telemetry", credential,
                                      **eventhub_kwargs(namespace))
    consumer = EventHubConsumerClient(namespace.namespace, "telemetry", "$Default", credential,
                                      **eventhub_kwargs(namespace))
    assert eventhub_round_trip(producer, consumer, body) == [body]
    assert resources(credential.scopes) == {"https://eventhubs.azure.net"}
    assert {t["token_kind"] for t in accepted_put_tokens(namespace)} == {"jwt"}


def test_eventhub_sas_is_refused(namespace):
    conn_str = namespace.connection_string(entity="telemetry")
    producer = EventHubProducerClient.from_connection_string(conn_str, **eventhub_kwargs(namespace))
    with pytest.raises(EventHubAuthenticationError), producer:
        batch = producer.create_batch(partition_id="0")
        batch.add(EventData("never"))
        producer.send_batch(batch)
    refused = namespace.events("put_token")
    assert refused and {(e["token_kind"], e["status"]) for e in refused} == {("sas", 401)}
    assert not any(e["event"] == "transfer" for e in namespace.events())
