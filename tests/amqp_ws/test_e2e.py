"""Legacy Service Bus / Event Hubs apps on AMQP over WebSockets with a WRONG key, through the
real keyless process as their HTTP proxy, to the fake namespace (rhea, tests/support/
fake_namespace.mjs) on wss, which accepts only the identity's Entra token (signature, issuer,
audience, expiry checked) and refuses SAS tokens as a namespace without local auth does."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from azure.servicebus import ServiceBusMessage, TransportType
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.exceptions import ServiceBusAuthenticationError, ServiceBusError

from proxy.amqp.codec import (
    FRAME_SASL,
    Symbol,
    encode_frame,
    encode_performative,
    parse_frame,
    parse_performative,
)
from tests.amqp_ws.conftest import (
    HUBS,
    NAMESPACE,
    RECORDED,
    WRONG_KEY,
    Through,
    bounded,
    start_keyless,
    wrong_key_connection_string,
)
from tests.amqp_ws.recorder import RecordingWebSocket
from tests.support.azurite import TestPKI
from tests.support.fake_namespace import FakeNamespace
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token

pytestmark = pytest.mark.e2e


def put_tokens(fake: FakeNamespace, since: int = 0) -> list[dict]:
    return fake.events("put_token")[since:]


async def send_and_receive(connection_string: str, queue: str, body: str,
                           **options: object) -> list[str]:
    client = ServiceBusClient.from_connection_string(
        connection_string, transport_type=TransportType.AmqpOverWebsocket, retry_total=0,
        **options)
    async with client:
        async with client.get_queue_sender(queue) as sender:
            await sender.send_messages(ServiceBusMessage(body))
        async with client.get_queue_receiver(queue, max_wait_time=10) as receiver:  # peek-lock
            received = await receiver.receive_messages(max_message_count=1, max_wait_time=10)
            for message in received:
                await receiver.complete_message(message)  # waits for the service's outcome
    return [str(message) for message in received]


def test_queue_send_and_receive_with_a_wrong_key(through: Through) -> None:
    fake = through.fakes[NAMESPACE]
    seen = len(put_tokens(fake))
    converted = through.logins("converted")
    body = f"order-{uuid.uuid4()}"
    received = bounded(send_and_receive(wrong_key_connection_string(), "orders", body,
                                        **through.proxy_options()))
    assert received == [body]
    tokens = put_tokens(fake, seen)
    assert tokens, "the SDK sent no put-token"
    assert all(t["token_kind"] == "jwt" and t["accepted"] for t in tokens), tokens
    assert {t["audience"] for t in tokens} == {f"sb://{NAMESPACE}/orders"}
    upgrades = fake.events("websocket")
    assert upgrades and all(u["accepted"] for u in upgrades)
    assert all(o["hostname"] == NAMESPACE for o in fake.events("open"))
    # one per put-token the service accepted (sender and receiver each send one)
    assert through.logins("converted") == converted + len(tokens)
    through.assert_no_secrets_logged()


def test_the_fake_refuses_the_apps_own_sas(tmp_path: Path, fakes: dict[str, FakeNamespace],
                                           pki: TestPKI) -> None:
    """Calibration: without keyless the same app, its wrong key and the same wss port fail."""
    fake = fakes[NAMESPACE]
    seen = len(put_tokens(fake))
    with pytest.raises(ServiceBusError):
        bounded(send_and_receive(
            wrong_key_connection_string(), "orders", "direct",
            custom_endpoint_address=f"sb://127.0.0.1:{fake.wss_port}",
            connection_verify=pki.ca_pem_path))
    tokens = put_tokens(fake, seen)
    assert tokens and all(t["token_kind"] == "sas" and not t["accepted"] for t in tokens)


def test_without_a_token_the_app_hears_why_and_no_sas_leaves(
        tmp_path: Path, pki: TestPKI, fakes: dict[str, FakeNamespace]) -> None:
    fake = fakes[NAMESPACE]
    seen = len(put_tokens(fake))
    with FakeIdentityEndpoint(mode="error") as broken:
        running = start_keyless(tmp_path / "keyless", pki, broken, fakes,
                                "--token-timeout", "3")
        try:
            with pytest.raises(ServiceBusError) as raised:
                bounded(send_and_receive(wrong_key_connection_string(), "orders", "never",
                                         **running.proxy_options()))
            assert running.logins("token_unavailable") >= 1
            assert running.logins("converted") == 0
            running.assert_no_secrets_logged()
        finally:
            running.keyless.stop()
    assert isinstance(raised.value, ServiceBusAuthenticationError)
    # what the app logs: the put-token reply's description, which keyless wrote
    said = str(raised.value.inner_exception)  # type: ignore[attr-defined]
    assert "KeylessTokenUnavailable: no token for scope https://servicebus.azure.net" in said
    tokens = put_tokens(fake, seen)
    assert all(t["token_kind"] != "sas" for t in tokens), tokens
    assert not any(t["accepted"] for t in tokens)


async def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def header_then(through: Through, recorder: RecordingWebSocket,
                      then: bytes) -> list[tuple[object, object]]:
    """A raw AMQP-over-WebSocket client through keyless: a valid protocol header, then (once
    it arrived) `then`. Returns what came back (type, data)."""
    context = ssl.create_default_context(cafile=through.keyless.ca_path)
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"wss://{RECORDED}/$servicebus/websocket", protocols=["AMQPWSB10"],
            proxy=through.keyless.proxy_url, ssl=context) as ws:
        await ws.send_bytes(SASL_HEADER)
        await wait_until(lambda: bool(recorder.recorded()))
        await ws.send_bytes(then)
        seen: list[tuple[object, object]] = []
        for _ in range(10):
            received = await ws.receive(timeout=10)
            seen.append((received.type, received.data))
            if received.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                 aiohttp.WSMsgType.ERROR):
                break
        await wait_until(lambda: len(recorder.recorded()) > 1, 1.0)  # nothing more comes
        return seen


SASL_HEADER = b"AMQP\x03\x01\x00\x00"


def test_bytes_that_are_not_amqp_close_the_websocket_and_go_no_further(
        through: Through) -> None:
    recorder = through.fakes[RECORDED]
    before, upgrades = len(recorder.recorded()), len(recorder.upgrades)
    failed = through.logins("client_error")
    # a "frame" of 0x20202020 bytes, which the converter refuses
    seen = bounded(header_then(through, recorder, b"    garbage"), 30)
    assert [kind for kind, _ in seen] in ([aiohttp.WSMsgType.CLOSE],
                                          [aiohttp.WSMsgType.CLOSED]), seen
    assert recorder.upgrades[upgrades:] == ["/$servicebus/websocket"]
    assert recorder.recorded()[before:] == [SASL_HEADER]  # the header went on; nothing after
    assert through.logins("client_error") == failed + 1


async def send_only(connection_string: str, entity: str, body: str, **options: object) -> None:
    client = ServiceBusClient.from_connection_string(
        connection_string, transport_type=TransportType.AmqpOverWebsocket, retry_total=0,
        **options)
    async with client, client.get_queue_sender(entity) as sender:
        await sender.send_messages(ServiceBusMessage(body))


def test_an_event_hubs_namespace_gets_event_hubs_tokens(through: Through) -> None:
    """A route says the namespace is Event Hubs: every put-token gets an Event Hubs token
    (the fake checks aud = https://eventhubs.azure.net for its event hub), whatever the AMQP
    client: here azure-servicebus's (azure-eventhub's: test_e2e_eventhubs.py)."""
    fake = through.fakes[HUBS]
    seen, sent = len(put_tokens(fake)), len(fake.events("transfer"))
    bounded(send_only(wrong_key_connection_string(HUBS), "telemetry", "reading",
                      **through.proxy_options()))
    tokens = put_tokens(fake, seen)
    assert tokens and all(t["token_kind"] == "jwt" and t["accepted"] for t in tokens), tokens
    assert {t["audience"] for t in tokens} == {f"sb://{HUBS}/telemetry"}
    assert [t["entity"] for t in fake.events("transfer")[sent:]] == ["telemetry"]
    assert through.identity.calls_for("https://eventhubs.azure.net")


def test_audit_forwards_the_apps_sas_and_reports_the_namespace(
        tmp_path: Path, pki: TestPKI, module_identity: FakeIdentityEndpoint) -> None:
    """--audit changes nothing (the app's own, valid SAS reaches a namespace with local auth)
    and `keyless report` learns the namespace still gets SAS tokens over AMQP."""
    audited_ns = "keylessaudit.servicebus.windows.net"
    fake = FakeNamespace(tmp_path / "fake", pki, audited_ns, local_auth=True).start()
    try:
        running = start_keyless(tmp_path / "keyless", pki, module_identity,
                                {audited_ns: fake}, "--audit")
        try:
            body = f"audited-{uuid.uuid4()}"
            received = bounded(send_and_receive(fake.connection_string(), "orders", body,
                                                **running.proxy_options()))
            audited = running.logins("audited")
            converted = running.logins("converted")
            status, text = running.keyless.get("/report")
            running.assert_no_secrets_logged()
        finally:
            running.keyless.stop()
    finally:
        fake.stop()
    assert received == [body]
    tokens = fake.events("put_token")
    assert tokens and all(t["token_kind"] == "sas" and t["accepted"] for t in tokens), tokens
    connections = len(fake.events("websocket"))  # the sender's and the receiver's
    assert audited == connections and converted == 0  # once per connection
    assert status == 200
    inventory = {item["resource"]: item for item in json.loads(text)["inventory"]}
    namespace = inventory["keylessaudit"]
    assert namespace["service"] == "servicebus"
    assert namespace["schemes"] == {"SharedAccessSignature": connections}
    assert namespace["local_auth_can_be_disabled"] is False
    assert "sig=" not in text and "RootManageSharedAccessKey" not in text


def test_node_service_bus_app_over_websockets_with_a_wrong_key(through: Through) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed: apt-get install nodejs, then npm ci"
    fake = through.fakes[NAMESPACE]
    seen = len(put_tokens(fake))
    body = f"node-order-{uuid.uuid4()}"
    done = subprocess.run(
        [node, str(Path(__file__).with_name("servicebus_ws_app.mjs")),
         wrong_key_connection_string(), "orders", body, through.keyless.proxy_url],
        capture_output=True, text=True, timeout=90, cwd=Path(__file__).parent,
        env={**os.environ, "NODE_EXTRA_CA_CERTS": through.keyless.ca_path})
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"received": [body]}
    tokens = put_tokens(fake, seen)
    assert tokens and all(t["token_kind"] == "jwt" and t["accepted"] for t in tokens), tokens


def test_a_large_message_crosses_many_frames_and_websocket_messages(through: Through) -> None:
    body = "x" * 700_000  # over the fake's 256 KiB max-frame-size: several transfer frames
    received = bounded(send_and_receive(wrong_key_connection_string(), "orders", body,
                                        **through.proxy_options()))
    assert received == [body]


def test_a_token_the_service_refuses_reaches_the_app_as_the_services_answer(
        tmp_path: Path, pki: TestPKI, fakes: dict[str, FakeNamespace]) -> None:
    fake = fakes[NAMESPACE]
    seen = len(put_tokens(fake))
    with FakeIdentityEndpoint() as identity:
        # a well-signed token for another audience: the namespace refuses it (401)
        identity.queue_tokens("https://servicebus.azure.net",
                              make_token("https://storage.azure.com"))
        running = start_keyless(tmp_path / "keyless", pki, identity, fakes)
        try:
            with pytest.raises(ServiceBusAuthenticationError) as raised:
                bounded(send_only(wrong_key_connection_string(), "orders", "refused",
                                  **running.proxy_options()))
            refused = running.logins("upstream_refused")
            converted = running.logins("converted")
            running.assert_no_secrets_logged()
            assert "Azure Service Bus Data Sender" in running.keyless.log()  # the fix
        finally:
            running.keyless.stop()
    assert "Status code: 401" in str(raised.value.inner_exception)  # type: ignore[attr-defined]
    tokens = put_tokens(fake, seen)
    assert tokens and all(t["token_kind"] == "jwt" and not t["accepted"] for t in tokens)
    assert refused == len(tokens) and converted == 0



def test_a_sasl_login_with_the_key_is_answered_by_keyless_and_never_forwarded(
        through: Through) -> None:
    """SASL PLAIN carries the key itself: keyless answers it (auth failed) over the
    WebSocket and closes; the key never reaches the service."""
    recorder = through.fakes[RECORDED]
    before = len(recorder.recorded())
    failed = through.logins("client_error")
    plain = encode_frame(FRAME_SASL, 0, encode_performative(
        "sasl-init", [Symbol("PLAIN"), b"\x00RootManageSharedAccessKey\x00" + WRONG_KEY.encode()]))
    seen = bounded(header_then(through, recorder, plain), 30)
    kinds = [kind for kind, _ in seen]
    assert kinds[0] == aiohttp.WSMsgType.BINARY and kinds[-1] in (
        aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), seen
    outcome = parse_performative(parse_frame(seen[0][1]))
    assert outcome.name == "sasl-outcome" and outcome.field(0).value == 1  # auth failed
    assert recorder.recorded()[before:] == [SASL_HEADER]  # the header only: no key
    assert through.logins("client_error") == failed + 1


def test_node_event_hubs_app_over_websockets_with_a_wrong_key(through: Through) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed: apt-get install nodejs, then npm ci"
    fake = through.fakes[HUBS]
    seen, attached = len(put_tokens(fake)), len(fake.events("attach"))
    body = f"reading-{uuid.uuid4()}"
    done = subprocess.run(
        [node, str(Path(__file__).with_name("eventhubs_ws_app.mjs")),
         wrong_key_connection_string(HUBS, "telemetry"), body,
         through.keyless.proxy_url],
        capture_output=True, text=True, timeout=90, cwd=Path(__file__).parent,
        env={**os.environ, "NODE_EXTRA_CA_CERTS": through.keyless.ca_path})
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in result and result["sent"] is True, result
    tokens = put_tokens(fake, seen)
    # Event Hubs JWTs (the fake checks aud=https://eventhubs.azure.net), for the partition
    # sender and the consumer group's partition receiver
    assert tokens and all(t["token_kind"] == "jwt" and t["accepted"] for t in tokens), tokens
    assert {t["audience"] for t in tokens} >= {
        f"sb://{HUBS}/telemetry/Partitions/1",
        f"sb://{HUBS}/telemetry/ConsumerGroups/$Default/Partitions/1"}
    attaches = [e for e in fake.events("attach")[attached:] if "Partitions/1" in e["address"]]
    assert attaches and all(e["accepted"] for e in attaches), attaches
    assert body in result["received"], result  # sent to partition 1, read back from it
