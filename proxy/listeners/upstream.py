"""Dialling a listener's upstream: the app dialer's rules, and always-verified TLS.

The connection goes where `--connect-to` says, to addresses checked against the deny list
(proxy/dial.py AppDialer), and TLS is verified for the Azure host name against the CAs
mitmproxy would use for HTTPS upstreams (`--set ssl_verify_upstream_trusted_ca=FILE` or
`ssl_verify_upstream_trusted_confdir=DIR`, else certifi's bundle). `ssl_insecure` does not
apply: a token is never sent over an unverified or plain connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable

import certifi

from proxy.dial import AppDialer

CONNECT_TIMEOUT = 10.0
TLS_TIMEOUT = 10.0
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class UpstreamError(Exception):
    """The upstream could not be reached or its TLS not verified. Safe to show."""


def upstream_tls_context(mitmproxy_options: Iterable[tuple[str, str]]) -> ssl.SSLContext:
    options = dict(mitmproxy_options)
    cafile = options.get("ssl_verify_upstream_trusted_ca") or None
    capath = options.get("ssl_verify_upstream_trusted_confdir") or None
    try:
        context = ssl.create_default_context(
            cafile=cafile or (None if capath else certifi.where()), capath=capath)
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamError(f"cannot load the upstream trust store {cafile or capath}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context  # CERT_REQUIRED and check_hostname: the defaults, never switched off


class UpstreamDialer:
    def __init__(self, dialer: AppDialer, tls: ssl.SSLContext) -> None:
        self.dialer, self.tls = dialer, tls

    async def open(self, host: str, port: int, tls: bool, address: str | None = None
                   ) -> Streams:
        """Connect to host:port (TLS verified for `host`); `address`: dial this address
        instead of resolving `host` (transparent mode: where the app was going)."""
        try:
            infos = await asyncio.wait_for(self.dialer.resolve(address or host, port),
                                           CONNECT_TIMEOUT)
        except TimeoutError:
            raise UpstreamError(f"resolving {host} timed out") from None
        except OSError as exc:  # DestinationDenied is an OSError too
            raise UpstreamError(f"cannot reach {host}:{port}: {exc}") from None
        last: Exception | None = None
        for family, _, _, _, address in infos:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    address[0], address[1], family=family,
                    ssl=self.tls if tls else None,
                    server_hostname=host if tls else None,
                    ssl_handshake_timeout=TLS_TIMEOUT if tls else None), CONNECT_TIMEOUT)
            except ssl.SSLCertVerificationError as exc:
                raise UpstreamError(
                    f"{host}:{port} failed TLS verification: {exc.verify_message}") from None
            except (OSError, TimeoutError) as exc:
                last = exc
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return reader, writer
        reason = "timed out" if isinstance(last, TimeoutError) else (
            getattr(last, "strerror", None) or type(last).__name__)
        raise UpstreamError(f"cannot connect to {host}:{port}: {reason}")

    async def start_tls(self, writer: asyncio.StreamWriter, host: str) -> None:
        """Upgrade a plain connection in place (after PostgreSQL's or MySQL's TLS request)."""
        try:
            await writer.start_tls(self.tls, server_hostname=host,
                                   ssl_handshake_timeout=TLS_TIMEOUT)
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamError(f"{host} failed TLS verification: {exc.verify_message}") from None
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise UpstreamError(f"TLS with {host} failed: {type(exc).__name__}") from None
