"""Upstream HTTPS connections that outlive the app's connections.

mitmproxy ties every upstream connection to one app connection: an app that opens a new
connection per request makes keyless do two TLS handshakes per call. UpstreamPool keeps
keep-alive connections per (host, port, TLS settings) across app connections (aiohttp's
connector). addons/pool.py sends converted requests over it (small answers come back whole,
the rest streams through proxy/relay.py), and 401 replays use it too.

The pool dials through keyless' dialer for app traffic (proxy/dial.py: --connect-to, one
resolution, the deny list) and connects to exactly the addresses it checked; it verifies
certificates with mitmproxy's upstream trust settings.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from proxy import metrics
from proxy.dial import AppDialer, ip_address

BODY_LIMIT = 64 * 1024  # request bodies up to this size go pooled (larger ones stream directly)
RESPONSE_LIMIT = 256 * 1024  # answers up to this size are read whole; larger ones stream
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                        "proxy-authenticate", "te", "trailer", "transfer-encoding", "upgrade",
                        "content-length", "host"})
NO_BODY_STATUSES = frozenset({204, 304})


def poolable(method: str, headers: Mapping[str, str]) -> bool:
    """Whether a request goes over a pooled connection: a body of known, small length (big
    uploads stream faster on their own connection), and no protocol switch."""
    if method == "CONNECT" or "transfer-encoding" in headers or "upgrade" in headers:
        return False
    length = headers.get("content-length")
    return length is None or (length.isdigit() and int(length) <= BODY_LIMIT)


def forwarded_headers(fields: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in fields if k.lower() not in HOP_BY_HOP]


class TooLarge(Exception):
    """The answer is larger than the caller can hold."""


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]  # as received, minus hop-by-hop fields
    body: bytes
    started: float
    ended: float


@dataclass(frozen=True)
class Streaming:
    """An answer whose head is read and whose body is still on the wire."""

    response: aiohttp.ClientResponse


def bodyless(method: str, status: int) -> bool:
    return method == "HEAD" or status in NO_BODY_STATUSES or 100 <= status < 200


def end_to_end(raw_headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields of an answer meant for the app, not for the connection it came over."""
    return [(k, v) for k, v in raw_headers if k.decode("latin-1").lower() not in HOP_BY_HOP]


