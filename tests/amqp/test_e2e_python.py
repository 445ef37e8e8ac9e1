"""Python azure-servicebus and azure-eventhub apps with a WRONG key and
`UseDevelopmentEmulator=true`, through the real keyless process (`--reverse
PORT=amqps://NS`), to the fake namespace, which accepts only the identity's Entra tokens."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from azure.eventhub import EventData, EventHubConsumerClient, EventHubProducerClient
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.exceptions import ServiceBusError

from tests.amqp.conftest import KEY_NAME, NAMESPACE, WRONG_KEY, Through, start_keyless
from tests.amqp_fake.test_calibration import send_and_complete
from tests.support.azurite import free_port
from tests.support.fake_namespace import FakeNamespace
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e
WAIT = 10  # seconds an SDK waits for a message: a bound


def client(through: Through) -> ServiceBusClient:
    return ServiceBusClient.from_connection_string(through.connection_string(), retry_total=0)


def no_sas_upstream(namespace: FakeNamespace) -> None:
    puts = namespace.events("put_token")
    assert puts and {p["token_kind"] for p in puts} == {"jwt"}, puts
    assert all("localhost" not in p["audience"] for p in puts)


def test_queue_send_receive_peek_lock_complete(through: Through) -> None:
    body = f"order-{uuid.uuid4()}"
    converted = through.logins("converted")
    assert send_and_complete(client(through), body, queue="orders") == [body]
    assert through.logins("converted") >= converted + 2  # sender and receiver put-tokens
    no_sas_upstream(through.namespace)
    assert all(p["accepted"] for p in through.namespace.events("put_token"))
    assert {e["hostname"] for e in through.namespace.events("open")} == {NAMESPACE}
    attached = {e["address"] for e in through.namespace.events("attach")}
    assert f"amqps://{NAMESPACE}/orders" in attached and not any("localhost" in a
                                                                  for a in attached)


def test_topic_subscription(through: Through) -> None:
    body = f"event-{uuid.uuid4()}"
    assert send_and_complete(client(through), body, topic="events",
                             subscription="audit") == [body]
    no_sas_upstream(through.namespace)


def test_session_queue(through: Through) -> None:
    with client(through) as sb, sb.get_queue_sender("sessions") as sender:
        sender.send_messages([ServiceBusMessage("for b", session_id="b"),
                              ServiceBusMessage("for a", session_id="a")])
    assert send_and_complete(client(through), "a again", queue="sessions",
                             session_id="a") == ["for a"]


def test_event_hubs_send_batch_and_receive(tmp_path: Path, fake_namespace: FakeNamespace,
                                           module_identity: FakeIdentityEndpoint) -> None:
    config = tmp_path / "keyless.toml"
    config.write_text(f'[[route]]\nhost = "{NAMESPACE}"\nservice = "eventhubs"\n')
    running = start_keyless(tmp_path / "keyless", fake_namespace, module_identity,
                            "--config", str(config))
    try:
        conn_str = running.connection_string(entity="telemetry")
        body = f"reading-{uuid.uuid4()}"
        with EventHubProducerClient.from_connection_string(conn_str, retry_total=0) as producer:
            batch = producer.create_batch(partition_id="0")
            batch.add(EventData(body))
            producer.send_batch(batch)
        received: list[str] = []
        consumer = EventHubConsumerClient.from_connection_string(conn_str, "$Default",
                                                                 retry_total=0)

        def on_event(_context, event) -> None:
            if event is not None:
                received.append(event.body_as_str())
                consumer.close()

        with consumer:
            consumer.receive(on_event=on_event, partition_id="0", starting_position="-1",
                             max_wait_time=WAIT)
        assert body in received
        hub_tokens = [p for p in fake_namespace.events("put_token")
                      if "telemetry" in p["audience"]]
        assert hub_tokens and all(p["accepted"] and p["token_kind"] == "jwt"
                                  for p in hub_tokens)
        assert module_identity.calls_for("https://eventhubs.azure.net")  # the Event Hubs scope
    finally:
        running.keyless.stop()


def test_token_endpoint_down_fails_closed(tmp_path: Path, fake_namespace: FakeNamespace) -> None:
    with FakeIdentityEndpoint(mode="error") as down:
        running = start_keyless(tmp_path / "keyless", fake_namespace, down, wait_ready=False)
        try:
            before = len(fake_namespace.events("put_token"))
            with pytest.raises(ServiceBusError) as error:
                send_and_complete(client(running), "never", queue="orders")
            # what the app logs: the put-token reply's description, which keyless wrote
            said = str(error.value.inner_exception)  # type: ignore[attr-defined]
            assert "KeylessTokenUnavailable: " in said and "servicebus.azure.net" in said
            after = fake_namespace.events("put_token")[before:]
            assert after and not any(p["token_kind"] == "sas" or p["accepted"] for p in after)
            assert running.logins("token_unavailable") >= 1
            assert "sig=" not in running.keyless.log()
        finally:
            running.keyless.stop()


def test_garbage_is_closed_and_keyless_keeps_serving(through: Through) -> None:
    with socket.create_connection(("127.0.0.1", through.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100) == b""  # closed, nothing answered
    body = f"after-garbage-{uuid.uuid4()}"
    assert send_and_complete(client(through), body, queue="orders") == [body]


def run_node_app(connection_string: str, body: str, kind: str) -> dict:
    node = shutil.which("node")
    assert node, "Node.js is needed: apt-get install nodejs, then npm ci"
    done = subprocess.run([node, str(Path(__file__).with_name("node_servicebus_app.mjs")),
                           connection_string, body, kind], capture_output=True, text=True,
                          timeout=90, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_node_service_bus_app_with_the_wrong_key(through: Through) -> None:
    body = f"node-order-{uuid.uuid4()}"
    before = len(through.namespace.events("put_token"))
    assert run_node_app(through.connection_string(), body, "servicebus") == {"received": [body]}
    puts = through.namespace.events("put_token")[before:]
    assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts


def test_node_event_hubs_app_with_the_wrong_key(tmp_path: Path, fake_namespace: FakeNamespace,
                                                module_identity: FakeIdentityEndpoint) -> None:
    config = tmp_path / "keyless.toml"
    config.write_text(f'[[route]]\nhost = "{NAMESPACE}"\nservice = "eventhubs"\n')
    running = start_keyless(tmp_path / "keyless", fake_namespace, module_identity,
                            "--config", str(config))
    try:
        body = f"node-reading-{uuid.uuid4()}"
        before = len(fake_namespace.events("put_token"))
        result = run_node_app(running.connection_string(entity="telemetry"), body, "eventhubs")
        assert "error" not in result, result
        assert body in result["received"], result  # sent to partition 1, read back from it
        puts = fake_namespace.events("put_token")[before:]
        assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
        assert {p["audience"] for p in puts} >= {
            f"sb://{NAMESPACE}/telemetry/Partitions/1",
            f"sb://{NAMESPACE}/telemetry/ConsumerGroups/$Default/Partitions/1"}
        attaches = [e for e in fake_namespace.events("attach") if "Partitions/1" in e["address"]]
        assert attaches and all(e["accepted"] for e in attaches)
    finally:
        running.keyless.stop()


def test_a_connection_outlives_its_first_tokens_because_renewals_are_converted(
        tmp_path: Path, fake_namespace: FakeNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's SAS lives 20 s (the SDK re-sends its put-token at 90 %, ~18 s), so a
    receiver kept open for 35 s renews on its own schedule; the fake refuses a SAS, so the
    link keeps working only if every renewal is converted too. The identity's tokens live
    25 s: the renewal at ~18 s asks for one valid past the SAS's 20 s, which the cached one is
    not, so keyless must really fetch a new one (the credential's own cache would hand the
    same token back)."""
    from datetime import timedelta

    import azure.servicebus._base_handler as handler

    original = handler._generate_sas_token
    monkeypatch.setattr(handler, "_generate_sas_token",
                        lambda uri, policy, key, expiry=None: original(
                            uri, policy, key, timedelta(seconds=20)))
    with FakeIdentityEndpoint(lifetime_seconds=25) as identity:
        running = start_keyless(tmp_path / "keyless", fake_namespace, identity,
                                "--token-margin", "3")
        try:
            before = len(fake_namespace.events("put_token"))
            detached = len(fake_namespace.events("link_detached"))

            def send(body: str) -> None:
                with client(running) as sb, sb.get_queue_sender("orders") as sender:
                    sender.send_messages(ServiceBusMessage(body))

            got: list[str] = []
            with client(running) as sb, sb.get_queue_receiver("orders",
                                                              max_wait_time=3) as receiver:
                send("before renewal")
                start = time.monotonic()
                sent_late = False
                while time.monotonic() - start < 60 and len(got) < 2:  # bounded
                    for message in receiver.receive_messages(max_message_count=1,
                                                             max_wait_time=2):
                        receiver.complete_message(message)
                        got.append(str(message))
                    if not sent_late and time.monotonic() - start > 32:
                        send("after renewal")
                        sent_late = True
            assert got == ["before renewal", "after renewal"]
            puts = fake_namespace.events("put_token")[before:]
            assert all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
            per_connection: dict[int, int] = {}
            for put in puts:
                per_connection[put["connection"]] = per_connection.get(put["connection"], 0) + 1
            assert max(per_connection.values()) >= 2  # the receiver's renewals, converted
            assert len(fake_namespace.events("link_detached")) == detached
            assert running.logins("converted") >= 4
        finally:
            running.keyless.stop()


