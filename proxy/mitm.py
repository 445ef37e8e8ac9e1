"""The one module that builds and runs the mitmproxy master with keyless' addons."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import time
import types
from collections.abc import Callable

from mitmproxy import addons as mitm_addons
from mitmproxy import exceptions, master, options
from mitmproxy.addons import errorcheck
from mitmproxy.proxy import mode_servers
from mitmproxy.proxy.layers.http import _http1

from addons.amqp_websocket import AmqpOverWebSocket
from addons.azure_auth import AzureAuth
from addons.diagnose import DiagnoseDenials
from addons.failclosed import FailClosed
from addons.guard import ClientAllowlist, DenyDestinations, DialCheckedAddresses
from addons.health import ReportHealth
from addons.intercept import InterceptOnlyAzure
from addons.leaf import OneNameLeaves
from addons.observe import ObserveUpstream
from addons.pool import PoolUpstream
from addons.quickack import QuickAck
from addons.replay import ReplayUnauthorized
from addons.resume import ResumeUpstreamTLS
from addons.storage_batch import ResignBlobBatch
from addons.stream import StreamBodies
from addons.workers import CountWorkerRequests
from proxy import metrics
from proxy.admin import AdminServer, AdminTokenError, Health, read_admin_token
from proxy.audit import STATE_FILE, CallLog, SharedCallLog, build_report
from proxy.ca import CA_KEY_AND_CERT, CAError, expires_at, prepare_ca_for
from proxy.catalog import Catalog
from proxy.config import Settings
from proxy.connect_to import ConnectToTable
from proxy.dial import AppDialer
from proxy.dispatch import KeylessMaster
from proxy.identity import CredentialSource
from proxy.listeners import server as listener_server
from proxy.listeners.connection import ClientTLS, Shared
from proxy.listeners.server import Listener, Listeners, ListenerStartError, TransparentListener
from proxy.listeners.spec import azure_host
from proxy.listeners.upstream import UpstreamDialer, UpstreamError, upstream_tls_context
from proxy.redact import redact
from proxy.relay import UpstreamRelay
from proxy.tokens import Identity, TokenCache, TokenUnavailable
from proxy.upstream import UpstreamPool
from proxy.workers import SupervisorTokens, WorkerRole, report_status

logger = logging.getLogger(__name__)


class StartupError(Exception):
    pass


def listen_spec(host: str, port: int) -> str:
    # mitmproxy splits at the last ':' and keeps brackets in the host: write ::1:8080
    return f"{host}:{port}"


def ipv6_loopback() -> bool:
    """Whether this host has ::1 (IPv6 is switched off in some pods)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def proxy_modes(settings: Settings, has_ipv6_loopback: bool = False) -> list[str]:
    """mitmproxy mode specs: the main listener, and one reverse listener per --reverse."""
    main = "transparent" if settings.transparent else "regular"
    modes = [f"{main}@{listen_spec(*settings.listen)}"]
    if settings.transparent and settings.listen[0] == "127.0.0.1" and has_ipv6_loopback:
        # The recipe's ip6tables REDIRECT sends IPv6 connections to [::1]: listen there too.
        modes.append(f"transparent@{listen_spec('::1', settings.listen[1])}")
    modes += [f"reverse:https://{host}@{listen_spec('127.0.0.1', port)}"
              for port, host in settings.reverse]
    return modes


def keyless_options(settings: Settings) -> dict[str, object]:
    host, port = settings.listen
    return {
        "mode": proxy_modes(settings, ipv6_loopback()),
        "listen_host": host,
        "listen_port": port,
        "confdir": str(settings.confdir),
        # Connect upstream only when a request is really forwarded: a refused request never
        # opens a connection to the service.
        "connection_strategy": "lazy",
        "onboarding": False,
        # Inside an intercepted (catalog) connection only HTTP makes sense: no raw passthrough.
        "rawtcp": False,
        "proxyauth": settings.proxy_auth or None,
        # --allow-clients is the authority on who may connect
        "block_global": not settings.allow_clients,
    }


