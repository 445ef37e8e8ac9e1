"""Legacy Redis apps with a WRONG access key, through the real keyless process, to a real
redis-server that accepts only the identity's Entra token (ACL user = the token's oid)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from tests.redis.conftest import RESOURCE, WRONG_KEY, Through, start_keyless
from tests.support.entra import OBJECT_ID
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e


def test_direct_with_the_wrong_key_is_refused(through: Through) -> None:
    for username in (None, "default", OBJECT_ID):
        direct = through.server.client(username, WRONG_KEY)
        with pytest.raises(redis.AuthenticationError):
            direct.ping()


@pytest.mark.parametrize("style", ["auth-key", "auth-user-key", "hello3-auth"])
def test_get_set_with_the_wrong_key(through: Through, style: str) -> None:
    app = {
        "auth-key": lambda: through.client(WRONG_KEY),
        "auth-user-key": lambda: through.client(WRONG_KEY, username="default"),
        "hello3-auth": lambda: through.client(WRONG_KEY, username="default", protocol=3),
    }[style]()
    converted = through.logins("converted")
    assert app.set(f"k-{style}", "v1")
    assert app.get(f"k-{style}") == b"v1"
    assert app.execute_command("ACL", "WHOAMI") == OBJECT_ID.encode()
    if style == "hello3-auth":
        assert app.hgetall("missing") == {}
        assert app.execute_command("HELLO")[b"proto"] == 3  # the switch happened upstream
    assert through.logins("converted") == converted + 1
    app.close()


def test_reset_keeps_the_connection_logged_in(through: Through) -> None:
    app = through.client(single_connection_client=True)
    assert app.set("before-reset", "1")
    # redis-server logs the connection out on RESET
    assert app.execute_command("RESET") in ("RESET", b"RESET")
    assert app.get("before-reset") == b"1"  # keyless logged it in again behind the RESET
    assert app.execute_command("ACL", "WHOAMI") == OBJECT_ID.encode()


def test_pipeline_and_multi_exec(through: Through) -> None:
    app = through.client()
    with app.pipeline(transaction=False) as pipe:
        for i in range(200):
            pipe.set(f"p{i}", i)
            pipe.get(f"p{i}")
        results = pipe.execute()
    assert results[1::2] == [str(i).encode() for i in range(200)]
    with app.pipeline(transaction=True) as tx:
        tx.incr("counter").incr("counter").get("counter")
        assert tx.execute() == [1, 2, b"2"]
    # an app that (re-)authenticates inside its transaction: queued, answered in EXEC
    with app.pipeline(transaction=True) as tx:
        tx.execute_command("AUTH", WRONG_KEY).incr("counter")
        assert tx.execute() == [True, 3]  # redis-py reads AUTH's +OK as True


def test_pubsub_and_blpop(through: Through) -> None:
    app = through.client()
    sub = app.pubsub()
    sub.subscribe("news")
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    through.client().publish("news", "hello")
    message = sub.get_message(timeout=5)
    assert message["data"] == b"hello"
    sub.close()

    def push_later() -> None:
        time.sleep(1)
        through.client().rpush("queue", "job")
    pusher = threading.Thread(target=push_later)
    pusher.start()
    assert app.blpop(["queue"], timeout=10) == (b"queue", b"job")
    pusher.join()


@pytest.mark.parametrize("username", [None, "default"])
def test_node_ioredis_app_with_the_wrong_key(through: Through, username: str | None) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed: apt-get install nodejs, then npm ci"
    args = [node, str(Path(__file__).with_name("ioredis_app.js")), str(through.port), WRONG_KEY]
    done = subprocess.run(args + ([username] if username else []), capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (error1, first), (error2, second) = result.pop("multi")
    assert error1 is None and error2 is None and second == first + 1
    assert result == {"get": "node-value", "whoami": OBJECT_ID, "pipeline": ["OK", 2, "2"],
                      "message": "hello from node", "blpop": ["node-queue", "job"]}


def test_audit_mode_forwards_the_apps_password_and_records_the_login(
        tmp_path: Path, redis_server: RedisServer) -> None:
    redis_server.admin().execute_command("ACL", "SETUSER", "legacy-app", "on", ">app-password",
                                         "~*", "+@all")
    with FakeIdentityEndpoint() as identity:
        running = start_keyless(tmp_path / "keyless", redis_server, identity, "--audit")
        try:
            app = running.client("app-password", username="legacy-app")
            assert app.set("audited", "1") and app.execute_command("ACL", "WHOAMI") == \
                b"legacy-app"
            with pytest.raises(redis.AuthenticationError):  # forwarded as sent: refused
                running.client(WRONG_KEY).ping()
            assert running.logins("audited") == 2
        finally:
            running.keyless.stop()
        assert identity.calls == []  # audit mode changes nothing: no token was fetched
    state = json.loads((running.keyless.confdir / "keyless-state.json").read_text())
    logins = {(c["service"], c["scheme"], c["handled"]): c["count"] for c in state["calls"]}
    assert logins == {("redis", "password", "audited"): 2}
    assert "app-password" not in running.keyless.log()


def test_the_listener_user_option_names_the_auth_user(tmp_path: Path,
                                                      redis_server: RedisServer) -> None:
    with FakeIdentityEndpoint() as identity:
        token = make_token(RESOURCE, lifetime=3600)
        identity.queue_tokens(RESOURCE, token)
        redis_server.add_token_user("keyless-named-user", token)
        running = start_keyless(tmp_path / "keyless", redis_server, identity,
                                listener="?user=keyless-named-user")
        try:
            app = running.client(WRONG_KEY, username="default")
            assert app.execute_command("ACL", "WHOAMI") == b"keyless-named-user"
        finally:
            running.keyless.stop()


def test_inline_commands_as_a_telnet_user_types_them(through: Through) -> None:
    with socket.create_connection(("127.0.0.1", through.port), timeout=10) as raw:
        raw.sendall(f"AUTH {WRONG_KEY}\r\nSET inline 'a b'\r\nGET inline\r\nQUIT\r\n".encode())
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    assert answer == b"+OK\r\n+OK\r\n$3\r\na b\r\n+OK\r\n"


def test_no_key_and_no_token_in_keyless_log(through: Through) -> None:
    """Last in this module: after every app above, the shared keyless' log holds neither the
    apps' key nor the identity's token."""
    log = through.keyless.log()
    assert "redis login for" in log  # the log is the listener's, and it logged the logins
    assert WRONG_KEY not in log
    assert through.identity.issued and not any(token in log for token in through.identity.issued)
