"""The Redis session's stream logic with in-memory streams: what goes upstream for what the
app sends, and what the app gets back, in order, when keyless answers or injects commands of
its own (the e2e tests run the same against redis-server; these pin the exact bytes)."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.redis.codec import Frame, encode
from proxy.redis.codec import encode_command as cmd
from proxy.redis.session import Session
from proxy.tokens import Token
from tests.redis.test_codec import split
from tests.support.entra import OBJECT_ID


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


def session(audit: bool = False) -> tuple[Session, Sink, Sink]:
    conn: Any = SimpleNamespace(audit=audit, spec=SimpleNamespace(name="redis:6380", user=None),
                                record_password_login=lambda user: None)
    to_app, to_server = Sink(), Sink()
    token = Token("old-token", 2e9, 1e9)
    s = Session(conn, (None, to_app), (None, to_server),  # type: ignore[arg-type]
                user="oid-1", token=token)
    return s, to_app, to_server


def app_sends(s: Session, to_server: Sink, data: bytes) -> bytes:
    return b"".join(s.on_client_data(data)) + to_server.take()


def server_sends(s: Session, to_app: Sink, *chunks: bytes) -> bytes:
    got = b"".join(b"".join(s.on_server_data(chunk)) for chunk in chunks)
    return to_app.take() + got


def test_the_apps_auth_is_answered_locally_in_pipeline_order() -> None:
    s, to_app, to_server = session()
    sent = app_sends(s, to_server, cmd("GET", "a") + cmd("AUTH", "the-key") + cmd("GET", "b"))
    assert sent == cmd("GET", "a") + cmd("GET", "b")  # the key never goes upstream
    assert server_sends(s, to_app, b"$1\r\n1\r\n", b"$1\r\n2\r\n") == \
        b"$1\r\n1\r\n+OK\r\n$1\r\n2\r\n"


def test_hello_auth_goes_upstream_without_its_auth_part() -> None:
    s, _, to_server = session()
    sent = app_sends(s, to_server, cmd("HELLO", "3", "AUTH", "default", "the-key",
                                       "SETNAME", "app"))
    assert sent == cmd("HELLO", "3", "SETNAME", "app")
    assert s.client_resp == 3


def test_reauth_is_swallowed_even_split_across_reads_and_waits_for_exec() -> None:
    s, to_app, to_server = session()
    assert app_sends(s, to_server, cmd("MULTI") + cmd("INCR", "x")) == \
        cmd("MULTI") + cmd("INCR", "x")

    async def scenario() -> bool:
        result = s.request_auth("oid-2", Token("new-token", 3e9, 2e9))
        assert to_server.take() == b""  # inside MULTI: not now
        sent = app_sends(s, to_server, cmd("EXEC") + cmd("GET", "y"))
        assert sent == cmd("EXEC") + cmd("AUTH", "oid-2", "new-token") + cmd("GET", "y")
        got = server_sends(s, to_app, b"+OK\r\n+QUEUED\r\n*1\r\n:1\r\n+O", b"K\r\n$1\r\nv\r\n")
        assert got == b"+OK\r\n+QUEUED\r\n*1\r\n:1\r\n$1\r\nv\r\n"  # the +OK was keyless'
        return await result

    assert asyncio.run(scenario()) is True


def test_the_apps_auth_inside_multi_is_queued_as_keyless_own() -> None:
    s, to_app, to_server = session()
    sent = app_sends(s, to_server, cmd("MULTI") + cmd("AUTH", "the-key") + cmd("INCR", "x")
                     + cmd("AUTH", "a", "b", "c") + cmd("EXEC"))
    # the server queues an AUTH with keyless' token; a wrong arity goes bare (no secret)
    assert sent == cmd("MULTI") + cmd("AUTH", "oid-1", "old-token") + cmd("INCR", "x") + \
        cmd("AUTH") + cmd("EXEC")
    assert b"the-key" not in sent
    replies = (b"+OK\r\n+QUEUED\r\n+QUEUED\r\n-ERR wrong number of arguments\r\n"
               b"-EXECABORT Transaction discarded\r\n")
    assert server_sends(s, to_app, replies) == replies  # the app gets the server's own


def test_reauth_with_replies_switched_off() -> None:
    s, to_app, to_server = session()
    assert app_sends(s, to_server, cmd("CLIENT", "REPLY", "OFF") + cmd("SET", "k", "v")) == \
        cmd("CLIENT", "REPLY", "OFF") + cmd("SET", "k", "v")

    async def scenario() -> bool:
        result = s.request_auth("oid-2", Token("new-token", 3e9, 2e9))
        assert to_server.take() == cmd("CLIENT", "REPLY", "ON") + \
            cmd("AUTH", "oid-2", "new-token") + cmd("CLIENT", "REPLY", "OFF")
        assert server_sends(s, to_app, b"+OK\r\n-WRONGPASS nope\r\n") == b""
        return await result

    assert asyncio.run(scenario()) is False  # a refused re-auth is reported, not forwarded


MONITOR_LINES = (b'+1796191244.451250 [0 127.0.0.1:50210] "SET" "k" "v"\r\n',
                 b'+1796191244.651409 [0 127.0.0.1:50206] "AUTH" "(redacted)"\r\n',
                 b'+1796191244.851743 [0 127.0.0.1:50210] "GET" "k"\r\n')


def monitoring() -> tuple[Session, Sink, Sink]:
    s, to_app, to_server = session()
    assert app_sends(s, to_server, cmd("MONITOR")) == cmd("MONITOR")
    assert server_sends(s, to_app, b"+OK\r\n") == b"+OK\r\n"
    return s, to_app, to_server


@given(st.lists(st.integers(min_value=1, max_value=200), max_size=8), st.booleans())
def test_a_monitor_connection_is_reauthenticated_between_its_lines(cuts, refused) -> None:
    """The server answers the AUTH between monitor lines (tests/redis/test_calibration.py):
    every line reaches the app unchanged and in order, however the reads split them (a lone
    "+" at the end of a read included), and only keyless' answer is swallowed."""
    s, to_app, to_server = monitoring()
    answer = b"-WRONGPASS invalid username-password pair\r\n" if refused else b"+OK\r\n"
    stream = MONITOR_LINES[0] + answer + MONITOR_LINES[1] + MONITOR_LINES[2]

    async def scenario() -> tuple[bool, bytes]:
        result = s.request_auth("oid-2", Token("new-token", 3e9, 2e9))
        assert to_server.take() == cmd("AUTH", "oid-2", "new-token")  # at once: no command due
        got = server_sends(s, to_app, *split(stream, cuts))
        return await result, got

    took, got = asyncio.run(scenario())
    assert got == b"".join(MONITOR_LINES)
    assert took is not refused


