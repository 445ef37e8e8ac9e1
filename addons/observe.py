"""Counts what Azure services answered keyless' requests (or that they did not answer)."""

from __future__ import annotations

import logging

from mitmproxy import http

from proxy import metrics
from proxy.flowstate import flow_state
from proxy.redact import redact

logger = logging.getLogger(__name__)


class ObserveUpstream:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if state is None or flow.response is None or not state.service_answered:
            return
        status_class = f"{flow.response.status_code // 100}xx"
        metrics.UPSTREAM_RESPONSES.labels(service=state.service, status_class=status_class).inc()

    def error(self, flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if state is None or flow.error is None:
            return
        metrics.UPSTREAM_ERRORS.labels(service=state.service).inc()
        logger.warning("%s %s: no response from upstream: %s", state.service, flow.request.method,
                       redact(flow.error.msg, limit=200))
