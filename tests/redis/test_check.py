"""`keyless check` with a --redis listener: a real login through the listener to the real
server with the identity's token (ok), and the server's refusal as one FAIL line."""

from __future__ import annotations

import pytest

from tests.listeners.test_check import run_check
from tests.redis.conftest import HOST, RESOURCE, keyless_args
from tests.support.azurite import free_port
from tests.support.entra import OBJECT_ID
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e


def test_check_logs_in_through_the_redis_listener(tmp_path, redis_server: RedisServer) -> None:
    port = free_port()
    with FakeIdentityEndpoint() as identity:
        token = make_token(RESOURCE, lifetime=3600)
        identity.queue_tokens(RESOURCE, token)
        redis_server.add_token_user(OBJECT_ID, token)
        ok = run_check(tmp_path, identity, *keyless_args(port, redis_server))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert f"ok   listener redis:{port} -> {HOST}:6380: logged in with the token" in ok.stdout
        # the next token is one no ACL user has: the server refuses it, check says so
        refused = run_check(tmp_path, identity, *keyless_args(port, redis_server))
    assert refused.returncode == 1
    line = next(line for line in refused.stdout.splitlines() if line.startswith("FAIL listener"))
    assert "WRONGPASS" in line, refused.stdout
    for issued in identity.issued:
        assert issued not in refused.stdout + refused.stderr + ok.stdout + ok.stderr
