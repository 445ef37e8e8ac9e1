"""How keyless handles the app's connections, checked by mechanism rather than by timing."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient

from tests.e2e.conftest import BLOB_HOST
from tests.support.azurite import ACCOUNT, WRONG_KEY

pytestmark = pytest.mark.e2e
NETSTAT = Path("/proc/net/netstat")


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
