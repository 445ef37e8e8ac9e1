"""MySQL faults: keyless fails closed and loudly, and one bad connection harms no other.

The fake Azure peer records every login it sees, so "the server never saw a login" is checked
where it happens, not inferred from keyless' own account.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pymysql
import pytest

from proxy.mysql import codec
from tests.mysql.conftest import FAKE_HOST
from tests.support.azurite import free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e
WRONG_PASSWORD = "wrong-password-from-the-app-config"
BADCERT_HOST = "badcert.mysql.database.azure.com"  # the fake's certificate does not name it
DOWN_HOST = "down.mysql.database.azure.com"  # nothing listens where it leads


@pytest.fixture(scope="module")
def keyless(tmp_path_factory, pki, fake_mysql, mysql_identity):
    ports = {name: free_port() for name in ("fake", "badcert", "down")}
    process = KeylessProcess(tmp_path_factory.mktemp("keyless-mysql-faults"), [
        "--mysql", f"{ports['fake']}={FAKE_HOST}",
        "--mysql", f"{ports['badcert']}={BADCERT_HOST}",
        "--mysql", f"{ports['down']}={DOWN_HOST}",
        "--connect-to", f"{FAKE_HOST}:3306:127.0.0.1:{fake_mysql.port}",
        "--connect-to", f"{BADCERT_HOST}:3306:127.0.0.1:{fake_mysql.port}",
        "--connect-to", f"{DOWN_HOST}:3306:127.0.0.1:{free_port()}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        "--token-margin", "0",
    ], mysql_identity.env()).start()
    process.ports = ports
    yield process
    assert process.stop() == 0, process.log()
    assert WRONG_PASSWORD not in process.log()
    for token in mysql_identity.issued:
        assert token not in process.log()


def app_connect(port: int) -> pymysql.connections.Connection:
    return pymysql.connect(host="127.0.0.1", port=port, user="app", password=WRONG_PASSWORD,
                           connect_timeout=10, read_timeout=20)


def logins(process: KeylessProcess, result: str) -> float:
    return process.metric("keyless_listener_logins_total", protocol="mysql", result=result)


@pytest.fixture
def bystander(keyless, fake):
    """A session logged in before the fault, which must keep working after it."""
    with contextlib.closing(app_connect(keyless.ports["fake"])) as db:
        yield db
    assert [login.accepted for login in fake.logins][:1] == [True]


def still_serving(keyless, bystander) -> None:
    with bystander.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == ("1",)
    with contextlib.closing(app_connect(keyless.ports["fake"])) as fresh:
        fresh.ping()


def test_token_endpoint_down_fails_closed(tmp_path, pki, fake):
    with FakeIdentityEndpoint(mode="error") as broken:
        port = free_port()
        process = KeylessProcess(tmp_path / "keyless", [
            "--mysql", f"{port}={FAKE_HOST}",
            "--connect-to", f"{FAKE_HOST}:3306:127.0.0.1:{fake.port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            "--token-timeout", "3",
        ], broken.env()).start()
        try:
            with pytest.raises(pymysql.err.OperationalError) as refused:
                app_connect(port)
            assert refused.value.args[0] == 1045
            assert refused.value.args[1].startswith("KeylessTokenUnavailable: ")
            assert logins(process, "token_unavailable") == 1
        finally:
            assert process.stop() == 0, process.log()
    assert fake.connections == 1  # keyless read the greeting ...
    assert fake.logins == []  # ... and never tried any password


def test_upstream_refusing_the_token(keyless, fake, bystander):
    fake.mode = "refuse"
    before = logins(keyless, "upstream_refused")
    with pytest.raises(pymysql.err.OperationalError) as refused:
        app_connect(keyless.ports["fake"])
    assert refused.value.args[0] == 1045  # the server's own ERR, passed on
    assert "Access denied for user 'app'" in refused.value.args[1]
    assert logins(keyless, "upstream_refused") == before + 1
    assert "CREATE AADUSER 'app' IDENTIFIED BY" in keyless.log()
    fake.mode = "clear"
    still_serving(keyless, bystander)


def test_upstream_reset_during_the_login(keyless, fake, bystander):
    fake.mode = "reset"
    before = logins(keyless, "upstream_failed")
    with pytest.raises(pymysql.err.OperationalError) as failed:
        app_connect(keyless.ports["fake"])
    assert "KeylessUpstreamFailed" in failed.value.args[1]
    assert logins(keyless, "upstream_failed") == before + 1
    fake.mode = "clear"
    still_serving(keyless, bystander)


def test_server_without_tls_gets_no_token(keyless, fake):
    fake.mode = "no_tls"
    with pytest.raises(pymysql.err.OperationalError) as failed:
        app_connect(keyless.ports["fake"])
    assert "does not offer TLS" in failed.value.args[1]
    assert fake.logins == []


def test_a_plugin_no_token_can_answer(keyless, fake, bystander):
    fake.mode = "ed25519"
    before = logins(keyless, "upstream_failed")
    with pytest.raises(pymysql.err.OperationalError) as failed:
        app_connect(keyless.ports["fake"])
    assert "KeylessUpstreamFailed" in failed.value.args[1]
    assert "client_ed25519" in failed.value.args[1]
    assert logins(keyless, "upstream_failed") == before + 1
    assert fake.logins[-1].password == b""  # keyless sent nothing for it
    fake.mode = "clear"
    still_serving(keyless, bystander)


def test_unverifiable_upstream_certificate_gets_no_token(keyless, fake):
    with pytest.raises(pymysql.err.OperationalError) as failed:
        app_connect(keyless.ports["badcert"])
    assert "KeylessUpstreamFailed" in failed.value.args[1]
    assert "TLS" in failed.value.args[1]
    assert fake.connections == 1 and fake.logins == []


def test_unreachable_upstream(keyless):
    with pytest.raises(pymysql.err.OperationalError) as failed:
        app_connect(keyless.ports["down"])
    assert "KeylessUpstreamFailed: cannot connect" in failed.value.args[1]


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    header = recv_exact(sock, 4)
    length, seq = codec.decode_header(header, codec.MAX_MESSAGE)
    return seq, recv_exact(sock, length)


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything keyless still sends, until it closes (bounded in time)."""
    sock.settimeout(timeout)
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError("keyless kept the connection open")


