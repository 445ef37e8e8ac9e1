"""Legacy PostgreSQL apps with a WRONG password go passwordless through the real keyless process.

The server (tests/support/postgres_server.py) is a real PostgreSQL 15 that asks for a
cleartext password over TLS, as Azure does for an Entra role; the role's password is the very
token the fake identity hands keyless. So a login through keyless works only if keyless
logged in upstream over TLS with the token — the app's wrong password would be refused (as
`test_direct_with_the_wrong_password_is_refused` shows).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.postgres.conftest import RESOURCE
from tests.support.azurite import free_port
from tests.support.identity_endpoint import make_token
from tests.support.keyless import KeylessProcess
from tests.support.postgres_server import AZURE_HOST

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
NODE_APP = REPO / "tests" / "apps" / "node" / "pg_app.mjs"
ROLE = "keyless_app"  # the role made for the identity (pgaadauth_create_principal on Azure)
WRONG_PASSWORD = "legacy-Passw0rd-from-the-config"
ROWS = 1000
POOL = 20


@pytest.fixture(scope="module")
def token(postgres_server, module_identity) -> str:
    value = make_token(RESOURCE, lifetime=3600)
    module_identity.queue_tokens(RESOURCE, value)
    postgres_server.create_role(ROLE, value)
    return value


class Listeners:
    def __init__(self) -> None:
        self.plain, self.tls, self.as_user = free_port(), free_port(), free_port()


@pytest.fixture(scope="module")
def ports() -> Listeners:
    return Listeners()


@pytest.fixture(scope="module")
def keyless(tmp_path_factory, pki, postgres_server, module_identity, token,
            ports) -> Iterator[KeylessProcess]:
    process = KeylessProcess(tmp_path_factory.mktemp("keyless-pg"), [
        "--postgres", f"{ports.plain}={AZURE_HOST}",
        "--postgres", f"{ports.tls}={AZURE_HOST}?client-tls=true",
        "--postgres", f"{ports.as_user}={AZURE_HOST}?user={ROLE}",
        "--connect-to", f"{AZURE_HOST}:5432:127.0.0.1:{postgres_server.port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        "--token-margin", "0",
    ], module_identity.env()).start()
    yield process
    process.stop()


def app_dsn(port: int, user: str = ROLE, **extra: object) -> str:
    """What the legacy app has in its config: keyless' listener, the old (wrong) password."""
    return psycopg.conninfo.make_conninfo(host="127.0.0.1", port=port, user=user,
                                          password=WRONG_PASSWORD, dbname=ROLE,
                                          connect_timeout=10, **extra)


def logins(process: KeylessProcess, port: int, result: str = "converted") -> float:
    return process.metric("keyless_listener_logins_total", listener=f"postgres:{port}",
                          result=result)


def test_direct_with_the_wrong_password_is_refused(postgres_server, token):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres_server.dsn(ROLE, WRONG_PASSWORD))


def test_psycopg_app_with_a_wrong_password_works_through_keyless(keyless, ports,
                                                                 postgres_server):
    before = logins(keyless, ports.plain)
    with psycopg.connect(app_dsn(ports.plain)) as conn:
        backend = conn.info.backend_pid
        # the server saw this session over TLS, as the identity's role
        assert conn.execute("SELECT current_user, ssl FROM pg_stat_ssl "
                            "WHERE pid = pg_backend_pid()").fetchone() == (ROLE, True)
        assert conn.pgconn.ssl_in_use is False  # the app's side: plain, on loopback
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO items VALUES (%s, %s)",
                            [(i, f"item-{i}") for i in range(ROWS)])
        conn.commit()
        rows = conn.execute("SELECT id, name FROM items ORDER BY id").fetchall()
        assert rows == [(i, f"item-{i}") for i in range(ROWS)]

        # a server-side prepared statement, used three times
        query = "SELECT name FROM items WHERE id = %s"
        for i in (7, 70, 700):
            assert conn.execute(query, (i,), prepare=True).fetchone() == (f"item-{i}",)
        prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements "
                                "WHERE statement LIKE 'SELECT name FROM items%%'").fetchone()
        assert prepared == (1,)

        # COPY in and out
        with conn.cursor() as cur:
            with cur.copy("COPY items (id, name) FROM STDIN") as copy:
                for i in range(ROWS, ROWS + 500):
                    copy.write_row((i, f"copied-{i}"))
            conn.commit()
            out = bytearray()
            with cur.copy("COPY (SELECT id, name FROM items WHERE id >= %s ORDER BY id) "
                          "TO STDOUT", (ROWS,)) as copy:
                for chunk in copy:
                    out += chunk
        lines = bytes(out).decode().splitlines()
        assert lines == [f"{i}\tcopied-{i}" for i in range(ROWS, ROWS + 500)]
        conn.execute("DROP TABLE items")
        conn.commit()
    assert logins(keyless, ports.plain) == before + 1
    # the server's own log line for this very backend: the login used TLS
    assert f"[{backend}] LOG:  connection authorized: user={ROLE} database={ROLE} SSL enabled " \
        "(protocol=TLSv1.3" in postgres_server.log_text()
    assert WRONG_PASSWORD not in keyless.log()


def test_a_cancelled_long_query_and_the_connection_still_works(keyless, ports):
    with psycopg.connect(app_dsn(ports.plain)) as conn:
        timer = threading.Timer(1.0, conn.cancel)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled, match="user request"):
                conn.execute("SELECT pg_sleep(30)")
        finally:
            timer.cancel()
        assert time.monotonic() - started < 15
        conn.rollback()
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)


