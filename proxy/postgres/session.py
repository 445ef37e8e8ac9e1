"""One PostgreSQL client connection: log in upstream with a token, then relay bytes.

    app ──(SSLRequest → 'N', or 'S' + TLS with keyless' CA)──▶ StartupMessage
    keyless ──SSLRequest → 'S' → TLS (verified)──▶ server: StartupMessage (the login user)
    server: AuthenticationCleartextPassword ◀── keyless answers with the token
    server: AuthenticationOk, ParameterStatus*, BackendKeyData, ReadyForQuery ──▶ app (unchanged)
    then bytes both ways (proxy.listeners.relay)

The app is never asked for a password (the server asked keyless), so whatever password it has
never leaves it. Anything else the server asks for (MD5, SCRAM) is refused: a token goes only
to a cleartext-password request over verified TLS. With --audit the app's own login is
relayed unchanged (over upstream TLS) and recorded for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl

from proxy.listeners.connection import Connection
from proxy.listeners.relay import relay
from proxy.listeners.upstream import UpstreamError
from proxy.postgres import codec
from proxy.postgres.cancel import CANCEL_KEYS
from proxy.postgres.codec import (
    Authentication,
    BackendKeyData,
    CancelRequest,
    CodecError,
    ErrorResponse,
    GSSENCRequest,
    ReadyForQuery,
    SSLRequest,
    StartupMessage,
)
from proxy.tokens import TokenUnavailable

logger = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

LOGIN_TIMEOUT = 60.0  # seconds for the whole login, like the server's authentication_timeout
CANCEL_TIMEOUT = 10.0
MAX_NEGOTIATIONS = 2  # a GSSENCRequest and an SSLRequest may precede the StartupMessage
MAX_LOGIN_MESSAGES = 1000  # a login is ~20 messages; more means a confused peer
# Requests whose answer is a client 'p' message (relayed only in audit mode).
ANSWERED_AUTH = {codec.AUTH_CLEARTEXT_PASSWORD, codec.AUTH_MD5_PASSWORD, codec.AUTH_GSS,
                 codec.AUTH_GSS_CONTINUE, codec.AUTH_SSPI, codec.AUTH_SASL,
                 codec.AUTH_SASL_CONTINUE}
PASSWORD_AUTH = {codec.AUTH_CLEARTEXT_PASSWORD, codec.AUTH_MD5_PASSWORD, codec.AUTH_SASL}

ROLE_FIX = ("the login user must be the role name created for the identity: as the server's "
            "Entra admin run SELECT * FROM pgaadauth_create_principal('{user}', false, false); "
            "(or set ?user=ROLE on the --postgres listener)")
UNSUPPORTED_FIX = ("the login user is a password role, not an Entra one: create it with "
                   "pgaadauth_create_principal, or set ?user=ROLE to the identity's role")


class Refused(Exception):
    """The server refused the login; its own ErrorResponse has gone to the client."""


class LoginFailed(Exception):
    """The login cannot go on; `sqlstate` and the message go to the client (secret-free)."""

    def __init__(self, sqlstate: str, message: str, result: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.result = result  # the Connection.login result to count (None: counted already)


async def serve(conn: Connection, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    client: Streams = (reader, writer)
    try:
        async with asyncio.timeout(LOGIN_TIMEOUT):
            first = await _client_startup(conn, client)
    except asyncio.IncompleteReadError:
        _client_error(conn, "the client closed the connection during startup")
        return
    except (CodecError, UpstreamError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
        _client_error(conn, str(exc) or type(exc).__name__)
        return
    if first is None:
        return
    if isinstance(first, CancelRequest):
        await _cancel(conn, first)
        return
    upstream, key = await _login(conn, client, first)
    if upstream is None:
        return
    try:
        await relay(conn, client, upstream)
    finally:
        if key is not None:
            CANCEL_KEYS.forget(conn.spec.upstream, key.pid, key.secret)


def _client_error(conn: Connection, reason: str) -> None:
    logger.info("postgres %s: closing client connection: %s", conn.peer, reason)
    conn.login("client_error")


# -- the client side ------------------------------------------------------------------------


async def _client_startup(conn: Connection,
                          client: Streams) -> StartupMessage | CancelRequest | None:
    """Answer the client's SSL/GSS requests and return its StartupMessage or CancelRequest."""
    reader, writer = client
    negotiated: set[type] = set()
    for _ in range(MAX_NEGOTIATIONS + 1):
        try:
            header = await reader.readexactly(4)
        except asyncio.IncompleteReadError as exc:
            if not negotiated and not exc.partial:
                return None  # a bare connect-and-close (a TCP probe) is no client error
            raise
        packet = await read_startup(reader, header)
        if isinstance(packet, StartupMessage | CancelRequest):
            return packet
        if type(packet) in negotiated:
            raise CodecError(f"{type(packet).__name__} sent twice")
        negotiated.add(type(packet))
        if isinstance(packet, GSSENCRequest):
            await _write(writer, b"N")  # no GSS encryption: the client falls back to SSL/plain
        elif isinstance(packet, SSLRequest):
            if _buffered(reader):
                # Bytes sent after the SSLRequest, before the handshake, would be read as if
                # they had come over TLS (CVE-2021-23214).
                raise CodecError("the client sent data after its SSLRequest before TLS")
            if conn.spec.client_tls:
                await _write(writer, b"S")
                # keyless' leaf for the server (transparent mode: for the app's TLS server
                # name, which then names the upstream)
                await conn.start_client_tls(writer)
            else:
                await _write(writer, b"N")  # plain on loopback: the client goes on in clear
    raise CodecError("too many negotiation requests before the StartupMessage")


