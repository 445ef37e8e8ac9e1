"""The injected pod run as far as this machine allows (no cluster here): the webhook patches a
pod with three legacy apps (Python, Node.js, Java, each with a wrong account key); then the
pod's pieces run for real with exactly the commands, environment and files the patch gives
them, adapted only in paths (the pod's volumes become local folders) and ports (loopback):

1. `keyless-init`'s command writes the CA into keyless' confdir and the public certificate,
   the bundle and the Java truststore into the shared folder;
2. keyless runs with the `keyless` sidecar's environment (plus, standing in for the cluster,
   the identity endpoint and a --connect-to that sends the Azure host to Azurite);
3. each app runs with its container's environment and nothing else: its blob round trip
   succeeds, and Azurite saw Bearer tokens, never the key.

Calibration: the same Python app with the same environment minus the proxy, straight to
Azurite (trusting Azurite's CA instead), is refused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BLOB_HOST, DEAD_PROXY_ENV
from tests.e2e.test_java import _AZURITE_REQUEST, CLIENTS, MAIN, SAS_SIGNATURE
from tests.e2e.test_nodejs import APP as NODE_APP
from tests.k8s.support import Webhook, apply, container_named, map_paths, review
from tests.support.azurite import ACCOUNT, WRONG_KEY, Azurite, TestPKI
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.jvm import MavenApp, maven_app
from tests.support.keyless import KeylessProcess, keyless_command

pytestmark = pytest.mark.e2e

PYTHON_APP = Path(__file__).with_name("storage_app.py")
LEGACY = (f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={WRONG_KEY};"
          "EndpointSuffix=core.windows.net")
APP_TIMEOUT = 180
POD_PROXY = "127.0.0.1:8080"
STORAGE_SCOPE = "https://storage.azure.com/.default"


def legacy_pod() -> dict[str, Any]:
    def app(name: str, image: str, extra: list[dict[str, str]] | None = None) -> dict:
        return {"name": name, "image": image,
                "env": [{"name": "AZURE_STORAGE_CONNECTION_STRING", "value": LEGACY},
                        *(extra or [])],
                "securityContext": {"runAsUser": 10002, "runAsNonRoot": True}}

    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "legacy-", "namespace": "shop",
                     "labels": {"keyless.io/inject": "true"},
                     "annotations": {"keyless.io/inject": "true",
                                     "keyless.io/ready-scopes": STORAGE_SCOPE}},
        "spec": {"containers": [
            app("python-app", "registry.example.com/legacy-python:1"),
            app("node-app", "registry.example.com/legacy-node:1"),
            app("java-app", "registry.example.com/legacy-java:1", [
                {"name": "BLOB_SIZE", "value": str(1024 * 1024 + 17)},
                {"name": "SAS_SIGNATURE", "value": SAS_SIGNATURE},
                {"name": "AZURE_HTTP_CLIENT_IMPLEMENTATION", "value": CLIENTS["netty"][0]}]),
        ]},
    }


@dataclass
class RunningPod:
    pod: dict[str, Any]
    paths: dict[str, str]
    keyless: KeylessProcess
    azurite: Azurite
    pki: TestPKI
    ca_dir: Path

    def container(self, name: str) -> dict[str, Any]:
        return container_named(self.pod, name)

    def env_of(self, name: str) -> dict[str, str]:
        """The container's environment as the kubelet gives it, adapted in paths and ports."""
        env = {}
        for entry in self.container(name).get("env", []):
            assert "valueFrom" not in entry, entry  # nothing the test would have to invent
            value = map_paths(entry["value"], self.paths)
            value = value.replace(POD_PROXY, f"127.0.0.1:{self.keyless.port}")
            env[entry["name"]] = value.replace("-Dhttps.proxyPort=8080",
                                               f"-Dhttps.proxyPort={self.keyless.port}")
        return env


