"""keyless' settings. Every flag is also an environment variable and a TOML key.

Precedence: command-line flag > `KEYLESS_<FLAG>` environment variable > `--config` TOML file >
default. For repeatable flags the first source that sets them wins as a whole. In the
environment, repeated values are separated by commas or newlines.

`FLAGS` is the single source of truth: argparse, the environment, the TOML keys and the
README's flag reference are all derived from it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from proxy.catalog import Catalog, Service, builtin_services
from proxy.connect_to import ConnectTo
from proxy.listeners.spec import (
    ListenerSpec,
    is_loopback,
    parse_listener,
    parse_protocol_routes,
)
from proxy.routes import parse_routes

HostPort = tuple[str, int]


def parse_host_port(text: str) -> HostPort:
    match = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", text.strip())
    if not match or not 0 <= int(match.group(2)) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return match.group(1), int(match.group(2))


def parse_set(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def parse_seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"expected a number of seconds ≥ 0, got {text!r}")
    return value


AMQP_REVERSE = "amqps://"  # marks an AMQP --reverse target until resolve() makes it a listener


def parse_reverse(text: str) -> tuple[int, str]:
    """PORT=https://HOST (HTTP), or PORT=amqps://HOST (AMQP: Service Bus, Event Hubs)."""
    port, sep, url = text.partition("=")
    match = re.fullmatch(r"(https|amqps)://([a-z0-9.-]+)(?::(443|5671))?/?", url.strip().lower())
    if not sep or not port.strip().isdigit() or not 0 < int(port) < 65536 or not match or (
            match.group(3) and match.group(3) != ("443" if match.group(1) == "https" else "5671")):
        raise ValueError(f"expected PORT=https://AZURE-HOST or PORT=amqps://NAMESPACE-HOST, "
                         f"got {text!r}")
    host = match.group(2)
    return int(port), (AMQP_REVERSE + host if match.group(1) == "amqps" else host)


def parse_days(text: str) -> float:
    value = float(text)
    if not 1 <= value <= 3650:
        raise ValueError(f"expected a number of days from 1 to 3650, got {text!r}")
    return value


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_client_id(text: str) -> str | None:
    text = text.strip()
    if text and not re.fullmatch(r"[0-9a-fA-F-]{36}", text):
        raise ValueError(f"expected a GUID, got {text!r}")
    return text or None


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"expected an address or CIDR network, got {text!r}") from None


def parse_log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("json", "text"):
        raise ValueError(f"expected json or text, got {text!r}")
    return value


