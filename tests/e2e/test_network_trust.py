"""Where keyless connects, and who reads its admin server, with the real keyless process.

- DNS rebinding: a name answers an allowed address first and a denied one next. keyless must
  connect to the address it checked, on mitmproxy's path (a tunnel) and the pool's.
- `--connect-to` is for the app's connections: a wildcard rule must not divert keyless' own
  token requests to the identity endpoint.
- The admin server listens on all interfaces (as in the image): probes and /metrics answer
  anyone; /report answers loopback clients, or others with the `--admin-token-file` secret.

The rebinding and admin tests run in a network namespace the test creates: one worker thread
of this process enters it, and what that thread starts (servers, sockets, keyless) lives there.
There a DNS server of the test's own answers on 127.0.0.1:53, and keyless, in a mount
namespace of its own, reads a resolv.conf naming it (glibc's real resolver, no hook in keyless).
Needs root (CAP_SYS_ADMIN), `ip` (iproute2) and `unshare` (util-linux).
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

import pytest
import requests

from tests.e2e.conftest import DEAD_PROXY_ENV, RECORDER_HOST
from tests.support import keyless as keyless_support
from tests.support.identity_endpoint import TOKEN_PATH, FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess
from tests.support.rawclient import plain, request, status_of, tunnel
from tests.support.upstreams import RecordedRequest, RecordingServer, SocketServer

pytestmark = pytest.mark.e2e
T = TypeVar("T")
KEY = {"Authorization": "SharedKey rebind:c2lnbmF0dXJl", "x-ms-version": "2021-08-06"}
ALLOWED, DENIED = "127.0.0.1", "127.0.0.2"  # --deny-networks 127.0.0.2/32 in these tests
REBIND_TUNNEL = "rebind.test"  # not a catalog host: tunnelled (mitmproxy's connect)
REBIND_BLOB = "rebind.blob.core.windows.net"  # a catalog host: its first request is pooled
STORAGE_SCOPE_RESOURCE = "https://storage.azure.com"


# -- a network namespace of the test's own ------------------------------------------------------


def require_namespace_tools() -> None:
    missing = [tool for tool in ("ip", "unshare", "mount") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        raise RuntimeError(
            "these tests create network and mount namespaces: run them as root (or with "
            "CAP_SYS_ADMIN) with iproute2 and util-linux installed "
            f"(apt-get install iproute2 util-linux); missing: {missing or 'root'}")


class Netns:
    """A fresh network namespace (loopback only, plus `addresses` on lo) that one worker
    thread lives in; everything run(fn) does happens in it."""

    def __init__(self, *addresses: str) -> None:
        require_namespace_tools()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="netns",
                                          initializer=self._enter, initargs=addresses)

    @staticmethod
    def _enter(*addresses: str) -> None:
        os.unshare(os.CLONE_NEWNET)  # this thread only: the rest of pytest stays outside
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        for address in addresses:
            subprocess.run(["ip", "addr", "add", address, "dev", "lo"], check=True)

    def run(self, fn: Callable[..., T], *args: Any, timeout: float = 180.0) -> T:
        return self._worker.submit(fn, *args).result(timeout)

    def close(self) -> None:
        self._worker.shutdown(wait=True)


@pytest.fixture
def netns_factory() -> Iterator[Callable[..., Netns]]:
    made: list[Netns] = []

    def make(*addresses: str) -> Netns:
        made.append(Netns(*addresses))
        return made[-1]

    yield make
    for netns in made:
        netns.close()


def keyless_reads_resolv_conf(monkeypatch: pytest.MonkeyPatch, resolv_conf: Path) -> None:
    """keyless runs in a mount namespace of its own where /etc/resolv.conf is `resolv_conf`."""
    command = keyless_support.keyless_command()
    monkeypatch.setattr(keyless_support, "keyless_command", lambda: [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv_conf),
        *command,
    ])


class ScriptedDNS:
    """A DNS server on 127.0.0.1:53 whose A answers follow a script per name: the first
    query gets the first address, the next the next (the last repeats). TTL 0. Other types
    of a scripted name get an empty answer, unknown names NXDOMAIN. A retransmission (the same
    query from the same client) gets the answer the original got and is not counted."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = {name.lower(): addresses for name, addresses in script.items()}
        self._asked: Counter[str] = Counter()
        self._answered: dict[tuple[Any, bytes], bytes] = {}
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 53))
        self._socket.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def asked(self, name: str) -> int:
        """How many A queries for `name` were answered."""
        with self._lock:
            return self._asked[name.lower()]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, client = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            key = (client, query)  # a retransmission is the same bytes from the same port
            if key not in self._answered and (answer := self._answer(query)) is not None:
                self._answered[key] = answer
            if key in self._answered:
                self._socket.sendto(self._answered[key], client)

    def _answer(self, query: bytes) -> bytes | None:
        if len(query) < 17:
            return None
        labels, offset = [], 12
        while offset < len(query) and query[offset]:
            length = query[offset]
            labels.append(query[offset + 1:offset + 1 + length].decode("ascii", "replace"))
            offset += 1 + length
        qtype = struct.unpack(">H", query[offset + 1:offset + 3])[0]
        question = query[12:offset + 5]
        name = ".".join(labels).lower()
        records = b""
        rcode = 0 if name in self.script else 3
        if name in self.script and qtype == 1:  # A
            with self._lock:
                turn = self._asked[name]
                self._asked[name] += 1
            addresses = self.script[name]
            address = addresses[min(turn, len(addresses) - 1)]
            records = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 0, 4) + socket.inet_aton(address)
        header = query[:2] + struct.pack(">HHHHH", 0x8180 | rcode, 1, 1 if records else 0, 0, 0)
        return header + question + records


