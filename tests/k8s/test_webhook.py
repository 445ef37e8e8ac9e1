"""`keyless webhook` as a real HTTPS server fed real AdmissionReviews.

Fixtures: pods from the Kubernetes docs (a Deployment's template, a Job), an Istio-injected
pod, a Dapr pod, a pod with init containers and env of its own, a transparent-mode pod, and
the repo's deploy/kubernetes examples. Each answer's JSON Patch is applied with `jsonpatch`,
the result validated strictly by kubernetes-validate (1.30 and the newest schema) and checked
for every promise: native sidecar, probes, preStop, security context, CA distribution, the
app's environment. Then the pitfalls: "false", a second admission, Jobs, excluded namespaces,
skip lists, bad input (each answered allowed and unpatched, with a log line).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from proxy import __version__
from proxy.cli import build_parser
from proxy.config import FLAGS
from tests.deploy.test_manifests import env_map, validate_schema
from tests.k8s.support import (
    API_SERVER,
    REPO,
    WEBHOOK_NAMESPACE,
    Webhook,
    apply,
    as_pod,
    fixture_pods,
    patch_of,
    review,
)

PODS = fixture_pods()
INJECTED = ["deployment-nginx", "job-pi", "istio-injected", "dapr-annotated", "init-and-env",
            "transparent"]
CA_DIR = "/var/run/keyless-ca"
CONFDIR = "/var/run/keyless"
MESH = {"istio-init", "istio-proxy", "daprd"}
SECRET_VALUE = "AccountKey=c2VjcmV0LWtleS1uZXZlci1sb2dnZWQ="


@pytest.fixture(scope="module")
def webhook(tmp_path_factory) -> Iterator[Webhook]:
    running = Webhook(tmp_path_factory.mktemp("webhook")).start()
    yield running
    running.stop()


def mutated(webhook: Webhook, pod: dict[str, Any], **kwargs: Any) -> tuple[dict, dict]:
    admission = review(pod, **kwargs)
    answer = webhook.mutate(admission)
    return admission, answer


def log_line(webhook: Webhook, uid: str) -> str:
    lines = [line for line in webhook.log().splitlines() if f"uid={uid}" in line]
    assert len(lines) == 1, f"expected one log line for {uid}:\n{webhook.log()}"
    return lines[0]


def by_name(containers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in containers}


def check_injected(original: dict[str, Any], pod: dict[str, Any]) -> None:
    """Every promise of the injection, on the patched pod."""
    validate_schema(pod, "injected pod")
    spec, before = pod["spec"], original["spec"]
    annotations = original["metadata"].get("annotations") or {}
    transparent = annotations.get("keyless.io/mode") == "transparent"
    init = spec["initContainers"]
    names = [c["name"] for c in init]
    ours = ["keyless-init", *(["keyless-iptables"] if transparent else []), "keyless"]
    # ours first (keyless ready before the app's own init steps), then the pod's, in order
    assert names == ours + [c["name"] for c in before.get("initContainers", [])], names
    keyless = by_name(init)["keyless"]
    # native sidecar: an init container with restartPolicy Always, never a regular container
    assert keyless["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == [c["name"] for c in before["containers"]]
    assert spec.get("restartPolicy") == before.get("restartPolicy")
    assert all(c.get("restartPolicy") is None for c in init if c["name"] != "keyless"
               and c["name"] in ours)
    # probes on the admin port, preStop, resources
    assert keyless["ports"] == [{"name": "keyless-admin", "containerPort": 9180,
                                 "protocol": "TCP"}]
    assert keyless["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "keyless-admin"}
    assert keyless["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "keyless-admin"}
    assert keyless["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "keyless-admin"}
    assert keyless["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert keyless["resources"]["requests"]["memory"] and \
        keyless["resources"]["limits"]["memory"]
    kenv = env_map(keyless)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    assert 0 < float(kenv["KEYLESS_DRAIN_TIMEOUT"]) < grace
    assert kenv["KEYLESS_LISTEN"] == "127.0.0.1:8080"
    assert kenv["KEYLESS_ADMIN"] == "0.0.0.0:9180"
    assert (kenv.get("KEYLESS_TRANSPARENT") == "true") is transparent
    known = {f.env for f in FLAGS} | {"KEYLESS_CONFIG"}
    parser = build_parser()
    for container in init:
        if container["name"] not in ours:
            continue
        assert set(env_map(container)) <= known | set(), container["name"]
        # the command is one keyless accepts (sub-command and flags)
        assert container["command"][0] == "keyless"
        assert isinstance(parser.parse_args(container["command"][1:]), argparse.Namespace)
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        if container["name"] == "keyless-iptables":
            assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
        else:
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
            assert "add" not in sc["capabilities"]
    # the CA: created in the private in-memory confdir, public files in the shared emptyDir
    volumes = by_name(spec["volumes"])
    assert volumes["keyless-confdir"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes["keyless-ca"]
    ca_init = by_name(init)["keyless-init"]
    assert ca_init["command"][:4] == ["keyless", "init", "--ca-out", f"{CA_DIR}/keyless-ca.pem"]
    assert f"{CA_DIR}/ca-bundle.pem" in ca_init["command"]
    assert f"{CA_DIR}/truststore.p12" in ca_init["command"]
    for container in init + spec["containers"]:
        mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
        if "keyless-confdir" in mounts:
            assert container["name"] in ("keyless-init", "keyless"), \
                f"{container['name']} must not see keyless' CA key"
    assert "fsGroup" not in (spec.get("securityContext") or {})
    assert pod["metadata"]["annotations"]["keyless.io/injected"] == __version__
    # the pod's other annotations and labels are as they were
    for key, value in annotations.items():
        assert pod["metadata"]["annotations"][key] == value
    # the app containers
    skip = MESH | set(re.split(r"[,\s]+", annotations.get("keyless.io/skip-containers", "")))
    originals = by_name(before.get("initContainers", []) + before["containers"])
    after = by_name(init + spec["containers"])
    for name, old in originals.items():
        new = after[name]
        if name in skip:
            assert new == old, f"{name} is skipped: it must be untouched"
            continue
        # nothing but env and mounts changed; every old env entry is still there, in place
        assert {k: v for k, v in new.items() if k not in ("env", "volumeMounts")} == \
            {k: v for k, v in old.items() if k not in ("env", "volumeMounts")}
        old_env = old.get("env", [])
        assert [e["name"] for e in new["env"][:len(old_env)]] == [e["name"] for e in old_env]
        for entry, was in zip(new["env"], old_env, strict=False):
            if "valueFrom" in was:
                assert entry == was, f"{name}: {was['name']} from valueFrom must be untouched"
        assert old.get("volumeMounts", []) == new["volumeMounts"][:len(old.get("volumeMounts",
                                                                                []))]
        ca_mount = by_name(new["volumeMounts"])["keyless-ca"]
        assert ca_mount == {"name": "keyless-ca", "mountPath": CA_DIR, "readOnly": True}
        env = env_map(new)
        old_values = env_map(old)
        if transparent:
            assert not {"HTTPS_PROXY", "https_proxy", "NO_PROXY"} & set(env), name
            assert "-Dhttps.proxyHost" not in env["JAVA_TOOL_OPTIONS"]
        else:
            assert env["HTTPS_PROXY"] == "http://127.0.0.1:8080"
            if "valueFrom" not in next((e for e in old_env if e["name"] == "https_proxy"), {}):
                assert env["https_proxy"] == "http://127.0.0.1:8080"
            for no_proxy in (env["NO_PROXY"], env["no_proxy"]):
                entries = no_proxy.split(",")
                assert {".svc", ".cluster.local", "127.0.0.1", "localhost", "::1",
                        API_SERVER} <= set(entries), no_proxy
            java = env["JAVA_TOOL_OPTIONS"].split()
            assert {"-Dhttps.proxyHost=127.0.0.1", "-Dhttps.proxyPort=8080"} <= set(java)
            assert any(o.startswith("-Dhttp.nonProxyHosts=") and "*.svc" in o for o in java)
        java = env["JAVA_TOOL_OPTIONS"].split()
        assert f"-Djavax.net.ssl.trustStore={CA_DIR}/truststore.p12" in java
        assert "-Djavax.net.ssl.trustStoreType=PKCS12" in java
        for var, file in (("SSL_CERT_FILE", "ca-bundle.pem"), ("REQUESTS_CA_BUNDLE",
                                                              "ca-bundle.pem"),
                          ("NODE_EXTRA_CA_CERTS", "keyless-ca.pem")):
            assert env[var] == old_values.get(var) or env[var] == f"{CA_DIR}/{file}", var


@pytest.mark.parametrize("name", INJECTED)
def test_fixture_pods_are_injected_valid_and_complete(webhook, name):
    pod = PODS[name]
    admission, answer = mutated(webhook, pod)
    patched = apply(pod, answer)
    check_injected(pod, patched)
    line = log_line(webhook, admission["request"]["uid"])
    assert "decision=inject" in line and pod["metadata"].get("namespace", "") in line


def test_a_job_still_finishes_keyless_is_a_native_sidecar(webhook):
    pod = PODS["job-pi"]
    _, answer = mutated(webhook, pod)
    patched = apply(pod, answer)
    assert patched["spec"]["restartPolicy"] == "Never"
    # the Job completes when its only regular container exits: keyless is not one of them
    assert [c["name"] for c in patched["spec"]["containers"]] == ["pi"]
    sidecars = [c for c in patched["spec"]["initContainers"] if c.get("restartPolicy")]
    assert [(c["name"], c["restartPolicy"]) for c in sidecars] == [("keyless", "Always")]


@pytest.mark.parametrize("value", ["false", "False", "no", "0", "", "off", "maybe", "truee"])
def test_anything_but_an_explicit_yes_means_no(webhook, value):
    pod = copy.deepcopy(PODS["opted-out"])
    pod["metadata"]["annotations"]["keyless.io/inject"] = value
    admission, answer = mutated(webhook, pod)
    assert patch_of(answer) is None
    assert "decision=skip reason=not requested" in log_line(webhook, admission["request"]["uid"])


@pytest.mark.parametrize("value", ["true", "TRUE", " yes ", "On", "1"])
def test_an_explicit_yes_injects(webhook, value):
    pod = copy.deepcopy(PODS["opted-out"])
    pod["metadata"]["annotations"]["keyless.io/inject"] = value
    _, answer = mutated(webhook, pod)
    check_injected(pod, apply(pod, answer))


def test_the_label_alone_injects_the_annotation_alone_too_neither_does_not(webhook):
    label_only = PODS["job-pi"]
    assert "keyless.io/inject" not in (label_only["metadata"].get("annotations") or {})
    assert patch_of(mutated(webhook, label_only)[1]) is not None
    annotation_only = PODS["transparent"]
    assert "keyless.io/inject" not in (annotation_only["metadata"].get("labels") or {})
    assert patch_of(mutated(webhook, annotation_only)[1]) is not None
    neither = copy.deepcopy(label_only)
    del neither["metadata"]["labels"]["keyless.io/inject"]
    assert patch_of(mutated(webhook, neither)[1]) is None


@pytest.mark.parametrize("name", INJECTED)
def test_a_second_admission_changes_nothing(webhook, name):
    pod = PODS[name]
    once = apply(pod, mutated(webhook, pod)[1])
    admission, again = mutated(webhook, once)
    assert patch_of(again) is None
    assert "reason=already injected" in log_line(webhook, admission["request"]["uid"])


@pytest.mark.parametrize("namespace", ["kube-system", WEBHOOK_NAMESPACE])
def test_kube_system_and_the_webhooks_own_namespace_are_never_touched(webhook, namespace):
    pod = copy.deepcopy(PODS["deployment-nginx"])
    pod["metadata"]["namespace"] = namespace
    admission, answer = mutated(webhook, pod, namespace=namespace)
    assert patch_of(answer) is None
    assert f"namespace {namespace} is excluded" in log_line(webhook, admission["request"]["uid"])


def test_skipped_and_mesh_containers_are_left_alone(webhook):
    for name, untouched in (("init-and-env", {"metrics-exporter"}),
                            ("istio-injected", {"istio-init", "istio-proxy"}),
                            ("dapr-annotated", {"daprd"})):
        pod = PODS[name]
        patched = apply(pod, mutated(webhook, pod)[1])
        before = by_name(pod["spec"].get("initContainers", []) + pod["spec"]["containers"])
        after = by_name(patched["spec"]["initContainers"] + patched["spec"]["containers"])
        for container in untouched:
            assert after[container] == before[container], container
        others = set(before) - untouched
        assert others and all("HTTPS_PROXY" in env_map(after[c]) for c in others), name


def test_skip_every_container_means_no_injection(webhook):
    pod = copy.deepcopy(PODS["deployment-nginx"])
    pod["metadata"]["annotations"]["keyless.io/skip-containers"] = "nginx"
    admission, answer = mutated(webhook, pod)
    assert patch_of(answer) is None
    assert "every container is skipped" in log_line(webhook, admission["request"]["uid"])


def test_the_apps_own_environment_is_extended_not_replaced(webhook):
    pod = PODS["init-and-env"]
    admission, answer = mutated(webhook, pod)
    patched = apply(pod, answer)
    api = by_name(patched["spec"]["containers"])["api"]
    env = env_map(api)
    assert env["NO_PROXY"].startswith("internal.example.com,10.0.0.0/8,localhost,")
    assert env["JAVA_TOOL_OPTIONS"].startswith("-Xmx512m -XX:+UseG1GC -Djavax.net.ssl.")
    assert env["SSL_CERT_FILE"] == "/etc/orders/ca.pem"  # the app's choice is kept...
    assert env["REQUESTS_CA_BUNDLE"] == f"{CA_DIR}/ca-bundle.pem"
    # ...and said, with the valueFrom proxy it cannot change, to kubectl and in the log
    warnings = answer["response"]["warnings"]
    assert any("api: kept its own SSL_CERT_FILE" in w for w in warnings), warnings
    assert any("api: https_proxy comes from valueFrom" in w for w in warnings), warnings
    assert "kept its own SSL_CERT_FILE" in log_line(webhook, admission["request"]["uid"])
    assert api["envFrom"] == pod["spec"]["containers"][1 - 1]["envFrom"]
    # the init container that runs after keyless goes through it too
    migrate = by_name(patched["spec"]["initContainers"])["migrate"]
    assert env_map(migrate)["HTTPS_PROXY"] == "http://127.0.0.1:8080"
    assert env_map(migrate)["DB_HOST"] == "orders-db.shop.svc.cluster.local"
    # options from annotations: ready scopes, the catalog ConfigMap (mounted, passed as config)
    keyless = by_name(patched["spec"]["initContainers"])["keyless"]
    kenv = env_map(keyless)
    assert kenv["KEYLESS_READY_SCOPES"] == "https://storage.azure.com/.default"
    assert kenv["KEYLESS_CONFIG"] == "/etc/keyless-catalog/keyless.toml"
    assert {"name": "keyless-catalog", "mountPath": "/etc/keyless-catalog",
            "readOnly": True} in keyless["volumeMounts"]
    volume = by_name(patched["spec"]["volumes"])["keyless-catalog"]
    assert volume["configMap"]["name"] == "orders-keyless-routes"
    assert float(kenv["KEYLESS_DRAIN_TIMEOUT"]) == 30  # the pod's 90 s grace leaves room


def test_an_apps_own_java_truststore_is_kept_the_proxy_added(webhook):
    pod = copy.deepcopy(PODS["deployment-nginx"])
    own = "-Djavax.net.ssl.trustStore=/etc/app/trust.jks -Djavax.net.ssl.trustStorePassword=x"
    pod["spec"]["containers"][0]["env"] = [{"name": "JAVA_TOOL_OPTIONS", "value": own}]
    _, answer = mutated(webhook, pod)
    java = env_map(apply(pod, answer)["spec"]["containers"][0])["JAVA_TOOL_OPTIONS"]
    assert java.startswith(own + " -Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort=8080 ")
    assert java.count("-Djavax.net.ssl.trustStore=") == 1
    assert any("kept its own javax.net.ssl.trustStore" in w
               for w in answer["response"]["warnings"])


def test_a_mount_at_keyless_ca_path_leaves_the_pod_alone(webhook):
    pod = copy.deepcopy(PODS["deployment-nginx"])
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "x",
                                                     "mountPath": "/var/run/keyless-ca/"}]
    pod["spec"]["volumes"] = [{"name": "x", "emptyDir": {}}]
    admission, answer = mutated(webhook, pod)
    assert patch_of(answer) is None
    assert "already mounts something at /var/run/keyless-ca" in log_line(
        webhook, admission["request"]["uid"])


def test_resources_and_image_from_annotations(webhook):
    pod = PODS["dapr-annotated"]
    keyless = by_name(apply(pod, mutated(webhook, pod)[1])["spec"]["initContainers"])["keyless"]
    assert keyless["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                    "limits": {"memory": "300Mi"}}
    pod = PODS["transparent"]
    init = apply(pod, mutated(webhook, pod)[1])["spec"]["initContainers"]
    assert {c["image"] for c in init} == {"registry.example.com/keyless:0.9.0"}


def test_transparent_mode_adds_the_iptables_step_and_no_proxy_variables(webhook):
    pod = PODS["transparent"]
    patched = apply(pod, mutated(webhook, pod)[1])
    iptables = by_name(patched["spec"]["initContainers"])["keyless-iptables"]
    assert iptables["command"] == ["keyless", "iptables", "--apply", "--uid", "10001",
                                   "--listen", "127.0.0.1:8080"]
    assert "restartPolicy" not in iptables  # a step, done before keyless and the app start
    app = env_map(patched["spec"]["containers"][0])
    assert "HTTPS_PROXY" not in app and app["SSL_CERT_FILE"] == f"{CA_DIR}/ca-bundle.pem"


@pytest.mark.parametrize("annotation, value, reason", [
    ("keyless.io/mode", "sidecar", "mode must be forward or transparent"),
    ("keyless.io/cpu-request", "lots", "cpu-request is not a resource quantity"),
    ("keyless.io/skip-containers", "Bad_Name", "skip-containers"),
    ("keyless.io/catalog-configmap", "no/slashes", "catalog-configmap"),
    ("keyless.io/injectt", "true", "unknown annotation keyless.io/injectt"),
])
def test_a_bad_option_leaves_the_pod_alone_with_the_reason(webhook, annotation, value, reason):
    pod = copy.deepcopy(PODS["deployment-nginx"])
    pod["metadata"]["annotations"][annotation] = value
    admission, answer = mutated(webhook, pod)
    assert patch_of(answer) is None
    line = log_line(webhook, admission["request"]["uid"])
    assert "decision=skip reason=invalid option" in line and reason in line


def test_windows_pods_are_left_alone(webhook):
    pod = copy.deepcopy(PODS["deployment-nginx"])
    pod["spec"]["os"] = {"name": "windows"}
    admission, answer = mutated(webhook, pod)
    assert patch_of(answer) is None
    assert "not a Linux pod" in log_line(webhook, admission["request"]["uid"])


def test_host_network_and_uid_clashes_are_refused(webhook):
    pod = copy.deepcopy(PODS["deployment-nginx"])
    pod["spec"]["hostNetwork"] = True
    admission, answer = mutated(webhook, pod)
    assert patch_of(answer) is None and "hostNetwork" in log_line(
        webhook, admission["request"]["uid"])
    pod = copy.deepcopy(PODS["transparent"])
    pod["spec"]["containers"][0]["securityContext"]["runAsUser"] = 10001
    admission, answer = mutated(webhook, pod)
    assert patch_of(answer) is None and "keyless' UID" in log_line(
        webhook, admission["request"]["uid"])


# -- the repo's own examples --------------------------------------------------------------------


def example(path: str) -> dict[str, Any]:
    (workload,) = [o for o in yaml.safe_load_all((REPO / path).read_text())
                   if o and o["kind"] in ("Deployment", "Job")]
    return workload


def without_keyless(workload: dict[str, Any]) -> dict[str, Any]:
    """The example as the legacy app was before anyone added keyless by hand."""
    pod = as_pod(workload)
    spec = pod["spec"]
    del spec["initContainers"]
    spec["volumes"] = [v for v in spec["volumes"] if not v["name"].startswith("keyless")
                       and v["name"] != "tmp"]
    for app in spec["containers"]:
        app["env"] = [e for e in app["env"] if e["name"] == "AZURE_STORAGE_CONNECTION_STRING"]
        app["volumeMounts"] = [m for m in app["volumeMounts"] if m["name"] != "keyless-ca"]
        if not app["volumeMounts"]:
            del app["volumeMounts"]
    if not spec["volumes"]:
        del spec["volumes"]
    pod["metadata"].setdefault("annotations", {})["keyless.io/inject"] = "true"
    return pod


@pytest.mark.parametrize("path", ["deploy/kubernetes/sidecar/deployment.yaml",
                                  "deploy/kubernetes/job/job.yaml"])
def test_the_repos_examples_hand_wired_are_left_alone_bare_get_what_they_wire(webhook, path):
    workload = example(path)
    hand_wired = as_pod(workload)
    hand_wired["metadata"]["annotations"]["keyless.io/inject"] = "true"
    admission, answer = mutated(webhook, hand_wired)
    assert patch_of(answer) is None
    assert "already has a keyless container" in log_line(webhook, admission["request"]["uid"])

    bare = without_keyless(workload)
    patched = apply(bare, mutated(webhook, bare)[1])
    check_injected(bare, patched)
    # the injected sidecar does what the hand-written one does
    ours = by_name(patched["spec"]["initContainers"])["keyless"]
    theirs = by_name(workload["spec"]["template"]["spec"]["initContainers"])["keyless"]
    for key in ("restartPolicy", "ports", "securityContext"):
        assert ours[key] == theirs[key], key
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ours[probe]["httpGet"] == theirs[probe]["httpGet"], probe
    assert ours["resources"] == theirs["resources"]
    hand_app = env_map(workload["spec"]["template"]["spec"]["containers"][0])
    injected_app = env_map(patched["spec"]["containers"][0])
    assert set(hand_app) <= set(injected_app), set(hand_app) - set(injected_app)
    for var in ("HTTPS_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert injected_app[var] == hand_app[var], var


# -- bad input ---------------------------------------------------------------------------------


def test_health_endpoints_and_unknown_paths(webhook):
    assert webhook.request("GET", "/healthz")[0] == 200
    assert webhook.request("GET", "/readyz")[0] == 200
    assert webhook.request("GET", "/mutate")[0] == 404
    assert webhook.request("POST", "/validate", b"{}")[0] == 404


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe\x00", "not JSON"),
    (b"[]", "no request.uid"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
     "no request.uid"),
])
def test_a_body_that_is_no_review_gets_400_and_a_log_line(webhook, body, message):
    before = webhook.log().count("decision=error")
    status, answer = webhook.request("POST", "/mutate", body)
    assert status == 400 and message in json.loads(answer)["error"]
    assert webhook.log().count("decision=error") == before + 1


@pytest.mark.parametrize("change, reason", [
    (lambda r: r["request"].update(kind={"group": "apps", "version": "v1",
                                         "kind": "Deployment"}), "not a v1 Pod: Deployment"),
    (lambda r: r["request"].update(operation="UPDATE"), "operation UPDATE, not CREATE"),
    (lambda r: r["request"].update(object={"spec": {"containers": "nope"}}),
     "not a pod with containers"),
    (lambda r: r["request"].update(object=None), "not a pod with containers"),
    (lambda r: r["request"]["object"]["spec"].update(initContainers=[7]),
     "unexpected pod shape"),
    (lambda r: r.update(apiVersion="admission.k8s.io/v1beta1"), "expected admission.k8s.io/v1"),
])
def test_a_malformed_or_foreign_review_is_allowed_unpatched_and_logged(webhook, change, reason):
    admission = review(copy.deepcopy(PODS["deployment-nginx"]))
    change(admission)
    answer = webhook.mutate(admission)
    assert patch_of(answer) is None
    assert reason in log_line(webhook, admission["request"]["uid"])


def test_a_huge_object_is_allowed_unpatched_and_logged(webhook):
    pod = copy.deepcopy(PODS["deployment-nginx"])
    pod["metadata"]["annotations"]["filler"] = "x" * (9 * 1024 * 1024)
    admission = review(pod)
    answer = webhook.mutate(admission)
    assert patch_of(answer) is None
    assert "exceeds" in log_line(webhook, admission["request"]["uid"])
    # the server still serves
    assert patch_of(mutated(webhook, PODS["deployment-nginx"])[1]) is not None


def test_no_env_value_reaches_the_log(webhook):
    pod = copy.deepcopy(PODS["deployment-nginx"])
    pod["spec"]["containers"][0]["env"] = [
        {"name": "AZURE_STORAGE_CONNECTION_STRING", "value": SECRET_VALUE},
        {"name": "SSL_CERT_FILE", "value": "/secret/path/" + SECRET_VALUE}]
    admission, answer = mutated(webhook, pod)
    assert patch_of(answer) is not None
    assert log_line(webhook, admission["request"]["uid"])
    assert "c2VjcmV0" not in webhook.log()
    assert all("c2VjcmV0" not in w for w in answer["response"].get("warnings", []))


def test_the_readmes_example_workload_is_injected_as_documented(webhook):
    readme = (REPO / "deploy" / "kubernetes" / "injector" / "README.md").read_text()
    found = re.search(r"```yaml\n(spec:\n  template:\n.*?)```", readme, re.S)
    assert found, "deploy/kubernetes/injector/README.md: the example workload is missing"
    workload = {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "legacy-app", "namespace": "shop"},
                **yaml.safe_load(found.group(1))}
    pod = as_pod(workload)
    patched = apply(pod, mutated(webhook, pod)[1])
    check_injected(pod, patched)
    keyless = by_name(patched["spec"]["initContainers"])["keyless"]
    assert env_map(keyless)["KEYLESS_READY_SCOPES"] == "https://storage.azure.com/.default"
    # the containers the Workload Identity annotation keeps the token from exist
    skipped = pod["metadata"]["annotations"]["azure.workload.identity/skip-containers"]
    names = {c["name"] for c in patched["spec"]["initContainers"] + patched["spec"]["containers"]}
    assert set(skipped.split(";")) <= names
