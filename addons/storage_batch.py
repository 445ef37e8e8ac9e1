"""Blob Batch: re-sign every sub-request with the outer request's token (proxy/storage_batch).

A converted batch is buffered (at most the service's 4 MiB) instead of streamed, so its body
can be rewritten before it leaves; anything keyless cannot read is refused, never forwarded.
Runs after AzureAuth and ReplayUnauthorized (they set `stream`) and before PoolUpstream
(which sends the body in its own `request` hook).
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import http

from addons.answers import keyless_answer
from proxy import metrics
from proxy.flowstate import FlowState, converted
from proxy.storage_batch import BatchError, check_length, is_batch, resign_batch

logger = logging.getLogger(__name__)
BLOB_SERVICE = "storage-blob"
_LABELS = {"sharedkey": "SharedKey", "sharedkeylite": "SharedKeyLite", "SAS": "SAS"}


def _batch_state(flow: http.HTTPFlow) -> FlowState | None:
    state = converted(flow)
    if state is None or state.service != BLOB_SERVICE or flow.response:
        return None
    return state if is_batch(flow.request.method, flow.request.path) else None


def _bearer(request: http.Request) -> str:
    value = request.headers.get("authorization") or ""
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _resign(request: Any, token: str) -> list[str]:
    request.raw_content, found = resign_batch(request.raw_content or b"",
                                              request.headers.get("content-type"), token)
    request.headers["content-length"] = str(len(request.raw_content))
    return found


class ResignBlobBatch:
    """requestheaders: buffer a converted batch (or refuse it); request: rewrite its body."""

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = _batch_state(flow)
        if state is None:
            return
        request = flow.request
        try:
            if "transfer-encoding" in request.headers or "content-encoding" in request.headers:
                raise BatchError("KeylessBatchMalformed",
                                 "a Blob Batch must be sent with a Content-Length and no "
                                 "Content-Encoding", status=411)
            check_length(request.headers.get("content-length"))
        except BatchError as exc:
            self._refuse(flow, state, exc)
            return
        request.stream = False  # the whole body (≤ 4 MiB) before anything leaves

    def request(self, flow: http.HTTPFlow) -> None:
        state = _batch_state(flow)
        if state is None or not flow.live:
            return
        try:
            found = _resign(flow.request, _bearer(flow.request))
        except BatchError as exc:
            self._refuse(flow, state, exc)
            return
        for scheme in found:  # e.g. sub-requests signed with SharedKey: "BatchSharedKey"
            metrics.KEY_MATERIAL_STRIPPED.labels(service=state.service,
                                                 scheme=f"Batch{_LABELS[scheme]}").inc()
        # A 401 replay attaches a fresh token: the sub-requests get it too.
        outer = state.reattach

        def reattach(request: Any, fresh: str) -> None:
            if outer is not None:
                outer(request, fresh)
            _resign(request, fresh)

        state.reattach = reattach

    @staticmethod
    def _refuse(flow: http.HTTPFlow, state: FlowState, exc: BatchError) -> None:
        flow.request.stream = False  # mitmproxy cannot stream a request it answers itself
        flow.response = keyless_answer(exc.status, exc.code, exc.message)
        state.refused = True
        logger.error("%s batch refused: %s", state.service, exc.message)
