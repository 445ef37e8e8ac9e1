"""A Java Service Bus app (azure-messaging-servicebus, tests/apps/java/servicebus) with a
WRONG key, through the real keyless process to the fake namespace, which accepts only the
identity's Entra tokens (local auth disabled: SAS refused).

- local endpoint: `Endpoint=sb://localhost:PORT;...;UseDevelopmentEmulator=true`, keyless'
  `--reverse PORT=amqps://NS` listener;
- calibration: the same app and key straight at the namespace (through a bare TLS relay),
  or through keyless in --audit, is refused;
- transparent mode: the JVM in a network namespace as its own UID, its ordinary connection
  string (`Endpoint=sb://NS.servicebus.windows.net/`), port 5671 redirected to keyless by the
  rules `keyless iptables` prints, trusting keyless' CA through a truststore in
  JAVA_TOOL_OPTIONS (as tests/listeners/test_transparent_amqp.py does for Python).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.amqp.conftest import KEY_NAME, NAMESPACE, WRONG_KEY, Through, start_keyless
from tests.amqp_ws.conftest import start_keyless as start_ws_keyless
from tests.support.azurite import TestPKI, free_port
from tests.support.fake_namespace import FakeNamespace, sas_token
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.jvm import MavenApp, java_truststore, maven_app
from tests.support.netns import (
    NamespacePod,
    splice,
    start_fake_namespace,
    transparent_pod,
)

pytestmark = pytest.mark.e2e
MAIN = "keyless.LegacyServiceBusApp"
APP_TIMEOUT = 150  # seconds; the app's own watchdog ends it at 100 s


@pytest.fixture(scope="module")
def java_app() -> MavenApp:
    return maven_app("servicebus")


def run_java(app: MavenApp, connection_string: str, entity: str, count: int = 2,
             *jvm_args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run([*app.command(MAIN, *jvm_args), entity, str(count)],
                          capture_output=True, text=True, timeout=APP_TIMEOUT,
                          env={"PATH": "/usr/bin:/bin", **(env or {}),
                               "SERVICEBUS_CONNECTION_STRING": connection_string})
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, done.stdout + done.stderr[-4000:]
    result: dict[str, Any] = json.loads(lines[-1])
    result["stderr"] = done.stderr[-4000:]
    return result


def puts_since(namespace: FakeNamespace, before: int) -> list[dict[str, Any]]:
    return namespace.events("put_token")[before:]


def connections_metric(through: Through) -> float:
    return through.keyless.metric("keyless_listener_connections_total", protocol="amqp")


def test_java_queue_round_trip_through_the_local_endpoint(java_app: MavenApp,
                                                          through: Through) -> None:
    before = len(through.namespace.events("put_token"))
    attaches = len(through.namespace.events("attach"))
    opens = len(through.namespace.events("open"))
    converted = through.logins("converted")
    connections = connections_metric(through)
    relayed = through.keyless.metric("keyless_listener_bytes_total", direction="to_client")

    result = run_java(java_app, through.connection_string(), "orders", 3)

    assert result["ok"], json.dumps(result, indent=1)
    assert sorted(result["received_ids"]) == sorted(result["sent"]) and len(result["sent"]) == 3
    assert sorted(result["received"]) == sorted(f"body of {id_}" for id_ in result["sent"])
    puts = puts_since(through.namespace, before)
    assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
    # the Java SDK's audience form, with the local host:port rewritten to the namespace
    assert {p["audience"] for p in puts} == {f"amqp://{NAMESPACE}/orders"}, puts
    assert {e["hostname"] for e in through.namespace.events("open")[opens:]} == {NAMESPACE}
    # keyless' metrics: one login converted per put-token, the sender's and the receiver's
    # connections, and the messages relayed back
    assert through.logins("converted") >= converted + len(puts) >= converted + 2
    assert connections_metric(through) >= connections + 2
    assert through.keyless.metric("keyless_listener_bytes_total",
                                  direction="to_client") > relayed
    attached = [e for e in through.namespace.events("attach")[attaches:]
                if e.get("entity") == "orders"]
    assert {e["role"] for e in attached} == {"sender", "receiver"}, attached
    assert all(e["accepted"] for e in attached), attached
    log = through.keyless.log()
    assert "sig=" not in log and "SharedAccessSignature" not in log and WRONG_KEY not in log
    assert "sig=" not in through.keyless.metrics()


def test_java_topic_subscription_through_the_local_endpoint(java_app: MavenApp,
                                                            through: Through) -> None:
    before = len(through.namespace.events("put_token"))
    result = run_java(java_app, through.connection_string(), "events/audit", 2)
    assert result["ok"], json.dumps(result, indent=1)
    assert sorted(result["received_ids"]) == sorted(result["sent"])
    puts = puts_since(through.namespace, before)
    assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
    assert {p["audience"] for p in puts} == {f"amqp://{NAMESPACE}/events",
                                             f"amqp://{NAMESPACE}/events/subscriptions/audit"}


def test_java_app_with_a_ready_made_sas_in_its_connection_string(java_app: MavenApp,
                                                                  through: Through) -> None:
    """`SharedAccessSignature=...` instead of a key (apps handed a SAS, not the key): the SDK
    puts that SAS in its put-tokens as it is; keyless converts them the same way."""
    sas = sas_token(f"sb://localhost:{through.port}/orders", key=WRONG_KEY)
    before = len(through.namespace.events("put_token"))
    result = run_java(java_app, f"Endpoint=sb://localhost:{through.port};"
                      f"SharedAccessSignature={sas};UseDevelopmentEmulator=true", "orders", 1)
    assert result["ok"], json.dumps(result, indent=1)
    puts = puts_since(through.namespace, before)
    assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
    signature = sas.split("sig=", 1)[1].split("&", 1)[0]
    assert signature not in through.keyless.log() and "sig=" not in through.keyless.log()


def test_java_processor_client_through_the_local_endpoint(java_app: MavenApp,
                                                          through: Through) -> None:
    """ServiceBusProcessorClient (what Spring-style apps use): completes in its callback."""
    before = len(through.namespace.events("put_token"))
    result = run_java(java_app, through.connection_string(), "orders", 2,
                      env={"SERVICEBUS_RECEIVER": "processor"})
    assert result["ok"], json.dumps(result, indent=1)
    assert sorted(result["received_ids"]) == sorted(result["sent"])
    puts = puts_since(through.namespace, before)
    assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts


def test_java_session_receiver_through_the_local_endpoint(java_app: MavenApp,
                                                          through: Through) -> None:
    """A session queue: the messages carry a session id, a session receiver accepts it (the
    attach's com.microsoft:session-filter passes keyless unchanged)."""
    settled = len(through.namespace.events("settled"))
    result = run_java(java_app, through.connection_string(), "sessions", 2,
                      env={"SERVICEBUS_RECEIVER": "session"})
    assert result["ok"], json.dumps(result, indent=1)
    assert sorted(result["received_ids"]) == sorted(result["sent"])
    done = [e for e in through.namespace.events("settled")[settled:]
            if e["entity"] == "sessions"]
    assert [e["outcome"] for e in done] == ["accepted", "accepted"], done


def test_java_app_sees_keyless_failure_when_no_token_can_be_had(
        java_app: MavenApp, tmp_path: Path, fake_namespace: FakeNamespace) -> None:
    """The identity endpoint is down: the put-token still goes upstream (no SAS), refused;
    the Java SDK's exception carries keyless' description."""
    with FakeIdentityEndpoint(mode="error") as down:
        running = start_keyless(tmp_path / "keyless", fake_namespace, down, wait_ready=False)
        try:
            before = len(fake_namespace.events("put_token"))
            result = run_java(java_app, running.connection_string(), "orders", 1)
            assert not result["ok"] and not result["sent"], json.dumps(result, indent=1)
            assert "KeylessTokenUnavailable: " in result["error"], result["error"]
            after = puts_since(fake_namespace, before)
            assert after and not any(p["token_kind"] == "sas" or p["accepted"] for p in after)
            assert running.logins("token_unavailable") >= 1
            assert "sig=" not in running.keyless.log() and WRONG_KEY not in running.keyless.log()
        finally:
            running.keyless.stop()

class TlsRelay:
    """Plain TCP on 127.0.0.1:port, relayed over verified TLS to the fake namespace: what a
    `UseDevelopmentEmulator=true` client (plain AMQP) needs to reach the fake (AMQPS only)
    with nothing in between that knows AMQP."""

    def __init__(self, namespace: FakeNamespace) -> None:
        self.port = free_port()
        self.upstream = namespace.amqps_port
        self.context = ssl.create_default_context(cafile=namespace.ca_pem_path)
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="tls-relay").start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                app, _ = self._listener.accept()
            except OSError:
                continue
            raw = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            service = self.context.wrap_socket(raw, server_hostname=NAMESPACE)
            splice(app, service)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()

    def connection_string(self, key: str) -> str:
        return (f"Endpoint=sb://localhost:{self.port};SharedAccessKeyName={KEY_NAME};"
                f"SharedAccessKey={key};UseDevelopmentEmulator=true")


