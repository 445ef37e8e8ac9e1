"""A pod's keyless.io/* annotations (and the inject label) read into injection options."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from proxy.k8s.defaults import MODES, Defaults, Resources

PREFIX = "keyless.io/"
INJECT = PREFIX + "inject"
INJECTED = PREFIX + "injected"
TRUE_WORDS = ("true", "yes", "on", "1")
# Kubernetes resource quantities (a pragmatic subset of resource.Quantity's grammar).
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[0-9]+)?$")
CONTAINER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
CONFIG_MAP_NAME = re.compile(r"^[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$")
IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:@]{0,254}$")
SCOPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/:]{0,254}$")
RESOURCE_ANNOTATIONS = {"cpu-request": "cpu_request", "memory-request": "memory_request",
                        "cpu-limit": "cpu_limit", "memory-limit": "memory_limit"}
OPTION_ANNOTATIONS = {"inject", "injected", "mode", "image", "skip-containers",
                      "catalog-configmap", "ready-scopes", *RESOURCE_ANNOTATIONS}


class AnnotationError(ValueError):
    """An option annotation keyless cannot honour: the pod is left alone, with this reason."""


def is_true(value: Any) -> bool:
    """Only an explicit yes means yes: "false", "", "maybe" and any other value mean no."""
    if value is True:
        return True
    return isinstance(value, str) and value.strip().lower() in TRUE_WORDS


def wants_injection(labels: Mapping[str, str], annotations: Mapping[str, str]) -> bool:
    """The annotation has the final say; without it the label (objectSelector's pre-filter)
    decides."""
    if INJECT in annotations:
        return is_true(annotations[INJECT])
    return is_true(labels.get(INJECT))


@dataclass(frozen=True)
class PodOptions:
    mode: str
    image: str
    skip_containers: frozenset[str]
    catalog_config_map: str
    ready_scopes: tuple[str, ...]
    resources: Resources


def pod_options(annotations: Mapping[str, str], defaults: Defaults) -> PodOptions:
    """The pod's options over the webhook's defaults; raise AnnotationError on a bad value."""
    unknown = sorted(k for k in annotations
                     if k.startswith(PREFIX) and k.removeprefix(PREFIX) not in OPTION_ANNOTATIONS)
    if unknown:
        raise AnnotationError(f"unknown annotation {unknown[0]}")

    def get(name: str) -> str | None:
        value = annotations.get(PREFIX + name)
        return None if value is None else str(value).strip()

    mode = (get("mode") or defaults.mode).lower()
    if mode not in MODES:
        raise AnnotationError(f"{PREFIX}mode must be forward or transparent")
    image = get("image") or defaults.image
    if not IMAGE.match(image):
        raise AnnotationError(f"{PREFIX}image is not an image reference")
    skip = frozenset(defaults.skip_containers) | _names(get("skip-containers"),
                                                        "skip-containers", CONTAINER_NAME)
    catalog = get("catalog-configmap") or defaults.catalog_config_map
    if catalog and not CONFIG_MAP_NAME.match(catalog):
        raise AnnotationError(f"{PREFIX}catalog-configmap is not a ConfigMap name")
    scopes = defaults.ready_scopes
    if (raw_scopes := get("ready-scopes")) is not None:
        scopes = tuple(_names(raw_scopes, "ready-scopes", SCOPE, keep_order=True))
    resources = defaults.resources
    for name, attr in RESOURCE_ANNOTATIONS.items():
        if (quantity := get(name)) is not None:
            if not QUANTITY.match(quantity):
                raise AnnotationError(f"{PREFIX}{name} is not a resource quantity")
            resources = replace(resources, **{attr: quantity})
    return PodOptions(mode=mode, image=image, skip_containers=skip, catalog_config_map=catalog,
                      ready_scopes=scopes, resources=resources)


def _names(raw: str | None, what: str, pattern: re.Pattern[str],
           keep_order: bool = False) -> Any:
    if raw is None:
        return () if keep_order else frozenset()
    items = [item.strip() for item in re.split(r"[,\s;]+", raw) if item.strip()]
    for item in items:
        if not pattern.match(item):
            raise AnnotationError(f"{PREFIX}{what}: {item[:64]!r} is not valid")
    return tuple(dict.fromkeys(items)) if keep_order else frozenset(items)
