"""How keyless handles the app's connections, checked by mechanism rather than by timing."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from azure.storage.blob import BlobServiceClient

from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV
from tests.support.azurite import ACCOUNT, ACCOUNT_KEY
from tests.support.keyless import KeylessProcess
from tests.support.upstreams import CountingRelay

pytestmark = pytest.mark.e2e
KEY = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}
REPO = Path(__file__).resolve().parents[2]
PROBE_TIMEOUT = 300  # seconds; the probe takes about 10


def in_own_network_namespace(command: list[str]) -> list[str]:
    """`command` in a new network namespace with its loopback up (root, util-linux, iproute2)."""
    if os.geteuid() != 0:
        pytest.fail("this test creates a network namespace, which needs root: run the tests "
                    "as root (as CI does)")
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: `apt-get install -y {package}`")
    return ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            *command]


def test_small_sdk_uploads_are_not_held_back_by_delayed_acks(tmp_path):
    """urllib3 leaves Nagle on towards a proxy and sends an upload's head and body in two
    writes; unless keyless ACKs the head at once, each body waits for the peer's delayed ACK
    (~40 ms). Without addons/quickack.py this counts about one delayed ACK per upload.

    The kernel counts delayed ACKs per network namespace: the uploads, keyless, Azurite and
    the identity endpoint run in a namespace of their own, so no other traffic on the machine
    (another test run, say) adds to the count."""
    completed = subprocess.run(
        in_own_network_namespace(
            [sys.executable, "-m", "tests.e2e.quickack_probe", str(tmp_path)]),
        cwd=REPO, capture_output=True, text=True, timeout=PROBE_TIMEOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"\nquickack probe: {result}")
    uploads, held_back = result["uploads"], result["delayed_acks"]
    assert result["converted"] >= uploads + 3, result  # the uploads went through keyless
    assert held_back < uploads / 4, f"{held_back} delayed ACKs during {uploads} uploads"


# -- the upstream pool (addons/pool.py, proxy/upstream.py, proxy/relay.py) -------------------

@pytest.fixture(scope="module")
def counted(tmp_path_factory, pki, azurite, module_identity):
    """Two keyless processes, pool on and off, each dialling Azurite through a relay that
    counts the TCP connections keyless opens."""
    processes = {}
    with CountingRelay(("127.0.0.1", azurite.blob_port)) as on_relay, \
            CountingRelay(("127.0.0.1", azurite.blob_port)) as off_relay:
        for name, relay, extra in (("on", on_relay, []),
                                   ("off", off_relay, ["--upstream-pool", "false"])):
            processes[name] = (KeylessProcess(
                tmp_path_factory.mktemp(f"pool-{name}"),
                ["--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{relay.port}",
                 "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}", *extra],
                {**module_identity.env(), **DEAD_PROXY_ENV}).start(), relay)
        yield processes
        for process, _ in processes.values():
            assert process.stop() == 0, process.log()


def relay_port(process: KeylessProcess) -> int:
    found = re.search(r"relay for streamed answers on 127\.0\.0\.1:(\d+)", process.log())
    assert found, "keyless did not log its relay address"
    return int(found.group(1))


def fresh_get(process: KeylessProcess, path: str, **kwargs) -> requests.Response:
    """A GET on a new app connection (a new Session each time), with a wrong SharedKey."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(f"https://{BLOB_HOST}{path}", proxies={"https": process.proxy_url},
                           verify=process.ca_path, timeout=30, **kwargs,
                           headers={"Authorization": f"SharedKey {ACCOUNT}:c2lnbmF0dXJl",
                                    "x-ms-version": "2021-08-06"})


