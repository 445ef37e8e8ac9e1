"""Counts what Azure services answered keyless' requests (or that they did not answer)."""

from __future__ import annotations

import logging

from mitmproxy import http

from proxy import metrics
from proxy.redact import redact

logger = logging.getLogger(__name__)


class ObserveUpstream:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        service = flow.metadata.get("keyless_service")
        if service is None or flow.response is None or flow.metadata.get("keyless_refused") \
                or flow.metadata.get("keyless_answered"):
            return
        status_class = f"{flow.response.status_code // 100}xx"
        metrics.UPSTREAM_RESPONSES.labels(service=service, status_class=status_class).inc()

    def error(self, flow: http.HTTPFlow) -> None:
        service = flow.metadata.get("keyless_service")
        if service is None or flow.error is None:
            return
        metrics.UPSTREAM_ERRORS.labels(service=service).inc()
        logger.warning("%s %s: no response from upstream: %s", service, flow.request.method,
                       redact(flow.error.msg, limit=200))
