"""Helpers the addons share: keyless' own answers to the app, and the names a flow's
destination goes by (the agreement check's input)."""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode, TransparentMode

from proxy.authority import Destination
from proxy.errors import error_response
from proxy.upstream import Answer


def keyless_answer(status: int, code: str, message: str) -> http.Response:
    """An Azure-style JSON error that keyless gives the app itself (message redacted)."""
    headers, body = error_response(code, message)
    return http.Response.make(status, body, headers)


def to_response(answer: Answer) -> http.Response:
    """A service's answer read over keyless' own upstream pool, as mitmproxy's response."""
    return http.Response(
        http_version=b"HTTP/1.1", status_code=answer.status,
        reason=answer.reason.encode("latin-1", "replace"), headers=http.Headers(answer.headers),
        content=answer.body, trailers=None, timestamp_start=answer.started,
        timestamp_end=answer.ended,
    )


def catalog_host(flow: http.HTTPFlow) -> str:
    """The name the request is for, as the catalog knows it. In transparent mode mitmproxy's
    request host is the redirected connection's original IP address: the name is the TLS
    server name the app sent (the agreement check then holds the Host header to it)."""
    if isinstance(flow.client_conn.proxy_mode, TransparentMode):
        return (flow.client_conn.sni or flow.request.host).lower()
    return flow.request.host.lower()


def destination(flow: http.HTTPFlow) -> Destination:
    """Every name the flow's destination goes by, for the agreement check."""
    mode = flow.client_conn.proxy_mode
    address = flow.server_conn.address
    if isinstance(mode, ReverseMode):
        # keyless' own --reverse setting names the destination: the app cannot choose it.
        host, port = mode.address[:2]
        return Destination(host, port, host, flow.request.host_header, app_used_tls=True)
    if isinstance(mode, TransparentMode):
        # No CONNECT: the name is the TLS server name, and the upstream certificate must
        # prove it (keyless verifies upstream TLS against that name).
        sni = flow.client_conn.sni
        return Destination(sni, address[1] if address else None, sni,
                           flow.request.host_header,
                           app_used_tls=flow.client_conn.tls_established)
    return Destination(
        connect_host=address[0] if address else None,
        connect_port=address[1] if address else None,
        sni=flow.client_conn.sni,
        host_header=flow.request.host_header,
        app_used_tls=flow.client_conn.tls_established and flow.request.scheme == "https",
    )