@contextlib.contextmanager
def straight_to(workdir: Path, pki: TestPKI) -> Iterator[tuple[FakeNamespace, TlsRelay]]:
    """A fake namespace reached without keyless. Its name checks are off (the app names
    `localhost`, which only keyless rewrites); every token check stays on."""
    with FakeNamespace(workdir, pki, NAMESPACE,
                       checks={"check_hostname": False, "check_audience_host": False}
                       ) as namespace:
        relay = TlsRelay(namespace)
        try:
            yield namespace, relay
        finally:
            relay.close()


def test_calibration_the_same_app_straight_at_the_namespace_is_refused(
        java_app: MavenApp, tmp_path: Path, pki: TestPKI) -> None:
    with straight_to(tmp_path / "ns", pki) as (namespace, relay):
        result = run_java(java_app, relay.connection_string(WRONG_KEY), "orders", 1)
        assert not result["ok"] and not result["received_ids"], json.dumps(result, indent=1)
        puts = namespace.events("put_token")
        assert puts and all(p["token_kind"] == "sas" and not p["accepted"] for p in puts), puts
        assert {p["reason"] for p in puts} == {"local authentication (SAS) is disabled"}
        assert not namespace.events("transfer")


def test_calibration_keyless_audit_mode_forwards_the_java_sas_which_is_refused(
        java_app: MavenApp, tmp_path: Path, fake_namespace: FakeNamespace,
        module_identity: FakeIdentityEndpoint) -> None:
    """The same app and connection string through keyless in --audit (nothing converted,
    every check of the fake on): the namespace refuses the SDK's own SAS."""
    running = start_keyless(tmp_path / "keyless", fake_namespace, module_identity, "--audit")
    try:
        before = len(fake_namespace.events("put_token"))
        result = run_java(java_app, running.connection_string(), "orders", 1)
        assert not result["ok"] and not result["received_ids"], json.dumps(result, indent=1)
        puts = puts_since(fake_namespace, before)
        assert puts and all(p["token_kind"] == "sas" and not p["accepted"] for p in puts), puts
        assert running.logins("audited") >= 1 and running.logins("converted") == 0
    finally:
        running.keyless.stop()


