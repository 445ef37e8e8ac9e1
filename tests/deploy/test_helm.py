"""The Helm chart deploy/helm/keyless: lint, render, validate, and the security-relevant fields.

- `helm` is built once from the Go module proxy (helm.sh/helm/v3/cmd/helm@HELM_VERSION) into a
  cache directory; .ci/run prefetches it. No cluster runs here.
- Each scenario (default values, cert-manager, transparent mode, custom image and resources)
  is rendered with `helm template` and every object validated strictly with kubernetes-validate
  for the oldest and the newest Kubernetes version test_manifests.py uses. cert-manager's kinds
  are CRDs without a built-in schema: their shape is checked here, minimally.
- The self-generated certificate: the caBundle is the CA that signed the serving certificate
  in the Secret of the same render, and the certificate names the Service's DNS names.
- `lookup` (certificate reuse and renewal on upgrade) needs an API server: a small fake one on
  loopback answers Helm's discovery and the Secret GET, so `helm template --dry-run=server`
  takes the upgrade branches for real.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.deploy.test_manifests import REPO, VERSIONS, validate_schema

CHART = REPO / "deploy" / "helm" / "keyless"
HELM_VERSION = "v3.22.0"
HELM_MODULE = "helm.sh/helm/v3/cmd/helm"
BUILD_TIMEOUT = 900  # a cold build (modules downloaded and compiled) took ~1.5 min on 2 cores
RELEASE, NAMESPACE = "rel", "keyless-system"
SERVICE = f"{RELEASE}-keyless-webhook"
SECRET = f"{SERVICE}-tls"
CERT_MANAGER_KINDS = {"Issuer", "Certificate"}
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "cert-manager": {"certManager": {"enabled": True}},
    "transparent": {"injection": {"mode": "transparent"}},
    "custom-image-resources": {
        "image": {"repository": "registry.example.com/keyless", "tag": "1.2.3"},
        "webhook": {"resources": {"requests": {"cpu": "200m", "memory": "96Mi"},
                                  "limits": {"memory": "192Mi"}}},
        "injection": {"resources": {"requests": {"cpu": "150m", "memory": "80Mi"},
                                    "limits": {"cpu": "1", "memory": "300Mi"}},
                      "catalogConfigMap": "extra-routes",
                      "skipContainers": ["istio-proxy", "vault-agent"],
                      "readyScopes": ["https://storage.azure.com/.default"],
                      "excludeNamespaces": ["legacy-batch"],
                      "noProxy": ["10.0.0.0/8", ".svc.cluster.local"],
                      "drainTimeout": 20},
    },
}


# -- helm, built once ---------------------------------------------------------------------------


def helm_cache() -> Path:
    return Path(os.environ.get("KEYLESS_HELM_CACHE")
                or Path(tempfile.gettempdir()) / "keyless-helm") / HELM_VERSION


@pytest.fixture(scope="session")
def helm() -> Path:
    binary = helm_cache() / "helm"
    if binary.is_file():
        return binary
    go = shutil.which("go")
    if go is None:
        pytest.fail("`go` is missing, so helm cannot be built: install Go 1.26 (/usr/local/go) "
                    "and put it on PATH, or put helm " + HELM_VERSION + f" at {binary}")
    partial = helm_cache() / f".build-{os.getpid()}"
    partial.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOBIN": str(partial), "CGO_ENABLED": "0"}
    try:
        done = subprocess.run([go, "install", f"{HELM_MODULE}@{HELM_VERSION}"], env=env,
                              cwd=partial, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`go install {HELM_MODULE}@{HELM_VERSION}` took over {BUILD_TIMEOUT} s")
    if done.returncode != 0:
        pytest.fail(f"`go install {HELM_MODULE}@{HELM_VERSION}` failed (exit {done.returncode}); "
                    "the Go module proxy must be reachable once (.ci/run prefetches it):\n"
                    + done.stderr[-4000:])
    (partial / "helm").replace(binary)  # atomic: a concurrent run never sees half a binary
    shutil.rmtree(partial, ignore_errors=True)
    return binary


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="keyless-helm-home-") as home:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home,
               "HELM_CACHE_HOME": f"{home}/cache", "HELM_CONFIG_HOME": f"{home}/config",
               "HELM_DATA_HOME": f"{home}/data", "KUBECONFIG": f"{home}/none"}
        done = subprocess.run([str(helm), *args], env=env, capture_output=True, text=True,
                              timeout=120)
    if check:
        assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def kube_semver(version: str) -> str:
    """kubernetes-validate's "1.30" or "1.37.0" as Helm's --kube-version wants it."""
    major, minor = version.split(".")[:2]
    return f"{major}.{minor}.0"


def render(helm: Path, values: dict[str, Any], *, kube_version: str = VERSIONS[0],
           extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="values-") as file:
        yaml.safe_dump(values, file)
        file.flush()
        done = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                        "--kube-version", kube_semver(kube_version), "-f", file.name, *extra)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


@pytest.fixture(scope="module")
def rendered(helm: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: render(helm, values) for name, values in SCENARIOS.items()}


# -- lint and schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(helm: Path, scenario: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(SCENARIOS[scenario], file)
        file.flush()
        done = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                        "-f", file.name, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_valid(helm: Path, scenario: str) -> None:
    for version in VERSIONS:
        objects = render(helm, SCENARIOS[scenario], kube_version=version)
        kinds = sorted(o["kind"] for o in objects)
        expected = {"ServiceAccount", "ConfigMap", "Deployment", "Service",
                    "PodDisruptionBudget", "MutatingWebhookConfiguration"}
        assert expected <= set(kinds), kinds
        for obj in objects:
            if obj["kind"] in CERT_MANAGER_KINDS:
                with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                    kubernetes_validate.validate(obj, version, strict=True)
                check_cert_manager_shape(obj)
                continue
            assert obj["apiVersion"] != "cert-manager.io/v1", obj
            validate_schema(obj, f"helm template ({scenario}, {version})")
            if obj["kind"] not in ("MutatingWebhookConfiguration",):
                assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]


def check_cert_manager_shape(obj: dict[str, Any]) -> None:
    """cert-manager.io/v1 Issuer and Certificate: the fields this chart uses, typed."""
    assert obj["apiVersion"] == "cert-manager.io/v1"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, set(obj)
    assert obj["metadata"]["namespace"] == NAMESPACE
    spec = obj["spec"]
    if obj["kind"] == "Issuer":
        assert len(spec) == 1 and (spec == {"selfSigned": {}} or
                                   set(spec["ca"]) == {"secretName"}), spec
        return
    allowed = {"secretName", "dnsNames", "duration", "renewBefore", "usages", "privateKey",
               "issuerRef", "isCA", "commonName"}
    assert set(spec) <= allowed, set(spec) - allowed
    assert isinstance(spec["secretName"], str) and spec["secretName"]
    assert set(spec["issuerRef"]) == {"kind", "name"} and spec["issuerRef"]["kind"] == "Issuer"
    for field in ("duration", "renewBefore"):
        if field in spec:
            assert re.fullmatch(r"(\d+h)?(\d+m)?(\d+s)?", spec[field]), spec[field]
    assert spec["privateKey"]["algorithm"] in ("RSA", "ECDSA", "Ed25519")
    assert spec.get("isCA", False) or spec["dnsNames"], spec


# -- the MutatingWebhookConfiguration -----------------------------------------------------------


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector, evaluated as the API server does."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get(
            "values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def namespace_labels(name: str, **extra: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name, **extra}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_webhook_policies_and_selectors_are_the_contracts(rendered: dict, scenario: str) -> None:
    config = one(rendered[scenario], "MutatingWebhookConfiguration")
    (webhook,) = config["webhooks"]
    assert webhook["failurePolicy"] == "Ignore"
    assert webhook["sideEffects"] == "None"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["timeoutSeconds"] == 5
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""],
                                 "apiVersions": ["v1"], "resources": ["pods"],
                                 "scope": "Namespaced"}]
    assert webhook["clientConfig"]["service"] == {"name": SERVICE, "namespace": NAMESPACE,
                                                  "path": "/mutate", "port": 443}
    assert webhook["objectSelector"] == {"matchExpressions": [
        {"key": "keyless.io/inject", "operator": "In", "values": ["true"]}]}
    # which pods and namespaces the API server sends to the webhook
    pods = webhook["objectSelector"]
    assert selector_matches(pods, {"keyless.io/inject": "true", "app": "x"})
    assert not selector_matches(pods, {"keyless.io/inject": "false"})
    assert not selector_matches(pods, {"app": "x"})
    namespaces = webhook["namespaceSelector"]
    assert selector_matches(namespaces, namespace_labels("apps"))
    assert selector_matches(namespaces, namespace_labels("apps", **{
        "keyless.io/injection": "enabled"}))
    assert not selector_matches(namespaces, namespace_labels("kube-system"))
    assert not selector_matches(namespaces, namespace_labels(NAMESPACE))
    assert not selector_matches(namespaces, namespace_labels("apps", **{
        "keyless.io/injection": "disabled"}))
    if scenario == "custom-image-resources":
        assert not selector_matches(namespaces, namespace_labels("legacy-batch"))


def certificate_chain(objects: list[dict[str, Any]]) -> tuple[list[x509.Certificate],
                                                              x509.Certificate, bytes]:
    """(the CAs of the webhook's caBundle, the Secret's serving certificate, its key PEM)."""
    config = one(objects, "MutatingWebhookConfiguration")
    bundle = base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"])
    secret = one(objects, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["name"] == SECRET
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(data) == {"ca.crt", "tls.crt", "tls.key"}
    assert x509.load_pem_x509_certificates(data["ca.crt"])[0] == \
        x509.load_pem_x509_certificates(bundle)[0], "caBundle[0] is the Secret's CA"
    return (x509.load_pem_x509_certificates(bundle),
            x509.load_pem_x509_certificate(data["tls.crt"]), data["tls.key"])


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                       cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes,
                       ec.ECDSA(cert.signature_hash_algorithm))
        else:
            return False
    except Exception:
        return False
    return cert.issuer == ca.subject


def check_serving_certificate(objects: list[dict[str, Any]]) -> tuple[list[x509.Certificate],
                                                                      x509.Certificate]:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cas, cert, key_pem = certificate_chain(objects)
    assert signed_by(cert, cas[0]), "the caBundle's CA did not sign the serving certificate"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    assert f"{SERVICE}.{NAMESPACE}.svc" in dns, dns  # what the API server dials
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    assert cas[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    key = load_pem_private_key(key_pem, password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers(), \
        "tls.key is not the serving certificate's key"
    return cas, cert


def test_self_generated_ca_bundle_signed_the_serving_certificate(rendered: dict) -> None:
    cas, cert = check_serving_certificate(rendered["default"])
    assert len(cas) == 1, "a fresh install trusts one CA"
    secret = one(rendered["default"], "Secret")
    # the upgrade's renewal check reads this annotation: it is the certificate's expiry
    stored = int(secret["metadata"]["annotations"]["keyless.io/cert-not-after"])
    assert abs(stored - cert.not_valid_after_utc.timestamp()) < 120, \
        (stored, cert.not_valid_after_utc)
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == yaml.safe_load((CHART / "values.yaml").read_text())["certs"]["validityDays"]
    # the Deployment mounts this Secret as a directory (a renewed Secret reaches the files)
    deployment = one(rendered["default"], "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == SECRET
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    tls_mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert "subPath" not in tls_mount and tls_mount["readOnly"] is True


def test_two_renders_make_two_consistent_pairs(helm: Path) -> None:
    """Without a cluster `lookup` is empty, so each render generates: each render's caBundle
    still belongs to its own Secret (the Secret and the webhook config share one template)."""
    first, second = render(helm, {}), render(helm, {})
    _, cert_one = check_serving_certificate(first)
    cas_two, cert_two = check_serving_certificate(second)
    assert cert_one != cert_two
    assert not signed_by(cert_one, cas_two[0]), "two renders must not share a CA by accident"


def test_cert_manager_issues_and_injects(rendered: dict) -> None:
    objects = rendered["cert-manager"]
    assert not [o for o in objects if o["kind"] == "Secret"], "cert-manager writes the Secret"
    config = one(objects, "MutatingWebhookConfiguration")
    assert "caBundle" not in config["webhooks"][0]["clientConfig"]
    inject = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    certificates = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Certificate"}
    issuers = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Issuer"}
    namespace, _, name = inject.partition("/")
    assert namespace == NAMESPACE and name in certificates, inject
    serving = certificates[name]["spec"]
    assert serving["secretName"] == SECRET, "the Deployment mounts this Secret"
    assert f"{SERVICE}.{NAMESPACE}.svc" in serving["dnsNames"]
    assert not serving.get("isCA")
    assert "server auth" in serving["usages"]
    assert serving["privateKey"]["rotationPolicy"] == "Always"
    hours = {f: int(serving[f].removesuffix("h")) for f in ("duration", "renewBefore")}
    assert 0 < hours["renewBefore"] < hours["duration"]
    # serving <- CA issuer <- CA certificate <- self-signed issuer
    ca_issuer = issuers[serving["issuerRef"]["name"]]["spec"]
    ca_certificate = next(c["spec"] for c in certificates.values()
                          if c["spec"]["secretName"] == ca_issuer["ca"]["secretName"])
    assert ca_certificate["isCA"] is True
    assert issuers[ca_certificate["issuerRef"]["name"]]["spec"] == {"selfSigned": {}}


# -- the webhook Deployment, Service, PDB, RBAC -------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_webhook_deployment_is_hardened_and_runs_the_contracts_command(
        rendered: dict, scenario: str) -> None:
    objects = rendered[scenario]
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    template = deployment["spec"]["template"]
    spec = template["spec"]
    (container,) = spec["containers"]
    assert container["args"][0] == "webhook"
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"][1:])
    assert flags == {"listen": "0.0.0.0:8443",
                     "tls-cert": "/etc/keyless-webhook/tls/tls.crt",
                     "tls-key": "/etc/keyless-webhook/tls/tls.key",
                     "config": "/etc/keyless-webhook/config.yaml",
                     "shutdown-delay": "5", "log-level": "info"}
    # SIGTERM: /readyz fails, reviews keep being answered for the delay, then exit; the
    # kubelet must not kill it before
    assert spec["terminationGracePeriodSeconds"] > int(flags["shutdown-delay"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/keyless-webhook/tls"]["readOnly"] is True
    assert mounts["/etc/keyless-webhook/config.yaml"]["subPath"] == "config.yaml"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"https": 8443}
    for kind, path in (("startup", "/readyz"), ("readiness", "/readyz"),
                       ("liveness", "/healthz")):
        probe = container[f"{kind}Probe"]["httpGet"]
        assert probe["scheme"] == "HTTPS" and probe["path"] == path, (kind, probe)
        assert ports.get(probe["port"], probe["port"]) == 8443
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    # the kubelet writes Secret files as root: the webhook's user must still read tls.key
    tls_volume = next(v for v in spec["volumes"] if v["name"] == "tls")["secret"]
    mode = tls_volume.get("defaultMode", 0o644)
    group = spec["securityContext"].get("fsGroup")
    assert mode & 0o004 or (mode & 0o040 and group in (sc["runAsGroup"], 10001)), \
        f"UID 10001 cannot read the TLS key (mode {mode:o}, fsGroup {group})"
    assert not mode & 0o002 and not mode & 0o020, "the key must not be writable"
    assert container["resources"]["requests"]["memory"] and \
        container["resources"]["limits"]["memory"]
    spread = {c["topologyKey"] for c in spec["topologySpreadConstraints"]
              if selector_matches(c["labelSelector"], template["metadata"]["labels"])}
    assert "kubernetes.io/hostname" in spread, "replicas must spread over nodes"
    # RBAC: no API access at all
    assert spec["automountServiceAccountToken"] is False
    account = one(objects, "ServiceAccount")
    assert account["metadata"]["name"] == spec["serviceAccountName"]
    assert account["automountServiceAccountToken"] is False
    assert not {o["kind"] for o in objects} & {"Role", "RoleBinding", "ClusterRole",
                                               "ClusterRoleBinding"}
    # the PDB keeps one replica through a drain, and selects these pods
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert selector_matches(pdb["spec"]["selector"], template["metadata"]["labels"])
    # the Service the webhook configuration calls: <release>-keyless-webhook, 443 -> 8443
    service = one(objects, "Service")
    assert service["metadata"]["name"] == SERVICE
    assert service["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": 8443,
                                         "protocol": "TCP"}]
    assert selector_matches({"matchLabels": service["spec"]["selector"]},
                            template["metadata"]["labels"])


def webhook_config_file(objects: list[dict[str, Any]]) -> dict[str, Any]:
    configmap = one(objects, "ConfigMap")
    deployment = one(objects, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    return yaml.safe_load(configmap["data"]["config.yaml"])


CONFIG_KEYS = {"image", "imagePullPolicy", "resources", "readyScopes", "mode",
               "catalogConfigMap", "uid", "proxyPort", "adminPort", "excludeNamespaces",
               "skipContainers", "noProxy", "drainTimeout"}


def test_config_file_carries_the_defaults(rendered: dict) -> None:
    default = webhook_config_file(rendered["default"])
    assert set(default) <= CONFIG_KEYS, set(default) - CONFIG_KEYS
    image = one(rendered["default"], "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["image"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert default["image"] == image == f"keyless:{chart['appVersion']}"
    assert default["mode"] == "forward"
    assert (default["uid"], default["proxyPort"], default["adminPort"]) == (10001, 8080, 9180)
    assert default["excludeNamespaces"] == ["kube-system", NAMESPACE]
    assert "catalogConfigMap" not in default and "skipContainers" not in default
    assert webhook_config_file(rendered["transparent"])["mode"] == "transparent"

    custom = webhook_config_file(rendered["custom-image-resources"])
    values = SCENARIOS["custom-image-resources"]
    assert custom["image"] == "registry.example.com/keyless:1.2.3"
    assert custom["resources"] == values["injection"]["resources"]
    assert custom["catalogConfigMap"] == "extra-routes"
    assert custom["skipContainers"] == ["istio-proxy", "vault-agent"]
    assert custom["readyScopes"] == ["https://storage.azure.com/.default"]
    assert custom["excludeNamespaces"] == ["kube-system", NAMESPACE, "legacy-batch"]
    assert custom["noProxy"] == ["10.0.0.0/8", ".svc.cluster.local"]
    assert custom["drainTimeout"] == 20 and default["drainTimeout"] == 30
    assert "noProxy" not in default
    deployment = one(rendered["custom-image-resources"], "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/keyless:1.2.3"
    assert container["resources"] == values["webhook"]["resources"]
    # a change of the defaults rolls the webhook pods (the file is a subPath mount)
    checksums = {one(rendered[s], "Deployment")["spec"]["template"]["metadata"]["annotations"][
        "checksum/config"] for s in ("default", "transparent")}
    assert len(checksums) == 2


def test_digest_and_separate_sidecar_image(helm: Path) -> None:
    digest = "sha256:" + "ab" * 32
    objects = render(helm, {"image": {"repository": "r.example/keyless", "digest": digest},
                            "injection": {"image": "r.example/keyless-sidecar:9"}})
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
        f"r.example/keyless@{digest}"
    assert webhook_config_file(objects)["image"] == "r.example/keyless-sidecar:9"


@pytest.mark.parametrize(("values", "message"), [
    ({"injection": {"mode": "sidecar"}}, "value must be one of 'forward', 'transparent'"),
    ({"injection": {"readyScope": ["x"]}}, "additional properties 'readyScope' not allowed"),
    ({"webhook": {"timeoutSeconds": 60}}, "maximum"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"webhook": {"shutdownDelaySeconds": 30, "terminationGracePeriodSeconds": 30}},
     "webhook.terminationGracePeriodSeconds must exceed webhook.shutdownDelaySeconds"),
    ({"certs": {"validityDays": 10, "renewBeforeDays": 30}},
     "certs.validityDays must be greater than certs.renewBeforeDays"),
])
def test_bad_values_fail_the_render(helm: Path, values: dict, message: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(values, file)
        file.flush()
        done = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE,
                        "--kube-version", kube_semver(VERSIONS[0]), "-f", file.name, check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr


# -- upgrades: `lookup` against a fake API server -----------------------------------------------


class FakeApiServer:
    """Just enough of a Kubernetes API server for `helm template --dry-run=server`: core/v1
    discovery and GET of Secrets in one namespace (404 for any other). Loopback only."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                path = self.path.split("?")[0]
                prefix = f"/api/v1/namespaces/{NAMESPACE}/secrets/"
                if path == "/version":
                    self.answer(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
                elif path == "/api/v1":
                    self.answer(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                      "groupVersion": "v1", "resources": [
                                          {"name": "secrets", "singularName": "secret",
                                           "namespaced": True, "kind": "Secret",
                                           "verbs": ["get", "list"]}]})
                elif path.startswith(prefix) and path[len(prefix):] in server.secrets:
                    self.answer(200, server.secrets[path[len(prefix):]])
                else:
                    self.answer(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "reason": "NotFound", "code": 404})

            def answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        port = self.httpd.server_address[1]
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "fake", "user": {"token": "not-a-real-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": NAMESPACE}}]}))
        return path


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    server = FakeApiServer()
    server.thread.start()
    try:
        yield server, server.kubeconfig(tmp_path)
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=10)


