"""The injected transparent-mode pod, run for real in network namespaces (as the kubelet
would, minus the cluster): the webhook patches a pod annotated keyless.io/mode: transparent;
in a "pod" namespace, `keyless-init` runs as keyless' UID, `keyless-iptables` (root, the
injected command) applies the rules, keyless runs with the sidecar's environment (which is
what turns transparent mode on), and the app — a wrong key, no proxy variables, exactly its
container's environment, its own UID — reaches Azurite in an "azure" namespace under the real
Azure host name with a token. Calibration: before the rules, the same app is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV
from tests.k8s.support import Webhook, apply, container_named, map_paths, review
from tests.support.azurite import ACCOUNT, WRONG_KEY, Azurite, TestPKI
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import keyless_command
from tests.support.netns import (
    NamespacedKeyless,
    Netns,
    link,
    namespaces,
    readable_dir,
    require_netns,
)

pytestmark = pytest.mark.e2e

KEYLESS_UID, APP_UID = 10001, 10002
POD_ADDRESS, AZURITE_ADDRESS = "10.201.0.1", "10.201.0.2"
APP = Path(__file__).with_name("storage_app.py")
LEGACY = (f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
          "EndpointSuffix=core.windows.net")
_AZURITE_REQUEST = re.compile(
    r"RequestMethod=(?P<method>\S+) RequestURL=(?P<url>\S+) RequestHeaders:(?P<headers>\{.*\})"
    r" ClientIP=")


def transparent_pod() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "legacy-go", "namespace": "apps",
                         "labels": {"keyless.io/inject": "true"},
                         "annotations": {"keyless.io/inject": "true",
                                         "keyless.io/mode": "transparent"}},
            "spec": {"containers": [{
                "name": "app", "image": "registry.example.com/legacy:1",
                "env": [{"name": "AZURE_STORAGE_CONNECTION_STRING", "value": LEGACY}],
                "securityContext": {"runAsUser": APP_UID}}]}}


@dataclass
class Running:
    pod_ns: Netns
    patched: dict[str, Any]
    paths: dict[str, str]
    keyless: NamespacedKeyless
    azurite: Azurite
    pki: TestPKI
    workdir: Path

    def container(self, name: str) -> dict[str, Any]:
        return container_named(self.patched, name)

    def mapped(self, value: str) -> str:
        return map_paths(value, self.paths).replace("127.0.0.1:8080",
                                                    f"127.0.0.1:{self.keyless.port}")

    def env_of(self, name: str) -> dict[str, str]:
        return {e["name"]: self.mapped(e["value"]) for e in self.container(name).get("env", [])}

    def command_of(self, name: str) -> list[str]:
        command = self.container(name)["command"]
        assert command[0] == "keyless"
        return [*keyless_command(), *(self.mapped(a) for a in command[1:])]

    def app(self, env: dict[str, str]) -> dict[str, Any]:
        done = self.pod_ns.exec(sys.executable, str(APP), uid=APP_UID, check=False, timeout=120,
                                env={"PATH": "/usr/bin:/bin",
                                     "HOME": str(self.workdir / "home"), **env})
        lines = done.stdout.strip().splitlines()
        assert lines, done.stderr[-3000:]
        return json.loads(lines[-1])


def keyless_env(env: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("KEYLESS_")}, **env}


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    require_netns()
    workdir = readable_dir(Path(tempfile.mkdtemp(prefix="keyless-k8s-netns-")))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        webhook = Webhook(workdir / "webhook").start()
        try:
            pod = transparent_pod()
            patched = apply(pod, webhook.mutate(review(pod)))
        finally:
            webhook.stop()
        spaces = stack.enter_context(namespaces("kpod", "kazure"))
        pod_ns, azure_ns = spaces["kpod"], spaces["kazure"]
        link(pod_ns, f"{POD_ADDRESS}/24", azure_ns, [f"{AZURITE_ADDRESS}/24"])
        pod_ns.write_hosts({BLOB_HOST: AZURITE_ADDRESS})
        pki = TestPKI(readable_dir(workdir / "pki"))
        azurite = Azurite(workdir / "azurite", pki, host=AZURITE_ADDRESS, blob_port=443)
        azure_ns.call(azurite.start)
        stack.callback(azurite.stop)
        identity = FakeIdentityEndpoint()
        pod_ns.call(identity.start)  # the pod's loopback: exempt from the redirect
        stack.callback(identity.stop)
        readable_dir(workdir / "home")
        # the pod's emptyDirs; keyless-ca is written by keyless' UID, read by the app's
        ca_dir = readable_dir(workdir / "volumes" / "keyless-ca")
        os.chown(ca_dir, KEYLESS_UID, KEYLESS_UID)
        keyless = NamespacedKeyless(pod_ns, KEYLESS_UID, readable_dir(workdir / "keyless"), [
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            "--token-timeout", "5",
        ], {})
        paths = {"/var/run/keyless-ca": str(ca_dir), "/var/run/keyless": str(keyless.confdir),
                 "/tmp": str(readable_dir(workdir / "volumes" / "keyless-tmp")),
                 "/run": str(readable_dir(workdir / "volumes" / "run"))}
        result = Running(pod_ns, patched, paths, keyless, azurite, pki, workdir)
        # 1. keyless-init, as keyless' UID
        init = pod_ns.exec(*result.command_of("keyless-init"), uid=KEYLESS_UID, check=False,
                           env=keyless_env({**result.env_of("keyless-init"),
                                            "HOME": str(keyless.confdir)}))
        assert init.returncode == 0, init.stderr
        # 2. keyless with the sidecar's environment: KEYLESS_TRANSPARENT comes from there
        sidecar_env = result.env_of("keyless")
        assert sidecar_env["KEYLESS_TRANSPARENT"] == "true"
        keyless.env = {**sidecar_env, **identity.env(), **DEAD_PROXY_ENV,
                       "HOME": str(keyless.confdir)}
        stack.callback(keyless.stop)
        keyless.start()
        yield result


def test_before_the_iptables_step_the_app_is_refused(running):
    env = running.env_of("app")
    assert not {"HTTPS_PROXY", "https_proxy", "NO_PROXY"} & set(env)
    # straight to Azurite (trusting Azurite's CA): the wrong key is refused
    env["REQUESTS_CA_BUNDLE"] = running.pki.ca_pem_path
    result = running.app(env)
    assert (result["ok"], result.get("status"), result.get("code")) == \
        (False, 400, "InvalidAuthenticationInfo"), result


def test_after_the_injected_iptables_step_the_app_gets_through_with_a_token(running):
    test_before_the_iptables_step_the_app_is_refused(running)  # order-independent calibration
    command = running.command_of("keyless-iptables")
    # the injected command, its port mapped to this keyless' loopback port
    assert command[-6:] == ["iptables", "--apply", "--uid", str(KEYLESS_UID), "--listen",
                            f"127.0.0.1:{running.keyless.port}"]
    applied = running.pod_ns.exec(*command, check=False, env=keyless_env({}))
    assert applied.returncode == 0, applied.stderr
    result = running.app(running.env_of("app"))
    assert result["ok"] and result["same"], (result, running.keyless.log()[-3000:])
    seen = []
    for line in running.azurite.debug_log_text().splitlines():
        match = _AZURITE_REQUEST.search(line)
        if match and f"/{result['container']}" in match["url"]:
            headers = {k.lower(): v for k, v in json.loads(match["headers"]).items()}
            seen.append(headers.get("authorization", "").split(" ", 1)[0])
    assert seen and set(seen) == {"Bearer"}, seen
    assert WRONG_KEY not in running.keyless.log()