# -- transparent mode ---------------------------------------------------------------------

POD_ADDRESS, AZURE_ADDRESS = "10.200.14.1", "10.200.14.2"
LEGACY = (f"Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName={KEY_NAME};"
          f"SharedAccessKey={WRONG_KEY}")


class Pod(NamespacePod):
    app: MavenApp
    keyless_truststore: Path  # cacerts + keyless' CA
    namespace_truststore: Path  # cacerts + the test CA that signed the fake's certificate

    def run(self, truststore: Path, entity: str = "orders") -> dict[str, Any]:
        options = (f"-Djavax.net.ssl.trustStore={truststore} "
                   "-Djavax.net.ssl.trustStorePassword=changeit -XX:-UsePerfData")
        return self.run_app(*self.app.command(MAIN), entity, "2", timeout=APP_TIMEOUT,
                            env={"SERVICEBUS_CONNECTION_STRING": LEGACY,
                                 "JAVA_TOOL_OPTIONS": options})


@pytest.fixture(scope="module")
def pod(java_app: MavenApp) -> Iterator[Pod]:
    with transparent_pod("jsb", POD_ADDRESS, [AZURE_ADDRESS], {NAMESPACE: AZURE_ADDRESS},
                         kind=Pod) as pod:
        pod.app = java_app
        start_fake_namespace(pod, AZURE_ADDRESS, NAMESPACE)
        keyless = pod.start_keyless(
            "--set", f"ssl_verify_upstream_trusted_ca={pod.pki.ca_pem_path}",
            "--token-timeout", "5")
        stores = []
        for name, ca in (("keyless", keyless.ca_path), ("namespace", pod.pki.ca_pem_path)):
            store = java_truststore(ca, pod.app_dir / f"{name}-truststore.p12")
            store.chmod(0o644)
            stores.append(store)
        pod.keyless_truststore, pod.namespace_truststore = stores
        yield pod


