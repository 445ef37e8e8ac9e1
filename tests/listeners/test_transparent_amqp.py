"""Transparent mode for AMQPS (5671), with real iptables in network namespaces.

The "pod" runs keyless (`--transparent`, UID 10001), the fake identity endpoint and the
legacy app: the real azure-servicebus SDK (Python) or @azure/service-bus (Node.js) with its
SAS connection string (a WRONG key), no proxy settings and no code change, as UID 10002,
trusting keyless' CA, under exactly the rules `keyless iptables` prints (which redirect 5671 by
default). "azure" runs the fake
namespace (rhea; it refuses SAS put-tokens: local auth disabled) reachable at 10.200.2.2:5671.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import DEAD_PROXY_ENV
from tests.support.azurite import TestPKI
from tests.support.fake_namespace import FakeNamespace
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import keyless_command
from tests.support.netns import (
    NamespacedKeyless,
    Netns,
    TcpForwarder,
    link,
    namespaces,
    readable_dir,
    require_netns,
    run_app,
)

pytestmark = pytest.mark.e2e
KEYLESS_UID, APP_UID = 10001, 10002
POD_ADDRESS, AZURE_ADDRESS = "10.200.2.1", "10.200.2.2"
NAMESPACE = "keylessbus.servicebus.windows.net"
WRONG_KEY = "d3Jvbmcta2V5LWZyb20tdGhlLWFwcA=="
LEGACY = (f"Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName=RootManageSharedAccessKey;"
          f"SharedAccessKey={WRONG_KEY}")
APP = Path(__file__).resolve().parents[1] / "apps" / "transparent_amqp_app.py"
NODE_APP = Path(__file__).resolve().parents[1] / "apps" / "node" / "transparent_servicebus_app.mjs"


@dataclass
class Pod:
    pod: Netns
    workdir: Path
    pki: TestPKI
    keyless_ca: str
    keyless: NamespacedKeyless
    fake: FakeNamespace
    forwarder: TcpForwarder
    wss_forwarder: TcpForwarder
    rules: str

    def app(self, queue: str, ca: str | None = None, *transport: str) -> dict[str, Any]:
        return run_app(self.pod, APP_UID, self.workdir, sys.executable, str(APP), LEGACY,
                       queue, ca or self.keyless_ca, *transport, timeout=180)

    def node_app(self, queue: str, ca: str | None = None) -> dict[str, Any]:
        node = shutil.which("node")
        assert node, "Node.js is needed: apt-get install nodejs, then npm ci"
        return run_app(self.pod, APP_UID, self.workdir, node, str(NODE_APP), LEGACY, queue,
                       timeout=180, env={"NODE_EXTRA_CA_CERTS": ca or self.keyless_ca})


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    require_netns()
    workdir = readable_dir(Path(tempfile.mkdtemp(prefix="keyless-netns-amqp-")))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        spaces = stack.enter_context(namespaces("amqppod", "amqpazure"))
        pod_ns, azure_ns = spaces["amqppod"], spaces["amqpazure"]
        link(pod_ns, f"{POD_ADDRESS}/24", azure_ns, [f"{AZURE_ADDRESS}/24"])
        pod_ns.write_hosts({NAMESPACE: AZURE_ADDRESS})
        pki = TestPKI(readable_dir(workdir / "pki"))
        fake = FakeNamespace(workdir / "fake", pki, NAMESPACE)
        azure_ns.call(fake.start, timeout=60)
        stack.callback(fake.stop)
        forwarder = TcpForwarder(AZURE_ADDRESS, 5671, fake.amqps_port)
        azure_ns.call(forwarder.start)
        stack.callback(forwarder.stop)
        wss_forwarder = TcpForwarder(AZURE_ADDRESS, 443, fake.wss_port)
        azure_ns.call(wss_forwarder.start)
        stack.callback(wss_forwarder.stop)
        identity = FakeIdentityEndpoint()
        pod_ns.call(identity.start)
        stack.callback(identity.stop)
        keyless = NamespacedKeyless(pod_ns, KEYLESS_UID, readable_dir(workdir / "keyless"), [
            "--transparent",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            "--token-timeout", "5", "--log-level", "debug",
        ], {**identity.env(), **DEAD_PROXY_ENV, "HOME": str(workdir / "keyless")})
        stack.callback(keyless.stop)
        keyless.start()
        app_dir = readable_dir(workdir / "app")
        keyless_ca = app_dir / "keyless-ca.pem"
        shutil.copyfile(keyless.ca_path, keyless_ca)
        keyless_ca.chmod(0o644)
        printed = subprocess.run(
            [*keyless_command(), "iptables", "--listen", f"127.0.0.1:{keyless.port}",
             "--uid", str(KEYLESS_UID)], capture_output=True, text=True, timeout=30,
            check=True)
        yield Pod(pod_ns, workdir, pki, str(keyless_ca), keyless, fake, forwarder,
                  wss_forwarder, printed.stdout)


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
    pod.pod.flush_nat()
    pod.pod.run_recipe(pod.rules, pod.workdir)
    assert "--dport 5671 -j REDIRECT" in pod.rules
    before = len(put_tokens(pod.fake))
    arrived = pod.forwarder.connections

    result = pod.app("orders")

    assert result["outcome"] == "ok", (result, pod.keyless.log()[-4000:])
    assert result["uid"] == APP_UID and pod.keyless.uid_running() == KEYLESS_UID
    seen = put_tokens(pod.fake)[before:]
    assert seen and all(event.get("accepted") for event in seen), seen
    assert {event.get("type") for event in seen} == {"jwt"}  # no SAS reached the namespace
    assert pod.forwarder.connections > arrived  # through keyless, not looped back to it


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
    arrived = pod.wss_forwarder.connections

    result = pod.app("orders", None, "websocket")

    assert result["outcome"] == "ok", (result, pod.keyless.log()[-4000:])
    seen = put_tokens(pod.fake)[before:]
    assert seen and all(event.get("accepted") for event in seen), seen
    assert {event.get("token_kind") for event in seen} == {"jwt"}  # no SAS reached it
    assert pod.wss_forwarder.connections > arrived


def test_without_the_rules_the_node_app_is_refused_too(pod):
    pod.pod.flush_nat()
    before = len(put_tokens(pod.fake))
    result = pod.node_app("orders", ca=pod.pki.ca_pem_path)  # straight to the namespace
    assert result["outcome"] == "refused", result
    seen = put_tokens(pod.fake)[before:]
    assert seen and all(not event.get("accepted") for event in seen), seen


def test_the_unchanged_node_app_sends_and_receives_with_a_token(pod):
    pod.pod.flush_nat()
    pod.pod.run_recipe(pod.rules, pod.workdir)
    before = len(put_tokens(pod.fake))
    arrived = pod.forwarder.connections

    result = pod.node_app("orders")

    assert result["outcome"] == "ok", (result, pod.keyless.log()[-4000:])
    assert result["uid"] == APP_UID
    seen = put_tokens(pod.fake)[before:]
    assert seen and all(event.get("accepted") for event in seen), seen
    assert {event.get("type") for event in seen} == {"jwt"}  # no SAS reached the namespace
    assert pod.forwarder.connections > arrived  # through keyless, not looped back to it
