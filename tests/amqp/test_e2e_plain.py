"""A generic AMQP client (rhea) logging in with SASL PLAIN, user = the SAS key name and
password = a WRONG key, through the real keyless (`--reverse PORT=amqps://NS`) to the fake
namespace with local auth disabled (it refuses PLAIN and SAS): the round trip passes only if
keyless answered PLAIN itself, logged in upstream with ANONYMOUS and put the identity's Entra
token on the connection before the app's first attach."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.amqp.conftest import KEY_NAME, NAMESPACE, WRONG_KEY, Through, start_keyless
from tests.support import entra
from tests.support.fake_namespace import FakeNamespace
from tests.support.identity_endpoint import FakeIdentityEndpoint

pytestmark = pytest.mark.e2e
APP = Path(__file__).with_name("node_plain_app.mjs")


def run_plain_app(port: int, body: str, hold: int = 0, key: str = WRONG_KEY) -> dict:
    node = shutil.which("node")
    assert node, "Node.js is needed: apt-get install nodejs, then npm ci"
    done = subprocess.run([node, str(APP), str(port), KEY_NAME, key, body, str(hold)],
                          capture_output=True, text=True, timeout=hold + 60,
                          cwd=Path(__file__).parent)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stdout + done.stderr
    return json.loads(lines[-1])


def connection_events(namespace: FakeNamespace, since: dict[str, int]) -> dict[str, list]:
    return {kind: namespace.events(kind)[since.get(kind, 0):]
            for kind in ("sasl", "open", "put_token", "attach", "connection_closed")}


def counts(namespace: FakeNamespace) -> dict[str, int]:
    return {kind: len(namespace.events(kind))
            for kind in ("sasl", "open", "put_token", "attach", "connection_closed",
                         "link_detached")}


def test_plain_client_with_the_wrong_key_round_trips(through: Through) -> None:
    namespace = through.namespace
    before = counts(namespace)
    converted = through.logins("converted")
    body = f"plain-order-{uuid.uuid4()}"
    assert run_plain_app(through.port, body) == {"received": [body]}
    seen = connection_events(namespace, before)
    # upstream: ANONYMOUS only, never PLAIN (which would carry the key)
    assert [e["mechanism"] for e in seen["sasl"]] == ["ANONYMOUS"], seen["sasl"]
    assert [e["hostname"] for e in seen["open"]] == [NAMESPACE]
    # one put-token, keyless' own: a JWT for the namespace, accepted, before any entity attach
    puts = seen["put_token"]
    assert [(p["token_kind"], p["type"], p["audience"], p["accepted"]) for p in puts] == [
        ("jwt", "jwt", f"sb://{NAMESPACE}/", True)], puts
    entity_attaches = [e for e in seen["attach"] if e["address"] != "$cbs"]
    assert {e["address"] for e in entity_attaches} == {"orders"}
    assert all(e["accepted"] for e in entity_attaches), entity_attaches
    assert min(e["time"] for e in entity_attaches) >= puts[0]["time"]
    assert through.logins("converted") == converted + 1
    stripped = through.keyless.metric("keyless_key_material_stripped_total",
                                      service="servicebus", scheme="SASL PLAIN")
    assert stripped >= 1
    log = through.keyless.log()
    assert WRONG_KEY not in log and "eyJ" not in log
    assert KEY_NAME in log  # the key name (not secret) says which app it was


def test_plain_connection_outlives_its_first_token(tmp_path: Path,
                                                   fake_namespace: FakeNamespace) -> None:
    """Identity tokens of 30 s; the fake detaches links when their token expires; the PLAIN
    app keeps its receiver and sender open 45 s and still gets the late message: keyless
    renewed the connection's token on its own CBS session."""
    with FakeIdentityEndpoint(lifetime_seconds=30) as identity:
        running = start_keyless(tmp_path / "keyless", fake_namespace, identity,
                                "--token-margin", "3")
        try:
            before = counts(fake_namespace)
            body = f"plain-renewal-{uuid.uuid4()}"
            assert run_plain_app(running.port, body, hold=45) == {
                "received": [body, f"{body}-late"]}
            seen = connection_events(fake_namespace, before)
            puts = seen["put_token"]
            assert len(puts) >= 2 and all(p["accepted"] and p["token_kind"] == "jwt"
                                          for p in puts), puts
            assert len({p["connection"] for p in puts}) == 1
            assert puts[1]["expires"] > puts[0]["expires"]  # a fresh token, not the same
            assert len(fake_namespace.events("link_detached")) == before["link_detached"]
            assert running.keyless.metric("keyless_listener_reauths_total",
                                          result="ok") >= 1
        finally:
            running.keyless.stop()


def test_token_endpoint_down_fails_the_plain_login_and_keyless_keeps_serving(
        tmp_path: Path, fake_namespace: FakeNamespace) -> None:
    with FakeIdentityEndpoint(mode="error") as identity:
        running = start_keyless(tmp_path / "keyless", fake_namespace, identity,
                                wait_ready=False)
        try:
            before = counts(fake_namespace)
            started = time.monotonic()
            result = run_plain_app(running.port, "never")
            # the SASL outcome auth (code 1), at once: not a hang until the app gives up
            assert result == {"error": "connection error: amqp:unauthorized-access "
                                       "Failed to authenticate: 1"}, result
            assert time.monotonic() - started < 15
            assert running.logins("token_unavailable") == 1
            seen = connection_events(fake_namespace, before)
            assert not seen["put_token"] and not any(e["mechanism"] == "PLAIN"
                                                     for e in seen["sasl"])
            # the next connection, once tokens come again, is served
            identity.mode = "ok"
            body = f"plain-after-outage-{uuid.uuid4()}"
            assert run_plain_app(running.port, body) == {"received": [body]}
            log = running.keyless.log()
            assert WRONG_KEY not in log and "eyJ" not in log
        finally:
            running.keyless.stop()


def test_a_refused_put_token_closes_the_plain_app_with_what_keyless_tried(
        tmp_path: Path, fake_namespace: FakeNamespace) -> None:
    """The identity's token is one the service refuses (another issuer): the PLAIN app's
    connection is closed with amqp:unauthorized-access naming the audience and identity,
    never the token, and the app's attach never reached the service."""
    with FakeIdentityEndpoint() as identity:
        identity.queue_tokens("https://servicebus.azure.net",
                              entra.mint("https://servicebus.azure.net",
                                         issuer="https://sts.windows.net/not-trusted/"))
        running = start_keyless(tmp_path / "keyless", fake_namespace, identity)
        try:
            before = counts(fake_namespace)
            result = run_plain_app(running.port, "never")
            error = result.get("error", "")
            assert error.startswith("connection error: amqp:unauthorized-access keyless put "
                                    "the Entra token of identity "), result
            assert f"sb://{NAMESPACE}/" in error and "401" in error and "eyJ" not in error
            seen = connection_events(fake_namespace, before)
            assert [p["accepted"] for p in seen["put_token"]] == [False]
            assert [e for e in seen["attach"] if e["address"] != "$cbs"] == []
            assert running.logins("upstream_refused") == 1
        finally:
            running.keyless.stop()
