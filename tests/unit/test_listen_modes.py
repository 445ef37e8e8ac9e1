"""Listener specs and who may connect to them (transparent mode's redirected connections)."""

from __future__ import annotations

from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow

from addons.guard import ClientAllowlist
from proxy.cli import build_parser
from proxy.config import resolve
from proxy.mitm import listen_spec, proxy_modes


def settings(*args: str):
    return resolve(build_parser().parse_args(["run", *args]), {})


def test_ipv6_listen_spec_is_what_mitmproxy_parses():
    mode = ProxyMode.parse(f"regular@{listen_spec('::1', 8080)}")
    assert (mode.custom_listen_host, mode.custom_listen_port) == ("::1", 8080)


def test_transparent_mode_also_listens_on_ipv6_loopback_when_there_is_one():
    transparent = settings("--transparent", "--listen", "127.0.0.1:15001")
    assert proxy_modes(transparent, has_ipv6_loopback=True) == [
        "transparent@127.0.0.1:15001", "transparent@::1:15001"]
    # a pod without IPv6: binding ::1 would stop keyless from starting at all
    assert proxy_modes(transparent, has_ipv6_loopback=False) == ["transparent@127.0.0.1:15001"]
    assert proxy_modes(settings("--listen", "127.0.0.1:8080"), has_ipv6_loopback=True) == [
        "regular@127.0.0.1:8080"]


def client(mode: str, peer: str):
    conn = tflow.tclient_conn()
    conn.proxy_mode = ProxyMode.parse(mode)
    conn.peername = (peer, 40000)
    conn.error = None
    return conn


def test_redirected_connections_keep_the_pods_address_and_are_allowed():
    allowlist = ClientAllowlist([])
    redirected = client("transparent@127.0.0.1:15001", "10.200.0.1")
    allowlist.client_connected(redirected)
    assert redirected.error is None
    # the same peer on a proxy listener, or on a transparent listener off loopback, is refused
    for mode in ("regular@127.0.0.1:8080", "transparent@0.0.0.0:15001"):
        other = client(mode, "10.200.0.1")
        allowlist.client_connected(other)
        assert other.error and "--allow-clients" in other.error
