"""Prometheus metrics. Labels only ever take bounded values: never a URL, token or key."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from proxy import __version__

REGISTRY = CollectorRegistry(auto_describe=True)

# multiprocess_mode matters only under --workers (prometheus-client multiprocess mode): how
# the workers' values of a gauge combine into the one the admin port shows.
BUILD_INFO = Gauge("keyless_build_info", "keyless version.", ["version"], registry=REGISTRY,
                   multiprocess_mode="max")
BUILD_INFO.labels(version=__version__).set(1)

REQUESTS = Counter(
    "keyless_requests",
    "Requests by catalog service and outcome: converted, passed_through, refused, audited, "
    "unsupported; and (service \"none\") tunnelled connections, client_denied, "
    "destination_denied.",
    ["service", "outcome"],
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
AUTHORIZATION_DENIALS = Counter(
    "keyless_authorization_denials",
    "401 or 403 answers the service documents as 'the identity lacks a data-plane role' "
    "(RBAC), by service.",
    ["service"],
    registry=REGISTRY,
)
UPSTREAM_REFUSALS = Counter(
    "keyless_upstream_refusals",
    "Refusals of converted requests that are not a missing role, by service and kind "
    "(network_rules, token_rejected, local_auth_disabled, access_policy, other).",
    ["service", "kind"],
    registry=REGISTRY,
)
TOKEN_RETRIES = Counter(
    "keyless_token_retries",
    "401 answers to a converted request, by what keyless did: replayed (with a fresh token) "
    "or passed_on (body too large to replay, or the replay was refused too).",
    ["service", "action"],
    registry=REGISTRY,
)
UPSTREAM_POOL = Counter(
    "keyless_upstream_pool_requests",
    "Converted requests by service and how they went upstream: pooled (over a connection "
    "kept alive across app connections; answer passed whole), pooled_streamed (answer "
    "streamed through the relay), ordinary (the app connection's own), failed (no answer: "
    "502), app_left (the app closed its connection first).",
    ["service", "result"],
    registry=REGISTRY,
)
UPSTREAM_POOL_CONNECTIONS = Counter(
    "keyless_upstream_pool_connections_opened",
    "Upstream connections the pool opened; its other requests reused one of them.",
    registry=REGISTRY,
)
ADDED_SECONDS = Histogram(
    "keyless_added_seconds",
    "Time keyless spends on a request before it goes upstream (matching, stripping, "
    "waiting for a token, attaching).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5, 30),
    registry=REGISTRY,
)

LISTENER_CONNECTIONS = Counter(
    "keyless_listener_connections",
    "App connections accepted by a database/cache listener (listener = protocol:port).",
    ["listener", "protocol"],
    registry=REGISTRY,
)
LISTENER_OPEN = Gauge(
    "keyless_listener_open_connections",
    "App connections a database/cache listener holds open now.",
    ["listener", "protocol"],
    registry=REGISTRY,
    multiprocess_mode="livesum",  # the connections the live workers hold, summed
)
LISTENER_LOGINS = Counter(
    "keyless_listener_logins",
    "Upstream logins by a listener, by result: converted (logged in with the token), "
    "token_unavailable, upstream_refused (the server refused the token), upstream_failed "
    "(unreachable, TLS, reset), client_error (bad input from the app), audited.",
    ["listener", "protocol", "result"],
    registry=REGISTRY,
)
LISTENER_REAUTHS = Counter(
    "keyless_listener_reauths",
    ("Re-authentications of live connections with a fresh token (Redis AUTH; AMQP "
    "put-tokens keyless renews itself), by result."),
    ["listener", "result"],
    registry=REGISTRY,
)
LISTENER_BYTES = Counter(
    "keyless_listener_bytes",
    "Bytes a listener relayed, by direction (to_upstream, to_client).",
    ["listener", "direction"],
    registry=REGISTRY,
)

CA_EXPIRY = Gauge(
    "keyless_ca_expiry_timestamp_seconds",
    "When keyless' CA (the one apps trust) expires, as a Unix time; a running keyless does "
    "not rotate it: restart the pod before.",
    registry=REGISTRY,
    multiprocess_mode="max",  # one CA for all workers
)
# --workers only (registered by the supervisor; a worker's values reach the supervisor through
# the multiprocess files, whatever the registry): one process shows exactly what it showed.
WORKER_RESTARTS = Counter(
    "keyless_worker_restarts",
    "--workers: worker processes that died and were started again by the supervisor.",
    registry=None,
)
WORKER_REQUESTS = Counter(
    "keyless_worker_requests",
    "--workers: HTTP requests each worker process received (worker = its number).",
    ["worker"],
    registry=None,
)


class TokenExpiryCollector:
    """keyless_token_expiry_seconds{identity, scope}: read from the token cache at scrape."""

    def __init__(self, peek: Callable[[], dict], clock: Callable[[], float]) -> None:
        self.peek, self.clock = peek, clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "keyless_token_expiry_seconds",
            "Seconds until the cached token for (identity, scope) expires.",
            labels=["identity", "scope"],
        )
        now = self.clock()
        for (identity, scope), token in self.peek().items():
            family.add_metric([identity.label, scope], token.expires_on - now)
        yield family
