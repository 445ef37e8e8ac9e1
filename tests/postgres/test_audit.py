"""--audit: the app's own password login goes through unchanged (over upstream TLS), no token
is fetched, and the login is recorded for `keyless report`, without the password."""

from __future__ import annotations

import json
import subprocess

import psycopg
import pytest

from tests.support.azurite import free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess, keyless_command
from tests.support.postgres_server import AZURE_HOST

pytestmark = pytest.mark.e2e
ROLE = "audit_legacy_user"
PASSWORD = "the-apps-real-Passw0rd"


def test_audit_mode_relays_the_apps_login_and_records_it(tmp_path, pki, postgres_server):
    postgres_server.create_role(ROLE, PASSWORD)
    port = free_port()
    with FakeIdentityEndpoint() as endpoint:
        process = KeylessProcess(tmp_path / "keyless", [
            "--audit",
            "--postgres", f"{port}={AZURE_HOST}",
            "--connect-to", f"{AZURE_HOST}:5432:127.0.0.1:{postgres_server.port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        ], endpoint.env()).start()
        try:
            app = dict(host="127.0.0.1", port=port, user=ROLE, dbname=ROLE, connect_timeout=10)
            with psycopg.connect(**app, password=PASSWORD) as conn:
                assert conn.execute("SELECT current_user, ssl FROM pg_stat_ssl "
                                    "WHERE pid = pg_backend_pid()").fetchone() == (ROLE, True)
            # the password is the app's: a wrong one is the server's refusal, passed on
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                psycopg.connect(**app, password="wrong")
            live = json.loads(process.get("/report")[1])
            assert process.metric("keyless_listener_logins_total", result="audited") == 1
        finally:
            assert process.stop() == 0
        assert endpoint.calls == [], "audit mode fetched a token"
    (entry,) = live["inventory"]
    assert (entry["service"], entry["resource"], entry["hosts"], entry["schemes"]) \
        == ("postgres", "keylesspg", [AZURE_HOST], {"password": 1})
    report = subprocess.run([*keyless_command(), "report", "--confdir", str(process.confdir)],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    assert "postgres keylesspg" in report
    everything = report + json.dumps(live) + process.log() \
        + (process.confdir / "keyless-state.json").read_text()
    assert PASSWORD not in everything