def cpu_quota(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The cgroup v2 CPU limit in CPUs (`cpu.max` = "QUOTA PERIOD"), None when unlimited."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def available_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by the cgroup quota, at least 1."""
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota()
    if quota is not None:
        cpus = min(cpus, int(quota))
    return max(1, cpus)


def parse_workers(text: str) -> int:
    value = text.strip().lower()
    if value == "auto":
        return available_cpus()
    if not value.isdigit() or not 1 <= int(value) <= 256:
        raise ValueError(f"expected a number from 1 to 256 or auto, got {text!r}")
    return int(value)


def parse_log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError(f"expected debug, info, warning or error, got {text!r}")
    return level


@dataclass(frozen=True)
class Flag:
    name: str
    metavar: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    repeatable: bool = False
    switch: bool = False  # a boolean: `--flag` alone means true

    @property
    def env(self) -> str:
        return "KEYLESS_" + self.name.upper().replace("-", "_")

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")


DEFAULT_DENY_NETWORKS = ("169.254.0.0/16", "168.63.129.16/32", "fe80::/10",
                         "fd00:ec2::254/128")

FLAGS: tuple[Flag, ...] = (
    Flag("listen", "HOST:PORT", "127.0.0.1:8080", parse_host_port,
         "Where the proxy listens; apps set HTTPS_PROXY=http://HOST:PORT."),
    Flag("admin", "HOST:PORT", "127.0.0.1:9180", parse_host_port,
         "Where the admin server listens: /metrics, /healthz, /readyz (open to whoever "
         "reaches it) and /report (loopback clients, or --admin-token-file)."),
    Flag("admin-token-file", "FILE", "", lambda s: Path(s).expanduser() if s else None,
         "A file holding a secret (16+ characters): /report also answers clients off "
         "loopback that send it as `Authorization: Bearer`."),
    Flag("confdir", "DIR", "~/.keyless", lambda s: Path(s).expanduser(),
         "The CA key and certificate, generated on first start. "
         "Apps trust DIR/mitmproxy-ca-cert.pem."),
    Flag("ca-cert", "FILE", "", lambda s: Path(s).expanduser() if s else None,
         "Use this CA certificate (PEM) instead of generating one; needs --ca-key."),
    Flag("ca-key", "FILE", "", lambda s: Path(s).expanduser() if s else None,
         "The supplied CA's private key (PEM); must not be readable by group or others."),
    Flag("ca-validity", "DAYS", "90", parse_days,
         "How long a generated CA is valid. keyless makes a new one at start when a third "
         "of this is left, or when the configured hosts changed; apps must then re-read "
         "the CA certificate."),
    Flag("drain-timeout", "SECONDS", "30", parse_seconds,
         "On SIGTERM: readiness fails, new connections are refused, and in-flight requests "
         "get this long to finish before keyless exits."),
    Flag("workers", "N", "1", parse_workers,
         "Worker processes sharing the listen ports (SO_REUSEPORT), each a full keyless: "
         "one supervisor fetches the tokens for all and serves the admin port. `auto`: the "
         "CPUs this process may use (affinity, cgroup cpu.max). 1: one process."),
    Flag("reverse", "PORT=URL", (), parse_reverse,
         "Reverse mode: serve plain HTTP on 127.0.0.1:PORT and forward to the Azure endpoint "
         "URL (https://HOST), converting as in forward mode; the app needs no proxy setting "
         "and no CA. amqps://NAMESPACE.servicebus.windows.net: a plain AMQP listener for "
         "Service Bus and Event Hubs apps (UseDevelopmentEmulator=true), keyless speaking "
         "AMQPS to the namespace. Repeatable.", repeatable=True),
    Flag("postgres", "[ADDR:]PORT=HOST[:PORT][?OPTS]", (), str,
         "A PostgreSQL listener: apps connect to ADDR:PORT (default 127.0.0.1) with any "
         "password; keyless logs in to HOST (an Azure Database for PostgreSQL server, port "
         "5432) over verified TLS with the identity's Entra token. OPTS: user=NAME (log in "
         "as NAME, not the app's user), client-id=GUID (a user-assigned identity), "
         "client-tls=true (offer TLS to the app with keyless' CA). Repeatable.",
         repeatable=True),
    Flag("mysql", "[ADDR:]PORT=HOST[:PORT][?OPTS]", (), str,
         "A MySQL listener, as --postgres, for Azure Database for MySQL (port 3306). "
         "Repeatable.", repeatable=True),
    Flag("redis", "[ADDR:]PORT=HOST[:PORT][?OPTS]", (), str,
         "A Redis listener for Azure Cache for Redis (port 6380) or Azure Managed Redis "
         "(*.redis.azure.net, port 10000): the app's AUTH becomes AUTH <oid> <token>, and "
         "live connections re-authenticate before the token expires. OPTS: user=OID (instead "
         "of the token's oid claim), client-id=GUID. Repeatable.", repeatable=True),
    Flag("transparent", "BOOL", "false", parse_bool,
         "Transparent mode: --listen receives connections redirected by iptables (see "
         "`keyless iptables`) instead of proxy requests.", switch=True),
    Flag("transparent-listen", "HOST:PORT", "127.0.0.1:15671", parse_host_port,
         "With --transparent: where keyless takes the redirected connections that are not "
         "HTTPS: AMQP (5671; Service Bus, Event Hubs) and, with --transparent-databases, "
         "PostgreSQL, MySQL and Redis. The app's TLS server name picks the Azure host. "
         "Loopback only."),
    Flag("transparent-databases", "BOOL", "false", parse_bool,
         "With --transparent: also take redirected PostgreSQL (5432), MySQL (3306) and Redis "
         "(6380, 10000) connections on --transparent-listen, and have `keyless iptables` "
         "redirect those ports too.", switch=True),
    Flag("connect-to", "HOST:PORT:ADDR:PORT", (), ConnectTo.parse,
         "When the target is HOST:PORT, dial ADDR:PORT instead, keeping HOST as TLS server "
         "name and Host header (curl's meaning; also for tunnelled connections). Repeatable.",
         repeatable=True),
    Flag("set", "NAME=VALUE", (), parse_set,
         "Set any mitmproxy option, e.g. ssl_verify_upstream_trusted_ca=/ca.pem. Repeatable.",
         repeatable=True),
    Flag("allow-clients", "CIDR", (), parse_network,
         "Client networks allowed to use the proxy besides loopback. Required (or "
         "--proxy-auth) when listening off loopback. Repeatable.", repeatable=True),
    Flag("proxy-auth", "SPEC", "", str,
         "Require proxy authentication: USER:PASS, or @FILE for an htpasswd file "
         "(mitmproxy's proxyauth)."),
    Flag("deny-networks", "CIDR", DEFAULT_DENY_NETWORKS, parse_network,
         "Destinations keyless never connects to (cloud metadata, host agents, link-local). "
         "Repeatable; replaces the default list.", repeatable=True),
    Flag("token-margin", "SECONDS", "300", parse_seconds,
         "Never attach a token that expires within this many seconds."),
    Flag("token-timeout", "SECONDS", "10", parse_seconds,
         "How long a request waits for a token before keyless answers 503."),
    Flag("maps-client-id", "GUID", "", parse_client_id,
         "The Azure Maps account's client id, sent as x-ms-client-id with Maps tokens."),
    Flag("keyvault-swap-bearer", "BOOL", "false", parse_bool,
         "Intercept Key Vault and replace the app's own Bearer token with the identity's "
         "(scope from the vault's 401 challenge).", switch=True),
    Flag("ready-scopes", "SCOPE", (), str,
         "Scopes whose tokens are fetched at start; /readyz stays 503 until all are cached. "
         "A scope listeners use is fetched for each of their identities, any other for the "
         "default identity. Repeatable.", repeatable=True),
    Flag("audit", "BOOL", "false", parse_bool,
         "Audit mode: change nothing, forward every request as the app sent it, and record "
         "each key-based call for `keyless report`.", switch=True),
    Flag("upstream-pool", "BOOL", "true", parse_bool,
         "Send an app connection's first converted request (any method; a body of known "
         "length <= 64 KiB) over upstream connections kept alive across app connections; "
         "answers up to 256 KiB come back whole, larger ones stream. Nothing is ever sent "
         "twice: no answer means 502 KeylessUpstreamFailed. false: one upstream connection"
         " per app connection, as mitmproxy does.",
         switch=True),
    Flag("log-level", "LEVEL", "info", parse_log_level,
         "debug, info, warning or error."),
    Flag("log-format", "FORMAT", "json", parse_log_format,
         "json (one object per line) or text (for humans)."),
)
# Keys only the TOML file can hold: [[route]] tables (see proxy/routes.py).
FILE_ONLY_KEYS = {"route"}


@dataclass(frozen=True)
class Settings:
    listen: HostPort
    admin: HostPort
    admin_token_file: Path | None
    confdir: Path
    ca_cert: Path | None
    ca_key: Path | None
    ca_validity: float
    drain_timeout: float
    workers: int
    reverse: tuple[tuple[int, str], ...]
    postgres: tuple[str, ...]
    mysql: tuple[str, ...]
    redis: tuple[str, ...]
    transparent: bool
    transparent_listen: HostPort
    transparent_databases: bool
    connect_to: tuple[ConnectTo, ...]
    set: tuple[tuple[str, str], ...]
    allow_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    proxy_auth: str
    deny_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    token_margin: float
    token_timeout: float
    maps_client_id: str | None
    keyvault_swap_bearer: bool
    ready_scopes: tuple[str, ...]
    audit: bool
    upstream_pool: bool
    log_level: str
    log_format: str
    routes: tuple[Service, ...] = ()
    listeners: tuple[ListenerSpec, ...] = ()
    # (protocol, host) pairs that [[route]] tables with a protocol allow besides Azure's
    protocol_routes: tuple[tuple[str, str], ...] = ()

    def catalog(self) -> Catalog:
        services = builtin_services(self.maps_client_id, self.keyvault_swap_bearer)
        return Catalog(services).with_routes(self.routes)


class ConfigError(ValueError):
    pass


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="A TOML file whose keys are the flag names (env: KEYLESS_CONFIG).")
    for flag in FLAGS:
        env_note = f" (env: {flag.env}; default: {flag.default or 'none'})"
        if flag.switch:
            parser.add_argument(f"--{flag.name}", metavar=flag.metavar, dest=flag.attr,
                                nargs="?", const="true", default=None, help=flag.help + env_note)
            continue
        parser.add_argument(
            f"--{flag.name}", metavar=flag.metavar, dest=flag.attr,
            action="append" if flag.repeatable else "store", default=None,
            help=flag.help + env_note,
        )


