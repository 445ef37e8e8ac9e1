"""Transparent mode's MySQL session: keyless greets first and learns the server from the
app's TLS server name.

iptables REDIRECT itself is the framework's (tests/e2e/test_transparent.py proves it in
network namespaces); here the framework's pieces run in-process: the Connection carries the
original destination (MariaDB's address) and the server-name TLS context
(ClientTLS.by_server_name), exactly as TransparentListener builds them, and a real PyMySQL
app with a WRONG password connects with TLS to the Azure name. The token comes from a
TokenCache whose source hands out the very token that is the MariaDB user's password.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from proxy.audit import CallLog
from proxy.ca import CA_KEY_AND_CERT, generate_ca
from proxy.dial import AppDialer
from proxy.listeners.connection import ClientTLS, Shared
from proxy.listeners.spec import ListenerSpec, azure_host
from proxy.listeners.upstream import UpstreamDialer, upstream_tls_context
from proxy.mysql import session
from proxy.tokens import Identity, TokenCache
from tests.mysql.conftest import MYSQL_HOST
from tests.support.identity_endpoint import make_token
from tests.support.listener_session import RecordingConnection, StaticToken
from tests.support.mysql_server import OSSRDBMS_RESOURCE, TEST_DATABASE

pytestmark = pytest.mark.e2e
WRONG_PASSWORD = "wrong-password-from-the-app-config"


class TransparentMySQL:
    """An asyncio server on a thread that hands each connection to session.serve the way
    TransparentListener does (original destination: MariaDB)."""

    def __init__(self, tmp_path: Path, ca_pem: str, destination: tuple[str, int],
                 token: str, audit: bool = False) -> None:
        generate_ca(tmp_path, ["mysql.database.azure.com"], 30)
        self.ca_path = str(tmp_path / "mitmproxy-ca-cert.pem")
        self.client_tls = ClientTLS(tmp_path / CA_KEY_AND_CERT)
        self.fetches = 0

        async def source(identity: Identity, scope: str) -> StaticToken:
            assert scope == "https://ossrdbms-aad.database.windows.net/.default"
            self.fetches += 1
            return StaticToken(token, int(time.time()) + 3600)

        self.shared = Shared(
            TokenCache(source), UpstreamDialer(AppDialer(), upstream_tls_context(
                [("ssl_verify_upstream_trusted_ca", ca_pem)])),
            CallLog(None), self.client_tls, audit=audit)
        self.context = self.client_tls.by_server_name(lambda host: azure_host("mysql", host))
        self.destination = destination
        self.results: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        spec = ListenerSpec("mysql", ("127.0.0.1", self.port), ("", self.destination[1]),
                            client_tls=True)
        conn = RecordingConnection(spec, "app", self.shared,
                                   original_destination=self.destination,
                                   server_name_context=self.context)
        conn.results = self.results
        try:
            await session.serve(conn, reader, writer)
        finally:
            writer.close()

    def logins(self, count: int = 1, timeout: float = 5.0) -> list[str]:
        """The sessions' login results, once `count` are in (the app may see its answer
        before the session has counted it)."""
        deadline = time.monotonic() + timeout
        while len(self.results) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.results)

    def __enter__(self) -> TransparentMySQL:
        started = threading.Event()

        async def main() -> None:
            server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self.server = server
            started.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(main(), self.loop)
        assert started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            self.server.close()
            sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in sessions:
                task.cancel()
            await asyncio.gather(*sessions, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def resolve_to(monkeypatch) -> Iterator[dict[str, int]]:
    """The app's DNS: MYSQL_HOST resolves to the transparent listener (what REDIRECT does)."""
    ports: dict[str, int] = {}
    real = socket.create_connection

    def create_connection(address, *args, **kwargs):
        host, _port = address
        if host in ports:
            return real(("127.0.0.1", ports[host]), *args, **kwargs)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    yield ports


def app(host: str, ca: str, user: str, password: str = WRONG_PASSWORD, **extra):
    return pymysql.connect(host=host, port=3306, user=user, password=password,
                           ssl_ca=ca, ssl_verify_cert=True, ssl_verify_identity=True,
                           connect_timeout=10, read_timeout=30, **extra)


@pytest.fixture
def token_user(mariadb) -> str:
    token = make_token(OSSRDBMS_RESOURCE)
    mariadb.create_token_user("transparent_app", token)
    return token


def test_transparent_login_takes_the_server_from_the_tls_name(tmp_path, pki, mariadb,
                                                              token_user, resolve_to):
    with TransparentMySQL(tmp_path, pki.ca_pem_path, ("127.0.0.1", mariadb.port),
                          token_user) as keyless:
        resolve_to[MYSQL_HOST] = keyless.port
        with contextlib.closing(app(MYSQL_HOST, keyless.ca_path, "transparent_app",
                                    database=TEST_DATABASE)) as db, db.cursor() as cursor:
            assert isinstance(db._sock, ssl.SSLSocket)
            assert db.server_version == "8.0.0-keyless"  # the blind greeting
            cursor.execute("SELECT CURRENT_USER(), DATABASE()")
            assert cursor.fetchone() == ("transparent_app@%", TEST_DATABASE)
            cursor.execute("SHOW STATUS LIKE 'Ssl_cipher'")
            assert cursor.fetchone()[1]
            cursor.execute("SELECT REPEAT('q', 1000000)")
            assert cursor.fetchone()[0] == "q" * 1_000_000
        assert keyless.logins() == ["converted"] and keyless.fetches == 1


def test_transparent_without_tls_gets_no_login(tmp_path, pki, mariadb, token_user):
    with TransparentMySQL(tmp_path, pki.ca_pem_path, ("127.0.0.1", mariadb.port),
                          token_user) as keyless:
        with pytest.raises(pymysql.err.OperationalError) as refused:
            pymysql.connect(host="127.0.0.1", port=keyless.port, user="transparent_app",
                            password=WRONG_PASSWORD, ssl_disabled=True, connect_timeout=10)
        assert "needs TLS from the app" in refused.value.args[1]
        assert keyless.logins() == ["upstream_failed"] and keyless.fetches == 0


def test_transparent_refuses_a_name_outside_azure(tmp_path, pki, mariadb, token_user,
                                                  resolve_to):
    with TransparentMySQL(tmp_path, pki.ca_pem_path, ("127.0.0.1", mariadb.port),
                          token_user) as keyless:
        resolve_to["db.example.com"] = keyless.port
        with pytest.raises(pymysql.err.OperationalError):
            app("db.example.com", keyless.ca_path, "transparent_app")
        assert keyless.logins() == ["client_error"] and keyless.fetches == 0


def test_transparent_audit_resyncs_the_apps_scramble(tmp_path, pki, mariadb, resolve_to):
    mariadb.create_token_user("transparent_audited", "real-password")
    with TransparentMySQL(tmp_path, pki.ca_pem_path, ("127.0.0.1", mariadb.port),
                          "unused", audit=True) as keyless:
        resolve_to[MYSQL_HOST] = keyless.port
        with contextlib.closing(app(MYSQL_HOST, keyless.ca_path, "transparent_audited",
                                    password="real-password")) as db:
            db.ping()
        assert keyless.logins() == ["audited"] and keyless.fetches == 0