def test_a_cancel_with_an_unknown_key_is_dropped(keyless, ports):
    # Another client's key guessed wrong: keyless forwards only keys of its live connections.
    with psycopg.connect(app_dsn(ports.plain)) as victim:
        pid = victim.info.backend_pid
        raw = psycopg.pq.PGconn.connect(app_dsn(ports.plain).encode())
        try:
            assert raw.status == psycopg.pq.ConnStatus.OK
        finally:
            raw.finish()
        before = keyless.log().count("CancelRequest for an unknown key dropped")
        with socket.create_connection(("127.0.0.1", ports.plain), timeout=5) as sock:
            sock.sendall(struct.pack("!IIII", 16, 80877102, pid, 12345))
            assert sock.recv(1) == b""  # closed, nothing answered
        deadline = time.monotonic() + 5
        while keyless.log().count("CancelRequest for an unknown key dropped") == before:
            assert time.monotonic() < deadline, keyless.log()[-2000:]
            time.sleep(0.05)
        assert victim.execute("SELECT 1").fetchone() == (1,)


def test_a_pool_of_twenty_concurrent_connections(keyless, ports, module_identity):
    barrier = threading.Barrier(POOL, timeout=60)
    results: dict[int, object] = {}

    def worker(index: int) -> None:
        try:
            with psycopg.connect(app_dsn(ports.plain)) as conn:
                barrier.wait()  # all twenty are open at once
                total = conn.execute("SELECT sum(g) FROM generate_series(1, %s) g",
                                     (index + 1,)).fetchone()
                results[index] = (total, conn.info.backend_pid)
        except Exception as exc:  # reported below with its index
            results[index] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(POOL)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert all(not isinstance(value, Exception) for value in results.values()), results
    assert {i: results[i][0] for i in range(POOL)} == {  # type: ignore[index]
        i: ((i + 1) * (i + 2) // 2,) for i in range(POOL)}
    assert len({results[i][1] for i in range(POOL)}) == POOL  # type: ignore[index]
    # one token for every connection of the module
    assert len(module_identity.calls_for(RESOURCE)) == 1


def test_client_tls_with_verify_full_against_keyless_ca(keyless, ports):
    dsn = psycopg.conninfo.make_conninfo(
        host=AZURE_HOST, hostaddr="127.0.0.1", port=ports.tls, user=ROLE,
        password=WRONG_PASSWORD, dbname=ROLE, sslmode="verify-full",
        sslrootcert=keyless.ca_path, connect_timeout=10)
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use is True
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                            ).fetchone() == (True,)
    assert logins(keyless, ports.tls) >= 1


def test_the_listener_user_replaces_the_apps(keyless, ports):
    with psycopg.connect(app_dsn(ports.as_user, user="legacy_user")) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() \
            == (ROLE, ROLE)


def test_keyless_keeps_serving_when_a_client_vanishes_mid_login(keyless, ports):
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", ports.plain), timeout=5) as sock:
            sock.sendall(b"\0\0\0\x08\x04\xd2\x16")  # half an SSLRequest, then gone
    with psycopg.connect(app_dsn(ports.plain)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- node-postgres ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is missing: the node-postgres app cannot run. Install Node.js 20 "
                    "(on Debian `apt-get install -y nodejs npm`)")
    if not (REPO / "node_modules" / "pg").is_dir():
        pytest.fail("node-postgres is missing: run `npm ci` in the repository root")
    return found


def run_node_app(node: str, env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    completed = subprocess.run([node, str(NODE_APP)], env={**base, **env}, cwd=REPO,
                               capture_output=True, text=True, timeout=120)
    lines = completed.stdout.strip().splitlines()
    assert completed.returncode == 0 and lines, completed.stdout + completed.stderr
    return json.loads(lines[-1])


def test_node_postgres_app_with_a_wrong_password_works_through_keyless(node, keyless, ports):
    before = logins(keyless, ports.plain)
    result = run_node_app(node, {"PGHOST": "127.0.0.1", "PGPORT": str(ports.plain),
                                 "PGUSER": ROLE, "PGPASSWORD": WRONG_PASSWORD,
                                 "PGDATABASE": ROLE, "ROWS": str(ROWS), "POOL": str(POOL)})
    assert result == {
        "user": ROLE, "ssl_upstream": True, "rows": ROWS,
        "sum": sum(range(ROWS)), "prepared": ["row-7", "row-70", "row-700"],
        "pool": POOL, "pool_backends": POOL,
    }
    # one client + twenty pooled connections
    assert logins(keyless, ports.plain) == before + 1 + POOL


def test_node_postgres_direct_with_the_wrong_password_is_refused(node, postgres_server, token):
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    completed = subprocess.run([node, str(NODE_APP)], env={
        **base, "PGHOST": "127.0.0.1", "PGPORT": str(postgres_server.port), "PGUSER": ROLE,
        "PGPASSWORD": WRONG_PASSWORD, "PGDATABASE": ROLE, "PGSSLMODE": "no-verify",
        "ROWS": "1", "POOL": "1"}, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode != 0
    assert "password authentication failed" in completed.stderr


def test_an_app_demanding_tls_from_the_plain_listener_is_told_so(keyless, ports):
    # what docs/databases/postgres.md tells such an app: client-tls=true, or sslmode=prefer
    with pytest.raises(psycopg.OperationalError,
                       match="server does not support SSL, but SSL was required"):
        psycopg.connect(app_dsn(ports.plain, sslmode="require"))
    with psycopg.connect(app_dsn(ports.tls, sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use is True
