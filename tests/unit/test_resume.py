"""Upstream TLS session resumption: the key, the store, and real handshakes in memory."""

from __future__ import annotations

import contextlib
import gc
from dataclasses import replace
from types import SimpleNamespace

import pytest
import trustme
from mitmproxy import connection, tls
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.net import tls as net_tls
from mitmproxy.proxy import context, server_hooks
from mitmproxy.test import taddons, tflow
from OpenSSL import SSL

from addons.resume import ResumeUpstreamTLS, SessionKey, SessionStore, session_key

OPTIONS = SimpleNamespace(ssl_insecure=False, ssl_verify_upstream_trusted_ca="/ca.pem",
                          ssl_verify_upstream_trusted_confdir=None, client_certs=None)


def server(address=("a.blob.core.windows.net", 443), sni="a.blob.core.windows.net",
           alpn=(b"http/1.1",)) -> connection.Server:
    conn = connection.Server(address=address)
    conn.sni, conn.alpn_offers = sni, list(alpn)
    return conn


# --- the key ---------------------------------------------------------------------------------

def test_same_destination_and_settings_give_the_same_key():
    assert session_key(server(), OPTIONS) == session_key(server(), OPTIONS)
    assert session_key(server(sni="A.Blob.Core.Windows.Net"), OPTIONS) == session_key(
        server(), OPTIONS)


@pytest.mark.parametrize("change", [
    {"address": ("b.blob.core.windows.net", 443)},
    {"address": ("a.blob.core.windows.net", 8443)},
    {"sni": "b.blob.core.windows.net"},  # same address, another name: never offered
    {"sni": None},
    {"alpn": (b"h2", b"http/1.1")},
    {"alpn": ()},
])
def test_another_destination_gets_another_key(change):
    assert session_key(server(**change), OPTIONS) != session_key(server(), OPTIONS)


@pytest.mark.parametrize("option, value", [
    ("ssl_insecure", True),
    ("ssl_verify_upstream_trusted_ca", "/other-ca.pem"),
    ("ssl_verify_upstream_trusted_confdir", "/etc/ssl/certs"),
    ("client_certs", "/client.pem"),
])
def test_other_verification_settings_get_another_key(option, value):
    other = SimpleNamespace(**{**vars(OPTIONS), option: value})
    assert session_key(server(), other) != session_key(server(), OPTIONS)


def test_an_upstream_proxy_is_part_of_the_key():
    via = server()
    via.via = ("http", ("proxy.internal", 3128))
    assert session_key(via, OPTIONS) != session_key(server(), OPTIONS)


# --- the store -------------------------------------------------------------------------------

def key(n: int) -> SessionKey:
    return replace(session_key(server(), OPTIONS), sni=f"{n}.blob.core.windows.net")


def test_store_keeps_the_latest_session_per_key_and_forgets_on_demand():
    store = SessionStore()
    store.put(key(1), "old")  # type: ignore[arg-type]
    store.put(key(1), "new")  # type: ignore[arg-type]
    store.put(key(2), "other")  # type: ignore[arg-type]
    assert (store.get(key(1)), store.get(key(2)), store.get(key(3))) == ("new", "other", None)
    store.forget(key(1))
    store.forget(key(3))  # unknown: no error
    assert store.get(key(1)) is None and len(store) == 1
    store.clear()
    assert len(store) == 0


def test_store_is_bounded_in_size():
    store = SessionStore(maxsize=3)
    for n in range(10):
        store.put(key(n), n)  # type: ignore[arg-type]
    assert len(store) == 3


def test_store_entries_expire():
    now = [0.0]
    store = SessionStore(ttl=600, timer=lambda: now[0])
    store.put(key(1), "s")  # type: ignore[arg-type]
    now[0] = 599
    assert store.get(key(1)) == "s"
    now[0] = 601
    assert store.get(key(1)) is None and len(store) == 0


