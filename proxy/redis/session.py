"""One Redis client connection: an Entra login upstream, the app's key kept local, and
re-authentication before the token expires.

On connect keyless opens TLS to the cache and sends `AUTH <oid> <token>` (the listener's
`user=` instead of the token's object id if set) before any command of the app. The app's own
`AUTH <key>` / `AUTH <user> <key>` is answered `+OK` locally (inside MULTI it becomes keyless'
own AUTH, which the server queues); `HELLO <ver> AUTH <user> <key>`
goes upstream without its AUTH part, so the protocol switch happens on the server. The key
never leaves keyless (except under --audit, which forwards it and records the login).

The relay is command-aware but does not re-serialize: `CommandScanner` finds command names and
boundaries, `ReplyScanner` reply boundaries, and bytes pass in the chunks they were read in.
Each command that will be answered puts an `Entry` in `Session.replies`, in order; the
upstream side pops one per reply, and pushes (`>`) pop nothing. That lets keyless put its own
commands into the stream at a command boundary and swallow their replies, whatever the app
has in flight:

- re-auth: at the token's refresh time (with jitter, never later than a margin before expiry)
  keyless gets the new token and sends `AUTH <oid> <new token>` behind whatever the app has
  sent (a pipeline, a blocking BLPOP: the server runs it when the block returns), never between
  MULTI and EXEC/DISCARD, and with `CLIENT REPLY ON ... OFF` around it when the app switched
  replies off;
- RESP2 pub/sub: a RESP2 connection in subscribed mode may run only (P|S)SUBSCRIBE,
  (P|S)UNSUBSCRIBE, PING, QUIT and RESET; AUTH and HELLO are refused (redis-server 7, see
  tests/redis/test_calibration.py). So when a RESP2 app subscribes, keyless first switches the
  upstream connection to RESP3 (`HELLO 3`, swallowed), where AUTH is allowed while subscribed,
  and hands the app RESP2: push frames become arrays (the same layout: only the type byte
  differs) and PING's answer takes the subscribed-mode RESP2 form. At the app's first command
  outside that set, keyless sends `HELLO 2` first, so the server answers it exactly as a RESP2
  server would (refused while still subscribed; normal once unsubscribed).
- RESET logs the connection out upstream: keyless logs in again right behind it.

- MONITOR: the server accepts AUTH on a monitoring connection and answers it between the
  monitor lines (and shows it to monitors as `"AUTH" "(redacted)"`). A monitor line is a simple
  string that starts with its timestamp (`+<digits>.`), never `+OK` or an error, so keyless
  passes those on and swallows its AUTH's answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy import metrics
from proxy.listeners.connection import Connection
from proxy.listeners.upstream import UpstreamError
from proxy.redact import redact
from proxy.redis.codec import (
    PUSH,
    SIMPLE,
    Command,
    CommandScanner,
    ProtocolError,
    ReplyScanner,
    decode,
    encode_command,
)
from proxy.tokens import Token, TokenUnavailable

logger = logging.getLogger("proxy.redis")

CHUNK = 64 * 1024
LOGIN_TIMEOUT = 15.0  # the upstream's answer to keyless' AUTH on connect
FIRST_COMMAND_TIMEOUT = 30.0  # waiting for the app's first command to answer it an error
MAX_JITTER = 60.0  # spread of re-auths of many connections that share one token
RETRY_PAUSE = 5.0  # after a failed re-auth attempt, while the token still serves
POLL_PAUSE = 1.0  # waiting for the token cache to hand out a newer token: at least,
MAX_POLL = 15.0  # and at most this long between two asks
PUBSUB_ALLOWED = frozenset((b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe",
                            b"punsubscribe", b"sunsubscribe", b"ping", b"quit", b"reset"))
SUBSCRIBE = frozenset((b"subscribe", b"psubscribe", b"ssubscribe"))
UNSUBSCRIBE = frozenset((b"unsubscribe", b"punsubscribe", b"sunsubscribe"))
# Commands the session acts on; any other is one command, one reply.
SPECIAL = SUBSCRIBE | UNSUBSCRIBE | frozenset((b"", b"auth", b"hello", b"client", b"ping",
                                               b"multi", b"exec", b"discard", b"monitor",
                                               b"reset"))
FIX_CACHE = ("assign a data access policy to the identity's object id {oid}: "
             "`az redis access-policy-assignment create --name <cache> --resource-group <rg> "
             "--access-policy-name \"Data Contributor\" --object-id {oid} "
             "--object-id-alias <name> --policy-assignment-name <name>` (and enable Microsoft "
             "Entra authentication on the cache)")
FIX_MANAGED = ("assign an access policy to the identity's object id {oid}: "
               "`az redisenterprise database access-policy-assignment create --cluster-name "
               "<cluster> --resource-group <rg> --database-name default "
               "--access-policy-assignment-name <name> --access-policy-name default "
               "--object-id {oid}` (and enable Microsoft Entra authentication)")

FORWARD, SWALLOW, LOCAL, PING2 = range(4)  # entry kinds
PUSHED, UNSOLICITED = 4, 5  # where a frame with no entry of its own goes (to the app)
UNDECIDED = 6  # MONITOR mode, a frame of which only its "+" has arrived: a monitor line or not
OK = b"+OK\r\n"


def object_id(token: str) -> str:
    """The `oid` claim of a JWT access token (its payload only; nothing is verified)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        oid = claims.get("oid") if isinstance(claims, dict) else None
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        oid = None
    if not isinstance(oid, str) or not oid:
        raise TokenUnavailable("the Redis token has no oid claim to log in with; set "
                               "?user=<object id> on the --redis listener")
    return oid


