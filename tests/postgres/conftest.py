"""Fixtures of the PostgreSQL tests: the real server (TLS for the Azure name), the test CA."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.conftest import identity, module_identity, pki  # noqa: F401  (re-exported)
from tests.support.postgres_server import PostgresServer

RESOURCE = "https://ossrdbms-aad.database.windows.net"  # the App Service protocol's resource


@pytest.fixture(scope="session")
def postgres_server(pki) -> Iterator[PostgresServer]:  # noqa: F811
    with PostgresServer(pki) as server:
        yield server
