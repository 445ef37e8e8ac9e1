"""Servers for the MySQL tests: a real MariaDB and fake Azure peers, with TLS for Azure names.

The identity endpoint is this package's own: the database user's password is the token it
hands out (queue_tokens), and the PostgreSQL tests queue tokens for the same resource.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.conftest import pki  # noqa: F401  (re-exported fixture)
from tests.support.azurite import TestPKI
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.mysql_server import FakeMySQLServer, MariaDB

MYSQL_HOST = "keylessmysql.mysql.database.azure.com"
FAKE_HOST = "keylessfake.mysql.database.azure.com"


@pytest.fixture(scope="module")
def mysql_identity() -> Iterator[FakeIdentityEndpoint]:
    with FakeIdentityEndpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory, pki: TestPKI) -> Iterator[MariaDB]:  # noqa: F811
    server = MariaDB(tmp_path_factory.mktemp("mariadb"), pki.issue_server_cert(MYSQL_HOST),
                     pki.ca_pem_path)
    with server:
        yield server


@pytest.fixture(scope="session")
def fake_mysql(pki: TestPKI) -> Iterator[FakeMySQLServer]:  # noqa: F811
    with FakeMySQLServer(pki.issue_server_cert(FAKE_HOST)) as server:
        yield server


@pytest.fixture
def fake(fake_mysql: FakeMySQLServer) -> Iterator[FakeMySQLServer]:
    """The session's fake, reset to the clear-password mode with empty records."""
    fake_mysql.mode = "clear"
    fake_mysql.expected_password = None
    fake_mysql.reset()
    yield fake_mysql
    fake_mysql.mode = "clear"
