"""The test server behaves like Azure Database for PostgreSQL for a token login.

A token as the password works directly over verified TLS; a wrong password, plain TCP and
a client that does not trust the test CA are refused; the server log records that the login
used TLS. If these did not hold, the keyless tests would prove nothing.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.postgres.conftest import RESOURCE
from tests.support.identity_endpoint import make_token

pytestmark = pytest.mark.e2e
ROLE = "calibration_identity"


@pytest.fixture(scope="module")
def token(postgres_server) -> str:
    value = make_token(RESOURCE, lifetime=3600)
    postgres_server.create_role(ROLE, value)
    return value


def test_token_as_password_over_verified_tls_logs_in(postgres_server, token):
    with psycopg.connect(postgres_server.dsn(ROLE, token)) as conn:
        row = conn.execute("SELECT current_user, ssl FROM pg_stat_ssl "
                           "WHERE pid = pg_backend_pid()").fetchone()
    assert row == (ROLE, True)
    assert f"connection authorized: user={ROLE} database={ROLE} SSL enabled" \
        in postgres_server.log_text()


def test_wrong_password_is_refused(postgres_server, token):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres_server.dsn(ROLE, "not-the-token"))


def test_plain_tcp_is_refused(postgres_server, token):
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(postgres_server.dsn(ROLE, token, sslmode="disable"))


def test_the_certificate_is_for_the_azure_name_from_the_test_ca(postgres_server, token):
    # verify-full against the system CAs: the test CA is not among them
    dsn = postgres_server.dsn(ROLE, token).replace(postgres_server.pki.ca_pem_path, "system")
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(dsn)
    wrong_name = postgres_server.dsn(ROLE, token).replace(postgres_server.host_name,
                                                         "other.postgres.database.azure.com")
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        psycopg.connect(wrong_name)
