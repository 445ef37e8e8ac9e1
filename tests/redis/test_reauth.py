"""Re-authentication of live connections before their token expires, through the real keyless
process, for every kind of connection an app holds open: plain, pipelined, MULTI/EXEC, a
blocking pop, subscribed (RESP2 and RESP3), and MONITOR.

How a token "expires" here: each token generation has its own object id (`oid`), and the test
server has one ACL user per generation with that token as its password. When a generation's
token expires the test deletes its user, and redis-server closes every connection still logged
in as it (tests/redis/test_calibration.py). keyless takes the user from each new token's oid,
so a connection survives a deletion only if keyless really sent AUTH with the newer token.
A direct connection that never re-authenticates is killed by the first deletion (the control).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.redis.conftest import RESOURCE, WRONG_KEY, Through, start_keyless
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.redis_server import RedisServer, mint_token

pytestmark = pytest.mark.e2e

# azure-identity asks the token endpoint again at most every 30 s while its token is valid
# (azure/identity/_internal/utils.py DEFAULT_TOKEN_REFRESH_RETRY_DELAY), so a generation
# cannot be shorter than that: keyless gets each new token when the old one's use ends
# (--token-margin before its expiry), 33 s after the previous fetch.
LIFETIME = 40  # seconds each token lives
MARGIN = 6  # --token-margin
STEP = LIFETIME - MARGIN - 1  # generation k+1 is issued when generation k stops being served
GENERATIONS = 5  # queued; the test outlives three of them
EXPIRED = 3  # generations whose users are deleted while the connections stay open
Rotating = tuple[Through, list[str], list[str], list[float]]


@pytest.fixture()
def rotating(tmp_path: Path, redis_server: RedisServer) -> Iterator[Rotating]:
    """keyless whose identity hands out one short-lived token per generation, each with its
    own oid and ACL user. Yields keyless, the generations' oids, tokens and expiry times."""
    with FakeIdentityEndpoint() as identity:
        running = start_keyless(tmp_path / "keyless", redis_server, identity,
                                "--token-margin", str(MARGIN))
        try:
            now = int(time.time())
            oids = [f"gen{k}-{uuid.uuid4()}" for k in range(GENERATIONS)]
            tokens = [mint_token(oid, LIFETIME, now=now + k * STEP) for k, oid in enumerate(oids)]
            for oid, token in zip(oids, tokens, strict=True):
                redis_server.add_token_user(oid, token)
            identity.queue_tokens(RESOURCE, *tokens)
            yield running, oids, tokens, [now + k * STEP + LIFETIME for k in range(GENERATIONS)]
        finally:
            running.keyless.stop()
            for oid in oids:
                redis_server.delete_user(oid)


