"""A Java Service Bus app (azure-messaging-servicebus, tests/apps/java/servicebus) with a
WRONG key, through the real keyless process to the fake namespace, which accepts only the
identity's Entra tokens (local auth disabled: SAS refused).

- local endpoint: `Endpoint=sb://localhost:PORT;...;UseDevelopmentEmulator=true`, keyless'
  `--reverse PORT=amqps://NS` listener;
- calibration: the same app and key straight at the namespace is refused;
- transparent mode: see tests/listeners/test_transparent_amqp_java.py.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.amqp.conftest import KEY_NAME, NAMESPACE, WRONG_KEY, Through
from tests.support.fake_namespace import FakeNamespace
from tests.support.jvm import MavenApp, maven_app

pytestmark = pytest.mark.e2e
MAIN = "keyless.LegacyServiceBusApp"
APP_TIMEOUT = 150  # seconds; the app's own watchdog ends it at 100 s


@pytest.fixture(scope="module")
def java_app() -> MavenApp:
    return maven_app("servicebus")


def run_java(app: MavenApp, connection_string: str, entity: str, count: int = 2,
             *jvm_args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(app.command(MAIN, *jvm_args) + [entity, str(count)],
                          capture_output=True, text=True, timeout=APP_TIMEOUT,
                          env={"PATH": "/usr/bin:/bin", **(env or {}),
                               "SERVICEBUS_CONNECTION_STRING": connection_string})
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, done.stdout + done.stderr[-4000:]
    result: dict[str, Any] = json.loads(lines[-1])
    result["stderr"] = done.stderr[-4000:]
    return result


def puts_since(namespace: FakeNamespace, before: int) -> list[dict[str, Any]]:
    return namespace.events("put_token")[before:]


def test_java_queue_round_trip_through_the_local_endpoint(java_app: MavenApp,
                                                          through: Through) -> None:
    before = len(through.namespace.events("put_token"))
    attaches = len(through.namespace.events("attach"))
    converted = through.logins("converted")

    result = run_java(java_app, through.connection_string(), "orders", 3)

    assert result["ok"], json.dumps(result, indent=1)
    assert sorted(result["received_ids"]) == sorted(result["sent"]) and len(result["sent"]) == 3
    assert sorted(result["received"]) == sorted(f"body of {id_}" for id_ in result["sent"])
    puts = puts_since(through.namespace, before)
    assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
    assert all(p["audience"].startswith(f"amqp://{NAMESPACE}/") or
               p["audience"].startswith(f"sb://{NAMESPACE}/") for p in puts), puts
    assert through.logins("converted") >= converted + 2  # the sender's and receiver's
    attached = [e for e in through.namespace.events("attach")[attaches:]
                if e.get("entity") == "orders"]
    assert attached and all(e["accepted"] for e in attached), attached
    log = through.keyless.log()
    assert WRONG_KEY not in log and "sig=" not in log
    assert WRONG_KEY not in through.keyless.metrics()


def test_java_topic_subscription_through_the_local_endpoint(java_app: MavenApp,
                                                            through: Through) -> None:
    before = len(through.namespace.events("put_token"))
    result = run_java(java_app, through.connection_string(), "events/audit", 2)
    assert result["ok"], json.dumps(result, indent=1)
    puts = puts_since(through.namespace, before)
    assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
