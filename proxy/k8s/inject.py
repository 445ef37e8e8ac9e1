"""What to inject into a pod, as a JSON Patch (RFC 6902). Pure: no I/O, no clock.

The injected pod matches deploy/kubernetes/sidecar/deployment.yaml: `keyless-init` writes the
CA into keyless' private confdir and the public certificate, a bundle (system CAs + keyless'
CA) and a Java truststore into the shared `keyless-ca` emptyDir; `keyless` runs as a native
sidecar (an init container with restartPolicy: Always), so the app starts after its startup
probe passes and Jobs still finish; each app container gets the proxy and trust variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy import __version__
from proxy.k8s.annotations import (
    INJECTED,
    AnnotationError,
    PodOptions,
    pod_options,
    wants_injection,
)
from proxy.k8s.defaults import Defaults

JsonPatchOp = dict[str, Any]

CONFDIR = "/var/run/keyless"
CA_DIR = "/var/run/keyless-ca"
CA_FILE = f"{CA_DIR}/keyless-ca.pem"
BUNDLE_FILE = f"{CA_DIR}/ca-bundle.pem"
TRUSTSTORE_FILE = f"{CA_DIR}/truststore.p12"
TRUSTSTORE_PASSWORD = "changeit"  # the JDK's customary one; the store holds public certs only
CATALOG_DIR = "/etc/keyless-catalog"
CATALOG_KEY = "keyless.toml"  # the ConfigMap's key: a keyless --config TOML ([[route]] tables)
INIT, IPTABLES, SIDECAR = "keyless-init", "keyless-iptables", "keyless"
VOLUMES = {"confdir": "keyless-confdir", "ca": "keyless-ca", "tmp": "keyless-tmp",
           "catalog": "keyless-catalog"}
LOCAL_NO_PROXY = ("localhost", "127.0.0.1", "::1", ".svc", ".cluster.local")
# Variables that name a file: an app's own value is kept (it chose its trust), and logged.
TRUST_FILES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
TRUST_OPTIONS = "-Djavax.net.ssl.trustStore"  # ...=, ...Password=, ...Type=


@dataclass(frozen=True)
class Decision:
    inject: bool
    reason: str
    options: PodOptions | None = None


def decide(pod: Mapping[str, Any], namespace: str, defaults: Defaults) -> Decision:
    """Whether to inject, and why (one short reason, for the log line)."""
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    spec = pod.get("spec") or {}
    if defaults.excluded(namespace):
        return Decision(False, f"namespace {namespace} is excluded")
    if INJECTED in annotations:
        return Decision(False, "already injected")
    if not wants_injection(labels, annotations):
        return Decision(False, "not requested (keyless.io/inject is not true)")
    try:
        options = pod_options(annotations, defaults)
    except AnnotationError as exc:
        return Decision(False, f"invalid option: {exc}")
    if ((spec.get("os") or {}).get("name") or "linux") != "linux":
        return Decision(False, "not a Linux pod (keyless' image is Linux only)")
    if spec.get("hostNetwork"):
        return Decision(False, "hostNetwork pod: keyless' ports and iptables rules would be "
                               "the node's")
    names = {c.get("name") for c in _all_containers(spec)}
    if names & {INIT, IPTABLES, SIDECAR}:
        return Decision(False, "the pod already has a keyless container (hand-written sidecar)")
    if {v.get("name") for v in spec.get("volumes") or []} & set(VOLUMES.values()):
        return Decision(False, "the pod already has a keyless-* volume")
    if (clash := mount_clash(spec, options.skip_containers)) is not None:
        return Decision(False, f"container {clash} already mounts something at {CA_DIR}")
    targets = [c for c in spec.get("containers") or []
               if c.get("name") not in options.skip_containers]
    if not targets:
        return Decision(False, "every container is skipped")
    if options.mode == "transparent" and defaults.uid in _run_as_users(spec):
        return Decision(False, f"transparent mode: a container runs as keyless' UID "
                               f"{defaults.uid}, whose traffic iptables exempts")
    return Decision(True, f"inject ({options.mode} mode)", options)


def plan(pod: Mapping[str, Any], options: PodOptions, defaults: Defaults) -> list[JsonPatchOp]:
    """The JSON Patch that injects keyless into `pod` (call `decide` first)."""
    spec = pod.get("spec") or {}
    ops: list[JsonPatchOp] = []
    # Env edits first, on the original indices: the init-container insertions below shift them.
    for kind in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(kind) or []):
            if container.get("name") in options.skip_containers:
                continue
            ops += _app_container_ops(f"/spec/{kind}/{index}", container, options, defaults)
    injected = [_init_container(options, defaults)]
    if options.mode == "transparent":
        injected.append(_iptables_container(options, defaults))
    injected.append(_sidecar(options, defaults, _grace_period(spec)))
    if spec.get("initContainers"):
        ops += [{"op": "add", "path": f"/spec/initContainers/{n}", "value": c}
                for n, c in enumerate(injected)]
    else:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": injected})
    volumes = _volumes(options)
    if spec.get("volumes"):
        ops += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes]
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    annotations = (pod.get("metadata") or {}).get("annotations")
    if annotations:
        ops.append({"op": "add", "path": "/metadata/annotations/" + _pointer(INJECTED),
                    "value": __version__})
    else:
        ops.append({"op": "add", "path": "/metadata/annotations",
                    "value": {INJECTED: __version__}})
    return ops


def notes(pod: Mapping[str, Any], options: PodOptions, defaults: Defaults) -> list[str]:
    """What the user should know about this injection (AdmissionReview warnings and the log):
    the variables keyless left as the app had them. Names only, never values."""
    spec = pod.get("spec") or {}
    found = []
    managed = {name for name, _, _ in app_environment(options, defaults)}
    for container in _all_containers(spec):
        if container.get("name") in options.skip_containers:
            continue
        for entry in container.get("env") or []:
            name = entry.get("name")
            if name not in managed:
                continue
            if "value" not in entry and "valueFrom" in entry:
                found.append(f"keyless: container {container.get('name')}: {name} comes from "
                             "valueFrom, left as it is")
            elif name in TRUST_FILES and entry.get("value"):
                found.append(f"keyless: container {container.get('name')}: kept its own {name}"
                             " (add keyless' CA to it, or the TLS to Azure fails)")
            elif name == "JAVA_TOOL_OPTIONS" and _own_truststore(str(entry.get("value", ""))):
                found.append(f"keyless: container {container.get('name')}: kept its own "
                             "javax.net.ssl.trustStore (add keyless' CA to it)")
    return found


# -- the app containers ----------------------------------------------------------------------


def no_proxy_entries(defaults: Defaults) -> list[str]:
    return list(dict.fromkeys([*LOCAL_NO_PROXY, *((defaults.api_server,)
                                                  if defaults.api_server else ()),
                               *defaults.no_proxy]))


def app_environment(options: PodOptions, defaults: Defaults) -> list[tuple[str, str, str]]:
    """(name, value, how): how is "set" (replace), "keep" (an app's own value wins),
    "append-comma" or "append-space" (added to an app's own value)."""
    proxy_url = f"http://127.0.0.1:{defaults.proxy_port}"
    no_proxy = ",".join(no_proxy_entries(defaults))
    java = [f"-Djavax.net.ssl.trustStore={TRUSTSTORE_FILE}",
            f"-Djavax.net.ssl.trustStorePassword={TRUSTSTORE_PASSWORD}",
            "-Djavax.net.ssl.trustStoreType=PKCS12"]
    env: list[tuple[str, str, str]] = []
    if options.mode == "forward":
        # The Java SDKs ignore HTTPS_PROXY: the JDK's own proxy properties (docs/languages).
        non_proxy = "|".join("*" + e if e.startswith(".") else e
                             for e in no_proxy_entries(defaults) if e != "::1")
        java += ["-Dhttps.proxyHost=127.0.0.1", f"-Dhttps.proxyPort={defaults.proxy_port}",
                 f"-Dhttp.nonProxyHosts={non_proxy}"]
        env += [("HTTPS_PROXY", proxy_url, "set"), ("https_proxy", proxy_url, "set"),
                ("NO_PROXY", no_proxy, "append-comma"), ("no_proxy", no_proxy, "append-comma")]
    env += [("SSL_CERT_FILE", BUNDLE_FILE, "keep"), ("REQUESTS_CA_BUNDLE", BUNDLE_FILE, "keep"),
            ("NODE_EXTRA_CA_CERTS", CA_FILE, "keep"),
            ("JAVA_TOOL_OPTIONS", " ".join(java), "append-space")]
    return env


def _app_container_ops(path: str, container: Mapping[str, Any], options: PodOptions,
                       defaults: Defaults) -> list[JsonPatchOp]:
    ops: list[JsonPatchOp] = []
    existing = container.get("env") or []
    index = {e.get("name"): n for n, e in enumerate(existing)}
    added: list[dict[str, Any]] = []
    for name, value, how in app_environment(options, defaults):
        if name not in index:
            added.append({"name": name, "value": value})
            continue
        current = existing[index[name]]
        if "value" not in current and "valueFrom" in current:
            continue  # from a Secret/ConfigMap/field: keyless cannot see it, so leaves it
        old = str(current.get("value", ""))
        if how == "keep" and old:
            continue
        if name == "JAVA_TOOL_OPTIONS" and _own_truststore(old):
            # the app chose its truststore (as with SSL_CERT_FILE): keep it, add the proxy only
            value = " ".join(v for v in value.split() if not v.startswith(TRUST_OPTIONS))
        if how.startswith("append") and old:
            sep = "," if how == "append-comma" else " "
            present = old.split(sep)
            value = sep.join([old, *(v for v in value.split(sep) if v not in present)])
        if value != old:
            ops.append({"op": "replace", "path": f"{path}/env/{index[name]}/value",
                        "value": value})
    if existing:
        ops += [{"op": "add", "path": f"{path}/env/-", "value": e} for e in added]
    elif added:
        ops.append({"op": "add", "path": f"{path}/env", "value": added})
    mount = {"name": VOLUMES["ca"], "mountPath": CA_DIR, "readOnly": True}
    if container.get("volumeMounts"):
        ops.append({"op": "add", "path": f"{path}/volumeMounts/-", "value": mount})
    else:
        ops.append({"op": "add", "path": f"{path}/volumeMounts", "value": [mount]})
    return ops


# -- keyless' containers ---------------------------------------------------------------------


def _security_context(uid: int) -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid,
            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _catalog_env_and_mount(options: PodOptions) -> tuple[list[dict], list[dict]]:
    if not options.catalog_config_map:
        return [], []
    return ([{"name": "KEYLESS_CONFIG", "value": f"{CATALOG_DIR}/{CATALOG_KEY}"}],
            [{"name": VOLUMES["catalog"], "mountPath": CATALOG_DIR, "readOnly": True}])


def _init_container(options: PodOptions, defaults: Defaults) -> dict[str, Any]:
    catalog_env, catalog_mount = _catalog_env_and_mount(options)
    return {
        "name": INIT,
        "image": options.image,
        "imagePullPolicy": defaults.image_pull_policy,
        # The CA in the private confdir; only public material into the shared directory.
        "command": ["keyless", "init", "--ca-out", CA_FILE, "--bundle-out", BUNDLE_FILE,
                    "--truststore-out", TRUSTSTORE_FILE],
        "env": [{"name": "KEYLESS_CONFDIR", "value": CONFDIR}, *catalog_env],
        "securityContext": _security_context(defaults.uid),
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                      "limits": {"memory": "128Mi"}},
        "volumeMounts": [{"name": VOLUMES["confdir"], "mountPath": CONFDIR},
                         {"name": VOLUMES["ca"], "mountPath": CA_DIR}, *catalog_mount],
    }


def _iptables_container(options: PodOptions, defaults: Defaults) -> dict[str, Any]:
    return {
        "name": IPTABLES,
        "image": options.image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": ["keyless", "iptables", "--apply", "--uid", str(defaults.uid),
                    "--listen", f"127.0.0.1:{defaults.proxy_port}"],
        # iptables needs root with NET_ADMIN (and NET_RAW) in the pod's network namespace only.
        "securityContext": {"runAsNonRoot": False, "runAsUser": 0, "runAsGroup": 0,
                            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                      "limits": {"memory": "64Mi"}},
        # iptables takes its lock in /run
        "volumeMounts": [{"name": VOLUMES["tmp"], "mountPath": "/run"}],
    }