def kubelet_env(env: dict[str, str]) -> dict[str, str]:
    """A process environment of only `env`, plus the PATH to find the interpreters."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}


def keyless_env(env: dict[str, str]) -> dict[str, str]:
    """keyless' own processes: this interpreter's environment (the image's stand-in) without
    any KEYLESS_* of the test run's, plus the container's."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("KEYLESS_")}, **env}


@pytest.fixture(scope="module")
def running_pod(tmp_path_factory) -> Iterator[RunningPod]:
    root = tmp_path_factory.mktemp("pod")
    pki = TestPKI(root / "pki")
    webhook = Webhook(root / "webhook").start()
    try:
        pod = legacy_pod()
        patched = apply(pod, webhook.mutate(review(pod)))
    finally:
        webhook.stop()
    keyless_dir = root / "keyless"
    ca_dir = root / "volumes" / "keyless-ca"
    paths = {"/var/run/keyless-ca": str(ca_dir),
             "/var/run/keyless": str(keyless_dir / "confdir"),
             "/tmp": str(root / "volumes" / "keyless-tmp")}
    with Azurite(root / "azurite", pki) as azurite, FakeIdentityEndpoint() as identity:
        keyless = KeylessProcess(keyless_dir, [
            # the cluster's stand-ins: Azure's name goes to Azurite, whose CA keyless trusts
            "--connect-to", f"{BLOB_HOST}:443:127.0.0.1:{azurite.blob_port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            "--token-timeout", "5",
        ], {})  # its loopback ports are chosen here; its environment is the sidecar's, below
        running = RunningPod(patched, paths, keyless, azurite, pki, ca_dir)
        # 1. the CA init step, as the pod runs it
        init = running.container("keyless-init")
        assert init["command"][0] == "keyless"
        done = subprocess.run([*keyless_command(), *(map_paths(a, paths)
                                                     for a in init["command"][1:])],
                              env=keyless_env(running.env_of("keyless-init")),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        # 2. keyless with the sidecar's environment
        sidecar = running.container("keyless")
        sidecar_env = running.env_of("keyless")
        assert sidecar["command"] == ["keyless", "run"]
        # in the pod, keyless listens where the apps' HTTPS_PROXY points
        raw = {e["name"]: e["value"] for e in sidecar["env"]}
        assert raw["KEYLESS_LISTEN"] == POD_PROXY
        for app in patched["spec"]["containers"]:
            assert {"name": "HTTPS_PROXY", "value": f"http://{POD_PROXY}"} in app["env"]
        assert sidecar_env["KEYLESS_CONFDIR"] == paths["/var/run/keyless"]
        assert sidecar_env["KEYLESS_READY_SCOPES"] == STORAGE_SCOPE
        keyless.env = {**sidecar_env, **identity.env(), **DEAD_PROXY_ENV}
        keyless.start()  # waits for /readyz: the ready scope's token is cached
        try:
            yield running
        finally:
            assert keyless.stop() == 0, keyless.log()


def run(command: list[str], env: dict[str, str]) -> tuple[dict[str, Any], str]:
    done = subprocess.run(command, env=kubelet_env(env), capture_output=True, text=True,
                          timeout=APP_TIMEOUT)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(lines[-1]), done.stderr


def bearer_only(running: RunningPod, container: str) -> None:
    seen = []
    for line in running.azurite.debug_log_text().splitlines():
        match = _AZURITE_REQUEST.search(line)
        if match and f"/{container}" in match["url"]:
            headers = {k.lower(): v for k, v in json.loads(match["headers"]).items()}
            seen.append(headers.get("authorization", "").split(" ", 1)[0])
    assert seen and set(seen) == {"Bearer"}, seen


def test_the_ca_init_step_wrote_only_public_files_keyless_uses_its_ca(running_pod):
    files = sorted(p.name for p in running_pod.ca_dir.iterdir())
    assert files == ["ca-bundle.pem", "keyless-ca.pem", "truststore.p12"]
    bundle = (running_pod.ca_dir / "ca-bundle.pem").read_text()
    assert bundle.rstrip().endswith((running_pod.ca_dir / "keyless-ca.pem").read_text().rstrip())
    # keyless signs with the CA the init step made (not a second one of its own)
    assert Path(running_pod.keyless.ca_path).read_text() == \
        (running_pod.ca_dir / "keyless-ca.pem").read_text()


def test_the_python_app_with_a_wrong_key_works_with_the_injected_environment(running_pod):
    env = running_pod.env_of("python-app")
    assert env["HTTPS_PROXY"] == running_pod.keyless.proxy_url
    assert env["REQUESTS_CA_BUNDLE"] == str(running_pod.ca_dir / "ca-bundle.pem")
    result, stderr = run([sys.executable, str(PYTHON_APP)], env)
    assert result["ok"] and result["same"] and result["listed"] == ["payload.bin"], \
        (result, stderr[-3000:], running_pod.keyless.log()[-3000:])
    bearer_only(running_pod, result["container"])
    assert WRONG_KEY not in running_pod.keyless.log()


def test_calibration_the_same_app_and_env_without_keyless_is_refused(running_pod):
    env = running_pod.env_of("python-app")
    for name in ("HTTPS_PROXY", "https_proxy"):
        del env[name]
    endpoint = f"https://127.0.0.1:{running_pod.azurite.blob_port}/{ACCOUNT}"
    env["AZURE_STORAGE_CONNECTION_STRING"] = LEGACY + f";BlobEndpoint={endpoint}"
    env["REQUESTS_CA_BUNDLE"] = env["SSL_CERT_FILE"] = running_pod.pki.ca_pem_path
    result, _ = run([sys.executable, str(PYTHON_APP)], env)
    assert (result["ok"], result.get("status"), result.get("code")) == \
        (False, 400, "InvalidAuthenticationInfo"), result


def test_the_node_app_works_with_node_extra_ca_certs(running_pod):
    node = subprocess.run(["which", "node"], capture_output=True, text=True).stdout.strip()
    if not node:
        pytest.fail("node is missing: install Node.js 20 (apt-get install -y nodejs npm)")
    env = running_pod.env_of("node-app")
    assert env["NODE_EXTRA_CA_CERTS"] == str(running_pod.ca_dir / "keyless-ca.pem")
    result, stderr = run([node, str(NODE_APP)], env)
    assert result["ok"] and result["downloadedSha256"] == result["uploadedSha256"], \
        (result, stderr[-3000:])
    bearer_only(running_pod, result["container"])


@pytest.fixture(scope="module")
def storage_app() -> MavenApp:
    return maven_app("storage")


def test_the_java_app_works_with_java_tool_options_and_the_python_written_truststore(
        running_pod, storage_app):
    env = running_pod.env_of("java-app")
    options = env["JAVA_TOOL_OPTIONS"]
    assert f"-Dhttps.proxyPort={running_pod.keyless.port}" in options
    assert re.search(r"-Djavax\.net\.ssl\.trustStore=\S+/truststore\.p12", options)
    result, stderr = run(storage_app.command(MAIN), env)
    assert result["ok"] and result["downloadedSha256"] == result["uploadedSha256"], \
        (result, stderr[-3000:])
    assert result["sasRead"] == "read through a SAS URL"
    bearer_only(running_pod, result["container"])
