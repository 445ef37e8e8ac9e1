"""The last check before a request leaves for an Azure host: no key material, ever.

Runs in the requestheaders hook right after the conversion, before anything can send the
request: mitmproxy's own upstream connection sends a streamed request's headers once that
hook is done, the upstream pool sends in the request hook, a 401 replay in the response
hook; no addon changes headers or query in between (proxy/mitm.py request_chain keeps the
order, tests/unit/test_addon_order.py checks it). See proxy/invariant.py.

A request keyless converted is not checked again: the conversion has stripped it, for the
one host name every party agreed on, with the very strippers a check would run (profiled:
checking it again cost ~7 % of keyless' CPU under keep-alive load, for no new finding).
"""

from __future__ import annotations

import logging

from mitmproxy import http

from addons.answers import keyless_answer
from proxy import metrics
from proxy.catalog import Catalog
from proxy.errors import KEY_NOT_CONVERTED
from proxy.flowstate import flow_state
from proxy.invariant import leftover_key_material
from proxy.wire import split_authority

logger = logging.getLogger(__name__)


class FailClosed:
    def __init__(self, catalog: Catalog, audit: bool = False) -> None:
        self.catalog = catalog
        self.audit = audit  # audit mode forwards every request as the app sent it, by design

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.audit or flow.response is not None or not flow.live:
            return
        state = flow_state(flow)
        if state is not None and state.converted:
            return
        request = flow.request
        found = leftover_key_material(self.catalog, destination_names(flow), request.path,
                                      request.headers)
        if found is None:
            return
        service, schemes = found
        request.stream = False  # mitmproxy cannot stream a request it answers itself
        flow.response = keyless_answer(
            403, KEY_NOT_CONVERTED,
            f"keyless did not convert this request to {service}, and it carries key material "
            f"({', '.join(schemes)}); it is refused rather than forwarded")
        if state is not None:
            state.refused = True
        metrics.REQUESTS.labels(service=service, outcome="refused").inc()
        logger.error("%s %s refused: key material (%s) left after conversion", service,
                     request.method, ", ".join(schemes))


def destination_names(flow: http.HTTPFlow) -> list[str | None]:
    """Every name the request's destination goes by."""
    request = flow.request
    names = [request.host, flow.client_conn.sni, flow.server_conn.sni]
    if flow.server_conn.address:
        names.append(str(flow.server_conn.address[0]))
    if request.host_header:
        parsed = split_authority(request.host_header, default_port=443)
        # A malformed Host header still names a host to check: its part before any port.
        names.append(parsed[0] if parsed else request.host_header.rsplit(":", 1)[0])
    return names
