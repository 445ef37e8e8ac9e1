"""The legacy Java app in transparent mode: no proxy setting at all, real iptables.

As tests/e2e/test_transparent.py does for Python: a "pod" network namespace runs keyless
(`--transparent`, as UID 10001, exempt from the redirect) and the JVM (as UID 10002); the
rules printed by `keyless iptables` redirect the JVM's port 443 to keyless; Azurite listens
on port 443 of an "azure" namespace, its name resolved by the pod's /etc/netns hosts file. The
app gets only the truststore (the JDK's cacerts plus keyless' CA) in JAVA_TOOL_OPTIONS.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import BLOB_HOST
from tests.e2e.test_java import (
    CLIENTS,
    LEGACY_BLOB,
    MAIN,
    app_env,
    assert_azurite_saw_tokens,
    assert_converted,
    assert_round_trip,
    counters,
)
from tests.support.azurite import Azurite
from tests.support.jvm import MavenApp, java_truststore, maven_app
from tests.support.netns import APP_UID, KEYLESS_UID, TransparentPod, transparent_pod

pytestmark = pytest.mark.e2e

POD_ADDRESS = "10.201.0.1"
AZURITE_ADDRESS = "10.201.0.2"


class JavaPod(TransparentPod):
    app: MavenApp
    azurite: Azurite
    keyless_truststore: Path
    service_truststore: Path

    def java(self, store: Path, client: str) -> subprocess.CompletedProcess[str]:
        """The app inside the pod as its own UID: the truststore, and no proxy setting."""
        return self.pod.exec(*self.app.command(MAIN), uid=APP_UID, timeout=120, check=False,
                             env={"PATH": "/usr/bin:/bin", "HOME": str(self.workdir / "app"),
                                  **self.env(store, client)})

    def env(self, store: Path, client: str) -> dict[str, str]:
        return {**app_env(client), "AZURE_STORAGE_CONNECTION_STRING": LEGACY_BLOB,
                "JAVA_TOOL_OPTIONS": f"-Djavax.net.ssl.trustStore={store} "
                                     "-Djavax.net.ssl.trustStorePassword=changeit"}


@pytest.fixture(params=sorted(CLIENTS))
def client(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def java_pod() -> Iterator[JavaPod]:
    app = maven_app("storage")
    with transparent_pod("j", POD_ADDRESS, [AZURITE_ADDRESS], {BLOB_HOST: AZURITE_ADDRESS},
                         kind=JavaPod) as pod:
        pod.app = app
        pod.azurite = pod.in_azure(Azurite(pod.workdir / "azurite", pod.pki,
                                           host=AZURITE_ADDRESS, blob_port=443))
        keyless = pod.start_keyless(
            "--set", f"ssl_verify_upstream_trusted_ca={pod.pki.ca_pem_path}",
            "--token-timeout", "5")
        stores = [java_truststore(ca, pod.app_dir / name) for ca, name in (
            (keyless.ca_path, "keyless.p12"), (pod.pki.ca_pem_path, "service.p12"))]
        for store in stores:
            store.chmod(0o644)
        pod.keyless_truststore, pod.service_truststore = stores
        yield pod


def test_without_the_rules_azurite_refuses_the_java_apps_wrong_key(java_pod, client):
    java_pod.pod.flush_nat()
    before = counters(java_pod.keyless)

    # The app as it was before keyless: trusting the service's own CA, straight to Azurite.
    done = java_pod.java(java_pod.service_truststore, client)

    assert done.returncode == 1, done.stderr[-3000:]
    assert '"status":400,"code":"InvalidAuthenticationInfo"' in done.stdout, done.stdout
    assert counters(java_pod.keyless) == before


def test_java_app_is_redirected_to_keyless_and_converted(java_pod, client):
    pod = java_pod
    pod.apply_rules()
    before = counters(pod.keyless)

    result = pod.run_app(*pod.app.command(MAIN), env=pod.env(pod.keyless_truststore, client))

    assert_round_trip(result, subprocess.CompletedProcess([], 0, "", ""), client)
    assert_converted(pod.keyless, before)
    assert_azurite_saw_tokens(pod.azurite, result["container"])
    assert pod.keyless.uid_running() == KEYLESS_UID


def test_redirected_java_app_without_keyless_ca_fails_tls(java_pod, client):
    pod = java_pod
    pod.apply_rules()
    before = counters(pod.keyless)

    done = pod.java(pod.service_truststore, client)  # trusts Azurite's CA, not keyless'

    assert done.returncode == 1, done.stderr[-3000:]
    assert "javax.net.ssl.SSLHandshakeException" in done.stdout, done.stdout
    assert counters(pod.keyless)[0] == before[0]
