"""keyless resumes its TLS sessions to the service when the app opens a connection per request."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.e2e.conftest import DEAD_PROXY_ENV
from tests.support.keyless import KeylessProcess
from tests.support.upstreams import SocketServer

pytestmark = pytest.mark.e2e
N = 5
HOST_13 = "resume13.blob.core.windows.net"  # served by the TLS 1.3 upstream
HOST_12 = "resume12.blob.core.windows.net"  # served by the TLS 1.2-only upstream
HOST_A = "resumea.blob.core.windows.net"  # A and B: two names, one upstream address
HOST_B = "resumeb.blob.core.windows.net"
HOST_OFF = "resumeoff.blob.core.windows.net"  # for the keyless with resumption switched off
KEY = {"Authorization": "SharedKey resume:c2lnbmF0dXJl", "x-ms-version": "2021-08-06"}
TIMEOUT = 30  # per request: a hung keyless fails the test instead of hanging it


class ResumptionRecorder(SocketServer):
    """HTTPS on loopback that records, per accepted connection, the SNI and whether the
    handshake resumed a session. Answers 201 to every request (keep-alive until EOF)."""

    def __init__(self, tls: tuple[str, str], max_version: ssl.TLSVersion) -> None:
        super().__init__()
        self.handshakes: list[dict[str, Any]] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*tls)
        self.context.maximum_version = max_version
        self._names: dict[int, str | None] = {}
        self.context.sni_callback = self._sni

    def _sni(self, sock: ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        self._names[id(sock)] = name

    def for_name(self, name: str) -> list[bool]:
        return [h["reused"] for h in self.handshakes if h["sni"] == name]

    def serve(self, raw: socket.socket) -> None:  # type: ignore[override]
        raw.settimeout(TIMEOUT)
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                self.handshakes.append({"sni": self._names.pop(id(conn), None),
                                        "reused": conn.session_reused,
                                        "version": conn.version()})
                reader = conn.makefile("rb")
                for _ in range(100):  # requests per connection
                    length = None
                    for _ in range(100):  # header lines
                        line = reader.readline(65536)
                        if not line:
                            return
                        if line in (b"\r\n", b"\n"):
                            break
                        name, _, value = line.decode("latin-1").partition(":")
                        if name.strip().lower() == "content-length":
                            length = int(value)
                    reader.read(length or 0)
                    conn.sendall(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
        except (OSError, ValueError):
            return


@pytest.fixture(scope="module")
def upstream_13(pki) -> Iterator[ResumptionRecorder]:
    cert = pki.issue_server_cert(HOST_13, HOST_A, HOST_B, HOST_OFF)
    with ResumptionRecorder(cert, ssl.TLSVersion.TLSv1_3) as server:
        yield server


@pytest.fixture(scope="module")
def upstream_12(pki) -> Iterator[ResumptionRecorder]:
    with ResumptionRecorder(pki.issue_server_cert(HOST_12), ssl.TLSVersion.TLSv1_2) as server:
        yield server


def start(workdir, pki, identity, upstream_13, upstream_12, *extra: str) -> KeylessProcess:
    routes = [(HOST_13, upstream_13), (HOST_A, upstream_13), (HOST_B, upstream_13),
              (HOST_OFF, upstream_13), (HOST_12, upstream_12)]
    return KeylessProcess(
        workdir,
        [arg for host, server in routes
         for arg in ("--connect-to", f"{host}:443:127.0.0.1:{server.port}")]
        + ["--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
           "--token-timeout", "5",
           # mitmproxy's own upstream connections: the pool would carry these requests
           "--upstream-pool", "false", *extra],
        {**identity.env(), **DEAD_PROXY_ENV},
    ).start()


@pytest.fixture(scope="module")
def keyless(tmp_path_factory, pki, module_identity, upstream_13,
            upstream_12) -> Iterator[KeylessProcess]:
    process = start(tmp_path_factory.mktemp("keyless-resume"), pki, module_identity,
                    upstream_13, upstream_12)
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def keyless_off(tmp_path_factory, pki, module_identity, upstream_13,
                upstream_12) -> Iterator[KeylessProcess]:
    process = start(tmp_path_factory.mktemp("keyless-no-resume"), pki, module_identity,
                    upstream_13, upstream_12, "--set", "upstream_tls_resumption=false")
    yield process
    assert process.stop() == 0, process.log()


def post_on_new_connection(process: KeylessProcess, host: str, n: int) -> None:
    """What a connection-per-request app does: a fresh client (so a fresh connection) each.
    POST: keyless' upstream pool takes over idempotent requests, not these."""
    for i in range(n):
        with requests.Session() as session:
            session.trust_env = False
            response = session.post(f"https://{host}/c/blob-{i}", data=b"x" * 1024,
                                    headers=KEY, proxies={"https": process.proxy_url},
                                    verify=process.ca_path, timeout=TIMEOUT)
        assert response.status_code == 201, (response.status_code, response.text[:300])


@pytest.mark.parametrize("host, version", [(HOST_13, "TLSv1.3"), (HOST_12, "TLSv1.2")])
def test_new_client_connections_resume_the_upstream_session(keyless, upstream_13, upstream_12,
                                                            host, version):
    upstream = upstream_13 if host == HOST_13 else upstream_12
    post_on_new_connection(keyless, host, N)
    seen = [h for h in upstream.handshakes if h["sni"] == host]
    assert len(seen) == N, seen  # one upstream connection per client connection
    assert {h["version"] for h in seen} == {version}
    assert sum(h["reused"] for h in seen) >= N - 1, seen


def test_a_session_is_never_offered_to_another_name(keyless, upstream_13, pki):
    post_on_new_connection(keyless, HOST_A, 2)
    assert upstream_13.for_name(HOST_A)[-1] is True
    post_on_new_connection(keyless, HOST_B, 2)
    # B's first connection could only have resumed with A's session: it must not have
    assert upstream_13.for_name(HOST_B) == [False, True]
    would_resume_across_names(upstream_13, pki)


def would_resume_across_names(upstream: ResumptionRecorder, pki) -> None:
    """Shows the check above can fail: this upstream does accept A's session for name B."""
    client = ssl.create_default_context(cafile=pki.ca_pem_path)
    before = len(upstream.handshakes)
    session = None
    for name in (HOST_A, HOST_B):
        with (socket.create_connection(("127.0.0.1", upstream.port), timeout=TIMEOUT) as raw,
              client.wrap_socket(raw, server_hostname=name, session=session) as conn):
            conn.sendall(b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 201")  # also reads the tickets
            session = conn.session
    # (TLS 1.3: the server reports the SNI of this ClientHello, not the session's.)
    assert [(h["sni"], h["reused"]) for h in upstream.handshakes[before:]] == [
        (HOST_A, False), (HOST_B, True)]


def test_switched_off_nothing_is_resumed(keyless_off, upstream_13):
    post_on_new_connection(keyless_off, HOST_OFF, N)
    assert upstream_13.for_name(HOST_OFF) == [False] * N
