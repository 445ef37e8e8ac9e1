"""UpstreamPool and the relay against a local HTTPS server: what is read whole, what streams,
that connections are shared, that nothing is sent twice, and who may use the relay."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.connect_to import ConnectTo, ConnectToTable
from proxy.dial import AppDialer, DestinationDenied
from proxy.relay import TOKEN_HEADER, UpstreamRelay
from proxy.upstream import (
    Answer,
    Streaming,
    TooLarge,
    UpstreamPool,
    forwarded_headers,
    poolable,
    upstream_tls,
)
from tests.support.azurite import TestPKI

BIG = 300 * 1024


@pytest.mark.parametrize(("method", "headers", "expected"), [
    ("GET", {}, True),
    ("POST", {"content-length": "65536"}, True),
    ("PUT", {"content-length": "65537"}, False),  # big uploads stream on their own
    ("PUT", {"content-length": "12x"}, False),
    ("POST", {"transfer-encoding": "chunked"}, False),
    ("GET", {"upgrade": "websocket"}, False),
    ("CONNECT", {}, False),
])
def test_poolable(method: str, headers: dict[str, str], expected: bool) -> None:
    assert poolable(method, headers) is expected


def test_hop_by_hop_fields_are_not_forwarded() -> None:
    assert forwarded_headers([("Host", "a"), ("Connection", "close"), ("x-ms-version", "1"),
                              ("Transfer-Encoding", "chunked"), ("Authorization", "Bearer t")]) \
        == [("x-ms-version", "1"), ("Authorization", "Bearer t")]


class Upstream:
    """A local HTTPS service: counts connections and requests per path."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        if request.path == "/small":
            return web.Response(body=b"small", headers={"x-ms-request-id": "r1"})
        if request.path == "/big":
            return web.Response(body=b"b" * BIG)
        if request.path == "/chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b"part1-")
            await response.write(b"part2")
            await response.write_eof()
            return response
        if request.path == "/reset":
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        return web.Response(status=404)