async def read_startup(reader: asyncio.StreamReader,
                       header: bytes | None = None) -> codec.StartupPacket:
    header = header or await reader.readexactly(4)
    length = codec.startup_length(header)  # checked before the body is read
    return codec.decode_startup(header + await reader.readexactly(length - 4))


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One typed message as (type, body), its length checked before the body is read."""
    kind, length = codec.message_header(await reader.readexactly(5))
    return kind, await reader.readexactly(length)


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


def _buffered(reader: asyncio.StreamReader) -> int:
    # StreamReader does not expose its buffer size; an empty buffer is what matters here.
    return len(getattr(reader, "_buffer", b""))


async def _refuse(conn: Connection, writer: asyncio.StreamWriter, failure: LoginFailed) -> None:
    if failure.result is not None:
        conn.login(failure.result)
    logger.warning("postgres %s: login refused: %s", conn.peer, failure)
    with contextlib.suppress(ConnectionError, OSError):  # the client may be gone
        await _write(writer, codec.encode_error(failure.sqlstate, str(failure)))


# -- the upstream side ----------------------------------------------------------------------


async def _open_tls_upstream(conn: Connection) -> Streams:
    """A connection to the server, TLS negotiated in band and verified."""
    host, port = conn.spec.upstream
    try:
        upstream = await conn.open_upstream(tls=False)
    except UpstreamError as exc:
        raise LoginFailed("08006", f"KeylessUpstreamFailed: {exc}", "upstream_failed") from None
    reader, writer = upstream
    try:
        await _write(writer, codec.encode_ssl_request())
        answer = await reader.readexactly(1)
        if answer != b"S" or _buffered(reader):
            raise LoginFailed("08006", f"KeylessUpstreamTLS: {host}:{port} does not accept TLS "
                              "(answered the SSLRequest with "
                              f"{answer!r}); keyless sends a token only over TLS",
                              "upstream_failed")
        await conn.start_upstream_tls(writer)
    except LoginFailed:
        writer.close()
        raise
    except UpstreamError as exc:
        writer.close()
        raise LoginFailed("08006", f"KeylessUpstreamFailed: {exc}", "upstream_failed") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        writer.close()
        reason = ("closed the connection" if isinstance(exc, asyncio.IncompleteReadError)
                  else exc.strerror or type(exc).__name__)
        raise LoginFailed("08006", f"KeylessUpstreamFailed: {host}:{port} {reason} before TLS",
                          "upstream_failed") from None
    return upstream


def login_startup(conn: Connection, startup: StartupMessage) -> StartupMessage:
    """The StartupMessage keyless sends: the listener's user in place of the app's, all other
    parameters as the app sent them (the database stays the one the app's user implied)."""
    user = conn.spec.user
    if conn.audit or not user:
        return startup
    app_user = startup.get("user") or ""
    if startup.get("database") is None:
        startup = startup.with_parameter("database", app_user)
    return startup.with_parameter("user", user)


async def _login(conn: Connection, client: Streams,
                 startup: StartupMessage) -> tuple[Streams | None, BackendKeyData | None]:
    """Log in upstream and pass the server's login answer to the client. Returns the upstream
    (None if the login failed, the client then told why) and the cancel key remembered."""
    _, client_writer = client
    startup = login_startup(conn, startup)
    user = startup.get("user") or ""
    upstream: Streams | None = None
    try:
        async with asyncio.timeout(LOGIN_TIMEOUT):
            if not conn.spec.upstream[0]:  # transparent mode, and the app spoke no TLS
                raise LoginFailed("08006", "KeylessUpstreamFailed: transparent mode needs TLS "
                                  "from the app (sslmode=require or verify-full): its TLS "
                                  "server name tells keyless the server", "upstream_failed")
            # The token first: without one the server must not even see a login attempt.
            token = None if conn.audit else await _token(conn)
            upstream = await _open_tls_upstream(conn)
            await _write(upstream[1], codec.encode_startup(startup))
            if token is None:
                key = await _audited_login(conn, client, upstream, user)
            else:
                key = await _token_login(conn, client, upstream, user, token)
    except Refused:
        pass
    except LoginFailed as failure:
        await _refuse(conn, client_writer, failure)
    except (asyncio.IncompleteReadError, CodecError, OSError, TimeoutError) as exc:
        reason = ("closed the connection" if isinstance(exc, asyncio.IncompleteReadError)
                  else "timed out" if isinstance(exc, TimeoutError)
                  else str(exc) if isinstance(exc, CodecError)
                  else exc.strerror or type(exc).__name__)
        await _refuse(conn, client_writer, LoginFailed(
            "08006", f"KeylessUpstreamFailed: the server {reason} during login",
            "upstream_failed"))
    else:
        return upstream, key
    if upstream is not None:
        upstream[1].close()
    return None, None


async def _token(conn: Connection) -> str:
    try:
        return (await conn.token()).value
    except TokenUnavailable as exc:
        raise LoginFailed("08006", f"KeylessTokenUnavailable: {exc}",
                          "token_unavailable") from None


async def _token_login(conn: Connection, client: Streams, upstream: Streams, user: str,
                       token: str) -> BackendKeyData | None:
    _, client_writer = client
    up_reader, up_writer = upstream
    key: BackendKeyData | None = None
    password_sent = False
    for _ in range(MAX_LOGIN_MESSAGES):
        kind, body = await read_message(up_reader)
        message = codec.decode_backend(kind, body)
        if isinstance(message, Authentication) and message.code != codec.AUTH_OK:
            if message.code != codec.AUTH_CLEARTEXT_PASSWORD or password_sent:
                method = message.method if not password_sent else "a second password"
                conn.refused(f"the server asked for {method}", UNSUPPORTED_FIX)
                raise LoginFailed("28000", f"KeylessUnsupportedAuth: the server asked for "
                                  f"{method}; Entra logins use cleartext over TLS", None)
            await _write(up_writer, codec.encode_password(token))
            password_sent = True
            continue
        if isinstance(message, ErrorResponse) and not message.notice:
            await _pass_refusal(conn, client_writer, kind, body, message, user)
        if isinstance(message, BackendKeyData):
            key = message
        if isinstance(message, ReadyForQuery):
            conn.login("converted")  # counted before the app can see it (and act on it)
            await _ready(conn, client_writer, codec.encode_message(kind, body), key)
            return key
        client_writer.write(codec.encode_message(kind, body))
    raise CodecError("the server sent too many messages during login")


async def _ready(conn: Connection, client_writer: asyncio.StreamWriter, ready: bytes,
                 key: BackendKeyData | None) -> None:
    """Hand the client ReadyForQuery, the key remembered first: the app may cancel as soon
    as it has it. Only a login that got this far leaves a key in the map."""
    if key is None:
        await _write(client_writer, ready)
        return
    CANCEL_KEYS.remember(conn.spec.upstream, key.pid, key.secret)
    try:
        await _write(client_writer, ready)
    except BaseException:
        CANCEL_KEYS.forget(conn.spec.upstream, key.pid, key.secret)
        raise


async def _audited_login(conn: Connection, client: Streams, upstream: Streams,
                         user: str) -> BackendKeyData | None:
    """--audit: the app answers the server's authentication itself (over upstream TLS)."""
    client_reader, client_writer = client
    up_reader, up_writer = upstream
    key: BackendKeyData | None = None
    password_login = False
    for _ in range(MAX_LOGIN_MESSAGES):
        kind, body = await read_message(up_reader)
        message = codec.decode_backend(kind, body)
        if isinstance(message, ErrorResponse) and not message.notice:
            await _pass_refusal(conn, client_writer, kind, body, message, user)
        if isinstance(message, BackendKeyData):
            key = message
        if isinstance(message, ReadyForQuery):
            if password_login:
                conn.record_password_login(user)
            conn.login("audited")
            await _ready(conn, client_writer, codec.encode_message(kind, body), key)
            return key
        await _write(client_writer, codec.encode_message(kind, body))
        if isinstance(message, Authentication) and message.code in ANSWERED_AUTH:
            password_login |= message.code in PASSWORD_AUTH
            answer_kind, answer = await read_message(client_reader)
            if answer_kind != b"p":
                raise LoginFailed("08P01", "KeylessProtocolError: the client did not answer "
                                  "the server's authentication request", "client_error")
            await _write(up_writer, codec.encode_message(answer_kind, answer))
    raise CodecError("the server sent too many messages during login")


async def _pass_refusal(conn: Connection, client_writer: asyncio.StreamWriter, kind: bytes,
                        body: bytes, error: ErrorResponse, user: str) -> None:
    """The server's own ErrorResponse goes to the client; the log gets it with its fix."""
    if error.sqlstate in ("28000", "28P01"):
        fix = ROLE_FIX.format(user=user)
    else:
        fix = "see the server's message"
    conn.refused(f"{error.sqlstate} {error.message}", fix)  # counts the refusal too
    with contextlib.suppress(ConnectionError, OSError):  # the client may be gone
        await _write(client_writer, codec.encode_message(kind, body))
    raise Refused


# -- cancel ---------------------------------------------------------------------------------


async def _cancel(conn: Connection, request: CancelRequest) -> None:
    """Send the client's CancelRequest to the server its key came from, over TLS."""
    if conn.transparent and not conn.spec.upstream[0]:
        # sent without TLS (libpq before 17 cancels in clear), so no server name: the key
        # names the server, if exactly one live connection through this port holds it
        upstream = CANCEL_KEYS.upstream_of(conn.spec.upstream[1], request.pid, request.secret)
        if upstream is not None:
            conn.spec = dataclasses.replace(conn.spec, upstream=upstream)
    if not CANCEL_KEYS.knows(conn.spec.upstream, request.pid, request.secret):
        logger.info("postgres %s: CancelRequest for an unknown key dropped", conn.peer)
        return
    try:
        async with asyncio.timeout(CANCEL_TIMEOUT):
            reader, writer = await _open_tls_upstream(conn)
            try:
                await _write(writer, codec.encode_cancel(request))
                await reader.read(1)  # the server closes the connection once it has acted
            finally:
                writer.close()
    except (LoginFailed, OSError, TimeoutError) as exc:
        logger.warning("postgres %s: CancelRequest not delivered: %s", conn.peer,
                       str(exc) or type(exc).__name__)