def test_transparent_calibration_without_the_rules_the_namespace_refuses_the_sas(
        pod: Pod) -> None:
    pod.pod.flush_nat()
    before = len(pod.fake.events("put_token"))
    result = pod.run(pod.namespace_truststore)  # the app as it was, straight there
    assert not result["ok"] and not result["received_ids"], json.dumps(result, indent=1)
    seen = puts_since(pod.fake, before)
    assert seen and all(p["token_kind"] == "sas" and not p["accepted"] for p in seen), seen


def test_transparent_the_unchanged_java_app_sends_and_receives_with_a_token(pod: Pod) -> None:
    pod.redirect()
    assert "--dport 5671 -j REDIRECT" in pod.rules
    before = len(pod.fake.events("put_token"))
    arrived = pod.upstream.forwarder.connections

    result = pod.run(pod.keyless_truststore)

    assert result["ok"], (json.dumps(result, indent=1), pod.keyless.log()[-4000:])
    assert sorted(result["received_ids"]) == sorted(result["sent"]) and result["sent"]
    seen = puts_since(pod.fake, before)
    assert seen and all(p["accepted"] and p["token_kind"] == "jwt" for p in seen), seen
    assert pod.upstream.forwarder.connections > arrived  # through keyless, not looped back to it
    assert pod.keyless.metric("keyless_listener_logins_total", protocol="amqp",
                              result="converted") >= 2
    assert WRONG_KEY not in pod.keyless.log()


# -- AMQP over WebSockets through forward (proxy) mode ---------------------------------------


def test_java_amqp_over_websockets_through_keyless_as_its_proxy(
        java_app: MavenApp, tmp_path: Path, pki: TestPKI,
        module_identity: FakeIdentityEndpoint) -> None:
    """AmqpTransportType.AMQP_WEB_SOCKETS with the JVM's proxy system properties naming
    keyless (regular proxy mode) and a truststore with keyless' CA; the ordinary connection
    string, a WRONG key. keyless converts the put-tokens inside the WebSocket."""
    with FakeNamespace(tmp_path / "ns", pki, NAMESPACE) as namespace:
        running = start_ws_keyless(tmp_path / "keyless", pki, module_identity,
                                   {NAMESPACE: namespace})
        try:
            store = java_truststore(running.keyless.ca_path, tmp_path / "truststore.p12")
            result = run_java(
                java_app, LEGACY, "orders", 2,
                f"-Djavax.net.ssl.trustStore={store}",
                "-Djavax.net.ssl.trustStorePassword=changeit",
                "-Dhttps.proxyHost=127.0.0.1", f"-Dhttps.proxyPort={running.keyless.port}",
                env={"SERVICEBUS_TRANSPORT": "AMQP_WEB_SOCKETS"})
            assert result["ok"], json.dumps(result, indent=1)
            assert sorted(result["received_ids"]) == sorted(result["sent"])
            puts = namespace.events("put_token")
            assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
            assert {e["transport"] for e in namespace.events("open")} == {"wss"}
            assert running.logins("converted") >= 2
            running.assert_no_secrets_logged()
            assert WRONG_KEY not in running.keyless.log()
        finally:
            running.keyless.stop()
