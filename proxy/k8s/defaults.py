"""The webhook's injection defaults: `--config` (YAML or JSON), every key optional."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from proxy import __version__

ALWAYS_EXCLUDED = ("kube-system",)
# Containers that must never be sent through keyless: service-mesh and runtime sidecars that
# other webhooks inject (their own traffic is the mesh's business).
DEFAULT_SKIP = ("istio-proxy", "istio-init", "istio-validation", "linkerd-proxy",
                "linkerd-init", "daprd")
MODES = ("forward", "transparent")


class DefaultsError(ValueError):
    pass


@dataclass(frozen=True)
class Resources:
    cpu_request: str = "50m"
    memory_request: str = "128Mi"
    cpu_limit: str = ""  # none: throttling would add latency to every Azure call
    memory_limit: str = "256Mi"

    def as_kubernetes(self) -> dict[str, dict[str, str]]:
        requests = {k: v for k, v in (("cpu", self.cpu_request),
                                      ("memory", self.memory_request)) if v}
        limits = {k: v for k, v in (("cpu", self.cpu_limit),
                                    ("memory", self.memory_limit)) if v}
        return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


@dataclass(frozen=True)
class Defaults:
    image: str = f"keyless:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    resources: Resources = field(default_factory=Resources)
    ready_scopes: tuple[str, ...] = ()
    mode: str = "forward"
    catalog_config_map: str = ""
    uid: int = 10001
    proxy_port: int = 8080
    admin_port: int = 9180
    exclude_namespaces: tuple[str, ...] = ALWAYS_EXCLUDED
    skip_containers: tuple[str, ...] = DEFAULT_SKIP
    # Extra NO_PROXY entries (the cluster's pod and service CIDRs, internal domains).
    no_proxy: tuple[str, ...] = ()
    # The API server's address for NO_PROXY (the webhook's own KUBERNETES_SERVICE_HOST).
    api_server: str = ""
    drain_timeout: int = 30

    def excluded(self, namespace: str) -> bool:
        return namespace in self.exclude_namespaces


_KEYS = {"image": "image", "imagePullPolicy": "image_pull_policy", "resources": "resources",
         "readyScopes": "ready_scopes", "mode": "mode", "catalogConfigMap": "catalog_config_map",
         "uid": "uid", "proxyPort": "proxy_port", "adminPort": "admin_port",
         "excludeNamespaces": "exclude_namespaces", "skipContainers": "skip_containers",
         "noProxy": "no_proxy", "drainTimeout": "drain_timeout"}
_RESOURCE_KEYS = {("requests", "cpu"): "cpu_request", ("requests", "memory"): "memory_request",
                  ("limits", "cpu"): "cpu_limit", ("limits", "memory"): "memory_limit"}


def parse_defaults(data: Mapping[str, Any], environ: Mapping[str, str]) -> Defaults:
    """Defaults from the config mapping; the webhook's namespace (POD_NAMESPACE) and
    kube-system are always excluded, whatever the file says."""
    unknown = set(data) - set(_KEYS)
    if unknown:
        raise DefaultsError(f"unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        attr = _KEYS[key]
        if attr == "resources":
            values[attr] = _parse_resources(value)
        elif attr in ("ready_scopes", "exclude_namespaces", "skip_containers", "no_proxy"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DefaultsError(f"{key} must be a list of strings")
            values[attr] = tuple(value)
        elif attr in ("uid", "proxy_port", "admin_port", "drain_timeout"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DefaultsError(f"{key} must be a non-negative integer")
            values[attr] = value
        else:
            if not isinstance(value, str):
                raise DefaultsError(f"{key} must be a string")
            values[attr] = value
    defaults = replace(Defaults(), **values)
    if defaults.mode not in MODES:
        raise DefaultsError(f"mode must be one of {MODES}, got {defaults.mode!r}")
    for attr in ("proxy_port", "admin_port"):
        if not 0 < getattr(defaults, attr) < 65536:
            raise DefaultsError(f"{attr} must be 1-65535")
    own = environ.get("POD_NAMESPACE", "").strip()
    excluded = tuple(dict.fromkeys((*ALWAYS_EXCLUDED, *((own,) if own else ()),
                                    *defaults.exclude_namespaces)))
    # the mesh sidecars stay skipped whatever the file lists
    skip = tuple(dict.fromkeys((*DEFAULT_SKIP, *defaults.skip_containers)))
    return replace(defaults, exclude_namespaces=excluded, skip_containers=skip,
                   api_server=environ.get("KUBERNETES_SERVICE_HOST", "").strip())


def _parse_resources(value: Any) -> Resources:
    if not isinstance(value, dict):
        raise DefaultsError("resources must be a mapping with requests/limits")
    found: dict[str, str] = {f.name: "" for f in fields(Resources)}
    for section in value:
        if section not in ("requests", "limits") or not isinstance(value[section], dict):
            raise DefaultsError(f"resources.{section}: expected requests or limits (mappings)")
        for kind, quantity in value[section].items():
            if (section, kind) not in _RESOURCE_KEYS:
                raise DefaultsError(f"resources.{section}.{kind}: only cpu and memory")
            found[_RESOURCE_KEYS[(section, kind)]] = str(quantity)
    return Resources(**found)


def load_defaults(path: Path, environ: Mapping[str, str], required: bool = False) -> Defaults:
    """The file is optional (the chart always mounts one; a bare run has none)."""
    if not path.exists():
        if required:
            raise DefaultsError(f"{path}: no such file")
        return parse_defaults({}, environ)
    text = path.read_text()
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else _yaml(text)
    except ValueError as exc:
        raise DefaultsError(f"{path}: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DefaultsError(f"{path}: expected a mapping at the top")
    try:
        return parse_defaults(data, environ)
    except DefaultsError as exc:
        raise DefaultsError(f"{path}: {exc}") from None


def _yaml(text: str) -> Any:
    # ruamel.yaml comes with mitmproxy: no extra runtime dependency for YAML.
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return _plain(YAML(typ="safe", pure=True).load(text))
    except YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
