"""Fixtures of the Redis listener tests: a real redis-server with TLS for the Azure name, the
e2e suite's PKI and identity endpoints, and keyless with a --redis listener in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.e2e.conftest import identity, module_identity, pki
from tests.support.azurite import TestPKI, free_port
from tests.support.entra import OBJECT_ID
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.keyless import KeylessProcess
from tests.support.redis_server import RedisServer

__all__ = ["identity", "module_identity", "pki"]

HOST = "keylesscache.redis.cache.windows.net"
RESOURCE = "https://redis.azure.com"  # the App Service protocol's resource: scope minus /.default
WRONG_KEY = "d3JvbmcgYWNjZXNzIGtleSBmcm9tIHRoZSBhcHA="  # what the legacy app has as its key
pytestmark = pytest.mark.e2e


def keyless_args(listen_port: int, server: RedisServer, *extra: str,
                 listener: str = "") -> list[str]:
    return ["--redis", f"{listen_port}={HOST}{listener}",
            "--connect-to", f"{HOST}:6380:127.0.0.1:{server.port}",
            "--set", f"ssl_verify_upstream_trusted_ca={server.pki.ca_pem_path}", *extra]


@dataclass
class Through:
    """keyless with a --redis listener for the test server."""

    keyless: KeylessProcess
    port: int
    server: RedisServer
    identity: FakeIdentityEndpoint

    def client(self, password: str | None = WRONG_KEY, username: str | None = None,
               **kwargs: object) -> redis.Redis:
        """An app's redis-py client: plain TCP to the listener, with the app's (wrong) key."""
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))  # a dropped connection must show
        return redis.Redis(host="127.0.0.1", port=self.port, username=username,
                           password=password, socket_timeout=15, **kwargs)  # type: ignore[arg-type]

    def logins(self, result: str) -> float:
        return self.keyless.metric("keyless_listener_logins_total", protocol="redis",
                                   result=result)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis"), pki, HOST) as server:
        yield server


def start_keyless(workdir: Path, server: RedisServer, identity: FakeIdentityEndpoint,
                  *extra: str, listener: str = "") -> Through:
    port = free_port()
    keyless = KeylessProcess(workdir, keyless_args(port, server, *extra, listener=listener),
                             identity.env()).start()
    return Through(keyless, port, server, identity)


@pytest.fixture(scope="module")
def through(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
            module_identity: FakeIdentityEndpoint) -> Iterator[Through]:
    """keyless in front of the server; the identity's token is its ACL user's password."""
    token = make_token(RESOURCE, lifetime=3600)
    module_identity.queue_tokens(RESOURCE, token)
    redis_server.add_token_user(OBJECT_ID, token)
    running = start_keyless(tmp_path_factory.mktemp("keyless-redis"), redis_server,
                            module_identity)
    try:
        yield running
    finally:
        running.keyless.stop()
