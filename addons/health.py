"""Tells the admin server when the proxy is serving, and what is in flight for a drain."""

from __future__ import annotations

import time

from mitmproxy import connection, http, tcp

from proxy.admin import Health

TUNNEL_IDLE_SECONDS = 2.0  # a tunnel quiet this long is not carrying a request


class ReportHealth:
    def __init__(self, health: Health) -> None:
        self.health = health
        self._flows: set[str] = set()  # HTTP requests between headers and the response's end
        self._tunnels: dict[str, float] = {}  # tunnelled connections: last time data moved

    def running(self) -> None:
        # mitmproxy calls `running` once its listeners are up.
        self.health.listening = True

    def client_connected(self, client: connection.Client) -> None:
        if self.health.draining:  # draining: no new connections
            client.error = "keyless is shutting down"

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._flows.add(flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        self._flows.discard(flow.id)

    def error(self, flow: http.HTTPFlow) -> None:
        self._flows.discard(flow.id)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self._tunnels[flow.id] = time.monotonic()

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        self._tunnels[flow.id] = time.monotonic()

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        self._tunnels.pop(flow.id, None)

    def tcp_error(self, flow: tcp.TCPFlow) -> None:
        self._tunnels.pop(flow.id, None)

    def in_flight(self) -> int:
        """Requests still being served; idle keep-alive connections do not count."""
        quiet_since = time.monotonic() - TUNNEL_IDLE_SECONDS
        busy_tunnels = sum(1 for last in self._tunnels.values() if last > quiet_since)
        return len(self._flows) + busy_tunnels

    def done(self) -> None:
        self.health.listening = False
