"""Transparent mode for MySQL with real iptables, inside network namespaces.

A pod namespace holds the app (PyMySQL, its own UID, a WRONG password, TLS with keyless' CA
to the Azure name, which the pod's hosts file points at the "azure" namespace), keyless (UID
10001, `--transparent --transparent-databases`, the rules `keyless iptables` prints) and the
fake identity endpoint; the azure namespace holds a real MariaDB on port 3306 whose user's
password is the token. The app changes nothing: its connection to port 3306 is redirected to
keyless, which learns the server from the app's TLS server name and logs in with the token.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.mysql.conftest import MYSQL_HOST
from tests.support.identity_endpoint import make_token
from tests.support.mysql_server import OSSRDBMS_RESOURCE, TEST_DATABASE, MariaDB
from tests.support.netns import TransparentPod, transparent_pod

pytestmark = pytest.mark.e2e
POD_ADDRESS, SERVER_ADDRESS = "10.201.0.1", "10.201.0.2"
DATABASES_PORT = 15432
USER = "netns_app"
OTHER_HOST = "db.contoso.test"  # the same server under a name outside Azure
APP = """
import json, sys, pymysql
host, ca, user = sys.argv[1:4]
try:
    db = pymysql.connect(host=host, port=3306, user=user, password="wrong-password",
                         database=sys.argv[4], ssl_ca=ca, ssl_verify_identity=True,
                         connect_timeout=20, read_timeout=30)
    with db.cursor() as cursor:
        cursor.execute("SELECT CURRENT_USER(), @@hostname IS NOT NULL")
        who = cursor.fetchone()[0]
        cursor.execute("SHOW STATUS LIKE 'Ssl_cipher'")
        cipher = cursor.fetchone()[1]
    print(json.dumps({"user": who, "cipher": cipher, "version": db.server_version}))
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


class MySQLPod(TransparentPod):
    def app(self, host: str = MYSQL_HOST) -> dict[str, str]:
        script = self.app_dir / "mysql_app.py"
        script.write_text(APP)
        script.chmod(0o644)
        return self.run_app(sys.executable, str(script), host, self.keyless_ca, USER,
                            TEST_DATABASE)


@pytest.fixture(scope="module")
def mysql_pod() -> Iterator[MySQLPod]:
    with transparent_pod("mysql", POD_ADDRESS, [SERVER_ADDRESS],
                         {MYSQL_HOST: SERVER_ADDRESS, OTHER_HOST: SERVER_ADDRESS},
                         kind=MySQLPod) as pod:
        pki = pod.pki
        token = make_token(OSSRDBMS_RESOURCE)
        # mariadbd is born inside the azure namespace
        mariadb = pod.in_azure(MariaDB(pod.workdir / "mariadb", pki.issue_server_cert(MYSQL_HOST),
                                       pki.ca_pem_path, host=SERVER_ADDRESS, port=3306),
                               timeout=120)
        mariadb.create_token_user(USER, token)
        pod.identity.queue_tokens(OSSRDBMS_RESOURCE, token)
        databases = ("--transparent-databases",
                     "--transparent-listen", f"127.0.0.1:{DATABASES_PORT}")
        keyless = pod.start_keyless(
            *databases, "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            "--token-margin", "0", recipe=("--transparent", *databases))
        pod.redirect()
        yield pod
        assert token not in keyless.log()


def test_the_unchanged_app_reaches_mariadb_with_the_token(mysql_pod):
    result = mysql_pod.app()
    assert "error" not in result, (result, mysql_pod.keyless.log()[-3000:])
    assert result["user"] == f"{USER}@%"
    assert result["cipher"]  # keyless' own TLS to the server
    assert result["version"] == "8.0.0-keyless"  # keyless greeted first (transparent)
    assert mysql_pod.keyless.metric("keyless_listener_logins_total", protocol="mysql",
                                    result="converted") == 1
    assert len(mysql_pod.identity.calls_for(OSSRDBMS_RESOURCE)) == 1


def test_a_name_outside_azure_gets_no_login(mysql_pod):
    before = mysql_pod.keyless.metric("keyless_listener_logins_total", protocol="mysql",
                                      result="converted")
    result = mysql_pod.app(OTHER_HOST)
    # keyless' TLS refuses the name (an alert), before any login: not MariaDB refusing the
    # wrong password, which the app would meet without the redirect
    assert "UNRECOGNIZED_NAME" in result["error"] and "1045" not in result["error"]
    assert mysql_pod.keyless.metric("keyless_listener_logins_total", protocol="mysql",
                                    result="converted") == before
