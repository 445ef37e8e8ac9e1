"""What the Redis tests rely on, checked against the real redis-server 7 (byte-exact, raw TLS):
the token works as an ACL password over TLS for the Azure name and a wrong key does not;
ACL DELUSER closes connections logged in as that user (how the re-auth tests expire a token);
and the protocol rules keyless' re-auth design follows (RESP2 subscribed mode refuses AUTH and
HELLO, RESP3 does not; AUTH inside MULTI is queued; AUTH behind a blocked BLPOP runs when it
returns; RESET logs the connection out)."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from proxy.redis.codec import ReplyScanner, encode_command
from tests.redis.conftest import HOST, WRONG_KEY
from tests.support.redis_server import RedisServer, mint_token

pytestmark = pytest.mark.e2e


class Raw:
    """A byte-level TLS client, verified for the Azure host name against the test CA."""

    def __init__(self, server: RedisServer) -> None:
        context = server.pki.client_ssl_context()
        plain = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        self.sock = context.wrap_socket(plain, server_hostname=HOST)
        self.buffer = b""
        self.scanner = ReplyScanner()
        self.frames: list[int] = []

    def send(self, *args: str) -> None:
        self.sock.sendall(encode_command(*args))

    def reply(self, timeout: float = 5.0) -> bytes:
        """The next whole reply frame; b"" when the server closed the connection."""
        self.sock.settimeout(timeout)
        while not self.frames:
            try:
                data = self.sock.recv(65536)
            except (ConnectionError, ssl.SSLError):
                return b""
            if not data:
                return b""
            base = len(self.buffer)
            self.buffer += data
            self.frames += [base + end for end, _ in self.scanner.feed(data)]
        end = self.frames.pop(0)
        frame, self.buffer = self.buffer[:end], self.buffer[end:]
        self.frames = [e - end for e in self.frames]
        return frame

    def call(self, *args: str) -> bytes:
        self.send(*args)
        return self.reply()


@pytest.fixture()
def users(redis_server: RedisServer) -> dict[str, str]:
    tokens = {f"cal-{i}-{time.monotonic_ns()}": "" for i in range(2)}
    for oid in tokens:
        tokens[oid] = mint_token(oid, 3600)
        redis_server.add_token_user(oid, tokens[oid])
    return tokens


def test_the_token_is_the_password_over_tls_and_a_wrong_key_is_not(
        redis_server: RedisServer, users: dict[str, str]) -> None:
    oid, token = next(iter(users.items()))
    assert Raw(redis_server).call("AUTH", oid, token) == b"+OK\r\n"
    assert Raw(redis_server).call("AUTH", oid, WRONG_KEY).startswith(b"-WRONGPASS")
    assert Raw(redis_server).call("AUTH", WRONG_KEY).startswith(b"-WRONGPASS")  # default: off
    assert Raw(redis_server).call("PING").startswith(b"-NOAUTH")
    with pytest.raises(ssl.SSLCertVerificationError):  # the certificate is for the Azure name
        context = redis_server.pki.client_ssl_context()
        plain = socket.create_connection(("127.0.0.1", redis_server.port), timeout=5)
        context.wrap_socket(plain, server_hostname="other.redis.cache.windows.net")


def test_deleting_the_user_closes_connections_that_did_not_re_authenticate(
        redis_server: RedisServer, users: dict[str, str]) -> None:
    (old, old_token), (new, new_token) = users.items()
    stale, renewed = Raw(redis_server), Raw(redis_server)
    assert stale.call("AUTH", old, old_token) == b"+OK\r\n"
    assert renewed.call("AUTH", old, old_token) == b"+OK\r\n"
    assert renewed.call("AUTH", new, new_token) == b"+OK\r\n"
    assert redis_server.delete_user(old) == 1
    assert stale.call("PING") == b""  # closed by the server
    assert renewed.call("PING") == b"+PONG\r\n"


def test_subscribed_mode_rules(redis_server: RedisServer, users: dict[str, str]) -> None:
    (oid, token), (other, other_token) = users.items()
    resp2 = Raw(redis_server)
    resp2.call("AUTH", oid, token)
    assert resp2.call("SUBSCRIBE", "ch").startswith(b"*3\r\n$9\r\nsubscribe")
    assert resp2.call("AUTH", other, other_token).startswith(b"-ERR Can't execute 'auth'")
    assert resp2.call("HELLO", "3").startswith(b"-ERR Can't execute 'hello'")
    assert resp2.call("PING") == b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"

    resp3 = Raw(redis_server)
    assert resp3.call("HELLO", "3", "AUTH", oid, token).startswith(b"%7\r\n")
    assert resp3.call("SUBSCRIBE", "ch").startswith(b">3\r\n$9\r\nsubscribe")
    assert resp3.call("AUTH", other, other_token) == b"+OK\r\n"  # allowed in RESP3
    assert resp3.call("PING") == b"+PONG\r\n"
    assert resp3.call("PING", "x") == b"$1\r\nx\r\n"
    assert resp3.call("HELLO", "2").startswith(b"*14\r\n")  # back to RESP2, still subscribed
    assert resp3.call("GET", "k").startswith(b"-ERR Can't execute 'get'")
    assert resp3.call("PING") == b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"


def test_auth_in_multi_is_queued_behind_a_block_waits_and_reset_logs_out(
        redis_server: RedisServer, users: dict[str, str]) -> None:
    (oid, token), (other, other_token) = users.items()
    tx = Raw(redis_server)
    tx.call("AUTH", oid, token)
    assert tx.call("MULTI") == b"+OK\r\n"
    assert tx.call("AUTH", other, other_token) == b"+QUEUED\r\n"  # never inject inside MULTI
    assert tx.call("EXEC") == b"*1\r\n+OK\r\n"

    blocked = Raw(redis_server)
    blocked.call("AUTH", oid, token)
    started = time.monotonic()
    blocked.send("BLPOP", "calibration-empty", "1")
    blocked.send("AUTH", other, other_token)
    assert blocked.reply() == b"*-1\r\n"  # the block's timeout: AUTH waited behind it
    assert blocked.reply() == b"+OK\r\n"
    assert time.monotonic() - started >= 0.9
    assert blocked.call("ACL", "WHOAMI") == b"$%d\r\n%s\r\n" % (len(other), other.encode())

    reset = Raw(redis_server)
    reset.call("AUTH", oid, token)
    assert reset.call("RESET") == b"+RESET\r\n"
    assert reset.call("ACL", "WHOAMI").startswith(b"-NOAUTH")