def upgrade_render(helm: Path, kubeconfig: Path) -> list[dict[str, Any]]:
    return render(helm, {}, extra=("--dry-run=server", "--kubeconfig", str(kubeconfig)))


def with_expiry(secret: dict[str, Any], not_after: int) -> dict[str, Any]:
    stored = json.loads(json.dumps(secret))
    stored["metadata"]["annotations"]["keyless.io/cert-not-after"] = str(not_after)
    return stored


def test_upgrade_keeps_a_valid_certificate(helm: Path, api_server: tuple) -> None:
    server, kubeconfig = api_server
    installed = render(helm, {})
    secret = one(installed, "Secret")
    server.secrets[SECRET] = secret
    upgraded = upgrade_render(helm, kubeconfig)
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{SECRET}" in \
        [r.split("?")[0] for r in server.requests], server.requests
    assert one(upgraded, "Secret")["data"] == secret["data"], "a valid pair must not churn"
    assert one(upgraded, "Secret")["metadata"]["annotations"] == \
        secret["metadata"]["annotations"]
    cas, _ = check_serving_certificate(upgraded)
    assert len(cas) == 1
    assert one(upgraded, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"][
        "caBundle"] == one(installed, "MutatingWebhookConfiguration")["webhooks"][0][
        "clientConfig"]["caBundle"]


