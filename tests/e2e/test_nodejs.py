"""A legacy Node.js app (@azure/storage-blob, account key) goes passwordless through keyless.

The app (tests/apps/node/storage_app.mjs) is the same code in every run; only its environment
changes. Through keyless it gets `HTTPS_PROXY` (read by @azure/core-rest-pipeline's proxy
settings, which `BlobServiceClient.fromConnectionString` consults) and `NODE_EXTRA_CA_CERTS`
(read by Node.js itself at start-up) and nothing else: no `NODE_TLS_REJECT_UNAUTHORIZED`, no
`NO_PROXY`, no code change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import BLOB_HOST
from tests.support.azurite import ACCOUNT, WRONG_KEY
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
APP = REPO / "tests" / "apps" / "node" / "storage_app.mjs"
APP_TIMEOUT = 120
BLOB_SIZE = 3 * 1024 * 1024 + 17  # a few MiB, not a multiple of any block size
LEGACY_BLOB = (
    f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
    f"BlobEndpoint=https://{BLOB_HOST}"
)
# What the app does: create, put, get properties + get (downloadToBuffer), list, delete,
# list, delete the container. Every one of them carries a Shared Key that keyless converts.
APP_REQUESTS = 8
# Anything that could route, trust or configure the app other than what each test passes.
SCRUBBED = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "NODE_TLS_REJECT_UNAUTHORIZED",
            "NODE_EXTRA_CA_CERTS", "NODE_OPTIONS", "NODE_USE_ENV_PROXY",
            "AZURE_STORAGE_CONNECTION_STRING", "BLOB_SIZE")


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is missing: the Node.js legacy app cannot run. Install Node.js 20 "
                    "(the machine's image has it; on Debian `apt-get install -y nodejs npm`)")
    if not (REPO / "node_modules" / "@azure" / "storage-blob").is_dir():
        pytest.fail("@azure/storage-blob is missing: run `npm ci` in the repository root")
    return found


def run_app(node: str, env: dict[str, str]) -> tuple[dict, subprocess.CompletedProcess[str]]:
    base = {k: v for k, v in os.environ.items() if k.upper() not in SCRUBBED}
    completed = subprocess.run(
        [node, str(APP)],
        env={**base, "BLOB_SIZE": str(BLOB_SIZE), **env},
        cwd=REPO, capture_output=True, text=True, timeout=APP_TIMEOUT,
    )
    lines = completed.stdout.strip().splitlines()
    assert lines, f"no output (exit {completed.returncode}):\n{completed.stderr}"
    return json.loads(lines[-1]), completed


def converted(process: KeylessProcess) -> tuple[float, float]:
    return (
        process.metric("keyless_requests_total", outcome="converted", service="storage-blob"),
        process.metric("keyless_key_material_stripped_total",
               scheme="SharedKey", service="storage-blob"),
    )


def test_node_app_with_wrong_key_works_through_keyless(node, keyless):
    requests_before, stripped_before = converted(keyless)

    result, completed = run_app(node, {
        "AZURE_STORAGE_CONNECTION_STRING": LEGACY_BLOB,
        "HTTPS_PROXY": keyless.proxy_url,
        "NODE_EXTRA_CA_CERTS": keyless.ca_path,
    })

    assert completed.returncode == 0 and result["ok"], (result, completed.stderr)
    assert result["size"] == BLOB_SIZE
    assert result["downloadedSha256"] == result["uploadedSha256"]
    assert result["listed"] == ["payload.bin"]
    assert result["afterDelete"] == []
    # keyless counted every request of the app as converted, its Shared Key stripped.
    deadline = time.monotonic() + 30  # the counters move after the answer; poll, generously
    while (now := converted(keyless))[0] - requests_before < APP_REQUESTS \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    requests_after, stripped_after = now
    assert requests_after - requests_before >= APP_REQUESTS, (requests_before, requests_after)
    assert stripped_after - stripped_before >= APP_REQUESTS, (stripped_before, stripped_after)
    assert WRONG_KEY not in keyless.log()


def test_same_node_app_straight_to_azurite_is_refused(node, azurite, pki):
    result, completed = run_app(node, {
        "AZURE_STORAGE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
            f"BlobEndpoint=https://127.0.0.1:{azurite.blob_port}/{ACCOUNT}"
        ),
        "NODE_EXTRA_CA_CERTS": pki.ca_pem_path,
    })

    assert completed.returncode == 1 and not result["ok"], (result, completed.stderr)
    # Azure answers a bad Shared Key with 403 AuthenticationFailed; Azurite under --oauth basic
    # with 400 InvalidAuthenticationInfo (see test_storage_end_to_end.py). Either way: refused.
    assert (result["status"], result["code"]) in {
        (400, "InvalidAuthenticationInfo"), (403, "AuthenticationFailed")
    }, result


def test_node_app_through_keyless_without_its_ca_fails_tls(node, keyless):
    # The app really verifies certificates: the success above is keyless' CA, not a bypass.
    result, completed = run_app(node, {
        "AZURE_STORAGE_CONNECTION_STRING": LEGACY_BLOB,
        "HTTPS_PROXY": keyless.proxy_url,
    })

    assert completed.returncode == 1 and not result["ok"], (result, completed.stderr)
    assert result["status"] is None
    assert result["code"] in {"SELF_SIGNED_CERT_IN_CHAIN", "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
                              "UNABLE_TO_VERIFY_LEAF_SIGNATURE"}, result