def test_upstream_reset_mid_stream_closes_the_app_side(tmp_path: Path, pki,
                                                       module_identity: FakeIdentityEndpoint
                                                       ) -> None:
    namespace = FakeNamespace(tmp_path / "ns", pki, NAMESPACE).start()
    running = start_keyless(tmp_path / "keyless", namespace, module_identity)
    try:
        with client(running) as sb, sb.get_queue_receiver("orders", max_wait_time=2) as receiver:
            assert receiver.receive_messages(max_message_count=1, max_wait_time=2) == []
            # the service's side goes away mid-connection, abruptly: no close frame
            assert namespace._process is not None
            namespace._process.kill()
            started = time.monotonic()
            with pytest.raises(ServiceBusError):
                for _ in range(10):  # bounded: the SDK must see the close, not hang
                    receiver.receive_messages(max_message_count=1, max_wait_time=2)
            assert time.monotonic() - started < 25
        assert running.keyless.get("/healthz")[0] == 200  # keyless keeps serving
        assert running.keyless.process is not None and running.keyless.process.poll() is None
    finally:
        running.keyless.stop()
        namespace.stop()


def test_audit_mode_forwards_the_sas_and_records_the_key_name(
        tmp_path: Path, fake_namespace: FakeNamespace,
        module_identity: FakeIdentityEndpoint) -> None:
    running = start_keyless(tmp_path / "keyless", fake_namespace, module_identity, "--audit")
    try:
        before = len(fake_namespace.events("put_token"))
        # the fake has local auth off: the SAS is refused
        with (pytest.raises(ServiceBusError), client(running) as sb,
              sb.get_queue_sender("orders") as sender):
            sender.send_messages(ServiceBusMessage("audited"))
        after = fake_namespace.events("put_token")[before:]
        assert after and {p["token_kind"] for p in after} == {"sas"}  # forwarded as sent
        assert running.logins("audited") == 1 and running.logins("converted") == 0
        assert "RootManageSharedAccessKey" in running.keyless.log()
    finally:
        running.keyless.stop()


