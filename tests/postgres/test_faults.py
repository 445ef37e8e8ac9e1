"""PostgreSQL faults through the real keyless process: each fails closed with a clear reason,
never sends the app's password (nor the token to a method that is not cleartext-over-TLS),
and keyless goes on serving the other connections meanwhile."""

from __future__ import annotations

import re
import socket
import struct
import time
from collections.abc import Iterator

import psycopg
import pytest

from proxy.postgres import codec
from tests.postgres.conftest import RESOURCE
from tests.postgres.fake_upstream import FakePostgres
from tests.support.azurite import free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.keyless import KeylessProcess
from tests.support.postgres_server import AZURE_HOST

pytestmark = pytest.mark.e2e
FAKE_HOST = "keylessfake.postgres.database.azure.com"
ROLE = "fault_identity"  # its password is the token
REFUSING_ROLE = "fault_refusing"  # its password is not the token: the server refuses it
WRONG_PASSWORD = "legacy-Passw0rd-from-the-config"


@pytest.fixture(scope="module")
def token(postgres_server, module_identity) -> str:
    value = make_token(RESOURCE, lifetime=3600)
    module_identity.queue_tokens(RESOURCE, value)
    postgres_server.create_role(ROLE, value)
    postgres_server.create_role(REFUSING_ROLE, "some-other-password")
    return value


@pytest.fixture(scope="module")
def fake_upstream(pki, token) -> Iterator[FakePostgres]:
    with FakePostgres(pki.issue_server_cert(FAKE_HOST), token) as fake:
        yield fake


@pytest.fixture
def fresh_fake(fake_upstream) -> FakePostgres:
    fake_upstream.attempts.clear()
    fake_upstream.auth_code = codec.AUTH_CLEARTEXT_PASSWORD
    fake_upstream.tls_answer = b"S"
    return fake_upstream


class Ports:
    def __init__(self) -> None:
        self.real, self.fake = free_port(), free_port()


@pytest.fixture(scope="module")
def ports() -> Ports:
    return Ports()


@pytest.fixture(scope="module")
def keyless(tmp_path_factory, pki, postgres_server, module_identity, token, fake_upstream,
            ports) -> Iterator[KeylessProcess]:
    process = KeylessProcess(tmp_path_factory.mktemp("keyless-pg-faults"), [
        "--postgres", f"{ports.real}={AZURE_HOST}",
        "--postgres", f"{ports.fake}={FAKE_HOST}",
        "--connect-to", f"{AZURE_HOST}:5432:127.0.0.1:{postgres_server.port}",
        "--connect-to", f"{FAKE_HOST}:5432:127.0.0.1:{fake_upstream.port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        "--token-margin", "0",
    ], module_identity.env()).start()
    yield process
    process.stop()


def dsn(port: int, user: str = ROLE) -> str:
    return psycopg.conninfo.make_conninfo(host="127.0.0.1", port=port, user=user, dbname=user,
                                          password=WRONG_PASSWORD, connect_timeout=10)


