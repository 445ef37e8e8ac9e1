"""A 401 to a converted request: forget the token, fetch a fresh one, replay once.

Only requests whose body was small enough to keep can be replayed (bodies otherwise stream
through and are gone); the rest get the 401 passed on. A service that rejects every token
costs at most one token fetch per (identity, scope) every 30 seconds.
"""

from __future__ import annotations

import logging
import ssl

import aiohttp
from mitmproxy import ctx, http

from proxy import metrics
from proxy.diagnosis import rbac_denial
from proxy.errors import error_response
from proxy.tokens import TokenCache, TokenUnavailable

logger = logging.getLogger(__name__)
KEEP_BODY_LIMIT = 64 * 1024  # request bodies up to this size are kept for a replay
REPLAY_RESPONSE_LIMIT = 32 * 1024 * 1024  # a replayed response is read into memory
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "content-length", "host"}


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


class ReplayUnauthorized:
    def __init__(self, tokens: TokenCache) -> None:
        self.tokens = tokens
        self._session: aiohttp.ClientSession | None = None

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
        kept: KeptBody | None = flow.metadata.get("keyless_kept_body")
        if rbac_denial(service, 401, response.headers.get, response.raw_content or b""):
            return  # missing claims: a fresh token would be refused the same way
        identity, scope = flow.metadata["keyless_identity_key"], flow.metadata["keyless_scope"]
        if kept is None or kept.data is None or not self.tokens.invalidate(identity, scope):
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
            flow.response = await self._replay(flow, bytes(kept.data))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            headers, body = error_response("KeylessReplayFailed",
                                           f"replaying after a 401 failed: {type(exc).__name__}")
            flow.response = http.Response.make(502, body, headers)
        metrics.TOKEN_RETRIES.labels(service=service, action="replayed").inc()
        logger.info("%s: 401 with a cached token; replayed once with a fresh token: %s",
                    service, flow.response.status_code)

    async def _replay(self, flow: http.HTTPFlow, body: bytes) -> http.Response:
        session = self._session = self._session or aiohttp.ClientSession(
            auto_decompress=False, trust_env=False)
        request = flow.request
        headers = [(k, v) for k, v in request.headers.items(multi=True)
                   if k.lower() not in HOP_BY_HOP]
        headers.append(("host", request.host_header or request.host))
        url = f"https://{request.host}:{request.port}{request.path}"
        async with session.request(
            request.method, aiohttp.client.URL(url, encoded=True), headers=headers, data=body,
            ssl=self._ssl_context(), allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=120), server_hostname=request.host,
        ) as upstream:
            content = await upstream.content.read(REPLAY_RESPONSE_LIMIT + 1)
            if len(content) > REPLAY_RESPONSE_LIMIT:
                headers_, body_ = error_response(
                    "KeylessReplayTooLarge", "the replayed response is too large to relay")
                return http.Response.make(502, body_, headers_)
            kept_headers = [(k, v) for k, v in upstream.raw_headers
                            if k.decode("latin-1").lower() not in HOP_BY_HOP]
            return http.Response.make(upstream.status, content, kept_headers)

    @staticmethod
    def _ssl_context() -> ssl.SSLContext | bool:
        if ctx.options.ssl_insecure:
            return False
        context = ssl.create_default_context(cafile=ctx.options.ssl_verify_upstream_trusted_ca
                                             or None)
        return context

    async def done(self) -> None:
        if self._session is not None:
            await self._session.close()