def test_verification_changes_empty_the_store_and_others_do_not():
    addon = ResumeUpstreamTLS()
    with taddons.context(addon) as tctx:
        addon.sessions.put(key(1), "s")  # type: ignore[arg-type]
        tctx.configure(addon, http2=False)
        assert len(addon.sessions) == 1
        tctx.configure(addon, ssl_verify_upstream_trusted_ca="/elsewhere.pem")
        assert len(addon.sessions) == 0


def test_mitmproxy_upstream_context_does_not_disable_tickets():
    """If an upgrade set SSL_OP_NO_TICKET, TLS 1.3 resumption with Azure would stop."""
    ssl_ctx = net_tls.create_proxy_server_context(
        method=net_tls.Method.TLS_CLIENT_METHOD, min_version=net_tls.Version.TLS1_2,
        max_version=net_tls.Version.UNBOUNDED, cipher_list=None, ecdh_curve=None,
        verify=net_tls.Verify.VERIFY_PEER, ca_path=None, ca_pemfile=None, client_cert=None,
        legacy_server_connect=False)
    options = ssl_ctx.set_options(0)  # adds nothing, answers the options in force
    assert not options & SSL.OP_NO_TICKET


# --- real handshakes in memory, through mitmproxy's TlsConfig and the addon -------------------

NAMES = ("a.blob.core.windows.net", "b.blob.core.windows.net")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[str, str]:
    """(CA certificate file, leaf key + chain file for both NAMES)."""
    ca = trustme.CA()
    directory = tmp_path_factory.mktemp("resume-pki")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    ca.issue_cert(*NAMES).private_key_and_cert_chain_pem.write_to_path(str(directory / "leaf.pem"))
    return str(directory / "ca.pem"), str(directory / "leaf.pem")


def service_context(pki, max_version: int) -> SSL.Context:
    """One upstream service: one SSL.Context, so one set of ticket keys and one session cache."""
    ssl_ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ssl_ctx.set_max_proto_version(max_version)
    ssl_ctx.use_privatekey_file(pki[1])
    ssl_ctx.use_certificate_chain_file(pki[1])
    ssl_ctx.set_session_id(b"keyless-test")
    return ssl_ctx


def transfer(source: SSL.Connection, sink: SSL.Connection) -> int:
    try:
        data = source.bio_read(65536)
    except SSL.WantReadError:
        return 0
    sink.bio_write(data)
    return len(data)


def handshake(client: SSL.Connection, peer: SSL.Connection) -> None:
    for _ in range(10):  # a full handshake settles in 3 rounds
        for side in (client, peer):
            with contextlib.suppress(SSL.WantReadError):
                side.do_handshake()
        if not transfer(client, peer) + transfer(peer, client):
            return
    raise AssertionError("handshake did not settle")


def reused(ssl_conn: SSL.Connection) -> bool:
    # pyOpenSSL has no public accessor for SSL_session_reused.
    return bool(SSL._lib.SSL_session_reused(ssl_conn._ssl))  # type: ignore[attr-defined]