def redact_mitmproxy_error_pages() -> None:
    """mitmproxy answers a request it cannot parse itself, before any addon sees it, with an
    error page quoting the request line (a SAS `sig` included). Redact what it quotes.
    (`make_error_response` is looked up as a module global on each call in _http1.)"""
    original = _http1.make_error_response
    if getattr(original, "keyless_redacted", False):
        return

    def redacted(status_code: int, message: str = "") -> bytes:
        return original(status_code, redact(message, limit=1000))

    redacted.keyless_redacted = True  # type: ignore[attr-defined]
    _http1.make_error_response = redacted


def share_listen_ports() -> None:
    """--workers: every worker binds the same ports with SO_REUSEPORT and the kernel spreads
    the connections. mitmproxy creates its TCP servers in one place (mode_servers calls
    `asyncio.start_server`): that module alone sees a start_server with reuse_port."""
    if getattr(mode_servers.asyncio, "keyless_reuse_port", False):
        return
    shared = types.SimpleNamespace(**vars(asyncio))
    start_server = asyncio.start_server

    async def start_server_reusing_port(*args: object, **kwargs: object) -> asyncio.Server:
        return await start_server(*args, reuse_port=True, **kwargs)  # type: ignore[arg-type]

    shared.start_server = start_server_reusing_port
    shared.keyless_reuse_port = True
    mode_servers.asyncio = shared  # type: ignore[assignment]
    # A reverse https mode also binds a UDP socket (HTTP/3), which cannot be shared; keyless'
    # reverse ports serve plain HTTP: under --workers they listen on TCP alone.
    listen = mode_servers.AsyncioServerInstance.listen

    async def listen_tcp_only(self: mode_servers.AsyncioServerInstance, host: str,
                              port: int) -> list:
        if self.mode.transport_protocol == "both":
            return [await start_server_reusing_port(self.handle_stream, host, port)]
        return await listen(self, host, port)

    mode_servers.AsyncioServerInstance.listen = listen_tcp_only  # type: ignore[method-assign]
    listener_server.REUSE_PORT = True


def build_listeners(settings: Settings, tokens: TokenCache, calls: CallLog,
                    dialer: AppDialer) -> Listeners:
    """The --postgres/--mysql/--redis listeners (proxy/listeners/), sharing the token cache,
    the app dialer (--connect-to, deny list) and mitmproxy's upstream trust options."""
    try:
        trust = upstream_tls_context(settings.set)
    except UpstreamError as exc:
        raise StartupError(str(exc)) from None
    shared = Shared(tokens, UpstreamDialer(dialer, trust), calls,
                    ClientTLS(settings.confdir / CA_KEY_AND_CERT), audit=settings.audit,
                    catalog=settings.catalog())
    listeners: list[Listener] = [
        Listener(dataclasses.replace(spec, identity=listener_identity(spec.identity)), shared,
                 settings.allow_clients)
        for spec in settings.listeners]
    if settings.transparent:
        routed = set(settings.protocol_routes)

        def allowed(protocol: str, host: str) -> bool:
            return azure_host(protocol, host) or (protocol, host) in routed

        host, port = settings.transparent_listen
        # The recipe's ip6tables REDIRECT sends IPv6 connections to [::1]: listen there too.
        hosts = [host, "::1"] if host == "127.0.0.1" and ipv6_loopback() else [host]
        protocols = {"amqp"} | ({"postgres", "mysql", "redis"}
                                if settings.transparent_databases else set())
        listeners += [TransparentListener((address, port), shared, allowed, default_identity(),
                                          protocols=protocols)
                      for address in hosts]
    return Listeners(listeners)


def app_dialer(settings: Settings, guard: DenyDestinations) -> AppDialer:
    # The one way keyless connects for the app (--connect-to, one resolution, deny list);
    # keyless' own traffic (Entra tokens) never goes through it.
    return AppDialer(ConnectToTable(settings.connect_to), guard.denied,
                     own_port=settings.admin[1])