def test_new_connection_per_request_shares_one_upstream_connection(counted, azurite, pki):
    """An app that opens a connection per request: with the pool, keyless keeps one
    connection to the service; without it, one per request (mitmproxy's way)."""
    container = BlobServiceClient(azurite.blob_url, credential=KEY,
                                  connection_verify=pki.ca_pem_path) \
        .create_container(f"pool{uuid.uuid4().hex[:12]}")
    container.upload_blob("small", b"tiny body")
    requests_each = 8
    opened = {}
    for name, (process, relay) in counted.items():
        before, pooled = relay.connections, process.metric(
            "keyless_upstream_pool_requests_total", result="pooled")
        for _ in range(requests_each):
            response = fresh_get(process, f"/{container.container_name}/small")
            assert response.status_code == 200 and response.content == b"tiny body"
        opened[name] = relay.connections - before
        if name == "on":
            assert process.metric("keyless_upstream_pool_requests_total",
                                  result="pooled") == pooled + requests_each
    container.delete_container()
    assert opened == {"on": 1, "off": requests_each}, opened


def test_a_large_answer_to_a_pooled_request_streams_through_the_relay(counted, azurite, pki):
    process, _ = counted["on"]
    container = BlobServiceClient(azurite.blob_url, credential=KEY,
                                  connection_verify=pki.ca_pem_path) \
        .create_container(f"big{uuid.uuid4().hex[:12]}")
    payload = os.urandom(5 * 1024 * 1024 + 7)  # far above what keyless reads whole
    container.upload_blob("big", payload)
    streamed = process.metric("keyless_upstream_pool_requests_total", result="pooled_streamed")
    rss_before = process.peak_rss_bytes()

    response = fresh_get(process, f"/{container.container_name}/big", stream=True)
    received = b"".join(response.iter_content(1 << 16))

    assert response.status_code == 200 and received == payload
    assert int(response.headers["Content-Length"]) == len(payload)
    assert process.metric("keyless_upstream_pool_requests_total",
                          result="pooled_streamed") == streamed + 1
    assert process.peak_rss_bytes() - rss_before < len(payload), "the answer was buffered"
    # The relay hands out an answer once, and only for its one-time token.
    relay = requests.get(f"http://127.0.0.1:{relay_port(process)}/anything", timeout=5,
                         headers={"x-keyless-relay": "guess"})
    assert relay.status_code == 403
    container.delete_container()


def h2_get(process: KeylessProcess, path: str, timeout: float = 10) -> tuple[int, bytes]:
    """One GET over HTTP/2 on a new app connection: (status, body)."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", BLOB_HOST),
                          (":path", path), ("authorization", f"SharedKey {ACCOUNT}:c2ln"),
                          ("x-ms-version", "2021-08-06")], end_stream=True)
    context = ssl.create_default_context(cafile=process.ca_path)
    context.set_alpn_protocols(["h2"])
    status, body = 0, b""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", process.port), timeout=timeout) as sock:
        sock.sendall(f"CONNECT {BLOB_HOST}:443 HTTP/1.1\r\nHost: {BLOB_HOST}:443\r\n\r\n"
                     .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        with context.wrap_socket(sock, server_hostname=BLOB_HOST) as tls:
            assert tls.selected_alpn_protocol() == "h2"
            tls.sendall(conn.data_to_send())
            while time.monotonic() < deadline:
                data = tls.recv(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(len(event.data), event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        return status, body
                tls.sendall(conn.data_to_send())
    raise AssertionError(f"no complete answer within {timeout}s (status {status})")


def test_http2_apps_and_head_requests_go_over_the_pool(counted, azurite, pki):
    process, _ = counted["on"]
    container = BlobServiceClient(azurite.blob_url, credential=KEY,
                                  connection_verify=pki.ca_pem_path) \
        .create_container(f"h2{uuid.uuid4().hex[:12]}")
    container.upload_blob("small", b"tiny body")
    path = f"/{container.container_name}/small"
    pooled = process.metric("keyless_upstream_pool_requests_total", result="pooled")

    assert h2_get(process, path) == (200, b"tiny body")
    with requests.Session() as session:
        session.trust_env = False
        head = session.head(f"https://{BLOB_HOST}{path}", proxies={"https": process.proxy_url},
                            verify=process.ca_path, timeout=30,
                            headers={"Authorization": f"SharedKey {ACCOUNT}:c2ln",
                                     "x-ms-version": "2021-08-06"})
    assert head.status_code == 200 and head.headers["Content-Length"] == "9"
    assert head.content == b""
    assert process.metric("keyless_upstream_pool_requests_total",
                          result="pooled") == pooled + 2
    container.delete_container()
