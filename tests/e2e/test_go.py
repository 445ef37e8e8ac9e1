"""A legacy Go app (azblob, account key) goes passwordless through keyless.

The app (tests/apps/go/cmd/storage, built once per run by tests/support/golang.py) is the same
binary in every run; only its environment changes. Through keyless it gets `HTTPS_PROXY` (read
by net/http's ProxyFromEnvironment, which azcore's default transport uses) and keyless' CA via
`SSL_CERT_FILE` or `SSL_CERT_DIR` (read by crypto/x509 on Linux) and nothing else.

The connection string names the production host (devstoreaccount1.blob.core.windows.net):
Go never proxies a loopback host, whatever HTTPS_PROXY says, so `BlobEndpoint=https://127.0.0.1`
would bypass keyless (docs/languages/go.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV, RECORDER_HOST
from tests.support.azurite import ACCOUNT, WRONG_KEY
from tests.support.golang import go_app
from tests.support.keyless import KeylessProcess

pytestmark = pytest.mark.e2e
APP_TIMEOUT = 120
BLOB_SIZE = 3 * 1024 * 1024 + 17  # a few MiB, not a multiple of the 1 MiB block size
STAGED_BLOCKS = 4  # ceil(BLOB_SIZE / 1 MiB): UploadStream stages them, then commits the list
LEGACY_BLOB = (
    f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
    f"BlobEndpoint=https://{BLOB_HOST}"
)
# What the app signs with the Shared Key: create container, stage blocks, commit, download,
# list, put note.txt, delete both blobs, list, delete container. The SAS read is one more.
SHARED_KEY_REQUESTS = 1 + STAGED_BLOCKS + 1 + 1 + 1 + 1 + 2 + 1 + 1
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Anything that could route, trust or configure the app other than what each test passes.
SCRUBBED = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE",
            "SSL_CERT_DIR", "GODEBUG", "AZURE_STORAGE_CONNECTION_STRING", "BLOB_SIZE")


@pytest.fixture(scope="module")
def storage_app() -> Path:
    return go_app("storage")


def run_app(app: Path, env: dict[str, str]) -> tuple[dict, subprocess.CompletedProcess[str]]:
    base = {k: v for k, v in os.environ.items() if k.upper() not in SCRUBBED}
    completed = subprocess.run([str(app)], env={**base, "BLOB_SIZE": str(BLOB_SIZE), **env},
                               capture_output=True, text=True, timeout=APP_TIMEOUT)
    lines = completed.stdout.strip().splitlines()
    assert lines, f"no output (exit {completed.returncode}):\n{completed.stderr}"
    return json.loads(lines[-1]), completed


def counters(process: KeylessProcess) -> tuple[float, float, float]:
    return (
        process.metric("keyless_requests_total", outcome="converted", service="storage-blob"),
        process.metric("keyless_key_material_stripped_total",
                       scheme="SharedKey", service="storage-blob"),
        process.metric("keyless_key_material_stripped_total", scheme="SAS",
                       service="storage-blob"),
    )


def through(process: KeylessProcess, **trust: str) -> dict[str, str]:
    return {"AZURE_STORAGE_CONNECTION_STRING": LEGACY_BLOB, "HTTPS_PROXY": process.proxy_url,
            **trust}


def assert_round_trip(result: dict, completed: subprocess.CompletedProcess[str]) -> None:
    assert completed.returncode == 0 and result["ok"], (result, completed.stderr)
    assert result["size"] == BLOB_SIZE
    assert result["downloadedSha256"] == result["uploadedSha256"]
    assert result["listed"] == ["payload.bin"]
    assert result["sasRead"] == "hello through a bogus SAS"
    assert result["afterDelete"] == []


def test_go_app_with_wrong_key_and_bogus_sas_works_through_keyless(storage_app, keyless):
    before = counters(keyless)

    result, completed = run_app(storage_app, through(keyless, SSL_CERT_FILE=keyless.ca_path))

    assert_round_trip(result, completed)
    # keyless counted every request of the app as converted, its key material stripped.
    deadline = time.monotonic() + 30  # the counters move after the answer; poll, generously
    while (now := counters(keyless))[0] - before[0] < SHARED_KEY_REQUESTS + 1 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now[0] - before[0] >= SHARED_KEY_REQUESTS + 1, (before, now)
    assert now[1] - before[1] >= SHARED_KEY_REQUESTS, (before, now)
    assert now[2] - before[2] >= 1, (before, now)  # the SAS read, its bogus sig stripped
    log = keyless.log()
    assert WRONG_KEY not in log
    signature = result["sasSignature"]  # base64: in the URL it travels percent-encoded
    assert signature and signature not in log and quote(signature, safe="") not in log
    # What Go's client did on the wire through the CONNECT tunnel (docs/languages/go.md):
    # HTTP/2 (azcore's transport offers h2 by ALPN, keyless accepts it and speaks HTTP/1.1 to
    # Azurite), every request on one multiplexed connection, no `Expect: 100-continue`.
    assert_wire(result["wire"], "HTTP/2.0", reused_at_least=result["wire"]["requests"] - 1)


def test_godebug_does_not_turn_off_http2_for_azcore(storage_app, keyless):
    # azcore's transport (sdk/internal/transport) configures HTTP/2 with golang.org/x/net/http2,
    # which GODEBUG=http2client=0 (a net/http switch) does not reach: still h2 (docs).
    result, completed = run_app(storage_app, through(keyless, SSL_CERT_FILE=keyless.ca_path,
                                                     GODEBUG="http2client=0"))
    assert_round_trip(result, completed)
    assert_wire(result["wire"], "HTTP/2.0", reused_at_least=result["wire"]["requests"] - 1)


@pytest.fixture(scope="module")
def keyless_http1(tmp_path_factory, pki, azurite, module_identity) -> Iterator[KeylessProcess]:
    """keyless with mitmproxy's HTTP/2 off: it offers the app only http/1.1 by ALPN."""
    process = KeylessProcess(tmp_path_factory.mktemp("keyless-http1"), [
        "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
        "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        "--set", "http2=false",
    ], {**module_identity.env(), **DEAD_PROXY_ENV}).start()
    yield process
    assert process.stop() == 0, process.log()


