"""The chart and `keyless webhook` together: the rendered objects run the real webhook.

From one `helm template` render: the Secret's serving pair and the ConfigMap's config.yaml
are written to files, the Deployment's container args are run (only the listen address and
the /etc/keyless-webhook paths moved to loopback and a temp directory; POD_NAMESPACE as the
downward API would set it), and AdmissionReviews are sent over HTTPS the way the API server
sends them: trusting only the webhook configuration's caBundle, verifying the name
<svc>.<ns>.svc from clientConfig.service, to clientConfig.service.path.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.test_helm import NAMESPACE, SCENARIOS, one, render
from tests.deploy.test_helm import helm as helm  # the session fixture: helm, built once
from tests.support.keyless import keyless_command

START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiServerConnection(http.client.HTTPSConnection):
    """Dials loopback, verifies the certificate for the Service's DNS name."""

    def __init__(self, port: int, server_name: str, context: ssl.SSLContext) -> None:
        super().__init__("127.0.0.1", port, timeout=10, context=context)
        self.server_name = server_name

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.server_name)


class ChartWebhook:
    def __init__(self, objects: list[dict[str, Any]], workdir: Path) -> None:
        self.objects = objects
        secret = one(objects, "Secret")
        tls = workdir / "tls"
        tls.mkdir()
        for key in ("tls.crt", "tls.key"):
            (tls / key).write_bytes(base64.b64decode(secret["data"][key]))
        (workdir / "config.yaml").write_text(one(objects, "ConfigMap")["data"]["config.yaml"])
        deployment = one(objects, "Deployment")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        self.port = free_port()
        args = []
        for arg in container["args"]:
            if arg.startswith("--listen="):
                arg = f"--listen=127.0.0.1:{self.port}"
            args.append(arg.replace("/etc/keyless-webhook", str(workdir)))
        assert args[0] == "webhook"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLESS_")}
        for item in container["env"]:
            if item["name"] == "POD_NAMESPACE":
                assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
                env["POD_NAMESPACE"] = deployment["metadata"]["namespace"]
        self.log = workdir / "webhook.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([*keyless_command(), *args], env=env,
                                            stdout=log, stderr=subprocess.STDOUT)
        config = one(objects, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]
        self.path = config["service"]["path"]
        self.server_name = f"{config['service']['name']}.{config['service']['namespace']}.svc"
        self.context = ssl.create_default_context(
            cadata=base64.b64decode(config["caBundle"]).decode())
        self.wait_ready()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        connection = ApiServerConnection(self.port, self.server_name, self.context)
        try:
            connection.request(method, path, body=body,
                               headers={"Content-Type": "application/json"} if body else {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except ssl.SSLCertVerificationError:
                raise
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the webhook was not ready within {START_TIMEOUT}s: {self.log.read_text()}")

    def mutate(self, pod: dict[str, Any], namespace: str) -> dict[str, Any]:
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE", "object": pod, "dryRun": False,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"}}}
        status, body = self.request("POST", self.path, json.dumps(review).encode())
        assert status == 200, body
        answer = json.loads(body)
        assert answer["response"]["uid"] == review["request"]["uid"]
        assert answer["response"]["allowed"] is True
        return answer["response"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def app_pod(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "generateName": "legacy-app-", "namespace": namespace,
        "labels": {"keyless.io/inject": "true", "app": "legacy-app"},
        "annotations": {"keyless.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "python:3.12-slim",
                                 "command": ["python", "-m", "http.server"]}]}}


def keyless_sidecar(response: dict[str, Any]) -> dict[str, Any]:
    assert response.get("patchType") == "JSONPatch", response
    patch = json.loads(base64.b64decode(response["patch"]))
    containers = []
    for operation in patch:
        value = operation.get("value")
        if operation["path"] == "/spec/initContainers" and isinstance(value, list):
            containers += value
        elif operation["path"].startswith("/spec/initContainers/") and isinstance(value, dict):
            containers.append(value)
    (sidecar,) = [c for c in containers if c.get("name") == "keyless"]
    return sidecar


@pytest.mark.parametrize("scenario", ["default", "custom-image-resources"])
def test_the_rendered_chart_runs_the_webhook(helm: Path, tmp_path: Path, scenario: str) -> None:
    objects = render(helm, SCENARIOS[scenario])
    webhook = ChartWebhook(objects, tmp_path)
    try:
        sidecar = keyless_sidecar(webhook.mutate(app_pod("apps"), "apps"))
        if scenario == "default":
            assert sidecar["image"] == one(objects, "Deployment")["spec"]["template"]["spec"][
                "containers"][0]["image"]
            assert sidecar["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
        else:
            injection = SCENARIOS[scenario]["injection"]
            assert sidecar["image"] == "registry.example.com/keyless:1.2.3"
            assert sidecar["resources"] == injection["resources"]
        # the release namespace is never injected (POD_NAMESPACE, and the config's list)
        assert "patch" not in webhook.mutate(app_pod(NAMESPACE), NAMESPACE)
        assert "patch" not in webhook.mutate(app_pod("kube-system"), "kube-system")
        # the API server would refuse a certificate for another name
        other = ApiServerConnection(webhook.port, "keyless.example.com", webhook.context)
        with pytest.raises(ssl.SSLCertVerificationError):
            other.request("GET", "/healthz")
    finally:
        webhook.stop()