def _parse_one(flag: Flag, raw: Any, source: str) -> Any:
    try:
        if flag.repeatable:
            items = raw if isinstance(raw, list | tuple) else [raw]
            return tuple(flag.parse(str(item)) for item in items)
        if isinstance(raw, list | dict):
            raise ValueError("expected a single value")
        return flag.parse(str(raw))
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = {flag.name for flag in FLAGS} | FILE_ONLY_KEYS
    if unknown := sorted(set(data) - known):
        raise ConfigError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; "
            f"known keys: {', '.join(sorted(known))}"
        )
    if isinstance(data.get("set"), dict):  # [set] table form: name = value
        data["set"] = [f"{k}={v if not isinstance(v, bool) else str(v).lower()}"
                       for k, v in data["set"].items()]
    return data


def resolve(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings:
    """Merge flags, environment and TOML file into Settings; raise ConfigError on bad input."""
    config_path = args.config or environ.get("KEYLESS_CONFIG")
    file_values = _read_toml(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for flag in FLAGS:
        from_flag = getattr(args, flag.attr, None)
        from_env = environ.get(flag.env)
        if from_flag is not None:
            values[flag.attr] = _parse_one(flag, from_flag, f"--{flag.name}")
        elif from_env is not None and from_env.strip():
            raw: Any = from_env
            if flag.repeatable:
                raw = [item for item in re.split(r"[,\n]", from_env) if item.strip()]
            values[flag.attr] = _parse_one(flag, raw, flag.env)
        elif flag.name in file_values:
            raw_file = file_values[flag.name]
            if isinstance(raw_file, bool):
                raw_file = str(raw_file).lower()
            values[flag.attr] = _parse_one(flag, raw_file, f"{config_path}: {flag.name}")
        else:
            values[flag.attr] = _parse_one(flag, list(flag.default) if flag.repeatable
                                           else flag.default, "default")
    settings = Settings(**values)
    check_not_open_proxy(settings)
    routes = file_values.get("route", [])
    if not isinstance(routes, list):
        raise ConfigError(f"{config_path}: route must be an array of tables ([[route]])")
    try:
        http_routes, routed_hosts = parse_protocol_routes(routes)
        settings = replace(settings, routes=parse_routes(http_routes, settings.catalog()))
    except ValueError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
    amqp = [(port, host.removeprefix(AMQP_REVERSE)) for port, host in settings.reverse
            if host.startswith(AMQP_REVERSE)]
    settings = replace(settings, reverse=tuple((port, host) for port, host in settings.reverse
                                               if not host.startswith(AMQP_REVERSE)))
    settings = replace(settings, listeners=listener_specs(settings, routed_hosts, amqp),
                       protocol_routes=tuple(sorted((protocol, host)
                                                    for protocol, hosts in routed_hosts.items()
                                                    for host in hosts)))
    catalog = settings.catalog()
    for port, host in settings.reverse:
        if not catalog.intercepts(host):
            raise ConfigError(f"--reverse {port}={host}: not an Azure host keyless knows "
                              "(add a [[route]] for it)")
    return settings


def listener_specs(settings: Settings, routed_hosts: Mapping[str, frozenset[str]],
                   amqp: Sequence[tuple[int, str]] = ()) -> tuple[ListenerSpec, ...]:
    specs: list[ListenerSpec] = []
    for port, host in amqp:  # --reverse PORT=amqps://NAMESPACE: a plain AMQP listener
        try:
            specs.append(parse_listener("amqp", f"{port}={host}",
                                        routed_hosts.get("amqp", frozenset())))
        except ValueError as exc:
            raise ConfigError(str(exc).replace("--amqp", "--reverse")) from None
    for protocol in ("postgres", "mysql", "redis"):
        for text in getattr(settings, protocol):
            try:
                specs.append(parse_listener(protocol, text, routed_hosts.get(protocol,
                                                                            frozenset())))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    taken = {settings.listen[1]: "--listen", settings.admin[1]: "--admin",
             **{port: "--reverse" for port, _ in settings.reverse}}
    if settings.transparent_databases and not settings.transparent:
        raise ConfigError("--transparent-databases needs --transparent")
    if settings.transparent:
        if not is_loopback(settings.transparent_listen[0]):
            raise ConfigError("--transparent-listen must be a loopback address: iptables "
                              "REDIRECT delivers the pod's connections there")
        port = settings.transparent_listen[1]
        if port in taken:
            raise ConfigError(f"--transparent-listen port {port} is already used by "
                              f"{taken[port]}")
        taken[port] = "--transparent-listen"
    for spec in specs:
        port = spec.listen[1]
        if port in taken:
            raise ConfigError(f"--{spec.protocol} {spec.listen[0]}:{port}: port {port} is "
                              f"already used by {taken[port]}")
        taken[port] = f"--{spec.protocol}"
        if not spec.loopback and not settings.allow_clients:
            raise ConfigError(
                f"refusing to listen on {spec.listen[0]}:{port} for {spec.protocol} off "
                "loopback without --allow-clients: anyone who reaches it could log in with "
                "this identity's token")
    return tuple(specs)


def check_not_open_proxy(settings: Settings) -> None:
    """Listening beyond loopback needs proxy authentication or an allowlist of clients."""
    host = settings.listen[0]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not settings.allow_clients and not settings.proxy_auth:
        raise ConfigError(
            f"refusing to listen on {host}:{settings.listen[1]} as an open proxy: anyone who "
            "reaches it could use this identity's tokens. Set --allow-clients CIDR or "
            "--proxy-auth, or listen on 127.0.0.1"
        )


def flag_reference() -> str:
    """The Markdown flag table for the README (a test keeps the README in step with it)."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |",
            "| `--config FILE` | `KEYLESS_CONFIG` | none | A TOML file whose keys are the "
            "flag names. |"]
    for flag in FLAGS:
        shown = ",".join(flag.default) if isinstance(flag.default, tuple) else flag.default
        default = f"`{shown}`" if shown else "none"
        metavar = f"[{flag.metavar}]" if flag.switch else flag.metavar
        rows.append(f"| `--{flag.name} {metavar}` | `{flag.env}` | {default} | {flag.help} |")
    return "\n".join(rows)


