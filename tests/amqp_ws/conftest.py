"""Fixtures of the AMQP-over-WebSocket tests: the fake namespace (rhea) on wss, the real
keyless process in regular proxy mode in front of it (--connect-to NS:443 → the fake's wss
port), and the real Python SDKs through keyless as their HTTP proxy, with a WRONG key."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.amqp_ws.recorder import RecordingWebSocket
from tests.e2e.conftest import module_identity, pki
from tests.support.azurite import TestPKI
from tests.support.fake_namespace import FakeNamespace
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess

__all__ = ["module_identity", "pki"]

NAMESPACE = "keylessbus.servicebus.windows.net"
HUBS = "keylesshubs.servicebus.windows.net"  # an Event Hubs namespace (a route says so)
RECORDED = "keylessrec.servicebus.windows.net"  # tests/amqp_ws/recorder.py behind it
WRONG_KEY = "d3JvbmcgYWNjZXNzIGtleSBmcm9tIHRoZSBhcHA="  # what the legacy app has
SDK_TIMEOUT = 60.0  # seconds for one SDK scenario, start to end


def wrong_key_connection_string(namespace: str = NAMESPACE, entity: str | None = None) -> str:
    text = (f"Endpoint=sb://{namespace}/;SharedAccessKeyName=RootManageSharedAccessKey;"
            f"SharedAccessKey={WRONG_KEY}")
    return text + (f";EntityPath={entity}" if entity else "")


def bounded[T](coroutine: Awaitable[T], timeout: float = SDK_TIMEOUT) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, timeout))  # type: ignore[arg-type]


@dataclass
class Through:
    """keyless (regular proxy mode) in front of the fake namespace(s)' wss port."""

    keyless: KeylessProcess
    fakes: dict[str, Any]  # namespace -> FakeNamespace (or RecordingWebSocket): a wss_port
    identity: FakeIdentityEndpoint

    def proxy_options(self) -> dict[str, Any]:
        """What an app gives the SDK: keyless as its HTTP proxy, keyless' CA as its trust."""
        return {"http_proxy": {"proxy_hostname": "http://127.0.0.1",
                               "proxy_port": self.keyless.port},
                "connection_verify": self.keyless.ca_path}

    def assert_no_secrets_logged(self) -> None:
        log = self.keyless.log()
        assert "sig=" not in log and "SharedAccessSignature sr" not in log
        assert "eyJ" not in log  # a JWT's (base64 JSON) start

    def logins(self, result: str) -> float:
        return self.keyless.metric("keyless_listener_logins_total", listener="websocket:443",
                                   protocol="amqp", result=result)


def start_fake(workdir: Path, pki: TestPKI, namespace: str = NAMESPACE) -> FakeNamespace:
    return FakeNamespace(workdir, pki, namespace).start()


def start_keyless(workdir: Path, pki: TestPKI, identity: FakeIdentityEndpoint,
                  fakes: dict[str, Any], *extra: str) -> Through:
    args = [arg for namespace, fake in fakes.items()
            for arg in ("--connect-to", f"{namespace}:443:127.0.0.1:{fake.wss_port}")]
    config = workdir / "keyless.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[[route]]\nhost = "{HUBS}"\nservice = "eventhubs"\n')
    keyless = KeylessProcess(workdir, [
        *args, "--config", str(config),
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}", *extra],
        identity.env()).start()
    return Through(keyless, fakes, identity)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[dict[str, Any]]:
    started: dict[str, Any] = {}
    try:
        started[NAMESPACE] = start_fake(tmp_path_factory.mktemp("fake-bus"), pki, NAMESPACE)
        started[HUBS] = start_fake(tmp_path_factory.mktemp("fake-hubs"), pki, HUBS)
        started[RECORDED] = RecordingWebSocket(pki, RECORDED).start()
        yield started
    finally:
        for running in reversed(started.values()):
            running.stop()


@pytest.fixture(scope="module")
def through(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
            module_identity: FakeIdentityEndpoint,
            fakes: dict[str, Any]) -> Iterator[Through]:
    running = start_keyless(tmp_path_factory.mktemp("keyless-amqp-ws"), pki, module_identity,
                            fakes)
    try:
        yield running
    finally:
        running.keyless.stop()
