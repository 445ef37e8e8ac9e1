"""Operating the listeners with the real keyless and a real redis-server: readiness waits
for a listener's own identity's token, and SIGTERM drains open listener connections."""

from __future__ import annotations

import signal
import socket
import time

import pytest
import redis

from tests.redis.conftest import (
    RESOURCE,
    Through,
    identity,
    keyless_args,
    pki,
    redis_server,
    start_keyless,
)
from tests.support.azurite import free_port
from tests.support.entra import object_id_for
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.keyless import KeylessProcess

__all__ = ["identity", "pki", "redis_server"]
pytestmark = pytest.mark.e2e
LISTENER_CLIENT_ID = "5e5e5e5e-0000-4000-8000-0000000000aa"
SCOPE = RESOURCE + "/.default"


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_readiness_waits_for_the_listeners_own_identity(tmp_path, redis_server,
                                                        identity: FakeIdentityEndpoint):
    token = make_token(RESOURCE, LISTENER_CLIENT_ID)
    redis_server.add_token_user(object_id_for(LISTENER_CLIENT_ID), token)
    identity.mode = "error"
    port = free_port()
    keyless = KeylessProcess(tmp_path, keyless_args(
        port, redis_server, "--ready-scopes", SCOPE,
        listener=f"?client-id={LISTENER_CLIENT_ID}"), identity.env())
    through = Through(keyless.start(wait_ready=False), port, redis_server, identity)
    try:
        assert wait_for(lambda: len(identity.calls_for(RESOURCE)) >= 1)
        assert through.keyless.get("/readyz")[0] == 503  # its listener has no token yet
        identity.queue_tokens(RESOURCE, token)
        identity.mode = "ok"
        assert wait_for(lambda: through.keyless.get("/readyz")[0] == 200), \
            through.keyless.log()[-3000:]
        asked = {call["client_id"] for call in identity.calls_for(RESOURCE)}
        assert asked == {LISTENER_CLIENT_ID}  # the listener's identity, not the default one
        with through.client() as app:
            assert app.ping() is True
            assert app.execute_command("ACL", "WHOAMI").decode() == object_id_for(
                LISTENER_CLIENT_ID)
    finally:
        through.keyless.stop()


def test_sigterm_lets_open_connections_finish_then_exits(tmp_path, redis_server,
                                                         identity: FakeIdentityEndpoint):
    token = make_token(RESOURCE)
    identity.queue_tokens(RESOURCE, token)
    redis_server.add_token_user(object_id_for(None), token)
    through = start_keyless(tmp_path, redis_server, identity, "--drain-timeout", "120")
    process = through.keyless.process
    assert process is not None
    app = through.client()
    try:
        app.set("draining", "before")
        process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: through.keyless.get("/readyz")[0] == 503)
        # new connections are refused ...
        assert wait_for(lambda: _refused(through.port))
        # ... while the open one keeps working
        app.set("draining", "during")
        assert app.get("draining") == b"during"
        assert process.poll() is None
    finally:
        app.close()
    # the last connection closed: keyless exits without waiting out the drain timeout
    process.wait(timeout=60)
    assert process.returncode == 0
    assert "drain timeout" not in through.keyless.log()


def test_drain_timeout_cuts_a_connection_that_stays(tmp_path, redis_server,
                                                     identity: FakeIdentityEndpoint):
    token = make_token(RESOURCE)
    identity.queue_tokens(RESOURCE, token)
    redis_server.add_token_user(object_id_for(None), token)
    through = start_keyless(tmp_path, redis_server, identity, "--drain-timeout", "2")
    process = through.keyless.process
    assert process is not None
    app = through.client()
    try:
        app.set("stays", "open")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        assert "drain timeout" in through.keyless.log()
        with pytest.raises(redis.ConnectionError):
            app.get("stays")
    finally:
        app.close()


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(100) == b""
    except OSError:
        return True