def answer(response: aiohttp.ClientResponse, content: bytes, started: float) -> Answer:
    """The answer as the app gets it: hop-by-hop fields dropped, and the length of what was
    read (a chunked answer read whole gets a Content-Length)."""
    headers = end_to_end(response.raw_headers)
    if response.content_length is not None:
        headers.append((b"Content-Length", str(response.content_length).encode()))
    elif not bodyless(response.method, response.status):
        headers.append((b"Content-Length", str(len(content)).encode()))
    return Answer(response.status, response.reason or "", headers, content, started, time.time())


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class GuardedResolver(AbstractResolver):
    """Resolves through the dialer: --connect-to applied, every address checked.

    aiohttp connects to exactly the addresses a resolver returns (and caches them, checked,
    for ttl_dns_cache), so what was checked is what is dialled."""

    def __init__(self, dialer: AppDialer) -> None:
        self.dialer = dialer

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = []
        for info_family, _, proto, _, address in await self.dialer.resolve(host, port, family):
            if info_family == socket.AF_INET6 and len(address) > 3 and address[3]:
                # a link-local address needs its zone, as aiohttp's own resolver does
                name, service = await asyncio.get_running_loop().getnameinfo(
                    address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                address = (name, int(service))
            results.append(ResolveResult(
                hostname=host, host=address[0], port=address[1], family=info_family,
                proto=proto, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        return results

    async def close(self) -> None:
        pass


class GuardedConnector(aiohttp.TCPConnector):
    """aiohttp skips the resolver for an IP-literal host; this one never does, so IP
    literals get the deny check too (a unit test watches this private hook)."""

    async def _resolve_host(self, host: str, port: int,
                            traces: Any = None) -> list[ResolveResult]:
        if ip_address(host) is not None:
            return await self._resolver.resolve(host, port, family=self._family)
        return await super()._resolve_host(host, port, traces=traces)


def upstream_tls(insecure: bool, cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """mitmproxy's upstream trust settings as an ssl context (certifi when none is given)."""
    context = ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if cafile or capath:
        context.load_verify_locations(cafile=cafile or None, capath=capath or None)
    else:
        import certifi  # mitmproxy's own default trust store

        context.load_verify_locations(cafile=certifi.where())
    return context


class UpstreamPool:
    def __init__(self, dialer: AppDialer | None = None,
                 per_host: int = 64, idle_seconds: float = 30.0,
                 read_timeout: float = 600.0) -> None:
        self.dialer = dialer or AppDialer()
        self.per_host, self.idle_seconds, self.read_timeout = per_host, idle_seconds, read_timeout
        self.tls: ssl.SSLContext | None = None
        self.connections_opened = 0
        self._session: aiohttp.ClientSession | None = None
        self._old: list[aiohttp.ClientSession] = []

    def use_tls(self, context: ssl.SSLContext) -> None:
        """New trust settings: connections made under the old ones are not reused."""
        self.tls = context
        if self._session is not None:
            self._old.append(self._session)
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_end.append(self._opened)
            self._session = aiohttp.ClientSession(
                connector=GuardedConnector(
                    limit=0, limit_per_host=self.per_host, keepalive_timeout=self.idle_seconds,
                    resolver=GuardedResolver(self.dialer), ttl_dns_cache=10),
                auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                trace_configs=[trace],
            )
            # aiohttp sends a GET/PUT/DELETE again when a reused connection fails; Azure does
            # not keep HTTP's promise there (a queue GET dequeues): never send anything twice.
            # No public switch exists (aiohttp 3.14); a test checks it stays off.
            self._session._retry_connection = False
        return self._session

    async def _opened(self, *_: Any) -> None:
        self.connections_opened += 1
        metrics.UPSTREAM_POOL_CONNECTIONS.inc()

    def request(self, method: str, host: str, port: int, path: str,
                headers: list[tuple[str, str]], body: bytes | None,
                server_hostname: str | None = None) -> Any:
        """One request over a pooled connection: aiohttp's response context manager.
        `server_hostname`: the name TLS verifies when `host` is an address (transparent mode
        dials the redirected connection's original address)."""
        url = aiohttp.client.URL(f"https://{_url_host(host)}:{port}{path}", encoded=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=self.read_timeout)
        return self._open().request(method, url, headers=headers, data=body,
                                    ssl=self.tls or True, allow_redirects=False, timeout=timeout,
                                    server_hostname=server_hostname)

    async def exchange(self, method: str, host: str, port: int, path: str,
                       headers: list[tuple[str, str]], host_header: str, body: bytes | None,
                       limit: int = RESPONSE_LIMIT) -> Answer | Streaming:
        """One request. A small answer comes back read; any other comes back as Streaming,
        its head read and its body still on the wire (the caller must release it)."""
        started = time.time()
        response = await self.request(method, host, port, path,
                                      [*headers, ("Host", host_header)], body)
        try:
            if bodyless(method, response.status):
                return answer(response, b"", started)
            if response.content_length is not None and response.content_length <= limit \
                    and response.content_type != "text/event-stream":
                return answer(response, await response.read(), started)
        except BaseException:
            response.close()
            raise
        return Streaming(response)

    async def send(self, method: str, host: str, port: int, path: str,
                   headers: list[tuple[str, str]], host_header: str, body: bytes | None,
                   limit: int, server_hostname: str | None = None) -> Answer:
        """One request, its whole answer read (streams and chunked ones too) up to `limit`;
        raises TooLarge beyond it."""
        started = time.time()
        async with self.request(method, host, port, path, [*headers, ("Host", host_header)],
                                body, server_hostname) as response:
            if bodyless(method, response.status):
                return answer(response, b"", started)
            if response.content_length is not None and response.content_length > limit:
                raise TooLarge()
            content = bytearray()
            async for chunk in response.content.iter_any():
                content += chunk
                if len(content) > limit:
                    raise TooLarge()
            return answer(response, bytes(content), started)

    async def close(self) -> None:
        sessions, self._old = [*self._old, self._session], []
        self._session = None
        for session in sessions:
            if session is not None:
                await session.close()
        await asyncio.sleep(0)  # let aiohttp's transports finish closing