async def with_upstream(test: Callable[[UpstreamPool, int, Upstream], Awaitable[None]],
                        tmp_path: Any, denied: Callable[[str], bool] = lambda a: False) -> None:
    pki = TestPKI(tmp_path / "pki")
    cert, key = pki.issue_server_cert("localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    upstream = Upstream()
    server = web.Server(upstream.handle)
    loop = asyncio.get_running_loop()

    def counted() -> Any:
        upstream.connections += 1
        return server()

    listener = await loop.create_server(counted, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    pool = UpstreamPool(AppDialer(denied=denied))
    pool.use_tls(upstream_tls(False, pki.ca_pem_path, None))
    try:
        await test(pool, port, upstream)
    finally:
        await pool.close()
        listener.close()
        await server.shutdown(1)


def run(test: Any, tmp_path: Any, **kwargs: Any) -> None:
    asyncio.run(with_upstream(test, tmp_path, **kwargs))


async def exchange(pool: UpstreamPool, port: int, path: str,
                   method: str = "GET") -> Answer | Streaming:
    return await pool.exchange(method, "localhost", port, path, [("x-ms-version", "1")],
                               f"localhost:{port}", None)


def test_small_answers_come_back_whole_over_one_shared_connection(tmp_path) -> None:
    async def test(pool: UpstreamPool, port: int, upstream: Upstream) -> None:
        answers = [await exchange(pool, port, "/small") for _ in range(5)]
        assert all(isinstance(a, Answer) and a.status == 200 and a.body == b"small"
                   for a in answers)
        headers = {k.lower(): v for k, v in answers[0].headers}  # type: ignore[union-attr]
        assert headers[b"x-ms-request-id"] == b"r1" and headers[b"content-length"] == b"5"
        assert b"connection" not in headers
        assert upstream.connections == 1 and pool.connections_opened == 1

    run(test, tmp_path)


def test_head_answers_have_no_body_but_keep_their_length(tmp_path) -> None:
    async def test(pool: UpstreamPool, port: int, upstream: Upstream) -> None:
        answer = await exchange(pool, port, "/big", method="HEAD")
        assert isinstance(answer, Answer) and answer.body == b""
        assert (b"Content-Length", str(BIG).encode()) in answer.headers

    run(test, tmp_path)


@pytest.mark.parametrize("path", ["/big", "/chunked"])
def test_large_or_unsized_answers_stream(tmp_path, path: str) -> None:
    async def test(pool: UpstreamPool, port: int, upstream: Upstream) -> None:
        result = await exchange(pool, port, path)
        assert isinstance(result, Streaming)
        body = await result.response.read()
        result.response.release()
        assert body == (b"b" * BIG if path == "/big" else b"part1-part2")

    run(test, tmp_path)


def test_send_reads_whole_answers_up_to_a_limit(tmp_path) -> None:
    async def test(pool: UpstreamPool, port: int, upstream: Upstream) -> None:
        chunked = await pool.send("GET", "localhost", port, "/chunked", [], "localhost", None,
                                  limit=1024)
        assert chunked.body == b"part1-part2"
        assert (b"Content-Length", b"11") in chunked.headers
        with pytest.raises(TooLarge):
            await pool.send("GET", "localhost", port, "/big", [], "localhost", None, limit=1024)

    run(test, tmp_path)


def test_a_failing_reused_connection_is_not_sent_again(tmp_path) -> None:
    """aiohttp would resend a GET on a reused connection that fails; Azure GETs can change
    state (a queue GET dequeues), so the pool must not."""
    async def test(pool: UpstreamPool, port: int, upstream: Upstream) -> None:
        await exchange(pool, port, "/small")  # a kept-alive connection to reuse
        with pytest.raises((aiohttp.ClientError, OSError)):
            await exchange(pool, port, "/reset")
        assert upstream.requests.count("/reset") == 1

    run(test, tmp_path)


def test_denied_destinations_are_refused_before_connecting(tmp_path) -> None:
    async def test(pool: UpstreamPool, port: int, upstream: Upstream) -> None:
        with pytest.raises((aiohttp.ClientError, OSError)):
            await exchange(pool, port, "/small")
        assert upstream.connections == 0

    run(test, tmp_path, denied=lambda address: address in ("127.0.0.1", "::1"))


def test_denied_ip_literals_are_refused_too(tmp_path) -> None:
    """aiohttp skips the resolver for an IP-literal host; the pool's connector does not."""
    async def test(pool: UpstreamPool, port: int, upstream: Upstream) -> None:
        with pytest.raises(aiohttp.ClientConnectorError) as refused:
            await pool.exchange("GET", "127.0.0.1", port, "/small", [], "localhost", None)
        assert isinstance(refused.value.os_error, DestinationDenied)
        assert upstream.connections == 0

    run(test, tmp_path, denied=lambda address: address == "127.0.0.1")


def test_the_pool_dials_through_connect_to_and_keeps_the_name_for_tls(tmp_path) -> None:
    async def test(pool: UpstreamPool, port: int, upstream: Upstream) -> None:
        pool.dialer.connect_to = ConnectToTable([ConnectTo.parse(f"localhost:1:127.0.0.1:{port}")])
        result = await pool.exchange("GET", "localhost", 1, "/small", [], "localhost", None)
        assert isinstance(result, Answer) and result.body == b"small"  # cert for localhost
        assert upstream.connections == 1

    run(test, tmp_path)


def test_the_relay_streams_a_parked_answer_once_to_its_token_holder(tmp_path) -> None:
    async def test(pool: UpstreamPool, port: int, upstream: Upstream) -> None:
        relay = UpstreamRelay()
        await relay.start()
        try:
            result = await exchange(pool, port, "/chunked")
            assert isinstance(result, Streaming)
            token = relay.park(result.response)
            url = f"http://127.0.0.1:{relay.port}/chunked"
            async with aiohttp.ClientSession() as app:
                async with app.get(url, headers={TOKEN_HEADER: "guess"}) as refused:
                    assert refused.status == 403
                async with app.get(url, headers={TOKEN_HEADER: token}) as relayed:
                    assert relayed.status == 200 and await relayed.read() == b"part1-part2"
                    assert relayed.headers.get("Transfer-Encoding") == "chunked"
                async with app.get(url, headers={TOKEN_HEADER: token}) as again:
                    assert again.status == 403  # one use only
            assert upstream.requests.count("/chunked") == 1
        finally:
            await relay.stop()

    run(test, tmp_path)


def test_an_unclaimed_parked_answer_is_dropped(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("proxy.relay.PARK_SECONDS", 0.05)

    async def test(pool: UpstreamPool, port: int, upstream: Upstream) -> None:
        relay = UpstreamRelay()
        result = await exchange(pool, port, "/big")
        assert isinstance(result, Streaming)
        relay.park(result.response)
        await asyncio.sleep(0.2)
        assert result.response.closed and not relay._parked

    run(test, tmp_path)