def test_identity_tokens_shorter_than_the_sas_are_renewed_by_keyless(
        tmp_path: Path, fake_namespace: FakeNamespace) -> None:
    """The app's SAS lasts the SDK's default hour (it re-sends its put-token only after
    54 min); the identity's tokens live 30 s, after which the fake detaches the links. A
    receiver kept open 45 s keeps working only because keyless re-puts a fresh token for
    its audience on its own CBS session."""
    with FakeIdentityEndpoint(lifetime_seconds=30) as identity:
        running = start_keyless(tmp_path / "keyless", fake_namespace, identity,
                                "--token-margin", "3")
        try:
            before = len(fake_namespace.events("put_token"))
            detached = len(fake_namespace.events("link_detached"))
            body = f"late-{uuid.uuid4()}"
            got: list[str] = []
            with client(running) as sb, sb.get_queue_receiver("orders",
                                                              max_wait_time=3) as receiver:
                start = time.monotonic()
                sent = False
                while time.monotonic() - start < 60 and body not in got:  # bounded
                    if not sent and time.monotonic() - start > 40:
                        with client(running) as other, other.get_queue_sender(
                                "orders") as sender:
                            sender.send_messages(ServiceBusMessage(body))
                        sent = True
                    for message in receiver.receive_messages(max_message_count=1,
                                                             max_wait_time=2):
                        receiver.complete_message(message)
                        got.append(str(message))
            assert body in got
            puts = fake_namespace.events("put_token")[before:]
            assert all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
            receiver_puts = [p for p in puts if p["connection"] == puts[0]["connection"]]
            assert len(receiver_puts) >= 2  # the SDK sent one; keyless the others
            assert len(fake_namespace.events("link_detached")) == detached
            assert running.keyless.metric("keyless_listener_reauths_total", result="ok") >= 1
        finally:
            running.keyless.stop()


def test_several_local_endpoints_for_several_namespaces(tmp_path: Path, pki,
                                                        module_identity: FakeIdentityEndpoint
                                                        ) -> None:
    """One keyless, two `--reverse PORT=amqps://NS` listeners: each app's connection goes to
    its own namespace, rewritten to that namespace's name (the fakes refuse another name)."""
    names = ("keylessbus.servicebus.windows.net", "otherbus.servicebus.windows.net")
    with FakeNamespace(tmp_path / "ns1", pki, names[0]) as first, \
            FakeNamespace(tmp_path / "ns2", pki, names[1]) as second:
        fakes = dict(zip(names, (first, second), strict=True))
        ports = {name: free_port() for name in names}
        args: list[str] = ["--set", f"ssl_verify_upstream_trusted_ca={first.ca_pem_path}"]
        for name, fake in fakes.items():
            args += ["--reverse", f"{ports[name]}=amqps://{name}",
                     "--connect-to", f"{name}:5671:127.0.0.1:{fake.amqps_port}"]
        keyless = KeylessProcess(tmp_path / "keyless", args, module_identity.env()).start()
        try:
            for name in names:
                body = f"for-{name}-{uuid.uuid4()}"
                app = ServiceBusClient.from_connection_string(
                    f"Endpoint=sb://localhost:{ports[name]};SharedAccessKeyName="
                    f"{KEY_NAME};SharedAccessKey={WRONG_KEY};UseDevelopmentEmulator=true",
                    retry_total=0)
                assert send_and_complete(app, body, queue="orders") == [body]
            for name, fake in fakes.items():
                assert {e["hostname"] for e in fake.events("open")} == {name}
                puts = fake.events("put_token")
                assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts)
                assert {p["audience"].split("/")[2] for p in puts} == {name}
            assert WRONG_KEY not in keyless.log()
        finally:
            keyless.stop()
