"""A 401 to a converted request: forget the token, fetch a fresh one, replay once.

The token is forgotten whatever the request was: the next request gets a fresh one. Only
requests whose body was small enough to keep can be replayed (bodies otherwise stream through
and are gone); the rest get the 401 passed on. A service that rejects every token costs at
most one token fetch per (identity, scope) every 30 seconds.
"""

from __future__ import annotations

import logging

import aiohttp
from mitmproxy import http

from addons.answers import catalog_host, keyless_answer, to_response
from proxy import metrics
from proxy.diagnosis import rbac_denial
from proxy.flowstate import FlowState, converted
from proxy.tokens import TokenCache, TokenUnavailable
from proxy.upstream import TooLarge, UpstreamPool, forwarded_headers

logger = logging.getLogger(__name__)
KEEP_BODY_LIMIT = 64 * 1024  # request bodies up to this size are kept for a replay
REPLAY_RESPONSE_LIMIT = 32 * 1024 * 1024  # a replayed response is read into memory


class KeptBody:
    """A request.stream function that passes chunks on and keeps a copy, up to a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data: bytearray | None = bytearray()

    def __call__(self, chunk: bytes) -> bytes:
        if self.data is not None:
            self.data += chunk
            if len(self.data) > self.limit:
                self.data = None  # too large: this request cannot be replayed
        return chunk


def kept_body(flow: http.HTTPFlow, state: FlowState) -> bytes | None:
    """The request body for a replay: whole when it was buffered (not streamed), else the
    copy KeptBody made; None when too large to have been kept."""
    if not flow.request.stream:
        return flow.request.raw_content or b""
    kept = state.kept_body
    return bytes(kept.data) if kept is not None and kept.data is not None else None


class ReplayUnauthorized:
    def __init__(self, tokens: TokenCache, upstream: UpstreamPool) -> None:
        self.tokens, self.upstream = tokens, upstream

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = converted(flow)
        if state is None or flow.response:
            return
        length = flow.request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > KEEP_BODY_LIMIT):
            return
        kept = KeptBody(KEEP_BODY_LIMIT)
        flow.request.stream = kept
        state.kept_body = kept

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # A 401 is small: keep its body to tell a missing role from a rejected token.
        if converted(flow) and flow.response is not None and flow.response.status_code == 401:
            flow.response.stream = False

    async def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        state = converted(flow)
        if response is None or response.status_code != 401 or state is None or state.replayed:
            return
        if rbac_denial(state.service, 401, response.headers.get, response.raw_content or b""):
            return  # missing claims: a fresh token would be refused the same way
        assert state.identity is not None and state.scope is not None
        # Forget the rejected token whatever the body: the app's next request needs a new one.
        forgotten = self.tokens.invalidate(state.identity, state.scope)
        body = kept_body(flow, state)
        if body is None or not forgotten:
            metrics.TOKEN_RETRIES.labels(service=state.service, action="passed_on").inc()
            return
        try:
            token = await self.tokens.get(state.identity, state.scope)
        except TokenUnavailable as exc:
            metrics.TOKEN_RETRIES.labels(service=state.service, action="passed_on").inc()
            logger.warning("%s: 401 and no fresh token: %s", state.service, exc)
            return
        assert state.reattach is not None
        state.reattach(flow.request, token)
        # reattach may re-sign the body too (Blob Batch sub-requests): send what it left.
        body = kept_body(flow, state) or b""
        state.replayed = True
        try:
            flow.response = await self._replay(flow, body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            flow.response = keyless_answer(
                502, "KeylessReplayFailed", f"replaying after a 401 failed: {type(exc).__name__}")
            state.answered = True
        metrics.TOKEN_RETRIES.labels(service=state.service, action="replayed").inc()
        logger.info("%s: 401 with a cached token; replayed once with a fresh token: %s",
                    state.service, flow.response.status_code)

    async def _replay(self, flow: http.HTTPFlow, body: bytes) -> http.Response:
        request = flow.request
        name = catalog_host(flow)  # differs from request.host in transparent mode (an address)
        try:
            answer = await self.upstream.send(
                request.method, request.host, request.port, request.path,
                forwarded_headers(request.headers.items(multi=True)),
                request.host_header or name, body, limit=REPLAY_RESPONSE_LIMIT,
                server_hostname=name if name != request.host.lower() else None)
        except TooLarge:
            return keyless_answer(502, "KeylessReplayTooLarge",
                                  "the replayed response is too large to relay")
        return to_response(answer)
