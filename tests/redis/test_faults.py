"""Faults around the Redis listener, through the real keyless process: no token at connect,
the server refusing the token, an upstream that resets, sends garbage or a 1 GiB length
prefix, an app that sends one. Each ends only its own connection, with a clear error and no
secret in it; another app keeps working through the same keyless."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.redis.conftest import HOST, RESOURCE, WRONG_KEY, Through, start_keyless
from tests.support.azurite import TestPKI, free_port
from tests.support.entra import OBJECT_ID
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e
FAKE_HOST = "faultycache.redis.cache.windows.net"


class FaultyUpstream:
    """A TLS server for FAKE_HOST that takes keyless' AUTH, then misbehaves as `mode` says:
    "reset" (RST on the first command), "garbage" (a reply no RESP parser accepts) or
    "huge" (a bulk reply announcing 1 GiB, then nothing)."""

    def __init__(self, pki: TestPKI) -> None:
        cert, key = pki.issue_server_cert(FAKE_HOST)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.mode = "reset"
        self.auths: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FaultyUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop:
            try:
                plain, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(plain,), daemon=True).start()

    def _one(self, plain: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            conn = self.context.wrap_socket(plain, server_side=True)
            conn.settimeout(10)
            self.auths.append(conn.recv(65536))  # keyless' AUTH <oid> <token>
            conn.sendall(b"+OK\r\n")
            conn.recv(65536)  # the app's first command
            if self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
            conn.sendall(b"?not RESP\r\n" if self.mode == "garbage" else b"$1073741824\r\n")
            conn.recv(65536)  # until keyless closes


@pytest.fixture(scope="module")
def faulty(pki: TestPKI) -> Iterator[FaultyUpstream]:
    with FaultyUpstream(pki) as server:
        yield server


@pytest.fixture(scope="module")
def two_listeners(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
                  faulty: FaultyUpstream) -> Iterator[tuple[Through, int]]:
    """keyless with a listener for the real server and one for the faulty upstream."""
    with FakeIdentityEndpoint() as identity:
        token = make_token(RESOURCE, lifetime=3600)
        identity.queue_tokens(RESOURCE, token)
        redis_server.add_token_user(OBJECT_ID, token)
        faulty_port = free_port()
        running = start_keyless(
            tmp_path_factory.mktemp("keyless-faults"), redis_server, identity,
            "--redis", f"{faulty_port}={FAKE_HOST}",
            "--connect-to", f"{FAKE_HOST}:6380:127.0.0.1:{faulty.port}")
        try:
            yield running, faulty_port
        finally:
            running.keyless.stop()


def no_secret_in(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


@pytest.mark.parametrize("mode", ["reset", "garbage", "huge"])
def test_a_misbehaving_upstream_ends_only_its_connection(
        two_listeners: tuple[Through, int], faulty: FaultyUpstream, mode: str) -> None:
    through, faulty_port = two_listeners
    healthy = through.client()
    assert healthy.set("before", mode)
    faulty.mode = mode
    rss_before = through.keyless.rss_bytes()
    app = redis.Redis(host="127.0.0.1", port=faulty_port, password=WRONG_KEY,
                      socket_timeout=10, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        app.get("k")
    assert through.keyless.rss_bytes() - rss_before < 64 * 1024 * 1024  # no 1 GiB buffer
    assert healthy.get("before") == mode.encode()  # the other connection is untouched
    assert through.client().get("before") == mode.encode()  # and new ones work
    assert faulty.auths and all(WRONG_KEY.encode() not in auth for auth in faulty.auths)
    assert all(auth.startswith(b"*3\r\n$4\r\nAUTH\r\n") for auth in faulty.auths)


def test_an_app_sending_a_1_gib_length_prefix_gets_a_protocol_error(
        two_listeners: tuple[Through, int]) -> None:
    through, _ = two_listeners
    rss_before = through.keyless.rss_bytes()
    client_errors = through.logins("client_error")
    with socket.create_connection(("127.0.0.1", through.port), timeout=10) as raw:
        raw.sendall(b"*2\r\n$3\r\nGET\r\n$1073741824\r\n" + b"x" * 65536)
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    assert answer.startswith(b"-ERR Protocol error: bulk length 1073741824 exceeds the limit")
    assert through.keyless.rss_bytes() - rss_before < 64 * 1024 * 1024
    assert through.logins("client_error") == client_errors + 1
    assert through.client().ping()


def test_no_token_at_connect_fails_the_first_command_and_closes(
        tmp_path: Path, redis_server: RedisServer) -> None:
    with FakeIdentityEndpoint(mode="error") as identity:
        running = start_keyless(tmp_path / "keyless", redis_server, identity)
        try:
            for password, username in ((WRONG_KEY, None), (WRONG_KEY, "default"), (None, None)):
                app = running.client(password, username=username)
                with pytest.raises(redis.RedisError) as failure:
                    app.get("k")
                text = str(failure.value)
                assert "KeylessTokenUnavailable" in text, text
                no_secret_in(text, WRONG_KEY)
            assert running.logins("token_unavailable") == 3
            token = make_token(RESOURCE, lifetime=3600)
            identity.queue_tokens(RESOURCE, token)
            redis_server.add_token_user(OBJECT_ID, token)
            identity.mode = "ok"  # the identity recovers: new connections log in
            assert running.client().ping()
        finally:
            running.keyless.stop()
        no_secret_in(running.keyless.log(), WRONG_KEY, *identity.issued)


def test_the_server_refusing_the_token_is_logged_with_the_fix(
        tmp_path: Path, redis_server: RedisServer) -> None:
    with FakeIdentityEndpoint() as identity:  # mints tokens no ACL user has: WRONGPASS
        running = start_keyless(tmp_path / "keyless", redis_server, identity)
        try:
            app = running.client()
            with pytest.raises(redis.AuthenticationError) as failure:
                app.set("k", "v")
            assert "WRONGPASS" in str(failure.value) or "invalid username-password" in \
                str(failure.value)
            assert running.logins("upstream_refused") == 1
            log = running.keyless.log()
            assert "az redis access-policy-assignment create" in log
            assert f"--object-id {OBJECT_ID}" in log
            no_secret_in(log + str(failure.value), WRONG_KEY, *identity.issued)
            assert HOST in log
        finally:
            running.keyless.stop()


def test_azure_managed_redis_port_10000_and_its_own_fix(tmp_path: Path, pki: TestPKI) -> None:
    managed = "keylessmanaged.westeurope.redis.azure.net"
    with RedisServer(tmp_path / "redis", pki, managed) as server, \
            FakeIdentityEndpoint() as identity:
        token = make_token(RESOURCE, lifetime=3600)
        identity.queue_tokens(RESOURCE, token)
        server.add_token_user(OBJECT_ID, token)
        port = free_port()
        running = start_keyless(  # no port given: Managed Redis listens on 10000
            tmp_path / "keyless", server, identity, "--redis", f"{port}={managed}",
            "--connect-to", f"{managed}:10000:127.0.0.1:{server.port}")
        try:
            app = redis.Redis(host="127.0.0.1", port=port, password=WRONG_KEY,
                              socket_timeout=10, retry=Retry(NoBackoff(), 0))
            assert app.execute_command("ACL", "WHOAMI") == OBJECT_ID.encode()
            server.delete_user(OBJECT_ID)  # the access policy assignment is gone
            with pytest.raises(redis.ConnectionError):
                app.ping()  # the server closed the connection of the deleted user
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(host="127.0.0.1", port=port, password=WRONG_KEY,
                            socket_timeout=10).ping()
            log = running.keyless.log()
            assert "az redisenterprise database access-policy-assignment create" in log
            assert f"--object-id {OBJECT_ID}" in log
            no_secret_in(log, WRONG_KEY, token)
        finally:
            running.keyless.stop()
