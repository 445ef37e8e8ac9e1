"""A 401 to a converted request: forget the token, fetch a fresh one, replay once.

Only requests whose body was small enough to keep can be replayed (bodies otherwise stream
through and are gone); the rest get the 401 passed on. A service that rejects every token
costs at most one token fetch per (identity, scope) every 30 seconds.
"""

from __future__ import annotations

import logging

import aiohttp
from mitmproxy import http

from addons.pool import to_response
from proxy import metrics
from proxy.diagnosis import rbac_denial
from proxy.errors import error_response
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


def kept_body(flow: http.HTTPFlow) -> bytes | None:
    """The request body for a replay: whole when it was buffered (not streamed), else the
    copy KeptBody made; None when too large to have been kept."""
    if not flow.request.stream:
        return flow.request.raw_content or b""
    kept: KeptBody | None = flow.metadata.get("keyless_kept_body")
    return bytes(kept.data) if kept is not None and kept.data is not None else None


class ReplayUnauthorized:
    def __init__(self, tokens: TokenCache, upstream: UpstreamPool) -> None:
        self.tokens, self.upstream = tokens, upstream

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.metadata.get("keyless_converted") or flow.response:
            return
        length = flow.request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > KEEP_BODY_LIMIT):
            return
        kept = KeptBody(KEEP_BODY_LIMIT)
        flow.request.stream = kept
        flow.metadata["keyless_kept_body"] = kept

    async def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or response.status_code != 401 \
                or not flow.metadata.get("keyless_converted") \
                or flow.metadata.get("keyless_replayed"):
            return
        service = flow.metadata["keyless_service"]
        body = kept_body(flow)
        if rbac_denial(service, 401, response.headers.get, response.raw_content or b""):
            return  # missing claims: a fresh token would be refused the same way
        identity, scope = flow.metadata["keyless_identity_key"], flow.metadata["keyless_scope"]
        if body is None or not self.tokens.invalidate(identity, scope):
            metrics.TOKEN_RETRIES.labels(service=service, action="passed_on").inc()
            return
        try:
            token = await self.tokens.get(identity, scope)
        except TokenUnavailable as exc:
            metrics.TOKEN_RETRIES.labels(service=service, action="passed_on").inc()
            logger.warning("%s: 401 and no fresh token: %s", service, exc)
            return
        flow.metadata["keyless_attach"](flow.request, token)
        flow.metadata["keyless_replayed"] = True
        try:
            flow.response = await self._replay(flow, body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            headers, body = error_response("KeylessReplayFailed",
                                           f"replaying after a 401 failed: {type(exc).__name__}")
            flow.response = http.Response.make(502, body, headers)
        metrics.TOKEN_RETRIES.labels(service=service, action="replayed").inc()
        logger.info("%s: 401 with a cached token; replayed once with a fresh token: %s",
                    service, flow.response.status_code)

    async def _replay(self, flow: http.HTTPFlow, body: bytes) -> http.Response:
        request = flow.request
        try:
            answer = await self.upstream.send(
                request.method, request.host, request.port, request.path,
                forwarded_headers(request.headers.items(multi=True)),
                request.host_header or request.host, body, limit=REPLAY_RESPONSE_LIMIT)
        except TooLarge:
            headers, content = error_response(
                "KeylessReplayTooLarge", "the replayed response is too large to relay")
            return http.Response.make(502, content, headers)
        return to_response(answer)