def build_master(settings: Settings, tokens: TokenCache, health: Health,
                 calls: CallLog) -> master.Master:
    redact_mitmproxy_error_pages()
    opts = options.Options()
    m = KeylessMaster(opts)
    catalog = settings.catalog()
    # Our guards and interception decision come before mitmproxy's own addons.
    guard = DenyDestinations(settings.deny_networks)
    m.addons.add(ClientAllowlist(settings.allow_clients), guard)
    m.addons.add(InterceptOnlyAzure(catalog))
    m.addons.add(*mitm_addons.default_addons())
    dialer = app_dialer(settings, guard)
    upstream = UpstreamPool(dialer)  # pooled requests and 401 replays
    m.addons.add(errorcheck.ErrorCheck(repeat_errors_on_stderr=True),
                 # after mitmproxy's TlsConfig: the app sees a leaf for its host alone
                 # (the CA's name constraints permit nothing else)
                 OneNameLeaves(settings.confdir / CA_KEY_AND_CERT),
                 *request_chain(settings, catalog, tokens, calls, upstream),
                 ReportHealth(health),
                 DialCheckedAddresses(dialer))  # the last server_connect hook
    try:
        # Options exist once the addons that declare them are loaded.
        opts.update(**keyless_options(settings))
        if settings.set:
            opts.set(*(f"{name}={value}" for name, value in settings.set))
    except exceptions.OptionsError as exc:
        raise StartupError(f"invalid mitmproxy option: {exc}") from None
    return m


def request_chain(settings: Settings, catalog: Catalog, tokens: TokenCache, calls: CallLog,
                  upstream: UpstreamPool) -> list[object]:
    """keyless' request addons. mitmproxy calls each hook on them in this order, and the
    order is part of their contract (tests/unit/test_addon_order.py checks it):

    - StreamBodies first: it turns streaming on; later addons may turn it off for a request
      (a refusal, a kept 401 body, a pooled request).
    - AzureAuth converts (strips key material, attaches the token, fills the flow record).
    - FailClosed comes right after it and before anything that sends: the upstream pool
      sends in its request hook and the 401 replay in its response hook, both later.
    - AmqpOverWebSocket reads the record AzureAuth filled for a /$servicebus/websocket
      upgrade (refusing one whose names disagree, before anything sends) and converts the
      AMQP inside the WebSocket messages (its websocket hooks are its own).
    - ReplayUnauthorized and PoolUpstream read the record AzureAuth filled.
    - ResignBlobBatch re-signs a Blob Batch's sub-requests in its request hook, before the
      pool sends it (and wraps the record's reattach, so a replay re-signs them too).
    - ObserveUpstream and DiagnoseDenials only watch answers.
    """
    return [
        QuickAck(),
        StreamBodies(),
        ResumeUpstreamTLS(),
        AzureAuth(catalog, tokens, default_identity(), calls, audit=settings.audit),
        FailClosed(catalog, audit=settings.audit),
        # AMQP over WebSocket: reads the record AzureAuth filled for the upgrade request
        AmqpOverWebSocket(catalog, tokens, default_identity(), calls, audit=settings.audit),
        ReplayUnauthorized(tokens, upstream),
        ResignBlobBatch(),
        PoolUpstream(upstream, UpstreamRelay(), enabled=settings.upstream_pool),
        ObserveUpstream(),
        DiagnoseDenials(),
    ]


def default_identity() -> Identity:
    return Identity(os.environ.get("AZURE_CLIENT_ID") or None)


def ready_keys(settings: Settings) -> set[tuple[Identity, str]]:
    """The tokens /readyz waits for: a --ready-scopes scope that listeners use is waited for
    with each of those listeners' identities (a listener may have an identity of its own, and
    the pod perhaps no default one); any other scope with the default identity."""
    keys: set[tuple[Identity, str]] = set()
    for scope in settings.ready_scopes:
        listeners = [spec for spec in settings.listeners if spec.scope == scope]
        keys |= {(listener_identity(spec.identity), scope) for spec in listeners} or {
            (default_identity(), scope)}
    return keys


def listener_identity(identity: Identity) -> Identity:
    return identity if identity.client_id else default_identity()


async def warm_up(tokens: TokenCache, keys: set[tuple[Identity, str]]) -> None:
    """Fetch the readiness tokens at start (retrying), so /readyz can wait for them."""
    pending = sorted(keys, key=lambda key: (key[0].label, key[1]))
    while pending:
        for identity, scope in list(pending):
            try:
                await tokens.get(identity, scope)
                pending.remove((identity, scope))
            except TokenUnavailable as exc:
                logger.warning("not ready yet: %s", exc)
        if pending:
            await asyncio.sleep(2)


