"""Prometheus metrics. Labels only ever take bounded values: never a URL, token or key."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy import __version__

REGISTRY = CollectorRegistry(auto_describe=True)

BUILD_INFO = Gauge("keyless_build_info", "keyless version.", ["version"], registry=REGISTRY)
BUILD_INFO.labels(version=__version__).set(1)

REQUESTS = Counter(
    "keyless_requests",
    "HTTP requests to catalog hosts, by service and outcome (converted, passed_through, "
    "refused, unsupported).",
    ["service", "outcome"],
    registry=REGISTRY,
)
TUNNELS = Counter(
    "keyless_tunnels",
    "Connections tunnelled without interception (not an Azure catalog host).",
    registry=REGISTRY,
)
KEY_MATERIAL_STRIPPED = Counter(
    "keyless_key_material_stripped",
    "Key-based credentials removed from requests, by service and scheme.",
    ["service", "scheme"],
    registry=REGISTRY,
)
TOKEN_FETCHES = Counter(
    "keyless_token_fetches",
    "Token fetches from the identity endpoint, by result (ok, unchanged, error, expired).",
    ["result"],
    registry=REGISTRY,
)
TOKEN_FETCH_SECONDS = Histogram(
    "keyless_token_fetch_seconds",
    "Time spent fetching a token from the identity endpoint.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
TOKEN_CACHE = Counter(
    "keyless_token_cache_lookups",
    "Token cache lookups by result (hit, miss).",
    ["result"],
    registry=REGISTRY,
)
UPSTREAM_RESPONSES = Counter(
    "keyless_upstream_responses",
    "Responses from Azure services to converted or passed-through requests, by service and "
    "status class (2xx, 3xx, 4xx, 5xx).",
    ["service", "status_class"],
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "keyless_upstream_errors",
    "Requests to Azure services that got no response (connection refused or reset, TLS "
    "failure, timeout), by service.",
    ["service"],
    registry=REGISTRY,
)
