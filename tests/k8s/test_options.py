"""Annotation parsing and the webhook's defaults file, as pure functions."""

from __future__ import annotations

import json

import pytest

from proxy.k8s.annotations import AnnotationError, is_true, pod_options, wants_injection
from proxy.k8s.defaults import DEFAULT_SKIP, Defaults, DefaultsError, load_defaults, parse_defaults


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "yes", "on", "1", " true ", True])
def test_is_true_for_the_explicit_yes_words(value):
    assert is_true(value)


@pytest.mark.parametrize("value", ["false", "False", "no", "off", "0", "", "y", "enabled",
                                   "truthy", None, False, 1])
def test_is_true_is_false_for_anything_else(value):
    assert not is_true(value)


def test_the_annotation_has_the_final_say_over_the_label():
    assert wants_injection({"keyless.io/inject": "true"}, {})
    assert not wants_injection({"keyless.io/inject": "true"}, {"keyless.io/inject": "false"})
    assert wants_injection({}, {"keyless.io/inject": "yes"})
    assert not wants_injection({}, {})
    assert not wants_injection({"keyless.io/inject": "false"}, {})


def test_pod_options_over_defaults():
    defaults = parse_defaults({"readyScopes": ["https://storage.azure.com/.default"],
                               "catalogConfigMap": "routes"}, {})
    options = pod_options({"keyless.io/skip-containers": "a, b;c",
                           "keyless.io/memory-request": "200Mi",
                           "keyless.io/ready-scopes": "x/.default,y/.default x/.default"},
                          defaults)
    assert options.skip_containers == frozenset({"a", "b", "c", *DEFAULT_SKIP})
    assert options.resources.memory_request == "200Mi"
    assert options.resources.memory_limit == "256Mi"
    assert options.ready_scopes == ("x/.default", "y/.default")
    assert options.catalog_config_map == "routes" and options.mode == "forward"
    assert pod_options({}, defaults).ready_scopes == ("https://storage.azure.com/.default",)


@pytest.mark.parametrize("annotations", [
    {"keyless.io/mode": "sidecar"}, {"keyless.io/image": "bad image"},
    {"keyless.io/cpu-limit": "1 core"}, {"keyless.io/memory-request": "-5Mi"},
    {"keyless.io/skip-containers": "UPPER"}, {"keyless.io/catalog-configmap": "a/b"},
    {"keyless.io/ready-scopes": "scope with\"quote"}, {"keyless.io/unknown": "x"},
])
def test_bad_option_annotations_are_refused(annotations):
    with pytest.raises(AnnotationError):
        pod_options(annotations, Defaults())


def test_defaults_exclude_kube_system_and_the_own_namespace_whatever_the_file_says():
    defaults = parse_defaults({"excludeNamespaces": ["legacy"]},
                              {"POD_NAMESPACE": "keyless", "KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert defaults.exclude_namespaces == ("kube-system", "keyless", "legacy")
    assert defaults.api_server == "10.0.0.1"
    assert parse_defaults({"excludeNamespaces": []}, {}).exclude_namespaces == ("kube-system",)


def test_a_skip_list_in_the_file_adds_to_the_mesh_sidecars():
    skip = parse_defaults({"skipContainers": ["log-shipper"]}, {}).skip_containers
    assert set(skip) == {*DEFAULT_SKIP, "log-shipper"}


def test_defaults_file_yaml_json_or_absent(tmp_path):
    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text("image: registry.example.com/keyless:1.2.3\nmode: transparent\n"
                         "resources:\n  requests: {cpu: 20m, memory: 100Mi}\n"
                         "  limits: {memory: 200Mi}\nuid: 10005\nproxyPort: 8081\n")
    defaults = load_defaults(yaml_file, {})
    assert defaults.image == "registry.example.com/keyless:1.2.3"
    assert defaults.mode == "transparent" and defaults.uid == 10005
    assert defaults.proxy_port == 8081
    assert defaults.resources.as_kubernetes() == {"requests": {"cpu": "20m", "memory": "100Mi"},
                                                  "limits": {"memory": "200Mi"}}
    json_file = tmp_path / "config.json"
    json_file.write_text(json.dumps({"adminPort": 9999}))
    assert load_defaults(json_file, {}).admin_port == 9999
    assert load_defaults(tmp_path / "absent.yaml", {}) == parse_defaults({}, {})
    with pytest.raises(DefaultsError, match="no such file"):
        load_defaults(tmp_path / "absent.yaml", {}, required=True)


@pytest.mark.parametrize("data, message", [
    ({"imag": "x"}, "unknown keys"), ({"mode": "sidecar"}, "mode must be"),
    ({"uid": "10001"}, "non-negative integer"), ({"proxyPort": 70000}, "1-65535"),
    ({"resources": {"requests": {"gpu": 1}}}, "only cpu and memory"),
    ({"excludeNamespaces": "kube-public"}, "list of strings"),
])
def test_bad_defaults_are_refused(data, message):
    with pytest.raises(DefaultsError, match=message):
        parse_defaults(data, {})
