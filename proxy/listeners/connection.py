"""The one record per client connection a listener accepted, and what a session may ask of it.

A protocol session (`proxy/<protocol>/session.py serve(conn, reader, writer)`) gets its token,
its upstream and its TLS contexts from here, and reports what happened through it, so the
metrics, logs and audit records look the same for every protocol.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from cachetools import TTLCache
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy import metrics
from proxy.audit import CallKey, CallLog
from proxy.ca import leaf_certificate
from proxy.catalog import Catalog
from proxy.listeners.spec import ListenerSpec
from proxy.listeners.tls import TLSReader, TLSWriter, accept_tls
from proxy.listeners.upstream import Streams, UpstreamDialer, UpstreamError
from proxy.redact import redact
from proxy.tokens import Token, TokenCache

logger = logging.getLogger("proxy.listeners")
LOGIN_RESULTS = ("converted", "token_unavailable", "upstream_refused", "upstream_failed",
                 "client_error", "audited")


class ClientTLS:
    """Server-side TLS contexts for apps that ask a listener for TLS (`client-tls=true`): a
    leaf for the Azure host from keyless' CA, the one the app already trusts for HTTPS."""

    def __init__(self, ca_file: Path) -> None:
        self.ca_file = ca_file
        self._contexts: TTLCache[str, ssl.SSLContext] = TTLCache(64, ttl=24 * 3600)
        self._names: dict[int, str] = {}  # id(leaf context) -> its host
        self._by_server_name: dict[str, ssl.SSLContext] = {}

    def by_server_name(self, allowed: Callable[[str], bool]) -> ssl.SSLContext:
        """For transparent mode: a context that shows the leaf for the app's TLS server name
        when `allowed(name)`, and fails the handshake otherwise (no name, or not an Azure
        host of the protocol): keyless never guesses where a token should go."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2

        def choose(sslobj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> int | None:
            host = (name or "").lower().rstrip(".")
            if not host or not allowed(host):
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = self.context(host)
            return None

        context.sni_callback = choose
        return context

    def host_of(self, context: ssl.SSLContext) -> str | None:
        """The host a leaf context (from `context`) was made for."""
        return self._names.get(id(context))

    def context(self, host: str) -> ssl.SSLContext:
        context = self._contexts.get(host)
        if context is None:
            context = self._contexts[host] = self._build(host)
            self._names = {id(c): name for name, c in self._contexts.items()}
        return context

    def _build(self, host: str) -> ssl.SSLContext:
        raw = self.ca_file.read_bytes()
        key = serialization.load_pem_private_key(raw, None)
        ca = x509.load_pem_x509_certificate(raw)
        leaf = leaf_certificate(key, ca, host,  # type: ignore[arg-type]
                                datetime.datetime.now(datetime.UTC))
        pem = (leaf.public_bytes(serialization.Encoding.PEM)
               + ca.public_bytes(serialization.Encoding.PEM)
               + key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # load_cert_chain reads files only: a private temporary file, removed at once
        fd, path = tempfile.mkstemp(prefix=".keyless-leaf-", suffix=".pem")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
            context.load_cert_chain(path)
        finally:
            os.unlink(path)
        return context


@dataclass(frozen=True, slots=True)
class Shared:
    """What every connection of every listener shares (built once in serve)."""

    tokens: TokenCache
    dialer: UpstreamDialer
    calls: CallLog
    client_tls: ClientTLS
    audit: bool = False
    catalog: Catalog | None = None  # AMQP: routes say which namespaces are Event Hubs


@dataclass(slots=True)
class Connection:
    spec: ListenerSpec
    peer: str
    shared: Shared = field(repr=False)
    # Transparent mode: the address the app dialled (iptables REDIRECT's original
    # destination); the upstream host name comes from the app's TLS server name.
    original_destination: tuple[str, int] | None = None
    server_name_context: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def transparent(self) -> bool:
        return self.original_destination is not None

    @property
    def audit(self) -> bool:
        return self.shared.audit

    async def token(self) -> Token:
        """The identity's token for the listener's scope (raises TokenUnavailable)."""
        return await self.shared.tokens.get_token(self.spec.identity, self.spec.scope)

    async def token_for(self, scope: str, valid_until: float | None = None) -> Token:
        """The identity's token for another scope (AMQP: Service Bus or Event Hubs per
        entity), valid at least until `valid_until` when given."""
        return await self.shared.tokens.get_token(self.spec.identity, scope, valid_until)

    def service_for(self, audience: str) -> str:
        """AMQP: "servicebus" or "eventhubs" for a put-token's audience (`sb://NS/entity`,
        `amqp://…`): a `[[route]]` with `service = "eventhubs"` for the namespace, or a path
        only Event Hubs has (consumer groups, partitions), makes it Event Hubs; anything else
        is Service Bus, as for REST."""
        split = urlsplit(audience if "://" in audience else f"sb://{audience}")
        host = (split.hostname or "").lower() or self.spec.upstream[0]
        catalog = self.shared.catalog
        target = catalog.match(host, split.path.lower() or "/") if catalog else None
        if target is not None and target.service.name in ("servicebus", "eventhubs"):
            return target.service.name
        return "servicebus"

    async def open_upstream(self, tls: bool) -> Streams:
        host, port = self.spec.upstream
        if self.original_destination is not None:
            if not host:
                raise UpstreamError(
                    "transparent mode needs TLS from the app (e.g. PostgreSQL sslmode=require, "
                    "MySQL ssl-mode=REQUIRED): its TLS server name tells keyless the server")
            return await self.shared.dialer.open(host, port, tls=tls,
                                                 address=self.original_destination[0])
        return await self.shared.dialer.open(host, port, tls=tls)

    async def start_client_tls(self, writer: asyncio.StreamWriter) -> None:
        """Upgrade the app's side to TLS with a keyless-CA leaf (the app asked for TLS).
        Transparent mode: the leaf is for the app's TLS server name, which then becomes the
        upstream host (dialled at the address the app dialled)."""
        if self.server_name_context is None:
            await writer.start_tls(self.client_tls_context())
            return
        await writer.start_tls(self.server_name_context)
        self._adopt_server_name(writer.get_extra_info("ssl_object"))

    async def accept_client_tls(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> tuple[TLSReader, TLSWriter]:
        """Transparent Redis: TLS from the app's first byte, on streams that may already
        hold its ClientHello (proxy/listeners/tls.py); the server name picks the upstream."""
        assert self.server_name_context is not None
        tls = await accept_tls(reader, writer, self.server_name_context)
        self._adopt_server_name(tls[1].get_extra_info("ssl_object"))
        return tls

    def _adopt_server_name(self, ssl_object: ssl.SSLObject | None) -> None:
        host = self.shared.client_tls.host_of(ssl_object.context) if ssl_object else None
        if not host:
            raise UpstreamError("the app's TLS connection named no server keyless may log in to")
        assert self.original_destination is not None
        self.spec = replace(self.spec, upstream=(host, self.original_destination[1]))

    async def start_upstream_tls(self, writer: asyncio.StreamWriter) -> None:
        await self.shared.dialer.start_tls(writer, self.spec.upstream[0])

    def client_tls_context(self) -> ssl.SSLContext:
        return self.shared.client_tls.context(self.spec.upstream[0])

    def login(self, result: str) -> None:
        if result not in LOGIN_RESULTS:
            raise ValueError(f"unknown login result {result!r}")
        metrics.LISTENER_LOGINS.labels(listener=self.spec.name, protocol=self.spec.protocol,
                                       result=result).inc()
        if result == "converted":  # the report: this server's logins now use the token
            self._record("converted")
        level = logging.INFO if result in ("converted", "audited") else logging.WARNING
        logger.log(level, "%s login for %s to %s: %s", self.spec.protocol, self.peer,
                   self.spec.upstream[0], result)

    def reauth(self, result: str) -> None:
        if result not in ("ok", "failed"):
            raise ValueError(f"unknown re-auth result {result!r}")
        metrics.LISTENER_REAUTHS.labels(listener=self.spec.name, result=result).inc()
        if result == "failed":
            logger.warning("%s re-authentication for %s to %s failed", self.spec.protocol,
                           self.peer, self.spec.upstream[0])

    def refused(self, message: str, fix: str) -> None:
        """The upstream refused keyless' token login: say why and what fixes it. This also
        counts the login as `upstream_refused`: do not call login() for it as well."""
        metrics.LISTENER_LOGINS.labels(listener=self.spec.name, protocol=self.spec.protocol,
                                       result="upstream_refused").inc()
        logger.warning("%s at %s refused the Entra login of identity %s: %s. Fix: %s",
                       self.spec.protocol, self.spec.upstream[0], self.spec.identity.label,
                       redact(message, limit=500), fix)

    def record_password_login(self, user: str) -> None:
        """--audit: the app logged in with a password; `keyless report` plans its migration."""
        self._record("audited")
        logger.info("audit: %s password login as %r to %s", self.spec.protocol, user[:64],
                    self.spec.upstream[0])

    def _record(self, handled: str) -> None:
        self.record_call(self.spec.protocol, "password", "login", handled)

    def record_call(self, service: str, scheme: str, operation: str, handled: str) -> None:
        """One key-based call for `keyless report` (AMQP: per entity link, by service)."""
        host = self.spec.upstream[0]
        self.shared.calls.record(CallKey(
            service=service, resource=host.split(".", 1)[0], host=host, scheme=scheme,
            operation=operation, identity=self.spec.identity.label, handled=handled))