@pytest.fixture
def bystander(keyless, ports) -> Iterator[psycopg.Connection]:
    """A normal client, open before the fault and checked after it."""
    with psycopg.connect(dsn(ports.real)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        yield conn
        assert conn.execute("SELECT 2").fetchone() == (2,)
    with psycopg.connect(dsn(ports.real)) as again:  # and a new one
        assert again.execute("SELECT current_user").fetchone() == (ROLE,)


def wait_for_log(process: KeylessProcess, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := process.log()):
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{log[-3000:]}"
        time.sleep(0.05)
    return log


def test_upstream_refusing_the_token_passes_its_error_and_logs_the_fix(keyless, ports,
                                                                       bystander):
    refused = keyless.metric("keyless_listener_logins_total", result="upstream_refused")
    with pytest.raises(psycopg.OperationalError,
                       match=f'password authentication failed for user "{REFUSING_ROLE}"'):
        psycopg.connect(dsn(ports.real, REFUSING_ROLE))
    log = wait_for_log(keyless, f"pgaadauth_create_principal('{REFUSING_ROLE}', false, false)")
    assert "the login user must be the role name created for the identity" in log
    assert keyless.metric("keyless_listener_logins_total", result="upstream_refused") \
        == refused + 1
    assert WRONG_PASSWORD not in log


def test_the_apps_password_never_goes_upstream_the_token_does(keyless, ports, fresh_fake,
                                                              token):
    with psycopg.connect(dsn(ports.fake)) as conn:
        assert conn.info.parameter_status("server_version") == "15.99"
        assert conn.info.backend_pid == 4242  # the server's own BackendKeyData
    (attempt,) = fresh_fake.attempts
    assert attempt.tls and attempt.startup is not None
    assert attempt.startup.get("user") == ROLE and attempt.startup.get("database") == ROLE
    assert bytes(attempt.received).startswith(codec.encode_password(token))
    assert WRONG_PASSWORD.encode() not in bytes(attempt.received)


@pytest.mark.parametrize(("code", "method"), [(codec.AUTH_MD5_PASSWORD, "an MD5 password"),
                                              (codec.AUTH_SASL, "SASL (SCRAM-SHA-256)")])
def test_md5_or_scram_requests_never_get_the_token(keyless, ports, fresh_fake, token, code,
                                                   method, bystander):
    fresh_fake.auth_code = code
    with pytest.raises(psycopg.OperationalError,
                       match=re.escape(f"KeylessUnsupportedAuth: the server asked for "
                                       f"{method}; Entra logins use cleartext over TLS")):
        psycopg.connect(dsn(ports.fake))
    wait_for_log(keyless, f"refused the Entra login of identity default: the server asked for "
                          f"{method}")
    (attempt,) = fresh_fake.attempts
    assert attempt.startup is not None
    assert bytes(attempt.received) == b""  # nothing after the startup: no token, no password


def test_an_upstream_without_tls_gets_nothing(keyless, ports, fresh_fake, bystander):
    fresh_fake.tls_answer = b"N"
    with pytest.raises(psycopg.OperationalError,
                       match=re.escape(f"KeylessUpstreamTLS: {FAKE_HOST}:5432 does not "
                                       "accept TLS")):
        psycopg.connect(dsn(ports.fake))
    (attempt,) = fresh_fake.attempts
    assert not attempt.tls and bytes(attempt.received) == b""  # no startup, no token


def test_an_upstream_reset_mid_query(keyless, ports, fresh_fake, bystander):
    with psycopg.connect(dsn(ports.fake)) as conn:
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT pg_sleep(1)")
        assert conn.closed


def test_the_real_server_terminating_a_backend_mid_query(keyless, ports, postgres_server,
                                                         bystander):
    with psycopg.connect(dsn(ports.real)) as victim:
        pid = victim.info.backend_pid
        with postgres_server.admin() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError, match="terminating connection"):
            victim.execute("SELECT 1")


@pytest.mark.parametrize(("garbage", "answer_expected"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b""),
    (struct.pack("!I", 1 << 30) + b"\0" * 64, b""),  # a 1 GiB length prefix
    (struct.pack("!II", 12, 196608) + b"\xff\xff\xff\xff", b""),
    (codec.encode_gssenc_request() + b"\xff" * 20, b"N"),
    # a StartupMessage pipelined behind the SSLRequest: refused, not answered (CVE-2021-23214)
    (codec.encode_ssl_request() + codec.encode_startup(codec.StartupMessage(
        196608, (("user", ROLE), ("database", ROLE)))), b""),
])
def test_a_client_sending_garbage_is_closed(keyless, ports, bystander, garbage,
                                            answer_expected):
    errors = keyless.metric("keyless_listener_logins_total", result="client_error")
    rss = keyless.rss_bytes()
    with socket.create_connection(("127.0.0.1", ports.real), timeout=10) as sock:
        sock.sendall(garbage)
        answer = b""
        while chunk := sock.recv(4096):  # until keyless closes (the timeout bounds it)
            answer += chunk
    assert answer == answer_expected
    assert keyless.metric("keyless_listener_logins_total", result="client_error") \
        == errors + 1
    assert keyless.rss_bytes() - rss < 64 * 1024 * 1024  # the 1 GiB was never allocated


def test_token_endpoint_down_at_connect(tmp_path, pki, postgres_server):
    later_token = make_token(RESOURCE, lifetime=3600)
    postgres_server.create_role("fault_down", later_token)
    with FakeIdentityEndpoint(mode="error") as endpoint:
        endpoint.queue_tokens(RESOURCE, later_token)
        port = free_port()
        process = KeylessProcess(tmp_path / "keyless", [
            "--postgres", f"{port}={AZURE_HOST}",
            "--connect-to", f"{AZURE_HOST}:5432:127.0.0.1:{postgres_server.port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            "--token-timeout", "5",
        ], endpoint.env()).start()
        try:
            seen = postgres_server.log_text().count("connection received")
            with pytest.raises(psycopg.OperationalError, match="KeylessTokenUnavailable: "):
                psycopg.connect(dsn(port, "fault_down"))
            # the server saw no connection at all, let alone a login attempt for the role
            assert postgres_server.log_text().count("connection received") == seen
            assert 'user "fault_down"' not in postgres_server.log_text()
            assert process.metric("keyless_listener_logins_total",
                                  result="token_unavailable") == 1
            assert WRONG_PASSWORD not in process.log()

            endpoint.mode = "ok"  # the identity is back: the next connection logs in
            with psycopg.connect(dsn(port, "fault_down")) as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("fault_down",)
        finally:
            process.stop()
