"""The --redis listener under --workers 2: both workers bind the listener's port, and every
connection logs in with the one token the supervisor fetched for the pod."""

from __future__ import annotations

import pytest

from tests.redis.conftest import RESOURCE, WRONG_KEY, start_keyless
from tests.support.entra import OBJECT_ID
from tests.support.identity_endpoint import make_token

pytestmark = pytest.mark.e2e


def test_redis_listener_under_two_workers(tmp_path, redis_server, identity) -> None:
    token = make_token(RESOURCE, lifetime=3600)
    identity.queue_tokens(RESOURCE, token)  # only this token is an ACL user's password
    redis_server.add_token_user(OBJECT_ID, token)
    through = start_keyless(tmp_path, redis_server, identity, "--workers", "2")
    try:
        for i in range(12):  # a new connection each: the kernel spreads them over the workers
            app = through.client(WRONG_KEY)
            assert app.set(f"w{i}", i) and app.get(f"w{i}") == str(i).encode()
            assert app.execute_command("ACL", "WHOAMI") == OBJECT_ID.encode()
            app.close()
        assert through.logins("converted") == 12  # summed over the workers
        assert len(identity.calls_for(RESOURCE)) == 1
    finally:
        assert through.keyless.stop() == 0, through.keyless.log()
