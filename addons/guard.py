"""Who may use keyless, and where keyless will never connect for them."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable

from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import TransparentMode

from proxy import metrics
from proxy.errors import error_response

logger = logging.getLogger(__name__)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class ClientAllowlist:
    """Only loopback and the configured client networks may use the proxy."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)

    def client_connected(self, client: connection.Client) -> None:
        address = _address(client.peername[0])
        if address is None or address.is_loopback or _redirected_locally(client):
            return
        if not any(address in network for network in self.networks):
            metrics.REQUESTS.labels(service="none", outcome="client_denied").inc()
            logger.warning("refused client %s: not in --allow-clients", address)
            client.error = "client not allowed by keyless --allow-clients"


def _redirected_locally(client: connection.Client) -> bool:
    """A transparent listener on loopback gets only this host's own connections, which
    iptables REDIRECT delivers with their original source (the pod's address, not loopback):
    the kernel accepts nothing for 127/8 from other hosts."""
    mode = client.proxy_mode
    if not isinstance(mode, TransparentMode):
        return False
    listen = _address(mode.custom_listen_host or "")
    return listen is not None and listen.is_loopback


class DenyDestinations:
    """Never connect to metadata or host-agent addresses (an SSRF-prone app's favourite target).

    IP literals are refused at CONNECT; names are resolved first (through --connect-to) and
    refused when any address they resolve to is denied.
    """

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)

    def denied(self, address: str) -> bool:
        ip = _address(address)
        return ip is not None and any(ip in network for network in self.networks)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.denied(flow.request.host):
            self._refuse(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.response and self.denied(flow.request.host):
            self._refuse(flow)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address is None:
            return
        host, port = data.server.address[:2]
        addresses = [host]
        if _address(host) is None:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM)
            except OSError:
                return  # the connection attempt itself will report the failure
            addresses = [str(info[4][0]) for info in infos]
        if any(self.denied(a) for a in addresses):
            metrics.REQUESTS.labels(service="none", outcome="destination_denied").inc()
            logger.warning("refused connection to %s:%s: denied destination", host, port)
            data.server.error = "destination denied by keyless"

    @staticmethod
    def _refuse(flow: http.HTTPFlow) -> None:
        metrics.REQUESTS.labels(service="none", outcome="destination_denied").inc()
        logger.warning("refused %s to %s: denied destination", flow.request.method,
                       flow.request.host)
        headers, body = error_response(
            "KeylessDestinationDenied",
            "keyless does not connect to metadata or link-local addresses",
        )
        flow.request.stream = False
        flow.response = http.Response.make(403, body, headers)
