"""How keyless handles the app's connections, checked by mechanism rather than by timing."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
import requests
from azure.storage.blob import BlobServiceClient

from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV
from tests.support.azurite import ACCOUNT, ACCOUNT_KEY, WRONG_KEY
from tests.support.keyless import KeylessProcess
from tests.support.upstreams import CountingRelay

pytestmark = pytest.mark.e2e
NETSTAT = Path("/proc/net/netstat")
KEY = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}


def delayed_acks() -> int:
    """The kernel's count of ACKs it held back waiting for data to piggyback on (Linux)."""
    lines = NETSTAT.read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split()[1:], values.split()[1:], strict=True))
                       ["DelayedACKs"])
    raise AssertionError("no TcpExt line in /proc/net/netstat")


@pytest.mark.skipif(not NETSTAT.exists(), reason="needs Linux' /proc/net/netstat")
def test_small_sdk_uploads_are_not_held_back_by_delayed_acks(through_keyless):
    """urllib3 leaves Nagle on towards a proxy and sends an upload's head and body in two
    writes; unless keyless ACKs the head at once, each body waits for the peer's delayed ACK
    (~40 ms). Without addons/quickack.py this counts about one delayed ACK per upload."""
    service = BlobServiceClient.from_connection_string(
        f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
        f"BlobEndpoint=https://{BLOB_HOST}")
    container = service.create_container(f"acks{uuid.uuid4().hex[:12]}")
    payload = os.urandom(1024)
    container.upload_blob("warm", payload)  # connection, token, certificate
    uploads = 40
    before = delayed_acks()
    for i in range(uploads):
        container.upload_blob(f"b{i}", payload, overwrite=True)
    held_back = delayed_acks() - before
    assert container.download_blob("b7").readall() == payload
    container.delete_container()
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
