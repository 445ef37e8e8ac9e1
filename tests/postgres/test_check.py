"""`keyless check` logs in through a --postgres listener (this session) to the real server
with the token, and says in one line why when the server refuses."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.postgres.conftest import RESOURCE
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.keyless import keyless_command
from tests.support.postgres_server import AZURE_HOST

pytestmark = pytest.mark.e2e
ROLE = "check_identity"


def keyless_check(tmp_path, pki, server, endpoint, user: str) -> subprocess.CompletedProcess:
    return subprocess.run([
        *keyless_command(), "check", "--confdir", str(tmp_path / "confdir"),
        "--postgres", f"6432={AZURE_HOST}?user={user}",
        "--connect-to", f"{AZURE_HOST}:5432:127.0.0.1:{server.port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
    ], env={**{k: v for k, v in os.environ.items() if not k.startswith("KEYLESS_")},
            **endpoint.env()}, capture_output=True, text=True, timeout=120)


def test_keyless_check_logs_in_through_the_postgres_listener(tmp_path, pki, postgres_server):
    token = make_token(RESOURCE)
    postgres_server.create_role(ROLE, token)
    with FakeIdentityEndpoint() as endpoint:
        endpoint.queue_tokens(RESOURCE, token)
        passed = keyless_check(tmp_path, pki, postgres_server, endpoint, ROLE)
        refused = keyless_check(tmp_path, pki, postgres_server, endpoint, f"{ROLE}_missing")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert f"listener postgres:6432 -> {AZURE_HOST}:5432" in passed.stdout
    assert "logged in with the token" in passed.stdout
    assert f"connection authorized: user={ROLE} database=postgres SSL enabled" \
        in postgres_server.log_text()
    assert refused.returncode != 0
    assert f'password authentication failed for user "{ROLE}_missing"' in refused.stdout
    assert token not in passed.stdout + passed.stderr + refused.stdout + refused.stderr
