"""keyless refuses to become an open proxy for its identity's tokens."""

from __future__ import annotations

import base64
import ipaddress
import socket
import subprocess
from types import SimpleNamespace

import pytest
from mitmproxy.proxy.mode_specs import ProxyMode

from addons.guard import ClientAllowlist
from tests.e2e.conftest import DEAD_PROXY_ENV, RECORDER_HOST
from tests.support.azurite import free_port
from tests.support.keyless import KeylessProcess, keyless_command
from tests.support.rawclient import request, status_of, tunnel

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("listen", ["0.0.0.0", "[::]", "10.1.2.3"])
def test_listening_off_loopback_without_auth_or_allowlist_is_refused(tmp_path, listen):
    result = subprocess.run(
        [*keyless_command(), "run", "--confdir", str(tmp_path), "--listen",
         f"{listen}:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "open proxy" in result.stderr and "--allow-clients" in result.stderr


def test_listening_off_loopback_with_an_allowlist_starts_and_serves_loopback(
    tmp_path, module_identity, pki, catalog_recorder
):
    process = KeylessProcess(tmp_path, [
        "--connect-to", f"{RECORDER_HOST}:443:127.0.0.1:{catalog_recorder.port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        "--allow-clients", "10.0.0.0/8",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}, listen_host="0.0.0.0")
    try:
        process.start()
        _, response, _ = tunnel(process.port, f"{RECORDER_HOST}:443", RECORDER_HOST,
                                request("GET", "/c/b", RECORDER_HOST,
                                        {"Authorization": "SharedKey a:QUJD"}))
        assert status_of(response) == 200
    finally:
        assert process.stop() == 0


def test_proxy_auth_is_required_when_configured(tmp_path, module_identity, pki, catalog_recorder):
    process = KeylessProcess(tmp_path, [
        "--connect-to", f"{RECORDER_HOST}:443:127.0.0.1:{catalog_recorder.port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        "--proxy-auth", "app:s3cret-proxy-password",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}).start()
    try:
        status, _, _ = tunnel(process.port, f"{RECORDER_HOST}:443", RECORDER_HOST, b"")
        assert status == 407
        credentials = base64.b64encode(b"app:s3cret-proxy-password").decode()
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
            sock.sendall(f"CONNECT {RECORDER_HOST}:443 HTTP/1.1\r\nHost: {RECORDER_HOST}\r\n"
                         f"Proxy-Authorization: Basic {credentials}\r\n\r\n".encode())
            assert b" 200 " in sock.recv(4096)
        assert "s3cret-proxy-password" not in process.log()
    finally:
        assert process.stop() == 0


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [("127.0.0.1", True), ("::1", True), ("10.1.2.3", True), ("::ffff:10.9.9.9", True),
     ("192.168.1.5", False), ("203.0.113.7", False), ("fe80::1%eth0", False)],
)
def test_client_allowlist(peer, allowed):
    client = SimpleNamespace(peername=(peer, 50000), error=None,
                             proxy_mode=ProxyMode.parse("regular@127.0.0.1:8080"))
    allowlist = ClientAllowlist([ipaddress.ip_network("10.0.0.0/8")])
    allowlist.client_connected(client)  # type: ignore[arg-type]
    assert (client.error is None) == allowed