def test_a_lone_plus_at_the_end_of_a_read_is_held_until_the_next_byte() -> None:
    s, to_app, to_server = monitoring()

    async def scenario() -> tuple[bool, list[bytes]]:
        result = s.request_auth("oid-2", Token("new-token", 3e9, 2e9))
        to_server.take()
        first = server_sends(s, to_app, MONITOR_LINES[0] + b"+")
        second = server_sends(s, to_app, MONITOR_LINES[1][1:] + b"+")
        third = server_sends(s, to_app, b"OK\r\n" + MONITOR_LINES[2])
        return await result, [first, second, third]

    took, reads = asyncio.run(scenario())
    assert reads == [MONITOR_LINES[0], MONITOR_LINES[1], MONITOR_LINES[2]]
    assert took is True


def test_an_apps_ping_while_monitoring_keeps_the_replies_in_step() -> None:
    """A monitoring app may PING (+PONG comes between the lines); the lines must not be taken
    for its answer, or keyless' next AUTH answer would reach the app."""
    s, to_app, to_server = monitoring()
    assert app_sends(s, to_server, cmd("PING")) == cmd("PING")
    assert server_sends(s, to_app, MONITOR_LINES[0]) == MONITOR_LINES[0]

    async def scenario() -> tuple[bool, bytes]:
        result = s.request_auth("oid-2", Token("new-token", 3e9, 2e9))
        assert to_server.take() == cmd("AUTH", "oid-2", "new-token")
        got = server_sends(s, to_app, b"+PONG\r\n" + MONITOR_LINES[1] + b"+OK\r\n"
                           + MONITOR_LINES[2])
        return await result, got

    took, got = asyncio.run(scenario())
    assert got == b"+PONG\r\n" + MONITOR_LINES[1] + MONITOR_LINES[2]
    assert took is True


def test_a_resp2_subscriber_is_lifted_to_resp3_upstream_and_gets_resp2() -> None:
    s, to_app, to_server = session()
    assert app_sends(s, to_server, cmd("SUBSCRIBE", "ch")) == cmd("HELLO", "3") + \
        cmd("SUBSCRIBE", "ch")
    hello = b"%1\r\n$5\r\nproto\r\n:3\r\n"
    push = b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    assert server_sends(s, to_app, hello + push[:5], push[5:]) == b"*" + push[1:]
    assert app_sends(s, to_server, cmd("PING")) == cmd("PING")
    assert server_sends(s, to_app, b"+PONG\r\n") == b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"

    async def scenario() -> bool:
        result = s.request_auth("oid-2", Token("new-token", 3e9, 2e9))
        assert to_server.take() == cmd("AUTH", "oid-2", "new-token")  # allowed in RESP3
        message = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
        assert server_sends(s, to_app, message + b"+OK\r\n") == b"*" + message[1:]
        return await result

    assert asyncio.run(scenario()) is True
    # a command outside subscribed mode: back to RESP2 first, as the app speaks
    assert app_sends(s, to_server, cmd("GET", "k")) == cmd("HELLO", "2") + cmd("GET", "k")
    assert server_sends(s, to_app, b"*2\r\n$5\r\nproto\r\n:2\r\n", b"$-1\r\n") == b"$-1\r\n"


