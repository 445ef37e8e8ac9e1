"""One MySQL client connection: keyless is the server to the app and an Entra client upstream.

1. Dial the server (plain TCP) and read its greeting; it must offer TLS.
2. Greet the app with the server's version, connection id and capabilities (minus what keyless
   cannot relay; plus TLS only with `client-tls=true`) and a fresh nonce, and read its
   HandshakeResponse41. The app's password scramble is discarded: keyless could not even
   recover the password from it, and it is never forwarded.
3. Get the token (none: the app gets ERR 1045 "KeylessTokenUnavailable: ..." and the server
   never sees a login), send the server an SSLRequest, start verified TLS, and log in as the
   app's user (or the listener's `user`) with the token: the scramble the greeting's plugin
   asks for, then whatever the server switches to (mysql_clear_password: the token in clear,
   caching_sha2_password's full authentication: the same), over TLS only.
4. The server's OK goes to the app with the app's sequence id; then bytes are relayed.

Each side keeps its own sequence ids. With --audit keyless forwards the app's own login
(greeting nonce and all) over upstream TLS instead and records it for `keyless report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import string
from dataclasses import replace
from typing import NoReturn, cast

from proxy.listeners.connection import Connection
from proxy.listeners.relay import relay
from proxy.listeners.tls import TLSReader, TLSWriter, UpgradableWriter
from proxy.listeners.upstream import UpstreamError
from proxy.mysql import codec
from proxy.mysql.codec import Err, HandshakeResponse, ProtocolError
from proxy.mysql.commands import AppCommands
from proxy.redact import redact
from proxy.tokens import TokenUnavailable

logger = logging.getLogger(__name__)

LOGIN_TIMEOUT = 30.0  # per packet of the login, either side
MAX_AUTH_ROUNDS = 8  # switches and more-data rounds before keyless gives up on a server
ZERO_FILLER = b"\0" * 23
NONCE_ALPHABET = (string.ascii_letters + string.digits + string.punctuation).encode()


def fresh_nonce() -> bytes:
    # printable and NUL-free, like the servers' own: some clients read it as a C string
    return bytes(secrets.choice(NONCE_ALPHABET) for _ in range(20))


class Side:
    """One end of the session: its streams and its own next sequence id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader: asyncio.StreamReader | TLSReader = reader
        self.writer: asyncio.StreamWriter | TLSWriter = writer
        self.seq = 0

    @property
    def streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # TLSReader/TLSWriter have what the relay uses of the asyncio streams
        return cast(asyncio.StreamReader, self.reader), cast(asyncio.StreamWriter, self.writer)

    async def read(self, limit: int = codec.MAX_AUTH_PACKET) -> bytes:
        header = await asyncio.wait_for(self.reader.readexactly(codec.HEADER_SIZE),
                                        LOGIN_TIMEOUT)
        length, seq = codec.decode_header(header, limit)
        payload = await asyncio.wait_for(self.reader.readexactly(length), LOGIN_TIMEOUT)
        self.seq = (seq + 1) & 0xFF
        return payload

    async def write(self, payload: bytes) -> None:
        self.writer.write(codec.encode_packet(self.seq, payload))
        self.seq = (self.seq + 1) & 0xFF
        await self.writer.drain()

    async def error(self, code: int, sqlstate: str, message: str) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self.write(codec.encode_err(Err(code, sqlstate, message)))


class Failed(Exception):
    """The login ends here; the app has been told (or could not be)."""