class Listener(SocketServer):
    """A TCP listener that only records who connected (the address keyless must not dial)."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address)
        self.accepted: list[tuple[str, int]] = []

    def serve(self, conn: socket.socket) -> None:
        self.accepted.append(conn.getpeername()[:2])
        conn.close()


def app_session(process: KeylessProcess) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"https": process.proxy_url, "http": process.proxy_url}
    session.verify = process.ca_path
    return session


def authorization(seen: RecordedRequest) -> str | None:
    """The one Authorization field a recording server saw (a repeat fails the test)."""
    return seen.header("authorization")


# -- 1. DNS rebinding ---------------------------------------------------------------------------


def test_a_rebinding_name_is_dialled_at_the_address_keyless_checked(
        tmp_path, pki, monkeypatch, netns_factory):
    netns_factory().run(rebinding_scenario, tmp_path, pki, monkeypatch)


def rebinding_scenario(tmp_path: Path, pki: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 127.0.0.1\noptions attempts:2 timeout:2\n")
    keyless_reads_resolv_conf(monkeypatch, resolv_conf)
    script = {REBIND_TUNNEL: [ALLOWED, DENIED], REBIND_BLOB: [ALLOWED, DENIED]}
    with RecordingServer(tls=pki.issue_server_cert(REBIND_BLOB, REBIND_TUNNEL)) as allowed, \
            Listener((DENIED, allowed.port)) as denied, ScriptedDNS(script) as dns, \
            FakeIdentityEndpoint() as identity:
        process = KeylessProcess(tmp_path / "keyless", [
            "--deny-networks", f"{DENIED}/32",
            # the port only: the name itself still goes to DNS
            "--connect-to", f"{REBIND_BLOB}:443::{allowed.port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
        ], {**identity.env(), **DEAD_PROXY_ENV}).start()
        try:
            # mitmproxy's path: a tunnelled connection, checked and dialled on one answer
            status, response, _ = tunnel(
                process.port, f"{REBIND_TUNNEL}:{allowed.port}", REBIND_TUNNEL,
                request("GET", "/tunnelled", REBIND_TUNNEL))
            assert denied.accepted == [], "keyless connected to the denied address"
            assert (status, status_of(response)) == (200, 200), response[:300]
            assert [seen.path for seen in allowed.requests] == ["/tunnelled"]
            assert dns.asked(REBIND_TUNNEL) == 1, "check and connect must share one answer"
            # the next connection gets the denied answer: refused, not dialled
            refused_before = process.metric("keyless_requests_total",
                                            outcome="destination_denied")
            tunnel(process.port, f"{REBIND_TUNNEL}:{allowed.port}", REBIND_TUNNEL,
                   request("GET", "/tunnelled-again", REBIND_TUNNEL))
            assert dns.asked(REBIND_TUNNEL) == 2
            assert process.metric("keyless_requests_total",
                                  outcome="destination_denied") == refused_before + 1

            # the pool's path: a converted request (wrong key) to a catalog host
            with app_session(process) as app:
                answer = app.get(f"https://{REBIND_BLOB}/c/b", headers=KEY, timeout=30)
            assert answer.status_code == 200, answer.text[:300]
            seen = allowed.requests[-1]
            assert seen.path == "/c/b", seen.path
            assert authorization(seen) == f"Bearer {identity.issued[-1]}", \
                [name for name, _ in seen.headers]  # names only: values hold the token
            assert dns.asked(REBIND_BLOB) == 1

            assert denied.accepted == [], "keyless connected to the denied address"
            assert [seen.path for seen in allowed.requests] == ["/tunnelled", "/c/b"]
        finally:
            assert process.stop() == 0, process.log()


# -- 2. --connect-to is for the app's connections only ------------------------------------------


def test_a_wildcard_connect_to_does_not_divert_keyless_own_token_requests(tmp_path, pki):
    with RecordingServer(tls=pki.issue_server_cert(RECORDER_HOST)) as upstream, \
            FakeIdentityEndpoint() as identity:
        env = {**identity.env(), **DEAD_PROXY_ENV}
        # A host name, as a real identity endpoint has (an IP literal is never rewritten).
        env["IDENTITY_ENDPOINT"] = f"http://localhost:{identity.port}{TOKEN_PATH}"
        process = KeylessProcess(tmp_path, [
            "--connect-to", f"::127.0.0.1:{upstream.port}",  # every name, every port
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            "--token-timeout", "5",
        ], env).start()
        try:
            with app_session(process) as app:
                answer = app.get(f"https://{RECORDER_HOST}/c/b", headers=KEY, timeout=30)
            assert answer.status_code == 200, answer.text[:300]
            assert len(identity.calls_for(STORAGE_SCOPE_RESOURCE)) == 1
            assert [seen.path for seen in upstream.requests] == ["/c/b"]
            assert authorization(upstream.requests[0]) == f"Bearer {identity.issued[0]}"
        finally:
            assert process.stop() == 0, process.log()


# -- 3. the admin server ------------------------------------------------------------------------

OFF_LOOPBACK = "10.77.0.1"  # on lo inside the test's namespace: a peer that is not loopback


def admin_get(address: str, port: int, path: str, source: str,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    connection = http.client.HTTPConnection(address, port, timeout=10,
                                            source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def test_report_is_for_loopback_clients_or_the_admin_token(tmp_path, netns_factory):
    netns_factory(f"{OFF_LOOPBACK}/32").run(admin_scenario, tmp_path)


def admin_scenario(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(32)
    token_file = tmp_path / "admin-token"
    token_file.write_text(secret + "\n")
    process = KeylessProcess(tmp_path / "keyless", ["--admin-token-file", str(token_file)], {})
    process.args += ["--admin", f"0.0.0.0:{process.admin_port}"]  # as the image does
    process.start()
    try:
        port = process.admin_port

        def remote(path: str, **headers: str) -> tuple[int, dict[str, str], str]:
            return admin_get(OFF_LOOPBACK, port, path, OFF_LOOPBACK, headers)

        # probes and Prometheus reach it from off loopback
        assert remote("/healthz")[0] == 200
        assert remote("/readyz")[0] == 200
        status, _, metrics = remote("/metrics")
        assert status == 200 and "keyless_requests_total" in metrics
        # /report: no token, a wrong one, another scheme -> refused without detail
        status, headers, body = remote("/report")
        assert (status, headers.get("WWW-Authenticate"), body) == (401, "Bearer",
                                                                    "unauthorized\n")
        assert remote("/report", Authorization=f"Bearer {secret}x")[::2] == (403, "forbidden\n")
        assert remote("/report", Authorization=f"Bearer {secret[:-1]}")[0] == 403
        assert remote("/report", Authorization=f"Basic {secret}")[0] == 401
        # the operator's token, or a loopback client
        status, _, body = remote("/report", Authorization=f"Bearer {secret}")
        assert status == 200 and "inventory" in json.loads(body)
        status, _, body = admin_get("127.0.0.1", port, "/report", "127.0.0.1")
        assert status == 200 and "inventory" in json.loads(body)
        # and no client reaches the admin server's loopback trust through keyless itself
        response = plain(process.port, request("GET", f"http://127.0.0.1:{port}/report",
                                               f"127.0.0.1:{port}"))
        assert status_of(response) == 502 and b"inventory" not in response, response[:300]
    finally:
        assert process.stop() == 0, process.log()
    assert secret not in process.log()


def test_a_weak_admin_token_file_stops_keyless_without_echoing_it(tmp_path):
    token_file = tmp_path / "admin-token"
    token_file.write_text("short-secret\n")
    process = KeylessProcess(tmp_path, ["--admin-token-file", str(token_file)], {})
    with pytest.raises(RuntimeError, match="keyless exited with 2") as failed:
        process.start(timeout=20)
    assert "at least 16" in str(failed.value) and "short-secret" not in str(failed.value)