async def save_periodically(calls: CallLog, every: float = 5.0) -> None:
    while True:
        await asyncio.sleep(every)
        calls.save()


async def serve(settings: Settings, worker: WorkerRole | None = None) -> int:
    """Run the proxy and the admin server until SIGTERM/SIGINT. `worker`: one of --workers'
    processes: tokens from the supervisor, ports shared, no admin server (the supervisor's)."""
    try:
        metrics.CA_EXPIRY.set(expires_at(prepare_ca_for(settings)))
    except CAError as exc:
        raise StartupError(str(exc)) from None
    source = CredentialSource() if worker is None else SupervisorTokens(
        worker.socket_path, settings.token_timeout + 5)
    tokens = TokenCache(
        source, expiry_margin=settings.token_margin, wait_timeout=settings.token_timeout,
        forget=source.forget, count_fetches=worker is None,
    )
    cached = ready_keys(settings)
    health = Health(tokens_ready=lambda: cached <= set(tokens.peek()))
    calls = CallLog(settings.confdir / STATE_FILE) if worker is None \
        else SharedCallLog(settings.confdir / STATE_FILE)
    collector = metrics.TokenExpiryCollector(tokens.peek, time.time)
    if worker is None:  # the supervisor's cache is the pod's
        metrics.REGISTRY.register(collector)
    else:
        share_listen_ports()
    proxy_master = build_master(settings, tokens, health, calls)
    if worker is not None:
        proxy_master.addons.add(CountWorkerRequests(worker.worker_id))
    guard = proxy_master.addons.get("denydestinations")
    listeners = build_listeners(settings, tokens, calls, app_dialer(settings, guard))
    try:
        report_token = read_admin_token(settings.admin_token_file)
    except AdminTokenError as exc:
        raise StartupError(str(exc)) from None
    admin = AdminServer(health, *settings.admin, report=lambda: build_report(calls.entries()),
                        report_token=report_token)
    try:
        if worker is None:
            await admin.start()
    except OSError as exc:
        raise StartupError(
            f"cannot listen on admin address {settings.admin[0]}:{settings.admin[1]}: "
            f"{exc.strerror}"
        ) from None
    try:
        await listeners.start()
    except ListenerStartError as exc:
        await listeners.stop()
        await admin.stop()
        raise StartupError(str(exc)) from None
    loop = asyncio.get_running_loop()
    http_in_flight = proxy_master.addons.get("reporthealth").in_flight
    drain = Drain(proxy_master, health, settings.drain_timeout,
                  lambda: http_in_flight() + listeners.in_flight, listeners)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain.start)
    logger.info(
        "keyless listening on %s:%s, admin on %s:%s, CA certificate %s",
        *settings.listen, *settings.admin, settings.confdir / "mitmproxy-ca-cert.pem",
    )
    background = [asyncio.create_task(save_periodically(calls)),
                  asyncio.create_task(warm_up(tokens, cached))]
    if worker is not None:
        background.append(asyncio.create_task(
            report_status(worker, lambda: health.ready, drain.start)))
    try:
        await proxy_master.run()
    finally:
        health.listening = False
        for task in background:
            task.cancel()
        await listeners.stop()
        calls.save()
        if worker is None:
            metrics.REGISTRY.unregister(collector)
            await admin.stop()
        await tokens.close()
        await source.close()
    return 0


class Drain:
    """SIGTERM: fail readiness, refuse new connections, let in-flight ones finish (bounded),
    then stop. A second signal stops at once."""

    def __init__(self, proxy_master: master.Master, health: Health, timeout: float,
                 in_flight: Callable[[], int], listeners: Listeners | None = None) -> None:
        self.master, self.health, self.timeout = proxy_master, health, timeout
        self.in_flight = in_flight
        self.listeners = listeners
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is not None:
            logger.info("second signal: stopping now")
            self.master.shutdown()
            return
        self.health.draining = True
        if self.listeners is not None:
            self.listeners.stop_accepting()
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.timeout
        logger.info("draining: %d request(s)/connection(s) in flight, up to %gs",
                    self.in_flight(),
                    self.timeout)
        while self.in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.in_flight():
            logger.warning("drain timeout: %d request(s) cut off", self.in_flight())
        logger.info("stopping")
        self.master.shutdown()