class Upstream:
    """Drives one upstream connection through the hooks the TLS layer would call."""

    def __init__(self, tctx, addons, service: SSL.Context, name: str, address: str) -> None:
        self.addons, self.client = addons, tflow.tclient_conn()
        # TlsConfig sends the client's SNI upstream
        self.client.sni, self.client.alpn_offers = name, []
        self.conn = connection.Server(address=(address or name, 443))
        data = tls.TlsData(self.conn, context.Context(self.client, tctx.options))
        for addon in addons:  # TlsConfig first, like mitmproxy's defaults before keyless'
            addon.tls_start_server(data)
        assert data.ssl_conn is not None
        self.ssl_conn, self.peer = data.ssl_conn, SSL.Connection(service)
        self.peer.set_accept_state()

    def run(self, disconnect: bool = True) -> bool:
        handshake(self.ssl_conn, self.peer)
        self.conn.tls_version = self.ssl_conn.get_protocol_version_name()  # type: ignore
        self.conn.timestamp_tls_setup = 1.0
        resume = self.addons[-1]
        resume.tls_established_server(tls.TlsData(self.conn, None, self.ssl_conn))  # type: ignore
        self.peer.send(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
        transfer(self.peer, self.ssl_conn)
        assert self.ssl_conn.recv(65536).startswith(b"HTTP/1.1 201")  # also reads the tickets
        flow = tflow.tflow(resp=True)
        flow.server_conn = self.conn
        resume.responseheaders(flow)
        if disconnect:
            resume.server_disconnected(server_hooks.ServerConnectionHookData(self.conn,
                                                                             self.client))
        return reused(self.ssl_conn)


@pytest.fixture
def upstream(tmp_path, pki):
    tlsconfig, resume = TlsConfig(), ResumeUpstreamTLS()
    with taddons.context(tlsconfig, resume) as tctx:
        tctx.configure(tlsconfig, confdir=str(tmp_path), ssl_verify_upstream_trusted_ca=pki[0])

        def connect(service: SSL.Context, name: str = NAMES[0], address: str = "") -> Upstream:
            return Upstream(tctx, (tlsconfig, resume), service, name, address)

        connect.tctx, connect.resume = tctx, resume  # type: ignore[attr-defined]
        yield connect


def close(up: Upstream) -> None:
    """The TLS layer lets go of the connection: pyOpenSSL frees it."""
    del up.ssl_conn, up.peer
    gc.collect()


VERSIONS = pytest.mark.parametrize("version", [SSL.TLS1_3_VERSION, SSL.TLS1_2_VERSION],
                                   ids=["TLSv1.3", "TLSv1.2"])


@VERSIONS
def test_a_new_connection_resumes_the_previous_session(upstream, pki, version):
    service = service_context(pki, version)
    results = []
    for _ in range(4):
        up = upstream(service)
        results.append(up.run())
        close(up)
    assert results == [False, True, True, True]


@VERSIONS
@pytest.mark.parametrize("address", ["", "10.0.0.1"], ids=["by-name", "same-address"])
def test_a_session_is_never_offered_to_another_name(upstream, pki, version, address):
    service = service_context(pki, version)  # serves both names, would accept either session
    first = upstream(service, NAMES[0], address)
    first.run()
    close(first)
    other = upstream(service, NAMES[1], address)
    assert other.ssl_conn.get_session() is None  # nothing was offered
    assert other.run() is False
    assert upstream(service, NAMES[0], address).run() is True


@VERSIONS
def test_sessions_survive_connections_closed_without_close_notify(upstream, pki, version,
                                                                  monkeypatch):
    """mitmproxy sends no close_notify upstream: without the shutdown mark set on disconnect,
    OpenSSL voids the session when the connection is freed. (This shows the mark matters.)"""
    service = service_context(pki, version)
    monkeypatch.setattr("addons.resume.keep_session_resumable", lambda ssl_conn: None)
    first = upstream(service)
    first.run()
    close(first)
    second = upstream(service)
    assert second.run() is False
    close(second)
    monkeypatch.undo()
    upstream.resume.sessions.clear()
    results = []
    for _ in range(3):
        up = upstream(service)
        results.append(up.run())
        close(up)
    assert results == [False, True, True]


def test_resumption_can_be_switched_off(upstream, pki):
    service = service_context(pki, SSL.TLS1_3_VERSION)
    upstream.tctx.configure(upstream.resume, upstream_tls_resumption=False)
    results = []
    for _ in range(3):
        up = upstream(service)
        results.append(up.run())
        close(up)
    assert results == [False, False, False] and len(upstream.resume.sessions) == 0


def test_a_failed_handshake_drops_the_session(upstream, pki):
    service = service_context(pki, SSL.TLS1_3_VERSION)
    first = upstream(service)
    first.run()
    close(first)
    failing = upstream(service)
    assert failing.ssl_conn.get_session() is not None  # offered
    upstream.resume.tls_failed_server(tls.TlsData(failing.conn, None, failing.ssl_conn))
    assert len(upstream.resume.sessions) == 0
    assert upstream(service).ssl_conn.get_session() is None