class Worker(threading.Thread):
    """Runs one app connection's workload in a loop until told to stop; records failures."""

    def __init__(self, name: str, step: Callable[[], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.step = step
        self.stop = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 240  # bounded, whatever happens
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                self.step()
                self.rounds += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_every_kind_of_connection_survives_three_token_lifetimes(
        rotating: Rotating, redis_server: RedisServer) -> None:
    through, oids, tokens, expiries = rotating
    admin = redis_server.admin()

    def app(name: str, **kwargs: object) -> redis.Redis:
        return through.client(WRONG_KEY, client_name=name, single_connection_client=True,
                              **kwargs)

    plain = app("plain")
    plain.set("plain", 0)

    def plain_step() -> None:
        assert plain.incr("plain") > 0
        time.sleep(0.2)

    piped = app("pipelined")

    def pipelined_step() -> None:
        with piped.pipeline(transaction=False) as pipe:
            for i in range(50):
                pipe.set(f"pipe{i}", i).get(f"pipe{i}")
            results = pipe.execute()
        assert results[1::2] == [str(i).encode() for i in range(50)]
        time.sleep(0.05)

    tx = app("multi")

    def multi_step() -> None:
        # MULTI held open for a while, so re-auth times fall inside transactions too
        assert tx.execute_command("MULTI") == b"OK"
        assert tx.execute_command("INCR", "tx") == b"QUEUED"
        time.sleep(0.7)
        assert tx.execute_command("INCR", "tx") == b"QUEUED"
        result = tx.execute_command("EXEC")
        assert result[1] == result[0] + 1

    blocking = app("blocking")
    pusher = redis_server.admin()

    def blocking_step() -> None:
        got = blocking.blpop(["jobs"], timeout=3)  # often outstanding when re-auth is due
        if got is not None:
            assert got == (b"jobs", b"job")

    subscribers: dict[str, redis.client.PubSub] = {}
    seen: dict[str, list[int]] = {"sub-resp2": [], "sub-resp3": []}
    for name, protocol in (("sub-resp2", 2), ("sub-resp3", 3)):
        subscriber = app(name, protocol=protocol).pubsub()
        subscriber.subscribe(f"ch-{name}")
        assert subscriber.get_message(timeout=5)["type"] == "subscribe"
        subscribers[name] = subscriber

    def sub_step(name: str) -> Callable[[], None]:
        subscriber = subscribers[name]
        pings = [0]

        def step() -> None:
            message = subscriber.get_message(timeout=1)
            if message is not None and message["type"] == "message":
                seen[name].append(int(message["data"]))
            elif message is not None:
                assert message["type"] == "pong" or message.get("data") in (b"PONG", b""), message
            pings[0] += 1
            if pings[0] % 3 == 0:
                subscriber.ping()  # PING in subscribed mode (RESP2: its array form)
        return step

    # MONITOR: keyless' AUTH is answered between the monitor lines. redis-py's Monitor fails
    # on any line that is not a monitor line (a leaked +OK), and no line may show a token.
    monitor = app("monitor").monitor()
    monitor.__enter__()
    monitored: list[str] = []

    def monitor_step() -> None:
        line = monitor.next_command()
        assert line["command"], line
        monitored.append(line["command"])

    workers = [Worker("plain", plain_step), Worker("pipelined", pipelined_step),
               Worker("multi", multi_step), Worker("blocking", blocking_step),
               *(Worker(name, sub_step(name)) for name in subscribers),
               Worker("monitor", monitor_step)]
    names = {w.name for w in workers}

    def connections() -> dict[str, list[tuple[str, str]]]:
        """(id, user) of each of the apps' server-side connections, by client name (an app
        may hold an idle one too: redis-py's pipelines and pub/sub take their own)."""
        found: dict[str, list[tuple[str, str]]] = {}
        for c in admin.client_list():
            if c["name"] in names:
                found.setdefault(c["name"], []).append((c["id"], c["user"]))
        return found

    control = redis_server.client(oids[0], tokens[0], single_connection_client=True,
                                  retry=Retry(NoBackoff(), 0))  # never re-authenticates
    assert control.ping()

    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 30
    while not all(w.rounds for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)  # every app has opened what it uses
    before = {name: sorted(i for i, _ in conns) for name, conns in connections().items()}
    assert set(before) == names, before
    published = 0
    for generation in range(EXPIRED):
        while time.time() < expiries[generation]:
            for name in subscribers:
                admin.publish(f"ch-{name}", published)
            published += 1
            if published % 5 == 0:
                pusher.rpush("jobs", "job")
            time.sleep(0.25)
            failed = [w for w in workers if w.error is not None]
            assert not failed, {w.name: repr(w.error) for w in failed}
        assert redis_server.delete_user(oids[generation]) == 1  # this token has expired
        if generation == 0:
            with pytest.raises(redis.ConnectionError):
                control.ping()  # the server closed the connection that kept the old token
    time.sleep(1.5)  # the last deletion's kills (if any) have landed
    admin.set("after-the-last-expiry", 1)  # the monitor must still see this
    for name in subscribers:
        admin.publish(f"ch-{name}", published)
    published += 1
    time.sleep(1.5)
    for worker in workers:
        worker.stop.set()
    for worker in workers:
        worker.join(timeout=10)
    failed = {w.name: repr(w.error) for w in workers if w.error is not None}
    assert not failed, f"{failed}\n{through.keyless.log()[-3000:]}"
    assert all(w.rounds > 3 for w in workers), {w.name: w.rounds for w in workers}

    # The same server-side connections, each logged in now as a generation not deleted.
    after = connections()
    assert {name: sorted(i for i, _ in conns) for name, conns in after.items()} == before
    live = set(oids[EXPIRED:])
    assert all(user in live for conns in after.values() for _, user in conns), after
    for name in subscribers:  # every message arrived, none lost to a reconnect
        assert seen[name] == list(range(published)), name
    assert "SET after-the-last-expiry 1" in monitored  # still monitoring
    assert not any(token in c for token in tokens for c in monitored)
    assert any(c.startswith("AUTH") for c in monitored)  # keyless' own, shown redacted
    reauths = through.keyless.metric("keyless_listener_reauths_total", result="ok")
    assert reauths >= EXPIRED * len(workers)
    log = through.keyless.log()
    assert WRONG_KEY not in log and not any(token in log for token in tokens)
