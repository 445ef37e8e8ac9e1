"""Transparent mode's PostgreSQL session: the server comes from the app's TLS server name.

iptables REDIRECT itself is the framework's (tests/e2e/test_transparent.py proves it in
network namespaces); here the framework's pieces run in-process, as TransparentListener
builds them: a Connection with the original destination (the real server's address) and the
server-name TLS context (ClientTLS.by_server_name). A real psycopg app with a WRONG password
connects with TLS (verify-full against keyless' CA) to the Azure name. The token comes from a
TokenCache whose source hands out the very token that is the role's password.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import psycopg
import pytest

from proxy.audit import CallLog
from proxy.ca import CA_KEY_AND_CERT, generate_ca
from proxy.dial import AppDialer
from proxy.listeners.connection import ClientTLS, Shared
from proxy.listeners.spec import ListenerSpec, azure_host
from proxy.listeners.upstream import UpstreamDialer, upstream_tls_context
from proxy.postgres import codec, session
from proxy.postgres.cancel import CANCEL_KEYS
from proxy.tokens import Identity, TokenCache
from tests.postgres.conftest import RESOURCE
from tests.support.identity_endpoint import make_token
from tests.support.listener_session import RecordingConnection, StaticToken
from tests.support.postgres_server import AZURE_HOST

pytestmark = pytest.mark.e2e
ROLE = "transparent_identity"
WRONG_PASSWORD = "legacy-Passw0rd-from-the-config"


class TransparentPostgres:
    """An asyncio server on a thread handing each connection to session.serve the way
    TransparentListener does (original destination: the real server)."""

    def __init__(self, confdir: Path, upstream_ca: str, destination: tuple[str, int],
                 token: str) -> None:
        generate_ca(confdir, ["postgres.database.azure.com"], 30)
        self.ca_path = str(confdir / "mitmproxy-ca-cert.pem")
        client_tls = ClientTLS(confdir / CA_KEY_AND_CERT)
        self.fetches = 0

        async def source(identity: Identity, scope: str) -> StaticToken:
            assert scope == f"{RESOURCE}/.default"
            self.fetches += 1
            return StaticToken(token, int(time.time()) + 3600)

        self.shared = Shared(TokenCache(source), UpstreamDialer(AppDialer(), upstream_tls_context(
            [("ssl_verify_upstream_trusted_ca", upstream_ca)])), CallLog(None), client_tls)
        self.context = client_tls.by_server_name(lambda host: azure_host("postgres", host))
        self.destination = destination
        self.results: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        spec = ListenerSpec("postgres", ("127.0.0.1", self.port), ("", self.destination[1]),
                            client_tls=True)
        conn = RecordingConnection(spec, "app", self.shared,
                                   original_destination=self.destination,
                                   server_name_context=self.context)
        conn.results = self.results
        try:
            await session.serve(conn, reader, writer)
        finally:
            writer.close()

    def __enter__(self) -> TransparentPostgres:
        async def start() -> None:
            self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)
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


@pytest.fixture(scope="module")
def token(postgres_server) -> str:
    value = make_token(RESOURCE)
    postgres_server.create_role(ROLE, value)
    return value


@pytest.fixture
def keyless(tmp_path, pki, postgres_server, token):
    with TransparentPostgres(tmp_path, pki.ca_pem_path, ("127.0.0.1", postgres_server.port),
                             token) as running:
        yield running


def app(keyless: TransparentPostgres, host: str = AZURE_HOST, **extra: str) -> psycopg.Connection:
    """The app dials HOST:5432; REDIRECT brings it to keyless (here: hostaddr)."""
    options = {"sslmode": "verify-full", "sslrootcert": keyless.ca_path, **extra}
    return psycopg.connect(host=host, hostaddr="127.0.0.1", port=keyless.port, user=ROLE,
                           password=WRONG_PASSWORD, dbname=ROLE, connect_timeout=10, **options)


def settled(keyless: TransparentPostgres, timeout: float = 5.0) -> list[str]:
    """The login results once keyless' side has caught up with what the app saw (a failed
    handshake reaches the app before keyless counts it)."""
    deadline = time.monotonic() + timeout
    while not keyless.results and time.monotonic() < deadline:
        time.sleep(0.02)
    return list(keyless.results)


def test_transparent_login_takes_the_server_from_the_tls_name(keyless):
    with app(keyless) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user, ssl FROM pg_stat_ssl "
                            "WHERE pid = pg_backend_pid()").fetchone() == (ROLE, True)
        # a cancel over TLS (libpq ≥ 17's cancel API): its server name names the server.
        # (conn.cancel(), the blocking PQcancel, would hold this process' GIL, and keyless
        # runs in-process here; test_e2e cancels that way against the real process.)
        timer = threading.Timer(1.0, conn.cancel_safe)
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
        finally:
            timer.cancel()
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert settled(keyless) == ["converted"] and keyless.fetches == 1


def test_transparent_without_tls_gets_no_login(keyless):
    with pytest.raises(psycopg.OperationalError, match="transparent mode needs TLS from the app"):
        app(keyless, sslmode="disable")
    assert settled(keyless) == ["upstream_failed"] and keyless.fetches == 0


def test_transparent_refuses_a_name_outside_azure(keyless):
    with pytest.raises(psycopg.OperationalError):
        app(keyless, host="db.example.com", sslmode="require")
    assert settled(keyless) == ["client_error"] and keyless.fetches == 0


def test_transparent_cancel_in_clear_finds_its_server_by_the_key(keyless):
    # libpq before 17 sends the CancelRequest without TLS, so it names no server; keyless
    # knows which live connection handed out the key. (The key is read from keyless' map:
    # psycopg does not expose it; the request is the bytes old libpq sends.)
    with app(keyless) as conn:
        pid = conn.info.backend_pid
        (secret,) = [s for (_, p, s) in CANCEL_KEYS._keys if p == pid]
        cancel = codec.encode_cancel(codec.CancelRequest(pid, secret))

        def send_cancel() -> None:
            with socket.create_connection(("127.0.0.1", keyless.port), timeout=10) as sock:
                sock.sendall(cancel)
                sock.recv(1)  # keyless closes once the server has the request

        timer = threading.Timer(1.0, send_cancel)
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
        finally:
            timer.cancel()
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)
