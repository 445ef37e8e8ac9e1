"""Transparent mode for MySQL with real iptables, inside network namespaces.

A pod namespace holds the app (PyMySQL, its own UID, a WRONG password, TLS with keyless' CA
to the Azure name, which the pod's hosts file points at the "azure" namespace), keyless (UID
10001, `--transparent --transparent-databases`, the rules `keyless iptables` prints) and the
fake identity endpoint; the azure namespace holds a real MariaDB on port 3306 whose user's
password is the token. The app changes nothing: its connection to port 3306 is redirected to
keyless, which learns the server from the app's TLS server name and logs in with the token.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mysql.conftest import MYSQL_HOST
from tests.support.azurite import TestPKI
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.keyless import keyless_command
from tests.support.mysql_server import OSSRDBMS_RESOURCE, TEST_DATABASE, MariaDB
from tests.support.netns import (
    NamespacedKeyless,
    Netns,
    link,
    namespaces,
    readable_dir,
    require_netns,
    run_app,
)

pytestmark = pytest.mark.e2e
KEYLESS_UID, APP_UID = 10001, 10002
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


@dataclass
class MySQLPod:
    pod: Netns
    workdir: Path
    keyless: NamespacedKeyless
    keyless_ca: str
    identity: FakeIdentityEndpoint

    def app(self, host: str = MYSQL_HOST) -> dict[str, str]:
        script = self.workdir / "app" / "mysql_app.py"
        script.write_text(APP)
        script.chmod(0o644)
        return run_app(self.pod, APP_UID, self.workdir, sys.executable, str(script), host,
                       self.keyless_ca, USER, TEST_DATABASE)


@pytest.fixture(scope="module")
def mysql_pod() -> Iterator[MySQLPod]:
    require_netns()
    workdir = readable_dir(Path(tempfile.mkdtemp(prefix="keyless-mysql-netns-")))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        spaces = stack.enter_context(namespaces("pod", "azure"))
        pod, azure = spaces["pod"], spaces["azure"]
        link(pod, f"{POD_ADDRESS}/24", azure, [f"{SERVER_ADDRESS}/24"])
        pod.write_hosts({MYSQL_HOST: SERVER_ADDRESS, OTHER_HOST: SERVER_ADDRESS})
        pki = TestPKI(readable_dir(workdir / "pki"))
        token = make_token(OSSRDBMS_RESOURCE)
        mariadb = MariaDB(workdir / "mariadb", pki.issue_server_cert(MYSQL_HOST),
                          pki.ca_pem_path, host=SERVER_ADDRESS, port=3306)
        azure.call(mariadb.start, timeout=120)  # mariadbd is born inside the azure namespace
        stack.callback(mariadb.stop)
        mariadb.create_token_user(USER, token)
        identity = FakeIdentityEndpoint()
        pod.call(identity.start)
        stack.callback(identity.stop)
        identity.queue_tokens(OSSRDBMS_RESOURCE, token)
        keyless = NamespacedKeyless(pod, KEYLESS_UID, readable_dir(workdir / "keyless"), [
            "--transparent", "--transparent-databases",
            "--transparent-listen", f"127.0.0.1:{DATABASES_PORT}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            "--token-margin", "0",
        ], {**identity.env(), "HOME": str(workdir / "keyless")})
        stack.callback(keyless.stop)
        keyless.start()
        app_dir = readable_dir(workdir / "app")
        keyless_ca = app_dir / "keyless-ca.pem"
        shutil.copyfile(keyless.ca_path, keyless_ca)
        keyless_ca.chmod(0o644)
        rules = subprocess.run(
            [*keyless_command(), "iptables", "--listen", f"127.0.0.1:{keyless.port}",
             "--uid", str(KEYLESS_UID), "--transparent", "--transparent-databases",
             "--transparent-listen", f"127.0.0.1:{DATABASES_PORT}"],
            capture_output=True, text=True, timeout=30, check=True).stdout
        pod.run_recipe(rules, workdir)
        yield MySQLPod(pod, workdir, keyless, str(keyless_ca), identity)
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
