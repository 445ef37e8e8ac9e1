"""Intercept TLS only for Azure catalog hosts; tunnel everything else untouched."""

from __future__ import annotations

import logging

from mitmproxy import tls
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.mode_specs import ReverseMode, TransparentMode

from proxy import metrics
from proxy.authority import HTTPS_PORT
from proxy.catalog import Catalog

logger = logging.getLogger(__name__)


class InterceptOnlyAzure:
    """Decides, per CONNECT target, whether keyless looks inside the connection at all:
    only catalog hosts on port 443 are intercepted.

    Must run before mitmproxy's own NextLayer addon. A tunnelled connection is never decrypted:
    the app sees the upstream's own certificate and keyless adds nothing.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer:
            return
        if isinstance(nextlayer.context.client.proxy_mode, ReverseMode | TransparentMode):
            return  # reverse: fixed by configuration; transparent: decided on the SNI below
        server = nextlayer.context.server
        # No address yet: this is the proxy's own HTTP layer reading the app's request.
        if server.address is None:
            return
        host, port = server.address[:2]
        if port != HTTPS_PORT or not self.catalog.intercepts(host):
            metrics.REQUESTS.labels(service="none", outcome="tunnelled").inc()
            logger.debug("tunnelling %s:%s untouched", host, server.address[1])
            nextlayer.layer = layers.TCPLayer(nextlayer.context, ignore=True)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Transparent mode has no CONNECT: intercept only catalog server names on 443."""
        context = data.context
        if not isinstance(context.client.proxy_mode, TransparentMode):
            return
        port = context.server.address[1] if context.server.address else None
        sni = data.client_hello.sni
        if port != HTTPS_PORT or not sni or not self.catalog.intercepts(sni):
            metrics.REQUESTS.labels(service="none", outcome="tunnelled").inc()
            data.ignore_connection = True
