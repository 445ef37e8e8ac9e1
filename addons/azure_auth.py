"""Swap key-based auth for a managed-identity token on requests to Azure catalog hosts."""

from __future__ import annotations

import logging

from mitmproxy import http

from proxy import metrics
from proxy.authority import Destination
from proxy.catalog import Catalog
from proxy.errors import TOKEN_UNAVAILABLE, error_response
from proxy.tokens import Identity, TokenCache, TokenUnavailable

logger = logging.getLogger(__name__)


def destination(flow: http.HTTPFlow) -> Destination:
    address = flow.server_conn.address
    return Destination(
        connect_host=address[0] if address else None,
        connect_port=address[1] if address else None,
        sni=flow.client_conn.sni,
        host_header=flow.request.host_header,
        app_used_tls=flow.client_conn.tls_established and flow.request.scheme == "https",
    )


class AzureAuth:
    """requestheaders: match the catalog, strip key material, attach a token, or refuse."""

    def __init__(self, catalog: Catalog, tokens: TokenCache, identity: Identity) -> None:
        self.catalog = catalog
        self.tokens = tokens
        self.identity = identity

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        service = self.catalog.match(flow.request.host)
        if service is None:
            return
        host = destination(flow).agreed_host()
        if host is None or host != flow.request.host.lower():
            # Plain HTTP, or names that disagree: never a token. The request goes on as the
            # app sent it, to the destination the app chose.
            metrics.REQUESTS.labels(service=service.name, outcome="passed_through").inc()
            logger.info("%s %s: no token (not TLS, or CONNECT/SNI/Host disagree)",
                        service.name, flow.request.method)
            return
        stripped = service.conversion.strip(flow.request)
        if stripped is None:
            metrics.REQUESTS.labels(service=service.name, outcome="passed_through").inc()
            return
        for scheme in stripped.schemes:
            metrics.KEY_MATERIAL_STRIPPED.labels(service=service.name, scheme=scheme).inc()
        try:
            token = await self.tokens.get(self.identity, service.scope)
        except TokenUnavailable as exc:
            self._refuse(flow, service.name, str(exc))
            return
        service.conversion.attach(flow.request, token, stripped)
        metrics.REQUESTS.labels(service=service.name, outcome="converted").inc()

    @staticmethod
    def _refuse(flow: http.HTTPFlow, service: str, reason: str) -> None:
        # Fail closed: answer the app ourselves; the request (and its key) goes nowhere.
        headers, body = error_response(TOKEN_UNAVAILABLE, reason)
        flow.request.stream = False  # mitmproxy cannot stream a request it answers itself
        flow.response = http.Response.make(503, body, headers)
        metrics.REQUESTS.labels(service=service, outcome="refused").inc()
        logger.error("%s %s refused: %s", service, flow.request.method, reason)
