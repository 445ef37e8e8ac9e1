"""Transparent mode for Event Hubs over AMQPS (5671), with real iptables in network namespaces.

The "pod" runs keyless (`--transparent`, UID 10001, a route that says the namespace is an
Event Hubs one), the fake identity endpoint and the legacy app as UID 10002: the real
azure-eventhub (Python) or @azure/event-hubs (Node.js) SDK with its SAS connection string (a
WRONG key), no proxy settings, no code change, trusting keyless' CA, under exactly the rules
`keyless iptables` prints. "azure" runs the fake namespace (rhea; it refuses SAS put-tokens and
checks that an event hub's tokens are for https://eventhubs.azure.net) at 10.200.4.2:5671.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.netns import (
    APP_UID,
    NamespacePod,
    start_fake_namespace,
    transparent_pod,
)

pytestmark = pytest.mark.e2e
POD_ADDRESS, AZURE_ADDRESS = "10.200.4.1", "10.200.4.2"
HUBS = "keylesshubs.servicebus.windows.net"
WRONG_KEY = "d3Jvbmcta2V5LWZyb20tdGhlLWFwcA=="
LEGACY = (f"Endpoint=sb://{HUBS}/;SharedAccessKeyName=RootManageSharedAccessKey;"
          f"SharedAccessKey={WRONG_KEY};EntityPath=telemetry")
TESTS = Path(__file__).resolve().parents[1]
APP = TESTS / "apps" / "transparent_eventhubs_app.py"
NODE_APP = TESTS / "amqp" / "node_servicebus_app.mjs"  # its "eventhubs" kind: partition 1


class Pod(NamespacePod):
    def python_app(self, ca: str | None = None) -> dict[str, Any]:
        return self.run_app(sys.executable, str(APP), LEGACY, ca or self.keyless_ca,
                            timeout=180)

    def node_app(self, body: str, ca: str | None = None) -> dict[str, Any]:
        node = shutil.which("node")
        assert node, "Node.js is needed: apt-get install nodejs, then npm ci"
        return self.run_app(node, str(NODE_APP), LEGACY, body, "eventhubs", timeout=180,
                            env={"NODE_EXTRA_CA_CERTS": ca or self.keyless_ca})


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    with transparent_pod("hubs", POD_ADDRESS, [AZURE_ADDRESS], {HUBS: AZURE_ADDRESS},
                         kind=Pod) as pod:
        start_fake_namespace(pod, AZURE_ADDRESS, HUBS)
        config = pod.workdir / "keyless.toml"
        config.write_text(f'[[route]]\nhost = "{HUBS}"\nservice = "eventhubs"\n')
        config.chmod(0o644)
        pod.start_keyless("--config", str(config),
                          "--set", f"ssl_verify_upstream_trusted_ca={pod.pki.ca_pem_path}",
                          "--token-timeout", "5")
        yield pod


def put_tokens(pod: Pod, since: int) -> list[dict[str, Any]]:
    return pod.fake.events("put_token")[since:]


@pytest.mark.parametrize("language", ["python", "node"])
def test_without_the_rules_the_event_hub_refuses_the_sas(pod: Pod, language: str) -> None:
    pod.pod.flush_nat()
    before = len(pod.fake.events("put_token"))
    if language == "python":
        result = pod.python_app(ca=pod.pki.ca_pem_path)  # the app as it was, straight there
        assert result["outcome"] == "refused", result
    else:
        result = pod.node_app("straight", ca=pod.pki.ca_pem_path)
        assert "error" in result, result
    seen = put_tokens(pod, before)
    assert seen and not any(event["accepted"] for event in seen), seen
    assert {event["token_kind"] for event in seen} == {"sas"}


@pytest.mark.parametrize("language", ["python", "node"])
def test_the_unchanged_event_hubs_app_sends_and_receives_with_a_token(pod: Pod,
                                                                      language: str) -> None:
    pod.redirect()
    before = len(pod.fake.events("put_token"))
    arrived = pod.upstream.forwarder.connections

    if language == "python":
        result = pod.python_app()
        assert result["outcome"] == "ok", (result, pod.keyless.log()[-4000:])
        assert result["uid"] == APP_UID
    else:
        body = f"node-transparent-reading-{language}-{before}"
        result = pod.node_app(body)
        assert "error" not in result and body in result["received"], (
            result, pod.keyless.log()[-4000:])

    seen = put_tokens(pod, before)
    # Event Hubs JWTs (the fake checks aud = https://eventhubs.azure.net), no SAS upstream
    assert seen and all(event["accepted"] for event in seen), seen
    assert {event["token_kind"] for event in seen} == {"jwt"}
    assert {event["type"] for event in seen} == {"jwt"}
    assert all(event["audience"].startswith(f"sb://{HUBS}/telemetry") for event in seen), seen
    assert pod.identity.calls_for("https://eventhubs.azure.net")  # the Event Hubs scope
    assert pod.upstream.forwarder.connections > arrived  # through keyless, not looped back to it
