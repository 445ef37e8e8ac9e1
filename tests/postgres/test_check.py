"""`check_login` (for `keyless check`): a real login with the token against the real server,
through the framework's own dialer and trust; a refusal and a missing token are one-line
reasons without a secret."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.audit import CallLog
from proxy.connect_to import ConnectTo, ConnectToTable
from proxy.dial import AppDialer
from proxy.listeners.connection import ClientTLS, Connection, Shared
from proxy.listeners.spec import ListenerSpec
from proxy.listeners.upstream import UpstreamDialer, upstream_tls_context
from proxy.postgres.session import LoginFailed, check_login
from proxy.tokens import Identity, TokenCache
from tests.support.postgres_server import AZURE_HOST

pytestmark = pytest.mark.e2e
ROLE = "check_identity"
TOKEN = "eyJ0eXAi.check-token-for-the-test.sig"


class Info:
    def __init__(self, token: str) -> None:
        self.token, self.expires_on, self.refresh_on = token, 2**31, None


def connection(server, pki, tmp_path: Path, token: str | None) -> Connection:
    async def source(identity, scope):
        if token is None:
            raise RuntimeError("the identity endpoint is down")
        return Info(token)

    table = ConnectToTable((ConnectTo.parse(f"{AZURE_HOST}:5432:127.0.0.1:{server.port}"),))
    dialer = UpstreamDialer(AppDialer(table, lambda address: False), upstream_tls_context(
        [("ssl_verify_upstream_trusted_ca", pki.ca_pem_path)]))
    shared = Shared(TokenCache(source, wait_timeout=2), dialer, CallLog(None),
                    ClientTLS(tmp_path / "none"))
    spec = ListenerSpec("postgres", ("127.0.0.1", 6432), (AZURE_HOST, 5432), Identity())
    return Connection(spec, "keyless check", shared)


def test_check_login_logs_in_with_the_token(postgres_server, pki, tmp_path):
    postgres_server.create_role(ROLE, TOKEN)
    before = postgres_server.log_text().count(f"connection authorized: user={ROLE} ")
    asyncio.run(check_login(connection(postgres_server, pki, tmp_path, TOKEN), ROLE))
    log = postgres_server.log_text()
    assert log.count(f"connection authorized: user={ROLE} database=postgres "
                     "application_name=keyless check SSL enabled") == before + 1


def test_check_login_reasons(postgres_server, pki, tmp_path, caplog):
    with pytest.raises(LoginFailed, match=f"refused the login as '{ROLE}-missing'") as refused:
        asyncio.run(check_login(connection(postgres_server, pki, tmp_path, TOKEN),
                                f"{ROLE}-missing"))
    assert TOKEN not in str(refused.value)
    assert f"pgaadauth_create_principal('{ROLE}-missing', false, false)" in caplog.text
    with pytest.raises(LoginFailed, match="KeylessTokenUnavailable: "):
        asyncio.run(check_login(connection(postgres_server, pki, tmp_path, None), ROLE))
