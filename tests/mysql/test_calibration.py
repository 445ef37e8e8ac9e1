"""The test servers judge the way Azure would: the token over TLS passes, anything else fails.

Straight from PyMySQL to the server (no keyless), so the end-to-end tests' successes mean
something: the MariaDB user's password is the token, the fake peer verifies the token it is
sent in clear (mysql_clear_password, caching_sha2_password full auth).
"""

from __future__ import annotations

import contextlib

import pymysql
import pytest

from tests.support.identity_endpoint import make_token
from tests.support.mysql_server import OSSRDBMS_RESOURCE, TEST_DATABASE

pytestmark = pytest.mark.e2e


def connect(port: int, user: str, password: str, ca: str | None, **extra):
    # PyMySQL tries TLS on its own when the server offers it: None means no TLS at all
    tls = ({"ssl_ca": ca, "ssl_verify_cert": True, "ssl_verify_identity": True} if ca
           else {"ssl_disabled": True})
    return pymysql.connect(host="127.0.0.1", port=port, user=user, password=password,
                           connect_timeout=10, **tls, **extra)


def query(connection, sql: str):
    with contextlib.closing(connection), connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def test_mariadb_accepts_the_token_over_tls(mariadb, pki):
    token = make_token(OSSRDBMS_RESOURCE)
    mariadb.create_token_user("calibrate", token)
    rows = query(connect(mariadb.port, "calibrate", token, pki.ca_pem_path,
                         database=TEST_DATABASE), "SHOW STATUS LIKE 'Ssl_cipher'")
    assert rows[0][1], "the session did not use TLS"


def test_mariadb_refuses_a_wrong_password_and_plain_tcp(mariadb, pki):
    token = make_token(OSSRDBMS_RESOURCE)
    mariadb.create_token_user("calibrate2", token)
    with pytest.raises(pymysql.err.OperationalError) as wrong:
        connect(mariadb.port, "calibrate2", "wrong-password", pki.ca_pem_path)
    assert wrong.value.args[0] == 1045
    with pytest.raises(pymysql.err.OperationalError) as plain:
        connect(mariadb.port, "calibrate2", token, None)
    assert plain.value.args[0] == 1045  # REQUIRE SSL


def test_fake_accepts_the_token_in_clear_over_tls(fake, pki):
    token = make_token(OSSRDBMS_RESOURCE)
    rows = query(connect(fake.port, "app@contoso", token, pki.ca_pem_path),
                 "SELECT CURRENT_USER()")
    assert rows == (("app@contoso",),)
    assert [login.accepted for login in fake.logins] == [True]


@pytest.mark.parametrize("mode", ["clear", "caching_sha2"])
def test_fake_refuses_what_azure_refuses(fake, pki, mode):
    fake.mode = mode
    for password in ("wrong-password", make_token("https://management.azure.com"),
                     make_token(OSSRDBMS_RESOURCE, lifetime=-60)):
        with pytest.raises(pymysql.err.OperationalError) as refused:
            connect(fake.port, "app", password, pki.ca_pem_path)
        assert refused.value.args[0] == 1045
    assert [login.accepted for login in fake.logins] == [False] * 3
    with pytest.raises(pymysql.err.OperationalError) as plain:
        connect(fake.port, "app", make_token(OSSRDBMS_RESOURCE), None)
    assert plain.value.args[0] == 3159


def test_fake_caching_sha2_full_auth_takes_the_token(fake, pki):
    fake.mode = "caching_sha2"
    rows = query(connect(fake.port, "app", make_token(OSSRDBMS_RESOURCE), pki.ca_pem_path),
                 "SELECT 1")
    assert rows == (("1",),)
    assert [(login.client_plugin, login.accepted) for login in fake.logins] == [
        ("caching_sha2_password", True)]


@pytest.mark.parametrize("mode", ["sha2_fast", "switch_native"])
def test_fake_scramble_modes_check_the_password(fake, pki, mode):
    fake.mode = mode
    fake.expected_password = b"the-right-password"
    with contextlib.closing(connect(fake.port, "app", "the-right-password",
                                    pki.ca_pem_path)) as db:
        db.ping()
    with pytest.raises(pymysql.err.OperationalError) as refused:
        connect(fake.port, "app", "wrong-password", pki.ca_pem_path)
    assert refused.value.args[0] == 1045
    assert [login.accepted for login in fake.logins] == [True, False]
