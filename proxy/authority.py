"""When may a token be attached? Only when every name for the destination agrees.

The confused-deputy rule: an app (or an attacker steering it) must not be able to make keyless
send a token anywhere but the Azure host it was fetched for. So a token goes only over TLS
from the app, and only when the CONNECT target, the TLS server name (SNI) and the Host header
(or HTTP/2 :authority) all name the same host, on port 443 (every Azure data plane's HTTPS port).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.wire import split_authority

HTTPS_PORT = 443


@dataclass(frozen=True, slots=True)
class Destination:
    connect_host: str | None  # the CONNECT target (None for plain proxied HTTP)
    connect_port: int | None
    sni: str | None  # the TLS server name the app sent to keyless
    host_header: str | None
    app_used_tls: bool

    def agreed_host(self) -> str | None:
        """The one host name all parties agree on, or None when anything disagrees."""
        if not self.app_used_tls or not self.connect_host or self.connect_port != HTTPS_PORT:
            return None
        if not self.sni or not self.host_header:
            return None
        connect_host = self.connect_host.lower()
        if self.sni.lower() != connect_host:
            return None
        parsed = split_authority(self.host_header, default_port=443)
        if parsed != (connect_host, self.connect_port):
            return None
        return connect_host
