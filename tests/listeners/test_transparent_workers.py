"""Transparent mode under `--workers 2`, with real iptables in network namespaces.

The pod (tests/support/netns.py `transparent_pod`) runs keyless `--transparent --workers 2`
(the supervisor and both workers as UID 10001, exempt from the redirect) and the legacy apps
as UID 10002, with no proxy settings, trusting keyless' CA, under exactly the rules
`keyless iptables` prints. Both workers bind the transparent ports (HTTPS on 127.0.0.1 and
[::1], AMQPS on the transparent listener) with SO_REUSEPORT; the kernel spreads the
redirected connections among them. The azure side runs Azurite (HTTPS on :443, OAuth: it
refuses the app's Shared Key) and the fake Service Bus namespace (it refuses SAS).

The Storage app opens a new connection per upload (UPLOADS of them), so both workers get
some: the supervisor's /metrics shows each worker's requests, and the identity endpoint
sees one call for the pod (the supervisor's token cache).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BLOB_HOST
from tests.e2e.test_transparent import LEGACY_BLOB, azurite_requests
from tests.e2e.test_workers import worker_pids
from tests.support.azurite import WRONG_KEY, Azurite
from tests.support.netns import (
    APP_UID,
    KEYLESS_UID,
    NamespacePod,
    start_fake_namespace,
    transparent_pod,
)

pytestmark = pytest.mark.e2e
WORKERS = 2
POD_ADDRESS, AZURITE_ADDRESS, NAMESPACE_ADDRESS = "10.200.20.1", "10.200.20.2", "10.200.20.3"
NAMESPACE = "keylessworkers.servicebus.windows.net"
SAS_KEY = "d3Jvbmcta2V5LWZyb20tdGhlLWFwcA=="
LEGACY_BUS = (f"Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName=RootManageSharedAccessKey;"
              f"SharedAccessKey={SAS_KEY}")
STORAGE = "https://storage.azure.com"
UPLOADS = 20
APPS = Path(__file__).resolve().parents[1] / "apps"


class WorkersPod(NamespacePod):
    azurite: Azurite

    def storage_app(self, container: str, ca: str | None = None) -> dict[str, Any]:
        return self.run_app(sys.executable, str(APPS / "transparent_app.py"), "connections",
                            LEGACY_BLOB, container, str(UPLOADS), timeout=180,
                            env={"REQUESTS_CA_BUNDLE": ca or self.keyless_ca})

    def bus_app(self, ca: str | None = None) -> dict[str, Any]:
        return self.run_app(sys.executable, str(APPS / "transparent_amqp_app.py"), LEGACY_BUS,
                            "orders", ca or self.keyless_ca, timeout=180)

    def per_worker(self) -> list[float]:
        """keyless_worker_requests_total{worker=N} from the supervisor's /metrics."""
        return [self.keyless.metric("keyless_worker_requests_total", worker=str(number))
                for number in range(WORKERS)]

    def converted(self) -> float:
        return self.keyless.metric("keyless_requests_total", outcome="converted")


@pytest.fixture(scope="module")
def pod() -> Iterator[WorkersPod]:
    with transparent_pod("wk", POD_ADDRESS, [AZURITE_ADDRESS, NAMESPACE_ADDRESS],
                         {BLOB_HOST: AZURITE_ADDRESS, NAMESPACE: NAMESPACE_ADDRESS},
                         kind=WorkersPod) as pod:
        pod.azurite = pod.in_azure(Azurite(pod.workdir / "azurite", pod.pki,
                                           host=AZURITE_ADDRESS, blob_port=443))
        start_fake_namespace(pod, NAMESPACE_ADDRESS, NAMESPACE)
        pod.start_keyless("--workers", str(WORKERS), "--log-format", "text",
                          "--set", f"ssl_verify_upstream_trusted_ca={pod.pki.ca_pem_path}",
                          "--token-timeout", "5")
        yield pod


def test_without_the_rules_azurite_refuses_the_apps_wrong_key(pod: WorkersPod) -> None:
    pod.pod.flush_nat()
    container = f"straight{uuid.uuid4().hex[:10]}"
    before = pod.per_worker()

    result = pod.storage_app(container, ca=pod.pki.ca_pem_path)  # the app as it was

    assert result["outcome"] == "refused", result
    seen = azurite_requests(pod.azurite, container)
    assert seen and {r["scheme"] for r in seen} == {"SharedKey"}, seen
    assert pod.per_worker() == before  # keyless saw none of it


def test_both_workers_serve_the_redirected_connections_with_one_token(
        pod: WorkersPod) -> None:
    pod.redirect()
    container = f"workers{uuid.uuid4().hex[:10]}"
    before, converted = pod.per_worker(), pod.converted()

    result = pod.storage_app(container)

    # first what reached Azurite: no Shared Key, ever (whichever worker forwarded it)
    seen = azurite_requests(pod.azurite, container)
    assert seen and {r["scheme"] for r in seen} == {"Bearer"}, seen
    assert not [r for r in seen if "sig=" in r["url"]], seen  # nor a SAS
    assert result["outcome"] == "ok", (result, pod.keyless.log()[-4000:])
    assert result["uid"] == APP_UID
    assert result["names"] == sorted(f"blob-{index}" for index in range(UPLOADS))
    statuses = result["statuses"]
    assert len(statuses) == UPLOADS + 3 and all(200 <= s < 300 for s in statuses), statuses
    assert len(seen) == len(statuses), seen  # each request reached Azurite once
    served = [after - earlier for after, earlier in zip(pod.per_worker(), before, strict=True)]
    assert all(count > 0 for count in served), served  # the kernel gave both some
    assert sum(served) == len(statuses), served
    assert pod.converted() - converted == len(statuses)
    # one identity call for the pod, whichever worker asked first
    assert len(pod.identity.calls_for(STORAGE)) == 1, pod.identity.calls
    # the supervisor and both workers run as keyless' own UID (the recipe exempts it)
    assert pod.keyless.process is not None
    workers = worker_pids(pod.keyless.process.pid)
    assert len(workers) == WORKERS
    assert {uid_of(pid) for pid in [pod.keyless.process.pid, *workers]} == {KEYLESS_UID}
    log, metrics = pod.keyless.log(), pod.keyless.metrics()
    assert WRONG_KEY not in log
    assert not any(token in log or token in metrics for token in pod.identity.issued)


def test_the_transparent_amqp_listener_is_shared_too(pod: WorkersPod) -> None:
    """The unchanged Service Bus app (a wrong SAS key) through the redirected 5671: the
    workers' transparent AMQP listeners share the port; the namespace sees only tokens."""
    pod.pod.flush_nat()
    before = len(pod.upstream.fake.events("put_token"))
    straight = pod.bus_app(ca=pod.pki.ca_pem_path)
    assert straight["outcome"] == "refused", straight
    refused = pod.upstream.fake.events("put_token")[before:]
    assert refused and not any(event["accepted"] for event in refused), refused

    pod.redirect()
    before = len(pod.upstream.fake.events("put_token"))
    arrived = pod.upstream.forwarder.connections

    result = pod.bus_app()

    assert result["outcome"] == "ok", (result, pod.keyless.log()[-4000:])
    seen = pod.upstream.fake.events("put_token")[before:]
    assert seen and all(event["accepted"] for event in seen), seen
    assert {event["token_kind"] for event in seen} == {"jwt"}  # no SAS reached it
    assert pod.upstream.forwarder.connections > arrived  # through keyless, not looped back
    assert pod.keyless.metric("keyless_listener_logins_total", protocol="amqp",
                              result="converted") >= len(seen)
    assert SAS_KEY not in pod.keyless.log()


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
