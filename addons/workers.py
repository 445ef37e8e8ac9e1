"""--workers: count the requests each worker process receives (how the kernel spread them)."""

from __future__ import annotations

from mitmproxy import http

from proxy import metrics


class CountWorkerRequests:
    def __init__(self, worker_id: str) -> None:
        self.received = metrics.WORKER_REQUESTS.labels(worker=worker_id)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.received.inc()
