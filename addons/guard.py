"""Who may use keyless, and where keyless will never connect for them."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import TransparentMode

from proxy import metrics
from proxy.dial import AppDialer, DestinationDenied, ip_address, pin, unpin
from proxy.errors import error_response
from proxy.redact import redact

logger = logging.getLogger(__name__)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAllowlist:
    """Only loopback and the configured client networks may use the proxy."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)

    def client_connected(self, client: connection.Client) -> None:
        address = ip_address(client.peername[0])
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
    listen = ip_address(mode.custom_listen_host or "")
    return listen is not None and listen.is_loopback


class DenyDestinations:
    """Never connect to metadata or host-agent addresses (an SSRF-prone app's favourite target).

    IP literals are refused at CONNECT (and in plain-HTTP requests) with a 403; names are
    checked by DialCheckedAddresses when keyless connects.
    """

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)

    def denied(self, address: str) -> bool:
        ip = ip_address(address)
        return ip is not None and any(ip in network for network in self.networks)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.denied(flow.request.host):
            self._refuse(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.response and self.denied(flow.request.host):
            self._refuse(flow)

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


class DialCheckedAddresses:
    """mitmproxy's upstream connections go where the dialer says, and only there.

    server_connect applies --connect-to, resolves once, refuses denied destinations and pins
    the checked addresses for the connect mitmproxy makes next (proxy/dial.py says why the
    address itself is left alone). Must be the last addon with a server_connect hook: any
    change of the destination after the check would not be checked (and the pin refuses it).
    """

    def __init__(self, dialer: AppDialer) -> None:
        self.dialer = dialer

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.error or server.address is None:
            return
        host, port = str(server.address[0]), int(server.address[1])
        if server.transport_protocol != "tcp" and ip_address(host) is None:
            # mitmproxy's UDP connect resolves on its own (in Rust): no pin reaches it.
            server.error = "keyless connects to UDP destinations by IP address only"
            return
        try:
            infos = await self.dialer.resolve(host, port)
        except DestinationDenied:
            metrics.REQUESTS.labels(service="none", outcome="destination_denied").inc()
            logger.warning("refused connection to %s:%s: denied destination", host, port)
            server.error = "destination denied by keyless"
            return
        except OSError as exc:
            server.error = redact(f"cannot resolve {host}: {exc}", limit=200)
            return
        pin(host, port, infos)

    def server_connected(self, _data: server_hooks.ServerConnectionHookData) -> None:
        unpin()  # an IP literal never consults its pin

    def server_connect_error(self, _data: server_hooks.ServerConnectionHookData) -> None:
        unpin()
