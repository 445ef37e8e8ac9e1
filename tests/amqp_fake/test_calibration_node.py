"""Calibration with the Node SDKs (@azure/service-bus, @azure/event-hubs) straight to the fake
namespace: a TokenCredential (Entra mode) works, the SAS connection string is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support import entra
from tests.support.fake_namespace import FakeNamespace

pytestmark = pytest.mark.e2e
APP = Path(__file__).with_name("node_direct_app.mjs")
REPO = Path(__file__).resolve().parents[2]


def run_app(ns: FakeNamespace, service: str, mode: str, body: str) -> dict:
    node = shutil.which("node")
    assert node, "node not found: apt-get install nodejs (Node.js 18 or later)"
    env = {**os.environ, "NODE_EXTRA_CA_CERTS": ns.ca_pem_path,
           "KEYLESS_TEST_TOKEN_SERVICEBUS": entra.mint("https://servicebus.azure.net"),
           "KEYLESS_TEST_TOKEN_EVENTHUBS": entra.mint("https://eventhubs.azure.net"),
           "KEYLESS_TEST_SAS": ns.connection_string()}
    done = subprocess.run([node, str(APP), service, mode, ns.namespace, str(ns.amqps_port), body],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("service", ["servicebus", "eventhubs"])
def test_node_entra_mode_works(namespace, service):
    body = f"node-{uuid.uuid4()}"
    result = run_app(namespace, service, "entra", body)
    assert "error" not in result, result
    assert body in result["received"]
    puts = namespace.events("put_token")
    assert puts and all(p["accepted"] and p["token_kind"] == "jwt" for p in puts), puts
    assert all(s.startswith(f"https://{service}.azure.net") for s in result["scopes"]), result


@pytest.mark.parametrize("service", ["servicebus", "eventhubs"])
def test_node_sas_is_refused(namespace, service):
    result = run_app(namespace, service, "sas", "never")
    assert "error" in result and "received" not in result, result
    puts = namespace.events("put_token")
    assert puts and {(p["token_kind"], p["status"], p["accepted"]) for p in puts} == {
        ("sas", 401, False)}, puts
    assert not namespace.events("transfer")
