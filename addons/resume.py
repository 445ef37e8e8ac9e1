"""Resume TLS sessions on keyless' own connections to the service.

An app that opens a new connection per request makes keyless open a new upstream connection
each time. Offering the previous session for the same destination lets the service skip the
certificate transfer and keyless the chain verification (an abbreviated handshake).

mitmproxy creates the pyOpenSSL connection in its TlsConfig addon (`tls_start_server`); keyless
adds its addons after mitmproxy's, so `tls_start.ssl_conn` exists when our hook runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache
from mitmproxy import connection, ctx, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks
from OpenSSL import SSL

logger = logging.getLogger(__name__)

MAX_SESSIONS = 1024
# OpenSSL also refuses a session past its own lifetime (the ticket's lifetime hint in TLS 1.3).
SESSION_TTL = 600.0

# Options that change which certificates are trusted: a session verified under other settings
# must not be offered (they are in the key; a change also empties the store).
VERIFY_OPTIONS = frozenset({
    "ssl_insecure", "ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir",
    "client_certs",
})


@dataclass(frozen=True, slots=True)
class SessionKey:
    """Everything that must match for a stored session to be offered to a new connection."""

    address: tuple[str, int] | None
    via: Any  # the upstream proxy spec, if any (hashable)
    sni: str | None
    alpn_offers: tuple[bytes, ...]
    insecure: bool
    trusted_ca: str | None
    trusted_confdir: str | None
    client_certs: str | None


def session_key(server: connection.Server, options: Any) -> SessionKey:
    """The key for `server` as TlsConfig has prepared it (SNI and ALPN already decided)."""
    address = (str(server.address[0]).lower(), int(server.address[1])) if server.address else None
    return SessionKey(
        address=address,
        via=server.via,
        sni=server.sni.lower() if server.sni else None,
        alpn_offers=tuple(server.alpn_offers or ()),
        insecure=bool(options.ssl_insecure),
        trusted_ca=options.ssl_verify_upstream_trusted_ca,
        trusted_confdir=options.ssl_verify_upstream_trusted_confdir,
        client_certs=options.client_certs,
    )


class SessionStore:
    """The last resumable session per key: bounded in size and age."""

    def __init__(self, maxsize: int = MAX_SESSIONS, ttl: float = SESSION_TTL,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self._sessions: TTLCache[SessionKey, SSL.Session] = TTLCache(maxsize, ttl, timer)

    def get(self, key: SessionKey) -> SSL.Session | None:
        return self._sessions.get(key)

    def put(self, key: SessionKey, session: SSL.Session) -> None:
        self._sessions[key] = session

    def forget(self, key: SessionKey) -> None:
        self._sessions.pop(key, None)

    def clear(self) -> None:
        self._sessions.clear()

    def __len__(self) -> int:
        self._sessions.expire()
        return len(self._sessions)


def keep_session_resumable(ssl_conn: SSL.Connection) -> None:
    """Mark a closed connection as shut down before pyOpenSSL frees it.

    mitmproxy closes upstream TLS without sending close_notify, and OpenSSL marks the session
    of a connection freed that way as not resumable (its SSL_free -> ssl_clear_bad_session).
    That rule dates from SSL 3.0; TLS 1.1+ (RFC 4346 7.2.1) no longer requires it. Without
    this, every stored session would die with the connection it came from.
    """
    ssl_conn.set_shutdown(ssl_conn.get_shutdown() | SSL.SENT_SHUTDOWN)


class ResumeUpstreamTLS:
    def __init__(self, maxsize: int = MAX_SESSIONS, ttl: float = SESSION_TTL,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.sessions = SessionStore(maxsize, ttl, timer)
        # server connection id -> its key and pyOpenSSL connection, while it is open
        self._live: dict[str, tuple[SessionKey, SSL.Connection]] = {}
        self._unsaved: set[str] = set()  # live connections whose session is not stored yet

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "upstream_tls_resumption", bool, True,
            "Resume TLS sessions on new upstream connections to the same destination.",
        )

    def configure(self, updated: set[str]) -> None:
        if updated & (VERIFY_OPTIONS | {"upstream_tls_resumption"}):
            self.sessions.clear()

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        if (not ctx.options.upstream_tls_resumption or tls_start.is_dtls
                or tls_start.ssl_conn is None):
            return
        assert isinstance(tls_start.conn, connection.Server)
        key = session_key(tls_start.conn, ctx.options)
        self._live[tls_start.conn.id] = (key, tls_start.ssl_conn)
        self._unsaved.add(tls_start.conn.id)
        session = self.sessions.get(key)
        if session is None:
            return
        try:
            tls_start.ssl_conn.set_session(session)
        except ValueError:
            # pyOpenSSL only resumes with the SSL.Context the session came from, and mitmproxy
            # built a new one (its context cache is bounded): start over with this one.
            self.sessions.forget(key)

    def tls_established_server(self, data: tls.TlsData) -> None:
        # TLS 1.3 tickets arrive after the handshake (NewSessionTicket): the session is only
        # resumable once a response has been read, see responseheaders.
        if data.conn.tls_version != "TLSv1.3":
            self._save(data.conn.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # The server sends its tickets right after our Finished, before any response bytes.
        self._save(flow.server_conn.id)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        self._unsaved.discard(data.conn.id)
        live = self._live.pop(data.conn.id, None)
        if live is not None:
            self.sessions.forget(live[0])

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._unsaved.discard(data.server.id)
        live = self._live.pop(data.server.id, None)
        if live is not None and data.server.tls_established:
            keep_session_resumable(live[1])

    def _save(self, conn_id: str) -> None:
        if conn_id not in self._unsaved:
            return  # once per connection: later responses on it change nothing
        self._unsaved.discard(conn_id)
        live = self._live.get(conn_id)
        if live is None:
            return
        key, ssl_conn = live
        session = ssl_conn.get_session()
        if session is not None:
            self.sessions.put(key, session)
