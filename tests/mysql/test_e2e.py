"""Apps with a WRONG MySQL password work through the real keyless process.

The MariaDB user's password is the very token the fake identity hands keyless (queue_tokens),
and the user must use TLS (REQUIRE SSL): a login succeeds only if keyless dialled the server,
started verified TLS, and answered the scramble with the token. The fake Azure peer takes the
`mysql_clear_password` and caching_sha2 full-auth paths and verifies the token's signature,
audience and expiry itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pymysql
import pytest

from proxy.mysql import codec
from tests.mysql.conftest import FAKE_HOST, MYSQL_HOST
from tests.support.azurite import free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.keyless import KeylessProcess, keyless_command
from tests.support.mysql_server import OSSRDBMS_RESOURCE, TEST_DATABASE

pytestmark = pytest.mark.e2e
APP_USER = "keyless_app"
ENTRA_USER = "entra-app"  # the fake's login user, set by the listener's ?user=
WRONG_PASSWORD = "wrong-password-from-the-app-config"
NODE_APP = Path(__file__).with_name("mysql2_app.mjs")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def token(mysql_identity) -> str:
    value = make_token(OSSRDBMS_RESOURCE, lifetime=3600)
    mysql_identity.queue_tokens(OSSRDBMS_RESOURCE, value)
    return value


@pytest.fixture(scope="module")
def keyless(tmp_path_factory, pki, mariadb, fake_mysql, mysql_identity, token):
    mariadb.create_token_user(APP_USER, token)
    maria_port, fake_port, tls_port = free_port(), free_port(), free_port()
    process = KeylessProcess(tmp_path_factory.mktemp("keyless-mysql"), [
        "--mysql", f"{maria_port}={MYSQL_HOST}",
        "--mysql", f"{tls_port}={MYSQL_HOST}?client-tls=true",
        "--mysql", f"{fake_port}={FAKE_HOST}?user={ENTRA_USER}",
        "--connect-to", f"{MYSQL_HOST}:3306:127.0.0.1:{mariadb.port}",
        "--connect-to", f"{FAKE_HOST}:3306:127.0.0.1:{fake_mysql.port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        "--token-margin", "0",
    ], mysql_identity.env()).start()
    process.maria_port, process.fake_port, process.tls_port = maria_port, fake_port, tls_port
    yield process
    assert process.stop() == 0, process.log()
    assert token not in process.log()
    assert WRONG_PASSWORD not in process.log()


def app_connect(port: int, user: str = APP_USER, **extra) -> pymysql.connections.Connection:
    """The legacy app: plain TCP to keyless on loopback, its configured (wrong) password."""
    return pymysql.connect(host="127.0.0.1", port=port, user=user, password=WRONG_PASSWORD,
                           connect_timeout=10, read_timeout=30, **extra)


def test_pymysql_app_with_a_wrong_password_works(keyless, mariadb):
    with contextlib.closing(app_connect(keyless.maria_port, database=TEST_DATABASE,
                                        autocommit=True)) as db, db.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS py_items")
        cursor.execute("CREATE TABLE py_items (id INT PRIMARY KEY, name VARCHAR(64))")
        cursor.executemany("INSERT INTO py_items (id, name) VALUES (%s, %s)",
                           [(i, f"item-{i}") for i in range(1000)])
        cursor.execute("SELECT COUNT(*), SUM(id) FROM py_items")
        assert cursor.fetchone() == (1000, sum(range(1000)))
        cursor.execute("SELECT id, name FROM py_items WHERE id >= 995 ORDER BY id")
        assert cursor.fetchall() == tuple((i, f"item-{i}") for i in range(995, 1000))
        # PyMySQL has no server-side prepare: the SQL statements do it
        cursor.execute("PREPARE pick FROM 'SELECT name FROM py_items WHERE id = ?'")
        cursor.execute("SET @wanted = 321")
        cursor.execute("EXECUTE pick USING @wanted")
        assert cursor.fetchall() == (("item-321",),)
        cursor.execute("DEALLOCATE PREPARE pick")
        cursor.execute("SHOW STATUS LIKE 'Ssl_cipher'")
        assert cursor.fetchone()[1], "the relayed session did not use TLS upstream"
        cursor.execute("SELECT CURRENT_USER()")
        assert cursor.fetchone() == (f"{APP_USER}@%",)
    assert keyless.metric("keyless_listener_logins_total", protocol="mysql",
                          result="converted") >= 1


def test_the_same_wrong_password_direct_is_refused(mariadb, pki):
    with pytest.raises(pymysql.err.OperationalError) as refused:
        pymysql.connect(host="127.0.0.1", port=mariadb.port, user=APP_USER,
                        password=WRONG_PASSWORD, ssl_ca=pki.ca_pem_path, connect_timeout=10)
    assert refused.value.args[0] == 1045


def test_pool_of_20_threads(keyless):
    ids: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(20, timeout=60)

    def worker() -> None:
        try:
            with contextlib.closing(app_connect(keyless.maria_port)) as db, \
                    db.cursor() as cursor:
                barrier.wait()  # all 20 open at once
                cursor.execute("SELECT CONNECTION_ID(), SLEEP(0.1)")
                ids.append(cursor.fetchone()[0])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not errors, errors[:3]
    assert len(set(ids)) == 20


def test_one_token_fetch_serves_every_login(keyless, mysql_identity):
    with contextlib.closing(app_connect(keyless.maria_port)) as db:
        db.ping()
    assert len(mysql_identity.calls_for(OSSRDBMS_RESOURCE)) == 1


@pytest.mark.parametrize("client_tls", [False, True], ids=["plain", "client-tls"])
def test_node_mysql2_app_with_a_wrong_password_works(keyless, client_tls):
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: install Node.js 20 (apt-get install -y nodejs npm)")
    if not (REPO / "node_modules" / "mysql2").is_dir():
        pytest.fail("mysql2 is missing: run `npm ci` in the repository root")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MYSQL_")},
           "MYSQL_HOST": "127.0.0.1",
           "MYSQL_PORT": str(keyless.tls_port if client_tls else keyless.maria_port),
           "MYSQL_USER": APP_USER, "MYSQL_PASSWORD": WRONG_PASSWORD,
           "MYSQL_DATABASE": TEST_DATABASE,
           **({"MYSQL_SSL_CA": keyless.ca_path} if client_tls else {})}
    completed = subprocess.run([node, str(NODE_APP)], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert completed.returncode == 0, (result, completed.stderr[-2000:])
    assert result["count"] == 1000 and result["total"] == sum(range(1000))
    assert result["prepared"] == [[i, f"item-{i}"] for i in range(10, 15)]
    assert result["ssl_cipher"]
    assert result["app_tls"] is client_tls
    assert result["current_user"] == f"{APP_USER}@%"
    assert result["pool_queries"] == 40 and result["pool_connections"] == 20


@pytest.mark.parametrize("mode", ["clear", "caching_sha2"])
def test_the_token_in_clear_when_the_server_asks(keyless, fake, token, mode):
    fake.mode = mode
    with contextlib.closing(app_connect(keyless.fake_port, user="someone-else")) as db, \
            db.cursor() as cursor:
        cursor.execute("SELECT CURRENT_USER()")
        assert cursor.fetchone() == (ENTRA_USER,)
        db.ping()
    [login] = fake.logins
    assert login.accepted and login.problems == []
    assert login.password == token.encode()  # the fake verified it; this is keyless' token
    assert login.user == ENTRA_USER  # ?user= replaces the app's user
    assert login.client_plugin == ("caching_sha2_password" if mode == "caching_sha2"
                                   else "mysql_native_password")


def test_the_app_is_greeted_like_its_server(keyless, mariadb):
    with socket.create_connection(("127.0.0.1", keyless.maria_port), timeout=10) as sock:
        header = sock.recv(4, socket.MSG_WAITALL)
        length, seq = codec.decode_header(header)
        greeting = codec.decode_handshake(sock.recv(length, socket.MSG_WAITALL))
    [(version,)] = mariadb.sql("SELECT VERSION()")
    assert seq == 0 and greeting.server_version == f"5.5.5-{version}"
    assert greeting.auth_plugin == codec.NATIVE and len(greeting.nonce) == 20
    # plain on loopback by default; nothing keyless cannot relay
    assert not greeting.capabilities & (codec.CLIENT_SSL | codec.CLIENT_COMPRESS)
    assert greeting.capabilities & codec.CLIENT_DEPRECATE_EOF  # MariaDB's, passed on


def test_client_tls_with_keyless_ca(keyless):
    with contextlib.closing(app_connect(keyless.tls_port, ssl_ca=keyless.ca_path,
                                        ssl_verify_cert=True)) as db, db.cursor() as cursor:
        assert isinstance(db._sock, ssl.SSLSocket)  # the app's own hop is TLS too
        names = [value for kind, value in db._sock.getpeercert()["subjectAltName"]]
        assert MYSQL_HOST in names
        cursor.execute("SHOW STATUS LIKE 'Ssl_cipher'")
        assert cursor.fetchone()[1]
        # many TLS records each way, through both TLS hops
        cursor.execute("SELECT LENGTH(%s), REPEAT('z', 3000000)", ("y" * 1_500_000,))
        length, text = cursor.fetchone()
        assert length == 1_500_000 and text == "z" * 3_000_000


def test_audit_mode_forwards_the_apps_own_login_and_records_it(tmp_path, pki, mariadb):
    real_password = "the-apps-real-password"
    mariadb.create_token_user("audited_app", real_password)
    port = free_port()
    with FakeIdentityEndpoint() as identity:
        process = KeylessProcess(tmp_path / "keyless", [
            "--audit", "--mysql", f"{port}={MYSQL_HOST}",
            "--connect-to", f"{MYSQL_HOST}:3306:127.0.0.1:{mariadb.port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        ], identity.env()).start()
        try:
            with contextlib.closing(pymysql.connect(
                    host="127.0.0.1", port=port, user="audited_app", password=real_password,
                    connect_timeout=10)) as db, db.cursor() as cursor:
                cursor.execute("SHOW STATUS LIKE 'Ssl_cipher'")
                assert cursor.fetchone()[1], "audit mode still logs in over TLS upstream"
            with pytest.raises(pymysql.err.OperationalError) as refused:
                app_connect(port, user="audited_app")  # the wrong password stays wrong
            assert refused.value.args[0] == 1045
            assert process.metric("keyless_listener_logins_total", protocol="mysql",
                                  result="audited") == 1
            report = json.loads(process.get("/report")[1])
        finally:
            assert process.stop() == 0, process.log()
        assert identity.calls == []  # audit mode fetches no token
    [entry] = report["inventory"]
    assert (entry["service"], entry["hosts"], entry["schemes"], entry["calls"]) == (
        "mysql", [MYSQL_HOST], {"password": 1}, 1)
    assert real_password not in process.log() + json.dumps(report)


@pytest.mark.parametrize("mode", ["sha2_fast", "switch_native"])
def test_the_scramble_the_server_asks_for(keyless, fake, token, mode):
    """caching_sha2_password's fast path (scramble, 0x01 0x03, OK) and an AuthSwitchRequest
    to mysql_native_password with a new nonce: the scramble is of the token."""
    fake.mode = mode
    fake.expected_password = token.encode()
    with contextlib.closing(app_connect(keyless.fake_port)) as db:
        db.ping()
    [login] = fake.logins
    assert login.accepted, login.problems


def test_the_mariadb_command_line_client(keyless):
    client = shutil.which("mariadb") or shutil.which("mysql")
    if client is None:
        pytest.fail("the mariadb client is missing: apt-get install -y mariadb-client")
    done = subprocess.run(
        [client, "--no-defaults", "-h", "127.0.0.1", "-P", str(keyless.maria_port),
         "-u", APP_USER, f"-p{WRONG_PASSWORD}", "--skip-ssl", "-N", "-e",
         "SELECT CURRENT_USER(); SHOW STATUS LIKE 'Ssl_cipher'"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == f"{APP_USER}@%"
    assert lines[1].startswith("Ssl_cipher\t") and lines[1] != "Ssl_cipher\t"


def test_keyless_check_logs_in_through_the_mysql_listener(tmp_path, pki, mariadb):
    token = make_token(OSSRDBMS_RESOURCE)
    mariadb.create_token_user("checked_app", token)
    with FakeIdentityEndpoint() as identity:
        identity.queue_tokens(OSSRDBMS_RESOURCE, token)

        def check(user: str) -> subprocess.CompletedProcess[str]:
            env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KEYLESS_")}
            return subprocess.run(
                [*keyless_command(), "check", "--confdir", str(tmp_path / "confdir"),
                 "--mysql", f"{free_port()}={MYSQL_HOST}?user={user}",
                 "--connect-to", f"{MYSQL_HOST}:3306:127.0.0.1:{mariadb.port}",
                 "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}"],
                env={**env, **identity.env()}, capture_output=True, text=True, timeout=120)

        passed = check("checked_app")
        assert passed.returncode == 0, passed.stdout + passed.stderr
        assert "logged in with the token" in passed.stdout
        refused = check("nobody_created_me")
        assert refused.returncode != 0
        assert "Access denied for user 'nobody_created_me'" in refused.stdout + refused.stderr
    assert token not in passed.stdout + passed.stderr + refused.stdout + refused.stderr


def test_change_user_is_refused_and_the_session_goes_on(keyless):
    """COM_CHANGE_USER would carry the app's own password upstream: keyless answers it."""
    def packet(sock: socket.socket) -> tuple[int, bytes]:
        length, seq = codec.decode_header(sock.recv(4, socket.MSG_WAITALL))
        return seq, sock.recv(length, socket.MSG_WAITALL)

    with socket.create_connection(("127.0.0.1", keyless.maria_port), timeout=20) as sock:
        _, greeting = packet(sock)
        flags = (codec.CLIENT_PROTOCOL_41 | codec.CLIENT_SECURE_CONNECTION
                 | codec.CLIENT_PLUGIN_AUTH | codec.CLIENT_CONNECT_WITH_DB)
        hello = codec.HandshakeResponse(
            flags, 1 << 24, 45, APP_USER,
            codec.scramble_native(WRONG_PASSWORD.encode(), codec.decode_handshake(greeting).nonce),
            TEST_DATABASE, codec.NATIVE)
        sock.sendall(codec.encode_packet(1, codec.encode_handshake_response(hello)))
        assert packet(sock)[1][:1] == b"\x00"
        secret = b"the-apps-own-password"
        sock.sendall(codec.encode_packet(0, b"\x11root\0" + bytes((len(secret) + 1,)) + secret
                                         + b"\0" + TEST_DATABASE.encode() + b"\0" + b"\x2d\x00"
                                         + b"mysql_clear_password\0"))
        seq, answer = packet(sock)
        assert seq == 1 and codec.decode_err(answer).code == 1235
        sock.sendall(codec.encode_packet(0, b"\x03SELECT CURRENT_USER()"))
        replies = [packet(sock)[1] for _ in range(5)]  # count, column, EOF, row, EOF
        assert replies[3] == codec.lenenc_bytes(f"{APP_USER}@%".encode())
        sock.sendall(codec.encode_packet(0, b"\x1f"))  # COM_RESET_CONNECTION: relayed
        seq, reset = packet(sock)
        assert seq == 1 and reset[:1] == b"\x00"


def test_load_data_local_infile_passes_the_command_filter(keyless, tmp_path):
    """The file's packets follow the command (sequence ids 1, 2, ...): data, never commands,
    even when a line starts with COM_CHANGE_USER's byte."""
    rows = [f"\x11line-{i},{i}" for i in range(3000)]
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(rows) + "\n")
    with contextlib.closing(app_connect(keyless.maria_port, database=TEST_DATABASE,
                                        local_infile=True, autocommit=True)) as db, \
            db.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS loaded")
        cursor.execute("CREATE TABLE loaded (name VARCHAR(64), n INT)")
        cursor.execute(f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE loaded "
                       "FIELDS TERMINATED BY ','")
        cursor.execute("SELECT COUNT(*), SUM(n), MIN(name) FROM loaded")
        assert cursor.fetchone() == (3000, sum(range(3000)), "\x11line-0")
