"""Small SDK uploads through keyless, counting the kernel's delayed ACKs meanwhile.

Run by tests/e2e/test_proxy_mechanics.py inside a network namespace of its own (unshare),
where it starts everything it talks to: Azurite, the fake identity endpoint, keyless. The
kernel's DelayedACKs counter is per network namespace, so the rest of the machine's traffic
does not count. Within the namespace, every route but one has the `quickack` attribute, so
no socket can delay an ACK except keyless' end of the app's connection (the app, at
APP_ADDRESS, dials keyless at KEYLESS_ADDRESS): the count is that socket's alone, whatever
Azurite, the identity endpoint or keyless' upstream connections do on a loaded machine.
Prints one JSON line: {"uploads": N, "delayed_acks": D, "converted": C}.

    unshare --net sh -c 'ip link set lo up && exec python -m tests.e2e.quickack_probe DIR'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import uuid
from pathlib import Path

from azure.storage.blob import BlobServiceClient

from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV
from tests.support.azurite import ACCOUNT, WRONG_KEY, Azurite, TestPKI
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess

NETSTAT = Path("/proc/net/netstat")  # /proc/self/net: this process' network namespace
KEYLESS_ADDRESS = "127.0.0.3"  # keyless listens here for the app
APP_ADDRESS = "127.0.0.5"  # the app's source address towards keyless
ROUTES = [  # `ip route replace ...` (table local): quick ACKs for all but keyless -> app
    ["local", "127.0.0.0/8", "dev", "lo", "table", "local", "proto", "kernel", "scope", "host",
     "src", "127.0.0.1", "quickack", "1"],
    ["local", "127.0.0.1", "dev", "lo", "table", "local", "proto", "kernel", "scope", "host",
     "src", "127.0.0.1", "quickack", "1"],
    ["local", KEYLESS_ADDRESS, "dev", "lo", "table", "local", "scope", "host",
     "src", APP_ADDRESS, "quickack", "1"],
    ["local", APP_ADDRESS, "dev", "lo", "table", "local", "scope", "host", "src", APP_ADDRESS],
]


def only_keyless_app_side_may_delay_acks() -> None:
    for route in ROUTES:
        subprocess.run(["ip", "route", "replace", *route], check=True, capture_output=True,
                       timeout=30)


def delayed_acks() -> int:
    """The kernel's count of ACKs it held back waiting for data to piggyback on (Linux)."""
    lines = NETSTAT.read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split()[1:], values.split()[1:], strict=True))
                       ["DelayedACKs"])
    raise AssertionError("no TcpExt line in /proc/net/netstat")


def uploads_through_keyless(workdir: Path, uploads: int) -> dict[str, int]:
    only_keyless_app_side_may_delay_acks()
    pki = TestPKI(workdir / "pki")
    with Azurite(workdir / "azurite", pki) as azurite, FakeIdentityEndpoint() as identity:
        keyless = KeylessProcess(workdir / "keyless", [
            "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        ], {**identity.env(), **DEAD_PROXY_ENV}, listen_host=KEYLESS_ADDRESS).start()
        try:
            for name in ("NO_PROXY", "no_proxy", "https_proxy", "http_proxy"):
                os.environ.pop(name, None)
            os.environ.update({"HTTPS_PROXY": f"http://{KEYLESS_ADDRESS}:{keyless.port}",
                               "REQUESTS_CA_BUNDLE": keyless.ca_path})
            service = BlobServiceClient.from_connection_string(
                f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
                f"BlobEndpoint=https://{BLOB_HOST}")
            container = service.create_container(f"acks{uuid.uuid4().hex[:12]}")
            payload = os.urandom(1024)
            container.upload_blob("warm", payload)  # connection, token, certificate
            before = delayed_acks()
            for i in range(uploads):
                container.upload_blob(f"b{i}", payload, overwrite=True)
            held_back = delayed_acks() - before
            assert container.download_blob("b7").readall() == payload
            container.delete_container()
            converted = keyless.metric("keyless_requests_total", outcome="converted")
        finally:
            assert keyless.stop() == 0, keyless.log()[-2000:]
    return {"uploads": uploads, "delayed_acks": held_back, "converted": int(converted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--uploads", type=int, default=40)
    args = parser.parse_args()
    print(json.dumps(uploads_through_keyless(args.workdir, args.uploads)), flush=True)


if __name__ == "__main__":
    main()
