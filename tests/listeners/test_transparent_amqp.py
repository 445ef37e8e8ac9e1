"""Transparent mode for AMQPS (5671), with real iptables in network namespaces.

The "pod" runs keyless (`--transparent`, UID 10001), the fake identity endpoint and the
legacy app: the real azure-servicebus SDK (Python) or @azure/service-bus (Node.js) with its
SAS connection string (a WRONG key), no proxy settings and no code change, as UID 10002,
trusting keyless' CA, under exactly the rules `keyless iptables` prints (which redirect 5671 by
default). "azure" runs the fake
namespace (rhea; it refuses SAS put-tokens: local auth disabled) reachable at 10.200.2.2:5671.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_namespace import FakeNamespace
from tests.support.netns import (
    APP_UID,
    KEYLESS_UID,
    NamespacePod,
    start_fake_namespace,
    transparent_pod,
)

pytestmark = pytest.mark.e2e
POD_ADDRESS, AZURE_ADDRESS = "10.200.2.1", "10.200.2.2"
NAMESPACE = "keylessbus.servicebus.windows.net"
WRONG_KEY = "d3Jvbmcta2V5LWZyb20tdGhlLWFwcA=="
LEGACY = (f"Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName=RootManageSharedAccessKey;"
          f"SharedAccessKey={WRONG_KEY}")
APP = Path(__file__).resolve().parents[1] / "apps" / "transparent_amqp_app.py"
PLAIN_APP = Path(__file__).resolve().parents[1] / "amqp" / "node_plain_app.mjs"
NODE_APP = Path(__file__).resolve().parents[1] / "apps" / "node" / "transparent_servicebus_app.mjs"


class Pod(NamespacePod):
    def app(self, queue: str, ca: str | None = None, *transport: str) -> dict[str, Any]:
        return self.run_app(sys.executable, str(APP), LEGACY, queue, ca or self.keyless_ca,
                            *transport, timeout=180)

    def node_app(self, queue: str, ca: str | None = None) -> dict[str, Any]:
        node = shutil.which("node")
        assert node, "Node.js is needed: apt-get install nodejs, then npm ci"
        return self.run_app(node, str(NODE_APP), LEGACY, queue, timeout=180,
                            env={"NODE_EXTRA_CA_CERTS": ca or self.keyless_ca})


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    with transparent_pod("amqp", POD_ADDRESS, [AZURE_ADDRESS], {NAMESPACE: AZURE_ADDRESS},
                         kind=Pod) as pod:
        start_fake_namespace(pod, AZURE_ADDRESS, NAMESPACE)
        pod.start_keyless("--set", f"ssl_verify_upstream_trusted_ca={pod.pki.ca_pem_path}",
                          "--token-timeout", "5", "--log-level", "debug")
        yield pod


def put_tokens(fake: FakeNamespace) -> list[dict[str, Any]]:
    return fake.events("put_token")


def test_without_the_rules_the_namespace_refuses_the_sas(pod):
    pod.pod.flush_nat()
    before = len(put_tokens(pod.fake))
    result = pod.app("orders", ca=pod.pki.ca_pem_path)  # the app as it was, straight there
    assert result["outcome"] == "refused", result
    seen = put_tokens(pod.fake)[before:]
    assert seen and all(not event.get("accepted") for event in seen), seen


def test_the_unchanged_app_sends_and_receives_with_a_token(pod):
    pod.redirect()
    assert "--dport 5671 -j REDIRECT" in pod.rules
    before = len(put_tokens(pod.fake))
    arrived = pod.upstream.forwarder.connections

    result = pod.app("orders")

    assert result["outcome"] == "ok", (result, pod.keyless.log()[-4000:])
    assert result["uid"] == APP_UID and pod.keyless.uid_running() == KEYLESS_UID
    seen = put_tokens(pod.fake)[before:]
    assert seen and all(event.get("accepted") for event in seen), seen
    assert {event.get("type") for event in seen} == {"jwt"}  # no SAS reached the namespace
    assert pod.upstream.forwarder.connections > arrived  # through keyless, not looped back to it


def test_amqp_over_websockets_on_443_is_converted_too(pod):
    """An app on `AmqpOverWebsocket` (wss to 443, no proxy setting): the 443 rule takes it to
    keyless' transparent HTTPS side, which converts the AMQP inside the WebSocket."""
    pod.pod.flush_nat()
    before = len(put_tokens(pod.fake))
    straight = pod.app("orders", pod.pki.ca_pem_path, "websocket")
    assert straight["outcome"] == "refused", straight
    refused = put_tokens(pod.fake)[before:]  # refused by the namespace, for its SAS
    assert refused and not any(event.get("accepted") for event in refused), straight

    pod.pod.run_recipe(pod.rules, pod.workdir)
    before = len(put_tokens(pod.fake))
    arrived = pod.upstream.wss_forwarder.connections

    result = pod.app("orders", None, "websocket")

    assert result["outcome"] == "ok", (result, pod.keyless.log()[-4000:])
    seen = put_tokens(pod.fake)[before:]
    assert seen and all(event.get("accepted") for event in seen), seen
    assert {event.get("token_kind") for event in seen} == {"jwt"}  # no SAS reached it
    assert pod.upstream.wss_forwarder.connections > arrived


def test_without_the_rules_the_node_app_is_refused_too(pod):
    pod.pod.flush_nat()
    before = len(put_tokens(pod.fake))
    result = pod.node_app("orders", ca=pod.pki.ca_pem_path)  # straight to the namespace
    assert result["outcome"] == "refused", result
    seen = put_tokens(pod.fake)[before:]
    assert seen and all(not event.get("accepted") for event in seen), seen


def test_the_unchanged_node_app_sends_and_receives_with_a_token(pod):
    pod.redirect()
    before = len(put_tokens(pod.fake))
    arrived = pod.upstream.forwarder.connections

    result = pod.node_app("orders")

    assert result["outcome"] == "ok", (result, pod.keyless.log()[-4000:])
    assert result["uid"] == APP_UID
    seen = put_tokens(pod.fake)[before:]
    assert seen and all(event.get("accepted") for event in seen), seen
    assert {event.get("type") for event in seen} == {"jwt"}  # no SAS reached the namespace
    assert pod.upstream.forwarder.connections > arrived  # through keyless, not looped back to it


def test_an_unchanged_sasl_plain_client_sends_and_receives_with_a_token(pod):
    """A generic AMQP client (rhea) with SASL PLAIN, user = key name, password = a WRONG key,
    AMQPS to the namespace's own name: keyless answers PLAIN, logs in with ANONYMOUS and puts
    the identity's token itself (the fake refuses PLAIN: local auth is disabled)."""
    pod.redirect()
    puts_before = len(put_tokens(pod.fake))
    sasl_before = len(pod.fake.events("sasl"))
    body = f"transparent-plain-{uuid.uuid4()}"
    result = pod.run_app("/usr/bin/node", str(PLAIN_APP), "5671", "RootManageSharedAccessKey",
                         WRONG_KEY, body, "0", NAMESPACE, pod.keyless_ca, timeout=90)
    assert result == {"received": [body]}, (result, pod.keyless.log()[-4000:])
    seen = put_tokens(pod.fake)[puts_before:]
    assert [(p["token_kind"], p["audience"], p["accepted"]) for p in seen] == [
        ("jwt", f"sb://{NAMESPACE}/", True)], seen
    assert [e["mechanism"] for e in pod.fake.events("sasl")[sasl_before:]] == ["ANONYMOUS"]
    assert WRONG_KEY not in pod.keyless.log()
