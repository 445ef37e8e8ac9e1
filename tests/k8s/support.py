"""Helpers for the webhook tests: fixtures as pods, AdmissionReviews, the real webhook process."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import re
import ssl
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Self

import jsonpatch
import trustme
import yaml

from tests.support.azurite import free_port
from tests.support.keyless import keyless_command

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]
WEBHOOK_NAMESPACE = "keyless-system"
API_SERVER = "10.96.0.1"


def as_pod(obj: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    """A workload's pod template as the Pod the API server sends (metadata from the template,
    a generateName, the namespace)."""
    if obj.get("kind") == "Pod":
        return copy.deepcopy(obj)
    template = copy.deepcopy(obj["spec"]["template"])
    metadata = template.get("metadata") or {}
    metadata.setdefault("generateName", obj["metadata"]["name"] + "-")
    metadata["namespace"] = obj["metadata"].get("namespace", namespace)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def fixture_pods() -> dict[str, dict[str, Any]]:
    pods = {}
    for path in sorted(FIXTURES.glob("*.yaml")):
        (obj,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
        pods[path.stem] = as_pod(obj)
    return pods


def review(pod: dict[str, Any], namespace: str | None = None, operation: str = "CREATE",
           kind: str = "Pod") -> dict[str, Any]:
    namespace = namespace or pod["metadata"].get("namespace") or "default"
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": kind},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"].get("name", ""),
            "namespace": namespace, "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "oldObject": None, "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]] | None:
    answer = response["response"]
    if "patch" not in answer:
        return None
    assert answer["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(answer["patch"]))


def apply(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """The pod after the webhook's patch, applied by a JSON Patch library (RFC 6902)."""
    patch = patch_of(response)
    assert patch is not None, response
    return jsonpatch.JsonPatch(patch).apply(pod)


class Webhook:
    """The real `keyless webhook` process on loopback with a trustme serving certificate."""

    def __init__(self, workdir: Path, config: str = "", reload_interval: float = 10.0,
                 env: dict[str, str] | None = None, shutdown_delay: float = 0.0) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.cert_path, self.key_path = workdir / "tls.crt", workdir / "tls.key"
        self.install(self.ca.issue_cert("127.0.0.1", "localhost"))
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(config)
        self.port = free_port()
        self.log_path = workdir / "webhook.log"
        self.reload_interval = reload_interval
        self.env = env or {}
        self.shutdown_delay = shutdown_delay
        self.process: subprocess.Popen[bytes] | None = None

    def install(self, leaf: trustme.LeafCert) -> None:
        """Write a serving pair the way the kubelet updates a Secret volume: each file whole."""
        for path, blob in ((self.key_path, leaf.private_key_pem),
                           (self.cert_path, leaf.cert_chain_pems[0])):
            tmp = path.with_suffix(".new")
            tmp.write_bytes(blob.bytes())
            tmp.replace(path)

    def start(self, timeout: float = 20.0) -> Self:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLESS_")}
        env.update({"POD_NAMESPACE": WEBHOOK_NAMESPACE, "KUBERNETES_SERVICE_HOST": API_SERVER,
                    **self.env})
        command = [*keyless_command(), "webhook", "--listen", f"127.0.0.1:{self.port}",
                   "--tls-cert", str(self.cert_path), "--tls-key", str(self.key_path),
                   "--config", str(self.config_path), "--log-format", "text",
                   "--tls-reload-interval", str(self.reload_interval),
                   "--shutdown-delay", str(self.shutdown_delay)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"webhook exited {self.process.returncode}: {self.log()}")
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"webhook not up within {timeout}s: {self.log()}")

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                                 context=self.context())
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def mutate(self, admission: dict[str, Any]) -> dict[str, Any]:
        status, body = self.request("POST", "/mutate", json.dumps(admission).encode(),
                                    {"Content-Type": "application/json"})
        assert status == 200, (status, body)
        answer = json.loads(body)
        assert answer["response"]["uid"] == admission["request"]["uid"]
        assert answer["response"]["allowed"] is True
        return answer

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.process is None:
            return None
        self.process.terminate()
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


PODS_CONFIG_EXAMPLE = """\
# a webhook config file, as the chart's ConfigMap would hold it
image: registry.example.com/keyless:9.9.9
imagePullPolicy: Always
resources:
  requests: {cpu: 20m, memory: 96Mi}
  limits: {memory: 192Mi}
readyScopes: ["https://storage.azure.com/.default"]
proxyPort: 8181
noProxy: ["10.0.0.0/8"]
excludeNamespaces: [legacy]
"""


def injected(pod: dict[str, Any], config: str = "") -> dict[str, Any]:
    """The pod as the webhook's planner patches it (in-process, same code the server runs)."""
    from proxy.k8s.defaults import parse_defaults
    from proxy.k8s.inject import decide, plan

    defaults = parse_defaults(yaml.safe_load(config) or {} if config else {},
                              {"POD_NAMESPACE": WEBHOOK_NAMESPACE,
                               "KUBERNETES_SERVICE_HOST": API_SERVER})
    decision = decide(pod, pod["metadata"].get("namespace", "default"), defaults)
    assert decision.inject and decision.options, decision.reason
    return jsonpatch.JsonPatch(plan(pod, decision.options, defaults)).apply(pod)


def container_named(pod: dict[str, Any], name: str) -> dict[str, Any]:
    """One of the pod's containers, init containers (native sidecars) included."""
    spec = pod["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"]
                if c["name"] == name)


def injected_command(pod: dict[str, Any], container: str, paths: dict[str, str]) -> list[str]:
    """The command of one injected container, with pod paths mapped to local ones."""
    return [map_paths(arg, paths) for arg in container_named(injected(pod), container)["command"]]


def map_paths(value: str, paths: dict[str, str]) -> str:
    """Pod paths (whole path components, longest first) to local ones, in one pass."""
    if not paths:
        return value
    names = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./-])({names})(?=/|$|[^\w.-])")
    return pattern.sub(lambda m: paths[m.group(1)], value)
