"""A legacy Go azservicebus app (tests/apps/go/cmd/servicebus) with a WRONG key and
`UseDevelopmentEmulator=true`, through the real keyless process (`--reverse PORT=amqps://NS`),
to the fake namespace, which accepts only the identity's Entra tokens."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.amqp.conftest import KEY_NAME, NAMESPACE, WRONG_KEY, Through, start_keyless
from tests.support.fake_namespace import FakeNamespace
from tests.support.golang import go_app
from tests.support.identity_endpoint import FakeIdentityEndpoint

pytestmark = pytest.mark.e2e
MESSAGES = 3
SCRUBBED = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE",
            "SSL_CERT_DIR", "SERVICEBUS_CONNECTION_STRING")


@pytest.fixture(scope="module")
def servicebus_app() -> Path:
    return go_app("servicebus")


def run_app(app: Path, connection_string: str, prefix: str,
            **env: str) -> tuple[dict, subprocess.CompletedProcess[str]]:
    base = {k: v for k, v in os.environ.items() if k.upper() not in SCRUBBED}
    completed = subprocess.run(
        [str(app)], capture_output=True, text=True, timeout=90,
        env={**base, "SERVICEBUS_CONNECTION_STRING": connection_string,
             "SERVICEBUS_QUEUE": "orders", "SERVICEBUS_MESSAGES": str(MESSAGES),
             "SERVICEBUS_BODY_PREFIX": prefix, **env})
    lines = completed.stdout.strip().splitlines()
    assert lines, f"no output (exit {completed.returncode}):\n{completed.stderr}"
    return json.loads(lines[-1]), completed


def test_go_queue_round_trip_with_the_wrong_key(servicebus_app: Path, through: Through) -> None:
    prefix = f"go-order-{uuid.uuid4()}"
    converted = through.logins("converted")
    puts_before = len(through.namespace.events("put_token"))
    attach_before = len(through.namespace.events("attach"))
    open_before = len(through.namespace.events("open"))

    result, completed = run_app(servicebus_app, through.connection_string(), prefix)

    assert completed.returncode == 0 and result["ok"], (result, completed.stderr)
    assert result["received"] == result["sent"] == [f"{prefix}-{i}" for i in range(MESSAGES)]
    assert through.logins("converted") >= converted + 2  # sender and receiver put-tokens
    puts = through.namespace.events("put_token")[puts_before:]
    assert len(puts) >= 2 and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
    # The Go SDK names its audience with the scheme it dials (amqp:// under the emulator flag,
    # amqps:// otherwise); keyless puts the namespace in place of localhost:PORT.
    audiences = {p["audience"] for p in puts}
    assert f"amqp://{NAMESPACE}/orders" in audiences, audiences
    assert audiences <= {f"amqp://{NAMESPACE}/orders",
                         f"amqp://{NAMESPACE}/orders/$management"}, audiences
    # Go attaches bare entity names (no authority to rewrite) ...
    attached = {e["address"] for e in through.namespace.events("attach")[attach_before:]}
    assert {"$cbs", "orders"} <= attached and not any("localhost" in a for a in attached), \
        attached
    # ... and opens with hostname localhost:PORT, which keyless replaces with the namespace.
    opened = {e["hostname"] for e in through.namespace.events("open")[open_before:]}
    assert opened == {NAMESPACE}, opened
    log = through.keyless.log()
    assert WRONG_KEY not in log and "sig=" not in log


def test_same_go_app_with_its_sas_straight_at_the_namespace_is_refused(
        servicebus_app: Path, fake_namespace: FakeNamespace) -> None:
    # Calibration, straight: without UseDevelopmentEmulator the SDK speaks AMQPS. The
    # connection string names the namespace (the TLS name, which the fake's certificate
    # covers), the app's custom endpoint setting dials the fake's AMQPS port, SSL_CERT_FILE
    # trusts the test CA. The SAS the app signs with its key is refused (local auth off).
    before = len(fake_namespace.events("put_token"))
    result, completed = run_app(
        servicebus_app,
        f"Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={WRONG_KEY}",
        f"go-direct-{uuid.uuid4()}", SSL_CERT_FILE=fake_namespace.ca_pem_path,
        SERVICEBUS_CUSTOM_ENDPOINT=f"localhost:{fake_namespace.amqps_port}")

    assert completed.returncode == 1 and not result["ok"], (result, completed.stderr)
    puts = fake_namespace.events("put_token")[before:]
    assert puts and {p["token_kind"] for p in puts} == {"sas"}, (puts, result)
    assert not any(p["accepted"] for p in puts), puts
    assert result["code"] == "unauthorized" \
        or result["condition"] == "amqp:unauthorized-access", result


def test_same_go_app_with_its_own_sas_is_refused_by_the_namespace(
        servicebus_app: Path, tmp_path: Path, fake_namespace: FakeNamespace,
        module_identity: FakeIdentityEndpoint) -> None:
    # keyless --audit forwards the app's own SAS unchanged: the namespace refuses it, and
    # keyless counts an audited login, no conversion.
    running = start_keyless(tmp_path / "keyless", fake_namespace, module_identity, "--audit")
    try:
        before = len(fake_namespace.events("put_token"))
        result, completed = run_app(servicebus_app, running.connection_string(),
                                    f"go-audited-{uuid.uuid4()}")
        assert completed.returncode == 1 and not result["ok"], (result, completed.stderr)
        puts = fake_namespace.events("put_token")[before:]
        assert puts and {p["token_kind"] for p in puts} == {"sas"}, (puts, result)
        assert not any(p["accepted"] for p in puts), puts
        assert result["code"] == "unauthorized" \
            or result["condition"] == "amqp:unauthorized-access", result
        assert running.logins("audited") >= 1 and running.logins("converted") == 0
    finally:
        running.keyless.stop()


def test_go_sdk_verifies_tls_against_host_and_port_of_a_custom_endpoint(
        servicebus_app: Path, fake_namespace: FakeNamespace) -> None:
    # The Go SDK's own limit (docs/languages/go.md): with TLS and `Endpoint=sb://HOST:PORT/`
    # it passes "HOST:PORT" to go-amqp as the host name, which becomes the TLS server name,
    # so no certificate matches. Through keyless the app uses plain AMQP to localhost instead.
    result, completed = run_app(
        servicebus_app,
        f"Endpoint=sb://localhost:{fake_namespace.amqps_port}/;SharedAccessKeyName={KEY_NAME};"
        f"SharedAccessKey={WRONG_KEY}",
        f"go-direct-{uuid.uuid4()}", SSL_CERT_FILE=fake_namespace.ca_pem_path)
    assert completed.returncode == 1 and not result["ok"], (result, completed.stderr)
    assert (f"x509: certificate is valid for localhost, {NAMESPACE}, "
            f"not localhost:{fake_namespace.amqps_port}") in result["message"], result
