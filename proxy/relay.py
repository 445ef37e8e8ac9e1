"""A loopback relay that streams an answer keyless already has to the app, through mitmproxy.

An addon can give mitmproxy a whole response but cannot stream one. When a pooled request's
answer is large, has no length or is an event stream, keyless parks the open answer here
under a one-time token and points the flow at this relay (plain HTTP on 127.0.0.1);
mitmproxy then reads the answer from the relay and streams it to the app as it would from
the service. Nothing is sent to the service twice.

Only the holder of a token gets its answer, once; an unclaimed answer is dropped after
PARK_SECONDS. Anything else gets 403 and nothing goes anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import aiohttp
from aiohttp import web

from proxy.upstream import bodyless, end_to_end

logger = logging.getLogger(__name__)
TOKEN_HEADER = "x-keyless-relay"
PARK_SECONDS = 30.0


class UpstreamRelay:
    def __init__(self) -> None:
        self.port = 0
        self._parked: dict[str, tuple[aiohttp.ClientResponse, asyncio.TimerHandle]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._web: web.Server | None = None

    async def start(self) -> None:
        # handler_cancellation: when mitmproxy drops the connection (the app left), stop
        # reading from the service too, as mitmproxy's own upstream connection would.
        self._web = web.Server(self.handle, handler_cancellation=True, access_log=None)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._web, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def park(self, response: aiohttp.ClientResponse) -> str:
        token = secrets.token_urlsafe(32)
        expiry = asyncio.get_running_loop().call_later(PARK_SECONDS, self._expire, token)
        self._parked[token] = (response, expiry)
        return token

    def _expire(self, token: str) -> None:
        parked = self._parked.pop(token, None)
        if parked is not None:
            logger.warning("a parked answer was not claimed within %gs; dropped", PARK_SECONDS)
            parked[0].close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        parked = self._parked.pop(request.headers.get(TOKEN_HEADER, ""), None)
        if parked is None:
            return web.Response(status=403, text="not for you\n")
        upstream, expiry = parked
        expiry.cancel()
        try:
            return await self._stream(request, upstream)
        finally:
            upstream.release()  # back to the pool when read to the end, else closed

    @staticmethod
    async def _stream(request: web.BaseRequest,
                      upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in end_to_end(upstream.raw_headers):
            response.headers.add(key.decode("latin-1"), value.decode("latin-1"))
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        elif not bodyless(upstream.method, upstream.status):
            response.enable_chunked_encoding()
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    async def stop(self) -> None:
        for upstream, expiry in self._parked.values():
            expiry.cancel()
            upstream.close()
        self._parked.clear()
        # Close mitmproxy's kept-alive connections to us first: since Python 3.12 the
        # server's wait_closed() waits for them, and mitmproxy is waiting for us.
        if self._server is not None:
            self._server.close()
        if self._web is not None:
            await self._web.shutdown(1.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