async def serve(conn: Connection, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    app = Side(reader, writer)
    server: Side | None = None
    try:
        if conn.spec.upstream[0]:
            # the server is known: greet the app with the server's own greeting
            server = await dial(conn, app)
            greeting = await upstream_greeting(conn, app, server)
            response = await app_login(conn, app, mirrored(conn, greeting))
        else:
            # transparent mode: the app's TLS server name names the server, so keyless
            # greets first and meets the server after the app's TLS handshake
            response = await app_login(conn, app, blind_greeting())
            server = await dial(conn, app)
            greeting = await upstream_greeting(conn, app, server)
            await require_compatible(conn, app, response, greeting)
            if conn.audit:
                response = await resync_scramble(conn, app, response, greeting)
        if await login(conn, app, server, greeting, response):
            reader, writer = app.streams
            if not conn.audit:  # a new login on the connection would carry the app's password
                reader = cast(asyncio.StreamReader, AppCommands(reader, writer, conn.peer))
            await relay(conn, (reader, writer), server.streams)
    except Failed:
        pass
    except ProtocolError as exc:  # the server's side of the login made no sense
        conn.login("upstream_failed")
        await app.error(2013, "HY000", f"KeylessUpstreamFailed: {exc}")
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
        logger.info("mysql connection from %s ended during the login: %s", conn.peer,
                    type(exc).__name__)
    finally:
        if server is not None:
            server.writer.close()


async def dial(conn: Connection, app: Side) -> Side:
    try:
        return Side(*await conn.open_upstream(tls=False))
    except UpstreamError as exc:
        conn.login("upstream_failed")
        await app.error(2003, "HY000", f"KeylessUpstreamFailed: {redact(str(exc), limit=300)}")
        raise Failed from None


async def login(conn: Connection, app: Side, server: Side, greeting: codec.Handshake,
                response: HandshakeResponse) -> bool:
    """The upstream login; True when both sides are logged in and ready to relay."""
    if conn.audit:
        return await audited_login(conn, app, server, greeting, response)
    try:
        token = (await conn.token()).value.encode()
    except TokenUnavailable as exc:
        # fail closed: the server never sees a login with any password
        conn.login("token_unavailable")
        await app.error(codec.ER_ACCESS_DENIED, "28000", f"KeylessTokenUnavailable: {exc}")
        return False
    user = conn.spec.user or response.user
    capabilities = upstream_capabilities(response.capabilities, greeting.capabilities)
    await start_tls(conn, app, server, capabilities, response)
    plugin = greeting.auth_plugin if greeting.auth_plugin in codec.FIRST_RESPONSE else codec.NATIVE
    first = HandshakeResponse(
        capabilities, response.max_packet, response.charset, user,
        codec.auth_response(plugin, token, greeting.nonce), response.database, plugin,
        response.attributes if capabilities & codec.CLIENT_CONNECT_ATTRS else None)
    await server.write(codec.encode_handshake_response(first))
    return await token_exchange(conn, app, server, plugin, token, user)


async def upstream_greeting(conn: Connection, app: Side, server: Side) -> codec.Handshake:
    try:
        payload = await server.read()
        if payload[:1] == b"\xff":  # e.g. the server refuses this client address
            conn.refused(codec.decode_err(payload).message, "see the server's message")
            await app.write(payload)
            raise Failed
        greeting = codec.decode_handshake(payload)
    except (ProtocolError, TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
        await upstream_failed(conn, app, f"no MySQL greeting from the server ({kind(exc)})")
    if not greeting.capabilities & codec.CLIENT_SSL:
        await upstream_failed(conn, app, "the server does not offer TLS, and keyless never "
                              "sends a token over plain TCP")
    if greeting.capabilities & codec.REQUIRED_UPSTREAM != codec.REQUIRED_UPSTREAM:
        await upstream_failed(conn, app, "the server lacks protocol 4.1 or plugin auth")
    return greeting


def mirrored(conn: Connection, greeting: codec.Handshake) -> codec.Handshake:
    """The app's greeting: the server's version, connection id (KILL QUERY from another
    connection finds this one) and flags, minus what keyless cannot relay."""
    if conn.audit:  # the app's scramble must be for the server's own nonce and plugin
        nonce, plugin = greeting.nonce, greeting.auth_plugin
    else:
        nonce = fresh_nonce()
        plugin = (greeting.auth_plugin if greeting.auth_plugin in codec.FIRST_RESPONSE
                  else codec.NATIVE)
    return codec.Handshake(greeting.server_version, greeting.connection_id, nonce,
                           greeting.capabilities & ~codec.NOT_RELAYABLE, greeting.charset,
                           greeting.status, plugin)


def blind_greeting() -> codec.Handshake:
    # connection id 0: no real id is known yet, and a KILL of 0 matches no session
    return codec.Handshake(codec.BLIND_VERSION, 0, fresh_nonce(), codec.OFFERED_BLIND, 45,
                           0x0002, codec.NATIVE)


async def app_login(conn: Connection, app: Side, greeting: codec.Handshake
                    ) -> HandshakeResponse:
    """Greet the app and read its login (over TLS if it asks and may)."""
    offered = greeting.capabilities & ~codec.CLIENT_SSL
    if conn.spec.client_tls:
        offered |= codec.CLIENT_SSL
    await app.write(codec.encode_handshake(replace(greeting, capabilities=offered)))
    try:
        payload = await app.read()
        if codec.is_ssl_request(payload):
            if not offered & codec.CLIENT_SSL:
                raise ProtocolError("TLS requested, but not offered")
            await client_tls(conn, app)
            payload = await app.read()
        return codec.decode_handshake_response(payload)
    except ProtocolError as exc:
        conn.login("client_error")
        await app.error(codec.ER_HANDSHAKE, "08S01", f"Bad handshake: {exc}")
        raise Failed from None


async def client_tls(conn: Connection, app: Side) -> None:
    # not StreamWriter.start_tls: the app's ClientHello follows its SSLRequest unasked and
    # may already be in the reader's buffer (proxy/listeners/tls.py)
    upgrade = UpgradableWriter(*app.streams)
    try:
        await conn.start_client_tls(cast(asyncio.StreamWriter, upgrade))
    except ConnectionError as exc:  # no TLS, or (transparent) a server name keyless refuses
        logger.warning("mysql client %s: %s", conn.peer, exc)
        conn.login("client_error")
        raise Failed from None
    except UpstreamError as exc:
        if upgrade.tls is not None:
            app.reader, app.writer = upgrade.tls
        conn.login("upstream_failed")
        await app.error(2003, "HY000", f"KeylessUpstreamFailed: {exc}")
        raise Failed from None
    assert upgrade.tls is not None
    app.reader, app.writer = upgrade.tls


async def require_compatible(conn: Connection, app: Side, response: HandshakeResponse,
                             greeting: codec.Handshake) -> None:
    """Blind greeting: the flags the app chose must mean the same to the server."""
    if missing := codec.unrelayable_choices(response.capabilities, greeting.capabilities):
        await upstream_failed(conn, app, "the server lacks capabilities the app chose: "
                              f"{codec.flag_names(missing)}")


async def resync_scramble(conn: Connection, app: Side, response: HandshakeResponse,
                          greeting: codec.Handshake) -> HandshakeResponse:
    """--audit after a blind greeting: the app scrambled keyless' nonce; an AuthSwitchRequest
    with the server's nonce and plugin has it answer for the server."""
    if not response.capabilities & codec.CLIENT_PLUGIN_AUTH:
        await upstream_failed(conn, app, "the app cannot switch auth plugins (CLIENT_PLUGIN_AUTH)")
    await app.write(codec.encode_auth_switch(codec.AuthSwitch(greeting.auth_plugin,
                                                              greeting.nonce + b"\0")))
    return response.with_auth(greeting.auth_plugin, await app.read())


def upstream_capabilities(app_flags: int, server_flags: int) -> int:
    """What the app negotiated (so the relayed stream means the same to both ends), what
    the server has, and what keyless' own login needs."""
    flags = app_flags & server_flags & ~codec.NOT_RELAYABLE
    flags |= codec.REQUIRED_UPSTREAM
    # a token is longer than 255 bytes: in clear it needs the length-encoded form
    flags |= server_flags & codec.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
    return flags


async def start_tls(conn: Connection, app: Side, server: Side, capabilities: int,
                    response: HandshakeResponse) -> None:
    await server.write(codec.encode_ssl_request(capabilities, response.max_packet,
                                                response.charset))
    try:
        await conn.start_upstream_tls(server.writer)
    except UpstreamError as exc:
        await upstream_failed(conn, app, str(exc))


async def token_exchange(conn: Connection, app: Side, server: Side, plugin: str,
                         token: bytes, user: str) -> bool:
    """Answer the server's requests with the token until it says OK or ERR."""
    for _ in range(MAX_AUTH_ROUNDS):
        try:
            payload = await server.read()
        except (ProtocolError, TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            await upstream_failed(conn, app, f"the server ended the login ({kind(exc)})")
        kind_byte = payload[:1]
        if kind_byte == bytes((codec.OK,)):
            conn.login("converted")
            await app.write(payload)  # the server's own status flags, for the app's seq
            return True
        if kind_byte == bytes((codec.ERR,)):
            conn.refused(codec.decode_err(payload).message, refusal_fix(conn, user))
            await app.write(payload)
            return False
        try:
            if kind_byte == bytes((codec.AUTH_SWITCH,)):
                switch = codec.decode_auth_switch(payload)
                plugin = switch.plugin
                await server.write(codec.auth_response(plugin, token, switch.nonce))
            elif kind_byte == bytes((codec.AUTH_MORE_DATA,)) and plugin == codec.CACHING_SHA2:
                more = codec.decode_auth_more_data(payload)
                if more == codec.PERFORM_FULL_AUTH:  # over TLS: the token in clear
                    await server.write(codec.clear_password(token))
                elif more != codec.FAST_AUTH_OK:
                    raise ProtocolError("unexpected caching_sha2_password request")
            else:
                raise ProtocolError(f"unexpected packet 0x{payload[:1].hex()} in the login")
        except ProtocolError as exc:
            await upstream_failed(conn, app, str(exc))
    await upstream_failed(conn, app, "the server's login did not end")


async def audited_login(conn: Connection, app: Side, server: Side, greeting: codec.Handshake,
                        response: HandshakeResponse) -> bool:
    """--audit: the app's own login, over upstream TLS, recorded; keyless only relays it."""
    capabilities = upstream_capabilities(response.capabilities, greeting.capabilities)
    capabilities &= response.capabilities | codec.CLIENT_SSL  # the app's own auth format
    await start_tls(conn, app, server, capabilities, response)
    await server.write(codec.encode_handshake_response(
        replace(response, capabilities=capabilities, filler=ZERO_FILLER)))
    for _ in range(MAX_AUTH_ROUNDS):
        payload = await server.read()
        if payload[:1] == bytes((codec.OK,)):
            conn.record_password_login(response.user)
            conn.login("audited")
        elif payload[:1] == bytes((codec.ERR,)):
            conn.login("upstream_refused")
        await app.write(payload)  # counted first: what the app sees is already in the metrics
        if payload[:1] in (bytes((codec.OK,)), bytes((codec.ERR,))):
            return payload[:1] == bytes((codec.OK,))
        if payload == b"\x01" + codec.FAST_AUTH_OK:
            continue  # the server's OK follows without an answer
        await server.write(await app.read())
    await upstream_failed(conn, app, "the login did not end")


def refusal_fix(conn: Connection, user: str) -> str:
    identity = conn.spec.identity.client_id or "<the managed identity's client id>"
    return (f"as the server's Microsoft Entra admin, create the user for the identity: "
            f"CREATE AADUSER '{user[:64]}' IDENTIFIED BY '{identity}'; and GRANT it its "
            "privileges (the server needs Microsoft Entra authentication enabled, with a "
            "server identity that may read Microsoft Graph); see docs/databases/mysql.md")


async def upstream_failed(conn: Connection, app: Side, reason: str) -> NoReturn:
    conn.login("upstream_failed")
    await app.error(2013, "HY000", f"KeylessUpstreamFailed: {redact(reason, limit=300)}")
    raise Failed


def kind(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ProtocolError) else type(exc).__name__