def test_go_app_over_http1_through_keyless(storage_app, keyless_http1):
    # HTTP/1.1 through the tunnel: kept-alive connections, reused by the two parallel stagers.
    before = counters(keyless_http1)
    result, completed = run_app(storage_app, through(keyless_http1,
                                                     SSL_CERT_FILE=keyless_http1.ca_path))
    assert_round_trip(result, completed)
    assert_wire(result["wire"], "HTTP/1.1", reused_at_least=result["wire"]["requests"] - 2)
    deadline = time.monotonic() + 30
    while (now := counters(keyless_http1))[0] - before[0] < SHARED_KEY_REQUESTS + 1 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now[0] - before[0] >= SHARED_KEY_REQUESTS + 1, (before, now)
    assert WRONG_KEY not in keyless_http1.log()


def assert_wire(wire: dict, protocol: str, reused_at_least: int) -> None:
    assert wire["protocols"] == {protocol: wire["requests"]}, wire
    assert wire["requests"] >= SHARED_KEY_REQUESTS + 1, wire
    assert wire["expectContinue"] == 0, wire
    assert wire["reusedConnections"] >= reused_at_least, wire

def test_go_trust_from_a_bundle_with_the_system_cas(storage_app, keyless, tmp_path):
    # The portable form (distroless, Alpine, scratch): one file with the system CAs and keyless'.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(SYSTEM_BUNDLE.read_bytes() + Path(keyless.ca_path).read_bytes())
    empty = tmp_path / "no-certs"
    empty.mkdir()
    result, completed = run_app(storage_app, through(keyless, SSL_CERT_FILE=str(bundle),
                                                     SSL_CERT_DIR=str(empty)))
    assert_round_trip(result, completed)


def test_go_reads_ssl_cert_dir_even_when_ssl_cert_file_is_set(storage_app, keyless, tmp_path):
    # SSL_CERT_FILE replaces only the bundle file: a directory still adds roots. keyless' CA
    # alone in SSL_CERT_DIR, the system bundle (without it) in SSL_CERT_FILE: trusted.
    directory = tmp_path / "certs"
    directory.mkdir()
    (directory / "keyless-ca.pem").write_bytes(Path(keyless.ca_path).read_bytes())
    result, completed = run_app(storage_app, through(keyless, SSL_CERT_FILE=str(SYSTEM_BUNDLE),
                                                     SSL_CERT_DIR=str(directory)))
    assert_round_trip(result, completed)


def test_go_app_through_keyless_without_its_ca_fails_tls(storage_app, keyless, tmp_path):
    # The app really verifies certificates: the successes above are keyless' CA, not a bypass.
    empty = tmp_path / "no-certs"
    empty.mkdir()
    for trust in ({}, {"SSL_CERT_FILE": str(SYSTEM_BUNDLE), "SSL_CERT_DIR": str(empty)}):
        result, completed = run_app(storage_app, through(keyless, **trust))
        assert completed.returncode == 1 and not result["ok"], (result, completed.stderr)
        assert result["status"] is None
        assert "x509: certificate signed by unknown authority" in result["message"], result


