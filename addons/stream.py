"""Stream every body: keyless touches headers and the query string, never the payload."""

from __future__ import annotations

from mitmproxy import http


class StreamBodies:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.request.stream = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        flow.response.stream = True  # type: ignore[union-attr]
