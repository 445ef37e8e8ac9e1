"""Send converted requests over upstream connections kept alive across app connections."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from mitmproxy import connection, ctx, http
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy.mode_specs import TransparentMode

from addons.answers import keyless_answer, to_response
from proxy import metrics
from proxy.errors import UPSTREAM_FAILED
from proxy.flowstate import converted, flow_state
from proxy.redact import redact
from proxy.relay import TOKEN_HEADER, UpstreamRelay
from proxy.upstream import (
    Answer,
    Streaming,
    UpstreamPool,
    forwarded_headers,
    poolable,
    upstream_tls,
)

logger = logging.getLogger(__name__)
TLS_OPTIONS = {"ssl_insecure", "ssl_verify_upstream_trusted_ca",
               "ssl_verify_upstream_trusted_confdir"}
APP_CHECK_SECONDS = 0.5  # how often a waiting exchange checks that the app is still there


class AppLeft(Exception):
    pass


async def while_app_waits(flow: http.HTTPFlow,
                          exchange: asyncio.Future[Answer | Streaming]) -> Answer | Streaming:
    """The exchange's result; cancelled when the app closes its connection meanwhile (on the
    ordinary path mitmproxy would close the upstream connection then)."""
    while True:
        done, _ = await asyncio.wait({exchange}, timeout=APP_CHECK_SECONDS)
        if done:
            return exchange.result()
        if not flow.client_conn.state & ConnectionState.CAN_READ:
            exchange.cancel()
            raise AppLeft()


class PoolUpstream:
    """requestheaders: choose the pool for the first converted request of an app
    connection (its small body is kept whole); request: send it. A small answer goes to the
    app as is, any other streams through the relay. responseheaders/error: the flow gets
    its real destination back."""

    def __init__(self, pool: UpstreamPool, relay: UpstreamRelay, enabled: bool = True) -> None:
        self.pool, self.relay, self.enabled = pool, relay, enabled
        self._served: set[str] = set()  # app connections that already sent a request

    def configure(self, updated: set[str]) -> None:
        if updated & TLS_OPTIONS or self.pool.tls is None:
            self.pool.use_tls(upstream_tls(
                ctx.options.ssl_insecure, ctx.options.ssl_verify_upstream_trusted_ca,
                ctx.options.ssl_verify_upstream_trusted_confdir))

    async def running(self) -> None:
        if self.enabled:
            await self.relay.start()
            logger.info("upstream pool on; relay for streamed answers on 127.0.0.1:%d",
                        self.relay.port)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        state = converted(flow)
        if flow.response or state is None:
            return
        # Only an app connection's first request: later ones are cheaper over the upstream
        # connection mitmproxy then keeps for that app connection (measured, see
        # docs/benchmarks.md); apps that open a connection per request always get the pool.
        first = flow.client_conn.id not in self._served
        self._served.add(flow.client_conn.id)
        if not first or not self.enabled or not self.relay.port \
                or isinstance(flow.client_conn.proxy_mode, TransparentMode) \
                or ctx.options.client_certs \
                or not poolable(request.method, request.headers):
            self._count(flow, "ordinary")
            return
        request.stream = False  # at most BODY_LIMIT: kept whole, sent in one piece
        state.pooled = True

    async def request(self, flow: http.HTTPFlow) -> None:
        state = converted(flow)
        if state is None or not state.pooled or flow.response or not flow.live:
            return
        request = flow.request
        exchange = asyncio.ensure_future(self.pool.exchange(
            request.method, request.host, request.port, request.path,
            forwarded_headers(request.headers.items(multi=True)),
            request.host_header or request.host, request.raw_content,
        ))
        try:
            result = await while_app_waits(flow, exchange)
        except AppLeft:
            self._count(flow, "app_left")
            flow.kill()
            return
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._failed(flow, exc)
            return
        if isinstance(result, Answer):
            flow.response = to_response(result)
            self._count(flow, "pooled")
            return
        # Stream it: mitmproxy fetches the parked answer from the relay, in plain HTTP.
        data = request.data
        state.relay_destination = (data.scheme, data.host, data.port)
        request.headers[TOKEN_HEADER] = self.relay.park(result.response)
        # .data: the Host header keeps naming the service
        data.scheme, data.host, data.port = b"http", "127.0.0.1", self.relay.port
        self._count(flow, "pooled_streamed")

    def client_disconnected(self, client: connection.Client) -> None:
        self._served.discard(client.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._restore(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._restore(flow)

    @staticmethod
    def _restore(flow: http.HTTPFlow) -> None:
        state = flow_state(flow)
        if state is not None and state.relay_destination is not None:
            data = flow.request.data
            data.scheme, data.host, data.port = state.relay_destination
            state.relay_destination = None
            flow.request.headers.pop(TOKEN_HEADER, None)

    @staticmethod
    def _failed(flow: http.HTTPFlow, exc: BaseException) -> None:
        """No answer from the service. The request may have reached it, so it is not sent
        again: the app gets a 502 and decides (the Azure SDKs retry)."""
        state = flow_state(flow)
        assert state is not None
        service = state.service
        reason = redact(f"{type(exc).__name__}: {exc}", limit=200)
        logger.warning("%s %s: no response from upstream: %s", service, flow.request.method,
                       reason)
        metrics.UPSTREAM_ERRORS.labels(service=service).inc()
        flow.response = keyless_answer(502, UPSTREAM_FAILED,
                                       f"no response from {flow.request.host}: {reason}")
        state.answered = True  # not the service's answer
        PoolUpstream._count(flow, "failed")

    @staticmethod
    def _count(flow: http.HTTPFlow, result: str) -> None:
        state = flow_state(flow)
        assert state is not None
        metrics.UPSTREAM_POOL.labels(service=state.service, result=result).inc()

    async def done(self) -> None:
        await self.relay.stop()
        await self.pool.close()
