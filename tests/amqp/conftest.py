"""Fixtures of the AMQP tests: the fake namespace (tests/support/fake_namespace.py, on rhea),
the e2e suite's PKI and identity endpoints, and the real keyless with a
`--reverse PORT=amqps://NS` listener whose upstream is the fake namespace."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import identity, module_identity, pki
from tests.support.azurite import TestPKI, free_port
from tests.support.fake_namespace import FakeNamespace
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess

__all__ = ["identity", "module_identity", "pki"]

NAMESPACE = "keylessbus.servicebus.windows.net"
KEY_NAME = "RootManageSharedAccessKey"
WRONG_KEY = "d3JvbmcgU0FTIGtleSBmcm9tIHRoZSBhcHAgISEhISE="  # the legacy app's (wrong) key


@dataclass
class Through:
    """keyless with an AMQP listener in front of the fake namespace."""

    keyless: KeylessProcess
    port: int
    namespace: FakeNamespace
    identity: FakeIdentityEndpoint

    def connection_string(self, key: str = WRONG_KEY, entity: str | None = None) -> str:
        text = (f"Endpoint=sb://localhost:{self.port};SharedAccessKeyName={KEY_NAME};"
                f"SharedAccessKey={key};UseDevelopmentEmulator=true")
        return text + (f";EntityPath={entity}" if entity else "")

    def logins(self, result: str) -> float:
        return self.keyless.metric("keyless_listener_logins_total", protocol="amqp",
                                   result=result)


def keyless_args(port: int, namespace: FakeNamespace, *extra: str) -> list[str]:
    return ["--reverse", f"{port}=amqps://{NAMESPACE}",
            "--connect-to", f"{NAMESPACE}:5671:127.0.0.1:{namespace.amqps_port}",
            "--set", f"ssl_verify_upstream_trusted_ca={namespace.ca_pem_path}", *extra]


def start_keyless(workdir: Path, namespace: FakeNamespace, identity: FakeIdentityEndpoint,
                  *extra: str, wait_ready: bool = True) -> Through:
    port = free_port()
    keyless = KeylessProcess(workdir, keyless_args(port, namespace, *extra),
                             identity.env()).start(wait_ready=wait_ready)
    return Through(keyless, port, namespace, identity)


@pytest.fixture(scope="module")
def fake_namespace(tmp_path_factory: pytest.TempPathFactory,
                   pki: TestPKI) -> Iterator[FakeNamespace]:
    with FakeNamespace(tmp_path_factory.mktemp("fake-namespace"), pki, NAMESPACE) as namespace:
        yield namespace


@pytest.fixture(scope="module")
def through(tmp_path_factory: pytest.TempPathFactory, fake_namespace: FakeNamespace,
            module_identity: FakeIdentityEndpoint) -> Iterator[Through]:
    running = start_keyless(tmp_path_factory.mktemp("keyless-amqp"), fake_namespace,
                            module_identity)
    try:
        yield running
    finally:
        running.keyless.stop()