def test_a_pipelined_subscribe_and_get_in_one_read() -> None:
    s, _, to_server = session()
    sent = app_sends(s, to_server, cmd("SUBSCRIBE", "ch") + cmd("GET", "k") + cmd("GET", "j"))
    assert sent == cmd("HELLO", "3") + cmd("SUBSCRIBE", "ch") + cmd("HELLO", "2") + \
        cmd("GET", "k") + cmd("GET", "j")


def test_reset_logs_in_again_behind_it() -> None:
    s, to_app, to_server = session()
    assert app_sends(s, to_server, cmd("RESET")) == cmd("RESET") + cmd("AUTH", "oid-1",
                                                                        "old-token")
    assert server_sends(s, to_app, b"+RESET\r\n+OK\r\n") == b"+RESET\r\n"


def test_the_auth_user_is_the_tokens_object_id() -> None:
    from proxy.redis.session import object_id
    from proxy.tokens import TokenUnavailable
    from tests.support.identity_endpoint import make_token
    from tests.support.redis_server import mint_token

    assert object_id(mint_token("the-oid", 60)) == "the-oid"
    assert object_id(make_token("https://redis.azure.com")) == OBJECT_ID
    for bad in ("not-a-jwt", "a.b.c", "a." + "e30" + ".c"):  # e30: {} (no oid claim)
        try:
            object_id(bad)
        except TokenUnavailable as exc:
            assert "?user=" in str(exc) and bad not in str(exc)
        else:
            raise AssertionError(f"{bad!r} gave an object id")


reply_frames = st.one_of(
    st.builds(Frame, st.just("$"), st.binary(max_size=30)),
    st.builds(Frame, st.just(":"), st.integers(-1000, 1000)),
    st.builds(Frame, st.just("-"), st.just(b"ERR no")),
    st.builds(Frame, st.just("*"), st.lists(st.builds(Frame, st.just("$"),
                                                      st.binary(max_size=8)), max_size=3)),
)
push_frame = st.builds(lambda data: Frame(">", [Frame("$", b"message"), Frame("$", b"ch"),
                                                Frame("$", data)]), st.binary(max_size=12))
operations = st.lists(st.one_of(
    st.tuples(st.just("command"), reply_frames),  # an app command and the server's reply
    st.tuples(st.just("auth"), st.none()),  # the app's AUTH: answered locally
    st.tuples(st.just("reauth"), st.none()),  # keyless' own AUTH: its reply is swallowed
), min_size=1, max_size=12)


@given(operations, st.lists(st.tuples(st.integers(0, 12), push_frame), max_size=4),
       st.lists(st.integers(0, 2000), max_size=10))
def test_the_app_gets_exactly_its_replies_in_order_however_the_server_splits_them(
        ops: list[tuple[str, Frame | None]], pushes: list[tuple[int, Frame]],
        cuts: list[int]) -> None:
    s, to_app, to_server = session()
    s.client_resp = 3
    sent = b""
    server_frames: list[tuple[bytes, bool]] = []  # (frame, is keyless' own)

    async def scenario() -> bytes:
        nonlocal sent
        results = []
        for kind, reply in ops:
            if kind == "command":
                assert reply is not None
                sent += app_sends(s, to_server, cmd("GET", "k"))
                server_frames.append((encode(reply), False))
            elif kind == "auth":
                sent += app_sends(s, to_server, cmd("AUTH", "the-key"))
            else:
                results.append(s.request_auth("oid-2", Token("new-token", 3e9, 2e9)))
                sent += to_server.take()
                server_frames.append((b"+OK\r\n", True))
        assert b"the-key" not in sent
        assert sent.count(b"new-token") == len(results)
        # The server's stream: replies in order, pushes wherever they fall between them.
        stream = b""
        early = to_app.take()  # local answers due before any reply went out at once
        assert early == b"+OK\r\n" * len(list(itertools.takewhile(
            lambda op: op[0] == "auth", ops)))
        expected = b""
        local_after: list[int] = []
        count = 0
        for kind, _ in ops:  # how many local answers follow each server frame
            if kind == "auth":
                if count:
                    local_after[-1] += 1
            else:
                count += 1
                local_after.append(0)
        for index, (frame, own) in enumerate(server_frames):
            for at, push in pushes:
                if at == index:
                    stream += encode(push)
                    expected += encode(push)
            stream += frame
            if not own:
                expected += frame
            expected += b"+OK\r\n" * local_after[index]
        got = server_sends(s, to_app, *split(stream, cuts))
        assert got == expected
        assert all(r.done() and r.result() is True for r in results)
        assert not s.replies
        return got

    asyncio.run(scenario())


def test_inline_commands_go_upstream_as_sent_and_inline_auth_stays() -> None:
    s, to_app, to_server = session()
    sent = app_sends(s, to_server, b"SET k v\r\nAUTH the-key\r\nGET k\r\nPING\r\n")
    assert sent == b"SET k v\r\nGET k\r\nPING\r\n"
    assert server_sends(s, to_app, b"+OK\r\n$1\r\nv\r\n+PONG\r\n") == \
        b"+OK\r\n+OK\r\n$1\r\nv\r\n+PONG\r\n"