def _grace_period(spec: Mapping[str, Any]) -> int:
    value = spec.get("terminationGracePeriodSeconds")
    return value if isinstance(value, int) and value >= 0 else 30


def _sidecar(options: PodOptions, defaults: Defaults, grace: int) -> dict[str, Any]:
    catalog_env, catalog_mount = _catalog_env_and_mount(options)
    # The drain has to end inside the pod's grace period (one budget for the whole pod).
    drain = max(1, min(defaults.drain_timeout, grace - 10))
    env = [{"name": "KEYLESS_LISTEN", "value": f"127.0.0.1:{defaults.proxy_port}"},
           {"name": "KEYLESS_ADMIN", "value": f"0.0.0.0:{defaults.admin_port}"},
           {"name": "KEYLESS_CONFDIR", "value": CONFDIR},
           {"name": "KEYLESS_DRAIN_TIMEOUT", "value": str(drain)},
           *catalog_env]
    if options.ready_scopes:
        env.append({"name": "KEYLESS_READY_SCOPES", "value": ",".join(options.ready_scopes)})
    if options.mode == "transparent":
        env.append({"name": "KEYLESS_TRANSPARENT", "value": "true"})
    probe = {"path": "/readyz", "port": "keyless-admin"}
    return {
        "name": SIDECAR,
        "image": options.image,
        "imagePullPolicy": defaults.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["keyless", "run"],
        "env": env,
        "ports": [{"name": "keyless-admin", "containerPort": defaults.admin_port,
                   "protocol": "TCP"}],
        "startupProbe": {"httpGet": probe, "periodSeconds": 2, "timeoutSeconds": 2,
                         "failureThreshold": 60},
        "readinessProbe": {"httpGet": probe, "periodSeconds": 5, "timeoutSeconds": 2,
                           "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "keyless-admin"},
                          "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "resources": options.resources.as_kubernetes(),
        "securityContext": _security_context(defaults.uid),
        "volumeMounts": [{"name": VOLUMES["confdir"], "mountPath": CONFDIR},
                         {"name": VOLUMES["tmp"], "mountPath": "/tmp"}, *catalog_mount],
    }


def _volumes(options: PodOptions) -> list[dict[str, Any]]:
    volumes = [{"name": VOLUMES["confdir"], "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
               {"name": VOLUMES["ca"], "emptyDir": {"sizeLimit": "8Mi"}},
               {"name": VOLUMES["tmp"], "emptyDir": {"sizeLimit": "64Mi"}}]
    if options.catalog_config_map:
        volumes.append({"name": VOLUMES["catalog"],
                        "configMap": {"name": options.catalog_config_map,
                                      "items": [{"key": CATALOG_KEY, "path": CATALOG_KEY}]}})
    return volumes


# -- helpers -----------------------------------------------------------------------------------


def _all_containers(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def _run_as_users(spec: Mapping[str, Any]) -> set[int]:
    pod_uid = (spec.get("securityContext") or {}).get("runAsUser")
    users = set()
    for container in spec.get("containers") or []:
        uid = (container.get("securityContext") or {}).get("runAsUser", pod_uid)
        if isinstance(uid, int):
            users.add(uid)
    return users


def _own_truststore(java_options: str) -> bool:
    return any(o.startswith(TRUST_OPTIONS + "=") for o in java_options.split())


def mount_clash(spec: Mapping[str, Any], skip: frozenset[str]) -> str | None:
    """A container that would get keyless-ca's mount path twice (the pod would be invalid)."""
    for container in _all_containers(spec):
        if container.get("name") in skip:
            continue
        if any(str(m.get("mountPath", "")).rstrip("/") == CA_DIR
               for m in container.get("volumeMounts") or []):
            return str(container.get("name"))
    return None


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")
