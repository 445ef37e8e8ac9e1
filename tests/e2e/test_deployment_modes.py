"""Reverse mode, graceful drain, CA handling and transparent-mode configuration."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
import uuid

import pytest
import requests
import trustme
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueClient

from proxy.cli import build_parser
from proxy.config import resolve
from proxy.mitm import proxy_modes
from proxy.transparent import transparent_rules
from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV, QUEUE_HOST
from tests.support.azurite import ACCOUNT, ACCOUNT_KEY, WRONG_KEY, free_port
from tests.support.keyless import KeylessProcess, keyless_command

pytestmark = pytest.mark.e2e


def test_reverse_mode_needs_no_proxy_and_no_ca(tmp_path, pki, azurite, module_identity,
                                               monkeypatch):
    blob_port, queue_port = free_port(), free_port()
    process = KeylessProcess(tmp_path, [
        "--reverse", f"{blob_port}=https://{BLOB_HOST}",
        "--reverse", f"{queue_port}=https://{QUEUE_HOST}",
        "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
        "--connect-to", f"{QUEUE_HOST}:443:127.0.0.1:{azurite.queue_port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}).start()
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    try:
        legacy = (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
                  f"BlobEndpoint=http://localhost:{blob_port};"
                  f"QueueEndpoint=http://localhost:{queue_port}")
        container = BlobServiceClient.from_connection_string(legacy).create_container(
            f"reverse{uuid.uuid4().hex[:8]}")
        payload = os.urandom(8 * 1024 * 1024)
        container.upload_blob("r.bin", payload)
        assert container.download_blob("r.bin").readall() == payload
        assert [b.name for b in container.list_blobs()] == ["r.bin"]
        container.delete_container()
        queue = QueueClient.from_connection_string(legacy, f"rq{uuid.uuid4().hex[:8]}")
        queue.create_queue()
        queue.send_message("via reverse mode")
        assert [m.content for m in queue.receive_messages()] == ["via reverse mode"]
        queue.delete_queue()
    finally:
        assert process.stop() == 0, process.log()[-2000:]


def test_sigterm_drains_a_large_download_in_flight_then_exits_0(tmp_path, pki, azurite,
                                                                  module_identity):
    container = f"drain{uuid.uuid4().hex[:8]}"
    payload = os.urandom(48 * 1024 * 1024)
    BlobServiceClient.from_connection_string(
        azurite.connection_string(ACCOUNT_KEY), connection_verify=pki.ca_pem_path,
    ).create_container(container).upload_blob("big.bin", payload)
    process = KeylessProcess(tmp_path, [
        "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        "--drain-timeout", "60",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}).start()
    proxies = {"https": process.proxy_url}
    response = requests.get(
        f"https://{BLOB_HOST}/{container}/big.bin", stream=True, timeout=60, proxies=proxies,
        verify=process.ca_path,
        headers={"Authorization": f"SharedKey {ACCOUNT}:AAAA", "x-ms-version": "2021-08-06",
                 "Connection": "close"})
    assert response.status_code == 200
    digest, received = hashlib.sha256(), 0
    chunks = response.iter_content(1024 * 1024)
    first = next(chunks)
    digest.update(first)
    received += len(first)

    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    # Bounds below are generous (a loaded machine is slow); nothing here measures time.
    deadline = time.monotonic() + 60
    while process.get("/readyz")[0] != 503:  # readiness fails while draining
        assert process.process.poll() is None, "keyless exited before the download ended"
        assert time.monotonic() < deadline, "readiness still passes 60 s after SIGTERM"
        time.sleep(0.05)
    # New connections are refused (closed), not merely slow: a timeout would not count.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"https://{BLOB_HOST}/{container}/big.bin", proxies=proxies,
                     verify=process.ca_path, timeout=30)
    assert process.process.poll() is None, "keyless stopped with a download in flight"
    for chunk in chunks:  # the download in flight completes, read slowly by the app
        digest.update(chunk)
        received += len(chunk)
        time.sleep(0.02)
    assert received == len(payload)
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert process.process.wait(timeout=60) == 0, process.log()[-2000:]


def run_keyless(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*keyless_command(), *args], capture_output=True, text=True,
                          timeout=60)


def test_supplied_ca_is_used_and_its_key_must_be_private(tmp_path, module_identity, pki,
                                                         catalog_recorder):
    ca = trustme.CA()
    cert, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    ca.cert_pem.write_to_path(str(cert))
    ca.private_key_pem.write_to_path(str(key))
    key.chmod(0o644)
    refused = run_keyless("run", "--confdir", str(tmp_path / "c1"), "--ca-cert", str(cert),
                          "--ca-key", str(key), "--listen", f"127.0.0.1:{free_port()}",
                          "--admin", f"127.0.0.1:{free_port()}")
    assert refused.returncode == 2 and "readable by others" in refused.stderr
    key.chmod(0o600)
    from tests.e2e.conftest import RECORDER_HOST
    process = KeylessProcess(tmp_path / "k", [
        "--ca-cert", str(cert), "--ca-key", str(key),
        "--connect-to", f"{RECORDER_HOST}:443:127.0.0.1:{catalog_recorder.port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}).start()
    try:
        # the app trusts only the supplied CA, and the interception certificate checks out
        response = requests.get(f"https://{RECORDER_HOST}/c/b", timeout=10, verify=str(cert),
                                proxies={"https": process.proxy_url},
                                headers={"Authorization": "SharedKey a:QUJD"})
        assert response.status_code == 200
        assert (process.confdir / "mitmproxy-ca.pem").stat().st_mode & 0o777 == 0o600
    finally:
        assert process.stop() == 0


def test_generated_ca_key_is_0600_and_a_loosened_key_stops_startup(tmp_path):
    confdir = tmp_path / "conf"
    assert run_keyless("ca", "--confdir", str(confdir)).returncode == 0
    key = confdir / "mitmproxy-ca.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o640)
    result = run_keyless("run", "--confdir", str(confdir), "--listen",
                         f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "chmod 600" in result.stderr


def test_init_writes_the_public_certificate_for_the_app_and_exits(tmp_path):
    out = tmp_path / "shared" / "keyless-ca.pem"
    result = run_keyless("init", "--confdir", str(tmp_path / "conf"), "--ca-out", str(out))
    assert result.returncode == 0
    assert out.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in out.read_text()
    assert out.read_bytes() == (tmp_path / "conf" / "mitmproxy-ca-cert.pem").read_bytes()


def test_transparent_mode_configuration_and_iptables_recipe():
    settings = resolve(build_parser().parse_args(
        ["run", "--transparent", "--listen", "127.0.0.1:15001", "--reverse",
         "9001=https://acct.blob.core.windows.net"]), {})
    assert proxy_modes(settings, has_ipv6_loopback=False) == ["transparent@127.0.0.1:15001",
                                     "reverse:https://acct.blob.core.windows.net@127.0.0.1:9001"]
    rules = transparent_rules(15001, 10001, 15671)  # AMQPS to --transparent-listen's default
    assert "iptables -t nat -A KEYLESS_OUTPUT -m owner --uid-owner 10001 -j RETURN" in rules
    assert ("iptables -t nat -A KEYLESS_OUTPUT -p tcp --dport 443 -j REDIRECT --to-ports 15001"
            in rules)
    # keyless' own traffic is exempted before anything is redirected, for IPv4 and IPv6
    for tool in ("iptables", "ip6tables"):
        mine = [r for r in rules if r.startswith(f"{tool} ")]
        assert mine.index(next(r for r in mine if "uid-owner" in r)) < \
            mine.index(next(r for r in mine if "REDIRECT" in r))
    assert ("iptables -t nat -A KEYLESS_OUTPUT -p tcp --dport 5671 -j REDIRECT --to-ports 15671"
            in rules)
    assert not any("--dport 5432" in rule for rule in rules)  # databases: only when asked
    printed = run_keyless("iptables", "--listen", "127.0.0.1:15001", "--uid", "10001")
    assert printed.returncode == 0 and printed.stdout.splitlines() == rules
    with_databases = run_keyless("iptables", "--listen", "127.0.0.1:15001", "--uid", "10001",
                                 "--transparent", "--transparent-databases")
    assert with_databases.stdout.splitlines() == transparent_rules(15001, 10001, 15671, True)
    assert "--dport 6380 -j REDIRECT --to-ports 15671" in with_databases.stdout
    # Applied for real, with traffic through keyless in transparent mode:
    # tests/e2e/test_transparent.py (network namespaces).