def error_reply(message: str) -> bytes:
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


@dataclass(slots=True)
class Entry:
    """An expected reply: pass it on (FORWARD, `count` of them in a row), swallow it (SWALLOW,
    `then` gets the frame), answer locally (LOCAL, `payload`, no upstream reply), or pass on
    PING's answer in RESP2 subscribed form (PING2)."""

    kind: int
    count: int = 1
    payload: bytes = b""
    then: Callable[[bytes], None] | None = None


@dataclass
class Session:
    conn: Connection
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    user: str = ""
    token: Token | None = None
    replies: deque[Entry] = field(default_factory=deque)
    commands: CommandScanner = field(default_factory=lambda: CommandScanner(SPECIAL))
    frames: ReplyScanner = field(default_factory=ReplyScanner)
    client_resp: int = 2
    lifted: bool = False  # a RESP2 app's subscribed connection runs RESP3 upstream
    in_multi: bool = False
    replies_off: bool = False  # CLIENT REPLY OFF
    skip_next: bool = False  # CLIENT REPLY SKIP: the next command has no reply
    monitor: bool = False
    auth_due: tuple[str, Token] | None = None
    auth_result: asyncio.Future[bool] | None = None
    # the upstream frame being read: where it goes (None: not decided yet)
    dest: int | None = None
    collected: bytearray = field(default_factory=bytearray)
    mid_frame: bool = False  # part of a frame was written to the app
    first: int = 0  # type byte of the frame being read

    async def run(self) -> None:
        """Both directions and the re-auth timer, until either side closes."""
        tasks = [asyncio.ensure_future(self.client_pump()),
                 asyncio.ensure_future(self.upstream_pump())]
        if self.token is not None:
            tasks.append(asyncio.ensure_future(self.reauth_loop()))
        try:
            done, _ = await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
            if tasks[0] in done and not tasks[1].done():
                # the app left: let the server's last answer (to QUIT) through for a moment
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(tasks[1]), timeout=2.0)
            for task in done:
                if not task.cancelled() and (exc := task.exception()) is not None and \
                        not isinstance(exc, ConnectionError | OSError):
                    raise exc
        finally:
            for task in tasks:
                task.cancel()
            reauth = tasks[2] if len(tasks) > 2 else None
            if reauth is not None and reauth.done() and not reauth.cancelled() and \
                    (exc := reauth.exception()) is not None:  # a bug: say so, secret-free
                logger.warning("redis re-auth loop for %s stopped: %s", self.conn.peer,
                               redact(f"{type(exc).__name__}: {exc}", limit=200))
            with contextlib.suppress(Exception):
                await self.client[1].drain()

    # -- app -> server ---------------------------------------------------------------------

    async def client_pump(self) -> None:
        reader = self.client[0]
        writer = self.upstream[1]
        counter = metrics.LISTENER_BYTES.labels(listener=self.conn.spec.name,
                                                direction="to_upstream")
        while data := await reader.read(CHUNK):
            payload = b"".join(self.on_client_data(data))
            if payload:
                writer.write(payload)
                counter.inc(len(payload))
                await writer.drain()

    def on_client_data(self, data: bytes) -> list[bytes]:
        """What goes upstream for `data` from the app (the same bytes, in as few slices as
        possible, without the app's key; keyless' own commands where they belong)."""
        out: list[bytes] = []
        if self.commands.at_boundary:
            self.maybe_inject(out)
        try:
            # Exact positions only when keyless may put a command in front of any one of
            # the app's (a re-auth is due; RESP2 pub/sub lifted to RESP3).
            items = self.commands.feed(data, self.auth_due is not None or self.lifted)
        except ProtocolError as exc:
            self.conn.login("client_error")
            self.local(error_reply(f"ERR Protocol error: {exc}"))
            raise
        for item in items:
            if isinstance(item, bytes):
                out.append(item)
            else:
                self.on_command(item, out)
        if self.commands.at_boundary:
            self.maybe_inject(out)
        return out

    def on_command(self, command: Command, out: list[bytes]) -> None:
        name = command.name
        if name not in SPECIAL and not self.lifted:  # most commands: one reply, passed on
            if self.auth_due is not None:
                self.maybe_inject(out)
            if command.raw:  # an inline command: held, like the careful path's
                out.append(command.raw)
            last = self.replies[-1] if self.replies else None
            if last is not None and last.kind == FORWARD and last.then is None and \
                    not self.skip_next and not self.replies_off:
                last.count += 1
            else:
                self.expect(FORWARD)
            return
        if not name:
            return  # an empty command: redis-server sends nothing back
        self.maybe_inject(out)
        if self.lifted and name not in PUBSUB_ALLOWED:
            self.inject(out, encode_command(b"HELLO", b"2"))  # back to what the app speaks
            self.lifted = False
        if name in SUBSCRIBE and self.client_resp == 2 and not self.lifted and \
                not self.in_multi and command.argc > 1:
            self.inject(out, encode_command(b"HELLO", b"3"))
            self.lifted = True
        if name == b"auth":
            self.on_auth(command, out)
            return
        if name == b"hello":
            self.on_hello(command, out)
            return
        if command.raw:
            out.append(command.raw)
        if name == b"client" and len(command.args) >= 2 and command.args[0].lower() == b"reply":
            mode = command.args[1].lower()
            if mode == b"on":
                self.replies_off = self.skip_next = False
                self.expect(FORWARD)
            elif mode == b"off":
                self.replies_off = True  # no reply, not even to this command
            elif mode == b"skip":
                if not self.replies_off:
                    self.skip_next = True
            else:
                self.expect(FORWARD)  # a syntax error, answered
            return
        if name in SUBSCRIBE or name in UNSUBSCRIBE:
            # Their confirmations are pushes (RESP3, or made RESP3 by lifting); only a
            # SUBSCRIBE without channels is answered, with an error.
            if name in SUBSCRIBE and command.argc == 1:
                self.expect(FORWARD)
            return
        if name == b"ping" and self.lifted:
            self.expect(PING2)
        else:
            self.expect(FORWARD)
        if name == b"multi":
            self.in_multi = True
        elif name in (b"exec", b"discard"):
            self.in_multi = False
        elif name == b"monitor":
            self.monitor = True
        elif name == b"reset":
            # RESET logs the connection out, ends MULTI, subscriptions, REPLY OFF and RESP3.
            self.in_multi = self.replies_off = self.skip_next = self.lifted = False
            self.monitor = False
            self.client_resp = 2
            if self.token is not None:
                self.inject(out, encode_command(b"AUTH", self.user, self.token.value))

    def on_auth(self, command: Command, out: list[bytes]) -> None:
        if self.conn.audit:
            self.conn.record_password_login(command.args[0].decode("utf-8", "replace")
                                            if len(command.args) == 2 else "default")
            out.append(command.raw)
            self.expect(FORWARD)
            return
        if self.in_multi:
            # Inside MULTI the server queues it (+QUEUED) and EXEC's array holds its answer:
            # keyless' own AUTH takes its place, so both come from the server, in order. A
            # wrong arity goes as a bare AUTH (no secret), so the server aborts the
            # transaction as it would have.
            args = (self.user, self.token.value) if len(command.args) in (1, 2) and \
                self.token is not None else ()
            out.append(encode_command(b"AUTH", *args))
            self.expect(FORWARD)
        elif len(command.args) not in (1, 2):
            self.local(b"-ERR wrong number of arguments for 'auth' command\r\n")
        else:
            self.local(OK)  # keyless already logged this connection in with its token

    def on_hello(self, command: Command, out: list[bytes]) -> None:
        args = list(command.args)
        if not self.conn.audit:
            kept: list[bytes] = []
            i = 0
            while i < len(args):
                if args[i].lower() == b"auth" and i > 0 and i + 2 < len(args):
                    i += 3  # AUTH <user> <key>: keyless' own login stands
                    continue
                kept.append(args[i])
                i += 1
            out.append(encode_command(b"HELLO", *kept))
        else:
            lowered = [a.lower() for a in args]
            if b"auth" in lowered:
                at = lowered.index(b"auth")
                if at + 1 < len(args):
                    self.conn.record_password_login(args[at + 1].decode("utf-8", "replace"))
            out.append(command.raw)
        version = args[0] if args else b""
        previous = self.client_resp
        if version in (b"2", b"3"):
            self.client_resp = int(version)  # pipelined commands after it speak it already

            def answered(frame: bytes) -> None:
                if frame[:1] in (b"-", b"!"):
                    self.client_resp = previous
            self.expect(FORWARD, then=answered)
        else:
            self.expect(FORWARD)

    def expect(self, kind: int, then: Callable[[bytes], None] | None = None) -> None:
        if self.skip_next:
            self.skip_next = False
            return
        if self.replies_off:
            return
        last = self.replies[-1] if self.replies else None
        if kind == FORWARD and then is None and last is not None and last.kind == FORWARD \
                and last.then is None:
            last.count += 1
        else:
            self.replies.append(Entry(kind, then=then))

    def local(self, payload: bytes) -> None:
        """An answer of keyless' own, in its place among the server's replies."""
        if self.skip_next or self.replies_off:
            self.skip_next = False
            return
        if not self.replies and not self.mid_frame:
            self.client[1].write(payload)
        else:
            self.replies.append(Entry(LOCAL, payload=payload))

    def inject(self, out: list[bytes], command: bytes,
               then: Callable[[bytes], None] | None = None) -> None:
        """A command of keyless' own, whose reply the app never sees."""
        if self.replies_off:
            out.append(encode_command(b"CLIENT", b"REPLY", b"ON"))
            self.replies.append(Entry(SWALLOW))
        elif self.skip_next:
            # the app's SKIP is for its own next command: give the server a command to skip
            out.append(encode_command(b"PING"))
            self.skip_next = False
        out.append(command)
        self.replies.append(Entry(SWALLOW, then=then))
        if self.replies_off:
            out.append(encode_command(b"CLIENT", b"REPLY", b"OFF"))

    # -- re-authentication -------------------------------------------------------------------

    def maybe_inject(self, out: list[bytes]) -> None:
        if self.auth_due is None or self.in_multi:
            return
        user, token = self.auth_due
        self.auth_due = None
        result = self.auth_result

        def answered(frame: bytes) -> None:
            if result is not None and not result.done():
                result.set_result(frame[:1] == b"+")
        self.inject(out, encode_command(b"AUTH", user, token.value), then=answered)

    def request_auth(self, user: str, token: Token) -> asyncio.Future[bool]:
        """Send AUTH with `token` at the next command boundary; the future tells if it took."""
        self.auth_result = asyncio.get_running_loop().create_future()
        self.auth_due = (user, token)
        if self.commands.at_boundary:  # the app is between commands: now
            out: list[bytes] = []
            self.maybe_inject(out)
            if out:
                self.upstream[1].write(b"".join(out))
        return self.auth_result

    def due(self, token: Token) -> float:
        """When to re-authenticate a connection logged in with `token` (wall clock)."""
        lifetime = max(0.0, token.expires_on - time.time())
        margin = min(180.0, lifetime / 10)  # Azure: at least 3 minutes before expiry
        latest = token.expires_on - margin
        spread = min(MAX_JITTER, max(0.0, latest - token.refresh_on) / 4)
        return min(latest, token.refresh_on + random.uniform(0, spread))

    async def reauth_loop(self) -> None:
        assert self.token is not None
        while True:
            current = self.token
            await asyncio.sleep(max(0.0, self.due(current) - time.time()))
            try:
                token = await self.conn.token()
                user = self.conn.spec.user or object_id(token.value)
            except TokenUnavailable as exc:
                self.conn.reauth("failed")
                logger.warning("redis re-authentication for %s: %s", self.conn.peer, exc)
                await asyncio.sleep(RETRY_PAUSE)
                continue
            if token.value == current.value or token.expires_on <= current.expires_on:
                # No newer token yet: the cache's refresh is under way, or (azure-identity
                # refreshes managed-identity tokens only in their last 5 minutes) the cache
                # gets it when the old one's use ends. Ask again, more often as expiry nears.
                left = current.expires_on - time.time()
                await asyncio.sleep(min(MAX_POLL, max(POLL_PAUSE, left / 20)) if left > 0
                                    else RETRY_PAUSE)
                continue
            took = await self.request_auth(user, token)
            if took:
                self.token, self.user = token, user
                self.conn.reauth("ok")
            else:
                self.conn.reauth("failed")
                await asyncio.sleep(RETRY_PAUSE)

    # -- server -> app -----------------------------------------------------------------------

    async def upstream_pump(self) -> None:
        reader = self.upstream[0]
        writer = self.client[1]
        counter = metrics.LISTENER_BYTES.labels(listener=self.conn.spec.name,
                                                direction="to_client")
        while data := await reader.read(CHUNK):
            out = self.on_server_data(data)
            payload = b"".join(out)
            if payload:
                writer.write(payload)
                counter.inc(len(payload))
                await writer.drain()

    def on_server_data(self, data: bytes) -> list[bytes]:
        """What the app gets of `data`: replies and pushes passed on unchanged (in as few
        slices as possible), keyless' own replies swallowed, local answers in their place."""
        frames = self.frames.feed(data)
        head = self.replies[0] if self.replies else None
        if self.dest is None and head is not None and head.kind == FORWARD and \
                head.then is None and len(frames) <= head.count and not self.lifted and \
                not self.monitor and \
                frames and frames[-1][0] == len(data) and \
                all(kind != PUSH for _, kind in frames):
            # The common case: whole replies to the app's own commands, nothing else.
            head.count -= len(frames)
            if head.count == 0:
                self.replies.popleft()
                if self.replies and self.replies[0].kind == LOCAL:
                    out = [data]
                    self.flush_locals(out)
                    return out
            return [data]
        out: list[bytes] = []
        span = 0  # start of bytes passed on unchanged that are not in `out` yet
        start = 0
        for end, _ in frames:
            span = self.piece(data, start, end, True, out, span)
            start = end
        if start < len(data):  # a frame goes on in the next chunk
            span = self.piece(data, start, len(data), False, out, span)
        if span < len(data):
            out.append(data[span:])
        return out

    def piece(self, data: bytes, start: int, end: int, complete: bool, out: list[bytes],
              span: int) -> int:
        """Handle `data[start:end]`, all or part of one frame; returns the new span start."""
        if self.dest is None:  # a new frame begins at `start`
            first = data[start]
            self.first = first
            if first == PUSH:
                self.dest = PUSHED
                if self.lifted:  # the app speaks RESP2: the same frame as an array
                    if span < start:
                        out.append(data[span:start])
                    out.append(b"*")
                    span = start + 1
            else:
                if self.replies and self.replies[0].kind == LOCAL:
                    if span < start:
                        out.append(data[span:start])
                    span = start
                    self.flush_locals(out)
                head = self.replies[0] if self.replies else None
                # no entry: unsolicited (MONITOR output, a refused SUBSCRIBE): pass it on
                if head is None:
                    self.dest = UNSOLICITED
                elif self.monitor and first == SIMPLE:
                    self.dest = (UNDECIDED if start + 1 >= end
                                 else self.monitor_line(data[start + 1], head.kind))
                else:
                    self.dest = head.kind
        elif self.dest == UNDECIDED:  # the byte after a lone "+" decides
            self.dest = self.monitor_line(data[start], self.replies[0].kind)
            if self.dest == UNSOLICITED:  # the held-back "+" goes first
                if span < start:
                    out.append(data[span:start])
                out.append(bytes(self.collected))
                self.collected.clear()
                span = start
        dest = self.dest
        if dest == UNDECIDED:  # hold the "+" back until the next read
            if span < start:
                out.append(data[span:start])
            self.collected += data[start:end]
            return end
        if dest in (FORWARD, PUSHED, UNSOLICITED):
            self.mid_frame = not complete
            if complete and dest == FORWARD:
                head = self.replies[0]
                head.count -= 1
                if head.count <= 0:
                    self.replies.popleft()
                if head.then is not None:
                    head.then(bytes((self.first,)))
        else:
            if span < start:
                out.append(data[span:start])
            self.collected += data[start:end]
            span = end
            if complete:
                self.finish_collected(dest, out)
        if complete:
            self.dest = None
            if self.replies and self.replies[0].kind == LOCAL:
                if span < end:
                    out.append(data[span:end])
                span = end
                self.flush_locals(out)
        return span

    @staticmethod
    def monitor_line(second: int, otherwise: int) -> int:
        """A MONITOR line is `+<timestamp> [...]`; any other simple string is a reply."""
        return UNSOLICITED if 0x30 <= second <= 0x39 else otherwise

    def finish_collected(self, dest: int, out: list[bytes]) -> None:
        frame = bytes(self.collected)
        self.collected.clear()
        head = self.replies.popleft()
        if dest == PING2:  # RESP2 subscribed-mode PING answer: ["pong", <argument or "">]
            got = decode(frame)
            if got is not None and got[0].kind == "$":
                out.append(b"*2\r\n$4\r\npong\r\n" + frame)
            elif got is not None and got[0].kind == "+":
                out.append(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
            else:
                out.append(frame)
        elif head.then is not None:
            head.then(frame)

    def flush_locals(self, out: list[bytes]) -> None:
        while self.replies and self.replies[0].kind == LOCAL:
            out.append(self.replies.popleft().payload)


async def serve(conn: Connection, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    """Run one app connection to the listener's cache until either side ends it."""
    token: Token | None = None
    user = ""
    if not conn.audit:
        try:
            token = await conn.token()
            user = conn.spec.user or object_id(token.value)
        except TokenUnavailable as exc:
            conn.login("token_unavailable")
            await answer_first_command(reader, writer,
                                       error_reply(f"ERR KeylessTokenUnavailable: {exc}"))
            return
    try:
        upstream = await conn.open_upstream(tls=True)
    except (UpstreamError, OSError) as exc:
        conn.login("upstream_failed")
        message = redact(f"{exc}", limit=300)
        await answer_first_command(reader, writer,
                                   error_reply(f"ERR KeylessUpstreamUnavailable: {message}"))
        return
    try:
        if token is not None:
            refusal = await login(upstream, user, token)
            if refusal is not None:
                fix = FIX_MANAGED if conn.spec.upstream[0].endswith(".redis.azure.net") \
                    else FIX_CACHE
                conn.refused(refusal.decode("utf-8", "replace").strip(),
                             fix.format(oid=user))
                await answer_first_command(reader, writer, refusal)
                return
            conn.login("converted")
        else:
            conn.login("audited")
        session = Session(conn, (reader, writer), upstream, user=user, token=token)
        await session.run()
    finally:
        upstream[1].close()


async def login(upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter], user: str,
                token: Token) -> bytes | None:
    """keyless' own AUTH on a fresh upstream connection. None: logged in; else the server's
    error reply (it names no secret), or a keyless error when the server did not answer."""
    reader, writer = upstream
    writer.write(encode_command(b"AUTH", user, token.value))
    buffer = b""
    scanner = ReplyScanner()
    try:
        async with asyncio.timeout(LOGIN_TIMEOUT):
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    return b"-ERR KeylessUpstreamClosed: the server closed the connection " \
                           b"on login\r\n"
                buffer += data
                frames = scanner.feed(data)
                if frames:
                    break
    except TimeoutError:
        return b"-ERR KeylessUpstreamTimeout: no answer to the login within %ds\r\n" % \
            LOGIN_TIMEOUT
    except ProtocolError as exc:
        return error_reply(f"ERR KeylessUpstreamProtocol: {exc}")
    end = frames[0][0] + len(buffer) - len(data)
    reply = buffer[:end]
    if reply[:1] == b"+":
        return None
    return reply if reply[:1] in (b"-", b"!") else b"-ERR unexpected answer to AUTH\r\n"


async def answer_first_command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               reply: bytes) -> None:
    """The app's first command gets `reply` (an error); then the connection closes."""
    scanner = CommandScanner()
    with contextlib.suppress(TimeoutError, ProtocolError, ConnectionError, OSError):
        async with asyncio.timeout(FIRST_COMMAND_TIMEOUT):
            while data := await reader.read(CHUNK):
                if any(isinstance(item, Command) and item.name for item in scanner.feed(data)):
                    writer.write(reply)
                    await writer.drain()
                    return