def test_upgrade_renews_a_certificate_near_expiry_and_trusts_both_cas(
        helm: Path, api_server: tuple) -> None:
    server, kubeconfig = api_server
    installed = render(helm, {})
    old_cas, old_cert = check_serving_certificate(installed)
    renew_before = yaml.safe_load((CHART / "values.yaml").read_text())["certs"][
        "renewBeforeDays"]
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    # one day inside the renewal window: still valid, so its CA stays trusted for the switch
    server.secrets[SECRET] = with_expiry(one(installed, "Secret"),
                                         now + (renew_before - 1) * 86400)
    upgraded = upgrade_render(helm, kubeconfig)
    cas, cert = check_serving_certificate(upgraded)
    assert cert != old_cert, "a certificate inside renewBeforeDays must be renewed"
    assert [c.subject for c in cas] == [cas[0].subject, old_cas[0].subject]
    assert cas[1] == old_cas[0], "the old CA stays in the bundle until the pods reload"
    assert signed_by(old_cert, cas[1])
    # one day outside the window: kept
    server.secrets[SECRET] = with_expiry(one(installed, "Secret"),
                                         now + (renew_before + 1) * 86400)
    assert one(upgrade_render(helm, kubeconfig), "Secret")["data"] == \
        one(installed, "Secret")["data"]


def test_upgrade_renews_an_expired_or_foreign_certificate(helm: Path, api_server: tuple) -> None:
    server, kubeconfig = api_server
    installed = render(helm, {})
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    # expired: renewed, and the dead CA is not kept in the bundle
    server.secrets[SECRET] = with_expiry(one(installed, "Secret"), now - 60)
    cas, cert = check_serving_certificate(upgrade_render(helm, kubeconfig))
    assert len(cas) == 1 and cert != certificate_chain(installed)[1]
    # made for other DNS names (say, by hand): renewed
    foreign = json.loads(json.dumps(one(installed, "Secret")))
    foreign["metadata"]["annotations"]["keyless.io/cert-for"] = "other.example"
    server.secrets[SECRET] = foreign
    _, cert = check_serving_certificate(upgrade_render(helm, kubeconfig))
    assert cert != certificate_chain(installed)[1]


def test_ci_prefetches_this_helm_version() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert f"HELM_VERSION={HELM_VERSION}\n" in ci, ".ci/run builds another helm than the tests"
    assert f'"{HELM_MODULE}@$HELM_VERSION"' in ci
