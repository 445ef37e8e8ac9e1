"""Transparent mode for databases and caches, with real iptables in network namespaces.

The "pod" namespace runs keyless (`--transparent --transparent-databases`, as UID 10001), the
fake identity endpoint (on the pod's loopback) and the legacy apps (psycopg, PyMySQL and
redis-py with a WRONG password, as UID 10002, no proxy settings, trusting keyless' CA), under
exactly the rules `keyless iptables` prints. The "azure" namespace runs real Debian servers
(PostgreSQL 15, MariaDB, redis-server with TLS for the Azure names from the test CA), each
reachable at 10.200.1.2 on its Azure port; the pod's hosts file sends the Azure names there.
The servers' passwords are the tokens the fake identity hands keyless, so an app that works
proves keyless logged in with the token; the same app without the rules is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.entra import object_id_for
from tests.support.identity_endpoint import make_token
from tests.support.mysql_server import MariaDB
from tests.support.netns import APP_UID, KEYLESS_UID, TcpForwarder, TransparentPod, transparent_pod
from tests.support.postgres_server import PostgresServer
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

POD_ADDRESS, AZURE_ADDRESS = "10.200.1.1", "10.200.1.2"
PG_HOST = "keylesspg.postgres.database.azure.com"
MYSQL_HOST = "keylessmysql.mysql.database.azure.com"
REDIS_HOST = "keylesscache.redis.cache.windows.net"
OUTSIDE_HOST = "db.example.test"  # resolves to the same PostgreSQL: not an Azure name
OSSRDBMS = "https://ossrdbms-aad.database.windows.net"
REDIS_RESOURCE = "https://redis.azure.com"
DB_LISTEN = 15432
APP = Path(__file__).resolve().parents[1] / "apps" / "transparent_db_app.py"
USER = "transparent_app"


class Pod(TransparentPod):
    forwarders: dict[str, TcpForwarder]
    postgres: PostgresServer

    def app(self, protocol: str, host: str, ca: str | None = None) -> dict[str, Any]:
        return self.run_app(sys.executable, str(APP), protocol, host, USER,
                            ca or self.keyless_ca)

    def logins(self, protocol: str, result: str = "converted") -> float:
        return self.keyless.metric("keyless_listener_logins_total", protocol=protocol,
                                   result=result)


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    hosts = {PG_HOST: AZURE_ADDRESS, MYSQL_HOST: AZURE_ADDRESS, REDIS_HOST: AZURE_ADDRESS,
             OUTSIDE_HOST: AZURE_ADDRESS}
    with transparent_pod("db", POD_ADDRESS, [AZURE_ADDRESS], hosts, kind=Pod) as pod:
        pki = pod.pki
        # The real servers, in the "azure" namespace, on its loopback (their own settings),
        # forwarded from the Azure ports at the namespace's veth address.
        database_token = make_token(OSSRDBMS)
        cache_token = make_token(REDIS_RESOURCE)
        pod.postgres = pod.in_azure(PostgresServer(pki, host_name=PG_HOST), timeout=120)
        pod.postgres.create_role(USER, database_token)
        mariadb = pod.in_azure(MariaDB(pod.workdir / "mariadb",
                                       pki.issue_server_cert(MYSQL_HOST), pki.ca_pem_path),
                               timeout=150)
        mariadb.create_token_user(USER, database_token)
        cache = pod.in_azure(RedisServer(pod.workdir / "redis", pki, REDIS_HOST))
        cache.add_token_user(object_id_for(None), cache_token)
        pod.forwarders = {protocol: pod.forward(AZURE_ADDRESS, port, to_port)
                          for protocol, port, to_port in (("postgres", 5432, pod.postgres.port),
                                                          ("mysql", 3306, mariadb.port),
                                                          ("redis", 6380, cache.port))}

        pod.identity.queue_tokens(OSSRDBMS, database_token)
        pod.identity.queue_tokens(REDIS_RESOURCE, cache_token)
        databases = ("--transparent-databases", "--transparent-listen", f"127.0.0.1:{DB_LISTEN}")
        pod.start_keyless(*databases,
                          "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
                          "--token-timeout", "5", "--log-level", "debug",
                          recipe=("--transparent", *databases))
        yield pod


def test_the_recipe_redirects_every_database_port(pod):
    for port in (5671, 5432, 3306, 6380, 10000):
        assert (f"iptables -t nat -A KEYLESS_OUTPUT -p tcp --dport {port} -j REDIRECT "
                f"--to-ports {DB_LISTEN}") in pod.rules
        assert (f"ip6tables -t nat -A KEYLESS_OUTPUT -p tcp --dport {port} -j REDIRECT "
                f"--to-ports {DB_LISTEN}") in pod.rules


@pytest.mark.parametrize("protocol, host", [("postgres", PG_HOST), ("mysql", MYSQL_HOST),
                                            ("redis", REDIS_HOST)])
def test_without_the_rules_the_server_refuses_the_wrong_password(pod, protocol, host):
    pod.pod.flush_nat()
    # The app as it was: trusting the server's own CA, straight to it.
    result = pod.app(protocol, host, ca=pod.pki.ca_pem_path)
    assert result["outcome"] == "refused", result
    assert any(word in result["error"].lower() for word in
               ("password", "access denied", "wrongpass", "invalid username")), result


@pytest.mark.parametrize("protocol, host, user", [
    ("postgres", PG_HOST, USER),
    ("mysql", MYSQL_HOST, f"{USER}@%"),
    ("redis", REDIS_HOST, object_id_for(None)),
])
def test_an_app_with_a_wrong_password_logs_in_with_the_token(pod, protocol, host, user):
    pod.redirect()
    converted = pod.logins(protocol)
    arrived = pod.forwarders[protocol].connections

    result = pod.app(protocol, host)

    assert result["outcome"] == "ok", (result, pod.keyless.log()[-4000:])
    assert result["uid"] == APP_UID and pod.keyless.uid_running() == KEYLESS_UID
    assert result["user"] == user  # the server's own account of who logged in
    if protocol == "redis":
        assert result["value"] == "yes"
    else:
        assert result["server_ssl"] is True  # keyless' leg to the server is TLS
    if protocol == "postgres":
        assert result["rows"] >= 100
    assert pod.logins(protocol) - converted == 1
    # keyless' own connection went out once, not redirected back to itself
    assert pod.forwarders[protocol].connections - arrived == 1


def test_a_name_outside_azure_gets_no_login(pod):
    pod.redirect()
    arrived = pod.forwarders["postgres"].connections
    fetches = len(pod.identity.calls)

    # The app does not even verify what it is shown: keyless itself must refuse the name.
    result = pod.app("postgres", OUTSIDE_HOST, ca="none")

    assert result["outcome"] == "refused", result
    assert pod.forwarders["postgres"].connections == arrived  # nothing reached the server
    assert len(pod.identity.calls) == fetches
    # and an app that does verify rejects any leaf for it: the CA's name constraints
    assert pod.app("postgres", OUTSIDE_HOST)["outcome"] == "refused"
    assert pod.forwarders["postgres"].connections == arrived