@pytest.mark.parametrize("garbage", [
    codec.encode_packet(1, b"\x00\x01not a handshake response"),
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # its 'length' is 5 MiB: refused unread
])
def test_garbage_from_the_app(keyless, fake, bystander, garbage):
    before = logins(keyless, "client_error")
    with socket.create_connection(("127.0.0.1", keyless.ports["fake"]), timeout=10) as sock:
        seq, greeting = read_packet(sock)
        assert seq == 0 and codec.decode_handshake(greeting).server_version
        sock.sendall(garbage)
        rest = until_closed(sock)
    assert rest[4:5] == b"\xff" and codec.decode_err(rest[4:]).code == codec.ER_HANDSHAKE
    assert logins(keyless, "client_error") == before + 1
    assert [login.user for login in fake.logins] == ["app"]  # only the bystander's
    still_serving(keyless, bystander)


def test_a_1_gib_length_prefix_is_refused_unread(keyless, fake, bystander):
    rss_before = keyless.rss_bytes()
    with socket.create_connection(("127.0.0.1", keyless.ports["fake"]), timeout=10) as sock:
        read_packet(sock)
        # a full 16 MiB packet, the first of the 64 that would make 1 GiB: keyless answers
        # at once, without waiting for (or allocating) any of its payload
        sock.sendall(b"\xff\xff\xff\x01")
        started = time.monotonic()
        rest = until_closed(sock, timeout=5)
        assert time.monotonic() - started < 5
        with contextlib.suppress(OSError):  # what a client would still push: nobody reads it
            for _ in range(64):
                sock.sendall(b"\xff" * 65536)
    err = codec.decode_err(rest[4:])
    assert err.code == codec.ER_HANDSHAKE and "more than the 1048576 allowed" in err.message
    assert keyless.rss_bytes() - rss_before < 16 * 1024 * 1024
    still_serving(keyless, bystander)
