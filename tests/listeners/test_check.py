"""`keyless check` as an init container runs it: the real command, the fake identity, a
real TLS host for a --reverse target. (The listener logins are checked in each protocol's
tests, against the real servers.)"""

from __future__ import annotations

import os
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.support.azurite import free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import keyless_command

pytestmark = pytest.mark.e2e
HOST = "checkacct.blob.core.windows.net"
NAMESPACE = "checkbus.servicebus.windows.net"  # an AMQP listener's upstream, same TLS host


@pytest.fixture()
def tls_host(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS server for HOST (accepts, handshakes, closes) and the CA file that trusts it."""
    import socket

    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST, NAMESPACE).configure_cert(context)
    cafile = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(sock, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], cafile
    stop.set()
    thread.join(5)
    listener.close()


def run_check(tmp_path: Path, identity: FakeIdentityEndpoint, *args: str
              ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYLESS_", "AZURE_"))}
    env.update(identity.env())
    return subprocess.run(
        [*keyless_command(), "check", "--confdir", str(tmp_path / "confdir"),
         "--token-timeout", "5", *args],
        capture_output=True, text=True, timeout=120, env=env)


def test_check_passes_reports_every_finding_and_redacts_secrets(tmp_path, tls_host) -> None:
    port, cafile = tls_host
    subprocess.run([*keyless_command(), "init", "--confdir", str(tmp_path / "confdir"),
                    "--ca-out", str(tmp_path / "ca.pem")], check=True, capture_output=True,
                   timeout=60)
    with FakeIdentityEndpoint() as identity:
        args = ("--reverse", f"{free_port()}=https://{HOST}",
                "--connect-to", f"{HOST}:443:127.0.0.1:{port}",
                "--reverse", f"{free_port()}=amqps://{NAMESPACE}",
                "--connect-to", f"{NAMESPACE}:5671:127.0.0.1:{port}",
                "--set", f"ssl_verify_upstream_trusted_ca={cafile}",
                "--ready-scopes", "https://storage.azure.com/.default",
                "--proxy-auth", "user:s3cret-proxy-password")
        result = run_check(tmp_path, identity, *args)
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert "ok   token https://storage.azure.com/.default (identity default): valid for" in out
        assert f"ok   dial {HOST}:443: TLS verified" in out
        assert f"-> {NAMESPACE}:5671: TLS verified" in out
        assert ("ok   token https://servicebus.azure.net/.default (identity default): valid "
                "for") in out
        assert "ok   ca: " in out and "is private (mode 600)" in out
        assert "proxy-auth = <redacted>" in out
        assert "s3cret-proxy-password" not in out + result.stderr
        assert identity.calls_for("https://storage.azure.com"), "no token was fetched"

        # Each failure is one line, and the exit status says so.
        identity.mode = "error"
        (tmp_path / "confdir" / "mitmproxy-ca.pem").chmod(0o644)
        nothing_there = f"{HOST}:443:127.0.0.1:{free_port()}"
        failed = run_check(tmp_path, identity, *args[:3], nothing_there, *args[4:])
        assert failed.returncode == 1
        lines = [line for line in failed.stdout.splitlines() if line.startswith("FAIL")]
        assert any(line.startswith("FAIL token https://storage.azure.com/.default")
                   for line in lines), failed.stdout
        assert any(line.startswith(f"FAIL dial {HOST}:443: cannot connect") for line in lines)
        assert any(line.startswith("FAIL ca: ") for line in lines), failed.stdout
        assert failed.stdout.rstrip().endswith("failed")


def test_check_refuses_an_upstream_with_the_wrong_certificate(tmp_path, tls_host) -> None:
    port, _ = tls_host
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with FakeIdentityEndpoint() as identity:
        result = run_check(tmp_path, identity, "--reverse", f"{free_port()}=https://{HOST}",
                           "--connect-to", f"{HOST}:443:127.0.0.1:{port}",
                           "--set", f"ssl_verify_upstream_trusted_ca={other}")
    assert result.returncode == 1
    assert f"FAIL dial {HOST}:443: {HOST}:443 failed TLS verification" in result.stdout
