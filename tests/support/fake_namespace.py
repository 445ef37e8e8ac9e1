"""A fake Service Bus / Event Hubs namespace for the AMQP tests (tests/support/fake_namespace.mjs).

The namespace runs on rhea, an AMQP 1.0 implementation independent of the Azure SDKs and of
keyless, and enforces what the service enforces for an app using Entra tokens: SASL ANONYMOUS
or MSSBCBS; the open frame's hostname is the namespace; a valid CBS put-token within
`put_token_deadline` seconds or the connection is closed; the token a JWT signed by the tests'
issuer (tests/support/entra.py) with `iss`, `aud` (https://servicebus.azure.net, or
https://eventhubs.azure.net for the event hub) and `nbf`/`exp` right; the put-token audience's
host the namespace; SAS tokens refused (401) unless `local_auth`; an attach without a valid
token for its entity refused; links detached when their token expires.

It listens on AMQPS (TLS for `namespace`, a certificate from the test CA) and on AMQP over
WebSocket (wss, `/$servicebus/websocket`, subprotocol AMQPWSB10). `events()` tells what it saw,
one dict per event (never a token or a signature): "connection", "sasl", "open", "put_token"
(type, audience, token_kind, accepted, status, reason), "attach" (role, address, entity,
accepted, reason), "attach_refused", "transfer"/"delivered"/"settled" per message and entity,
"link_detached" (token expired), "connection_closed" (condition, reason), "management".

Entities: queues "orders" and "sessions" (requires-session), topic "events" with subscription
"audit", event hub "telemetry" with partitions "0" and "1" (consumer group $Default).

The `checks` keyword exists to mutation-test the calibration: disabling one enforcement must
make a calibration test fail.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import select
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any, Self

from cryptography.hazmat.primitives import serialization

from tests.support import entra
from tests.support.azurite import TestPKI

SCRIPT = Path(__file__).with_name("fake_namespace.mjs")
REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 20.0  # seconds
NODE_HINT = "Node.js 18+ is needed (apt-get install nodejs) and `npm ci` for rhea"
SAS_KEY_NAME = "RootManageSharedAccessKey"
SAS_KEY = base64.b64encode(b"keyless-fake-namespace-sas-key-0").decode()

# Each enforcement the fake can switch off (for mutation checks only).
CHECKS = ("check_signature", "check_issuer", "check_audience", "check_audience_host",
          "check_hostname", "check_attach", "check_expiry", "check_type", "enforce_deadline")


class FakeNamespaceError(RuntimeError):
    pass


def sas_token(resource: str, key_name: str = SAS_KEY_NAME, key: str = SAS_KEY,
              lifetime: int = 3600) -> str:
    """A SharedAccessSignature for `resource` as the SDKs make it."""
    expiry = int(time.time()) + lifetime
    encoded = urllib.parse.quote(resource, safe="")
    signature = base64.b64encode(hmac.new(key.encode(), f"{encoded}\n{expiry}".encode(),
                                          hashlib.sha256).digest()).decode()
    return (f"SharedAccessSignature sr={encoded}&sig={urllib.parse.quote(signature, safe='')}"
            f"&se={expiry}&skn={key_name}")


class FakeNamespace:
    def __init__(self, workdir: Path, pki: TestPKI,
                 namespace: str = "keylessbus.servicebus.windows.net", *,
                 local_auth: bool = False, token_lifetime_check: bool = True,
                 put_token_deadline: float = 20.0, record_transfers: bool = True,
                 checks: dict[str, bool] | None = None,
                 tls_names: tuple[str, ...] = ()) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.namespace = namespace
        self.local_auth = local_auth
        self.token_lifetime_check = token_lifetime_check
        self.put_token_deadline = put_token_deadline
        self.record_transfers = record_transfers
        self.tls_names = tls_names  # more names for the TLS certificate (other-namespace tests)
        unknown = set(checks or ()) - set(CHECKS)
        if unknown:
            raise ValueError(f"unknown checks {sorted(unknown)}; known: {CHECKS}")
        self.checks = {name: True for name in CHECKS} | (checks or {})
        self.event_log = self.workdir / "fake-namespace-events.jsonl"
        self.stderr_path = self.workdir / "fake-namespace.stderr"
        self.amqps_port = 0
        self.wss_port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def ca_pem_path(self) -> str:
        return self.pki.ca_pem_path

    def connection_string(self, key: str = SAS_KEY, key_name: str = SAS_KEY_NAME,
                          entity: str | None = None) -> str:
        text = f"Endpoint=sb://{self.namespace}/;SharedAccessKeyName={key_name};SharedAccessKey={key}"
        return text + (f";EntityPath={entity}" if entity else "")

    def start(self) -> Self:
        node = shutil.which("node")
        if node is None:
            raise FakeNamespaceError(f"node not found: {NODE_HINT}")
        if not (REPO / "node_modules" / "rhea").is_dir():
            raise FakeNamespaceError(f"node_modules/rhea missing: {NODE_HINT}")
        cert, key = self.pki.issue_server_cert(self.namespace, *self.tls_names)
        config = {
            "namespace": self.namespace,
            "amqps_port": self.amqps_port,
            "wss_port": self.wss_port,
            "cert": cert,
            "key": key,
            "public_key_pem": entra.PUBLIC_KEY.public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
            "issuer": entra.ISSUER,
            "local_auth": self.local_auth,
            "sas_keys": {SAS_KEY_NAME: SAS_KEY},
            "token_lifetime_check": self.token_lifetime_check,
            "put_token_deadline": self.put_token_deadline,
            "record_transfers": self.record_transfers,
            "event_log": str(self.event_log),
            **self.checks,
        }
        config_path = self.workdir / "fake-namespace.json"
        config_path.write_text(json.dumps(config))
        self.event_log.write_text("")
        with self.stderr_path.open("wb") as stderr:
            self._process = subprocess.Popen([node, str(SCRIPT), str(config_path)],
                                             stdout=subprocess.PIPE, stderr=stderr,
                                             cwd=REPO)
        assert self._process.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            ready, _, _ = select.select([self._process.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self._process.stdout.fileno(), 4096)
                if not chunk:
                    break
                line += chunk
        if not line.startswith(b"READY "):
            self.stop()
            raise FakeNamespaceError(f"fake namespace did not start: {line!r} "
                                     f"{self.stderr_path.read_text()[-2000:]}")
        ports = json.loads(line[6:])
        self.amqps_port, self.wss_port = ports["amqps_port"], ports["wss_port"]
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        lines = self.event_log.read_text().splitlines() if self.event_log.exists() else []
        found = [json.loads(line) for line in lines if line.strip()]
        return [e for e in found if kind is None or e["event"] == kind]

    def wait_for(self, kind: str, count: int = 1, timeout: float = 10.0,
                 **match: Any) -> list[dict[str, Any]]:
        """The events of `kind` matching `match`, once there are `count` (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(kind) if all(e.get(k) == v for k, v in match.items())]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def stderr_text(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""