def test_same_go_app_straight_to_azurite_is_refused(storage_app, azurite, pki):
    result, completed = run_app(storage_app, {
        "AZURE_STORAGE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
            f"BlobEndpoint=https://127.0.0.1:{azurite.blob_port}/{ACCOUNT}"
        ),
        "SSL_CERT_FILE": pki.ca_pem_path,
    })

    assert completed.returncode == 1 and not result["ok"], (result, completed.stderr)
    # Azure answers a bad Shared Key with 403 AuthenticationFailed; Azurite under --oauth basic
    # with 400 InvalidAuthenticationInfo (see test_storage_end_to_end.py). Either way: refused.
    assert (result["status"], result["code"]) in {
        (400, "InvalidAuthenticationInfo"), (403, "AuthenticationFailed")
    }, result


@pytest.mark.parametrize("protocol", ["HTTP/2.0", "HTTP/1.1"])
def test_raw_net_http_app_with_expect_100_continue_through_keyless(keyless, protocol):
    # net/http's own client (tests/apps/go/cmd/rawblob): a Shared Key header it signs itself
    # and an upload with `Expect: 100-continue`. keyless (mitmproxy) answers 100 Continue itself
    # and drops the header before the upstream, so the body goes without the transport's 1 s
    # wait (ExpectContinueTimeout) over HTTP/2 and over HTTP/1.1 (GODEBUG reaches net/http's
    # bundled HTTP/2, unlike azcore's).
    before = counters(keyless)
    result, completed = run_app(go_app("rawblob"), {
        "BLOB_ACCOUNT": ACCOUNT, "BLOB_ACCOUNT_KEY": WRONG_KEY,
        "BLOB_ENDPOINT": f"https://{BLOB_HOST}", "HTTPS_PROXY": keyless.proxy_url,
        "SSL_CERT_FILE": keyless.ca_path,
        **({"GODEBUG": "http2client=0"} if protocol == "HTTP/1.1" else {}),
    })
    assert completed.returncode == 0 and result["ok"] and result["same"], (result,
                                                                         completed.stderr)
    calls = result["calls"]
    assert [c["method"] for c in calls] == ["PUT", "PUT", "GET", "DELETE"], calls
    assert {c["proto"] for c in calls} == {protocol}, calls
    upload = calls[1]
    assert upload["status"] == 201 and upload["got100Continue"], upload
    assert not any(c["got100Continue"] for c in calls[2:]), calls
    deadline = time.monotonic() + 30
    while (now := counters(keyless))[1] - before[1] < len(calls) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now[1] - before[1] >= len(calls), (before, now)  # each Shared Key stripped


def test_expect_100_continue_is_answered_by_keyless_not_forwarded(keyless, catalog_recorder):
    # What the upstream gets from that upload: the whole body, a token, and neither the
    # app's `Expect` nor its Shared Key (a recording server answers 200 to everything).
    before = len(catalog_recorder.requests)
    result, completed = run_app(go_app("rawblob"), {
        "BLOB_ACCOUNT": "recorder", "BLOB_ACCOUNT_KEY": WRONG_KEY,
        "BLOB_ENDPOINT": f"https://{RECORDER_HOST}", "HTTPS_PROXY": keyless.proxy_url,
        "SSL_CERT_FILE": keyless.ca_path,
    })
    assert completed.returncode == 0 and result["ok"], (result, completed.stderr)
    assert result["calls"][1]["got100Continue"], result
    uploads = [r for r in catalog_recorder.requests[before:]
               if r.method == "PUT" and r.path.endswith("/raw.bin")]
    assert len(uploads) == 1, catalog_recorder.requests[before:]
    upload = uploads[0]
    assert len(upload.body) == 256 * 1024 + 3
    assert upload.header_all("expect") == [], upload.headers
    authorization = upload.header_all("authorization")
    assert len(authorization) == 1 and authorization[0].startswith("Bearer "), authorization


def test_go_http2_connection_survives_idle_pings_through_keyless(storage_app, keyless):
    # azcore's HTTP/2 transport pings a connection idle for 10 s and closes it when no answer
    # comes within 5 s. After 17 s idle the app's next call still reuses its connection:
    # keyless answered the pings (and kept the tunnel open) as a long-lived app needs.
    result, completed = run_app(storage_app, through(keyless, SSL_CERT_FILE=keyless.ca_path,
                                                     PAUSE_SECONDS="17"))
    assert_round_trip(result, completed)
    assert result["wire"]["protocols"] == {"HTTP/2.0": result["wire"]["requests"]}
    assert result["reusedAfterPause"] is True, result
