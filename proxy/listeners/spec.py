"""What a listener is: `--postgres [ADDR:]PORT=HOST[:PORT][?OPTIONS]` and its kin, parsed.

The upstream host must be an Azure host of that protocol (the public cloud's and the
sovereign clouds' suffixes below) or named by an explicit `[[route]]` with `protocol = "..."`
in the TOML file, so a typo never sends a token to a host outside Azure.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from proxy.tokens import Identity

OSSRDBMS_SCOPE = "https://ossrdbms-aad.database.windows.net/.default"
REDIS_SCOPE = "https://redis.azure.com/.default"


@dataclass(frozen=True, slots=True)
class ProtocolInfo:
    name: str
    scope: str
    default_port: int
    suffixes: tuple[str, ...]
    # (suffix, port) pairs whose default port differs (Azure Managed Redis listens on 10000)
    port_overrides: tuple[tuple[str, int], ...] = ()

    def default_port_for(self, host: str) -> int:
        for suffix, port in self.port_overrides:
            if host.endswith(suffix):
                return port
        return self.default_port


SERVICEBUS_SCOPE = "https://servicebus.azure.net/.default"
EVENTHUBS_SCOPE = "https://eventhubs.azure.net/.default"

PROTOCOLS: dict[str, ProtocolInfo] = {
    # AMQP 1.0 (Service Bus, Event Hubs): the scope is chosen per entity (Event Hubs by a
    # route with service = "eventhubs"); this is the default.
    "amqp": ProtocolInfo(
        "amqp", SERVICEBUS_SCOPE, 5671,
        (".servicebus.windows.net", ".servicebus.usgovcloudapi.net",
         ".servicebus.chinacloudapi.cn")),
    "postgres": ProtocolInfo(
        "postgres", OSSRDBMS_SCOPE, 5432,
        (".postgres.database.azure.com", ".postgres.database.chinacloudapi.cn",
         ".postgres.database.usgovcloudapi.net")),
    "mysql": ProtocolInfo(
        "mysql", OSSRDBMS_SCOPE, 3306,
        (".mysql.database.azure.com", ".mysql.database.chinacloudapi.cn",
         ".mysql.database.usgovcloudapi.net")),
    "redis": ProtocolInfo(
        "redis", REDIS_SCOPE, 6380,
        (".redis.cache.windows.net", ".redis.cache.chinacloudapi.cn",
         ".redis.cache.usgovcloudapi.net", ".redis.azure.net"),
        port_overrides=((".redis.azure.net", 10000),)),
}
OPTIONS = {"user", "client-id", "client-tls"}
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HOST = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+")


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    protocol: str
    listen: tuple[str, int]
    upstream: tuple[str, int]
    identity: Identity = field(default_factory=Identity)
    user: str | None = None  # PG/MySQL: the login user instead of the app's; Redis: AUTH user
    client_tls: bool = False  # PG/MySQL: offer TLS with keyless' CA to the app

    @property
    def scope(self) -> str:
        return PROTOCOLS[self.protocol].scope

    @property
    def name(self) -> str:
        """The metric label: bounded, one per configured listener."""
        return f"{self.protocol}:{self.listen[1]}"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.listen[0])


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def azure_host(protocol: str, host: str) -> bool:
    return any(host.endswith(suffix) and len(host) > len(suffix)
               for suffix in PROTOCOLS[protocol].suffixes)


def _bool(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{where}: expected true or false, got {text!r}")


def parse_listener(protocol: str, text: str, routed_hosts: frozenset[str] = frozenset()
                   ) -> ListenerSpec:
    """`[ADDR:]PORT=HOST[:PORT][?user=NAME&client-id=GUID&client-tls=BOOL]`."""
    info = PROTOCOLS[protocol]
    usage = f"expected [ADDR:]PORT={protocol.upper()}-HOST[:PORT][?user=…&client-id=…]"
    local, sep, rest = text.strip().partition("=")
    if not sep:
        raise ValueError(f"--{protocol} {text!r}: {usage}")
    target, _, query = rest.partition("?")
    where = f"--{protocol} {local}={target}"
    match = re.fullmatch(r"(?:\[?([^\[\]]*?)\]?:)?(\d{1,5})", local.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"{where}: {usage}")
    listen = (match.group(1) or "127.0.0.1", int(match.group(2)))
    host, _, port_text = target.strip().lower().partition(":")
    if not _HOST.fullmatch(host) or (port_text and not port_text.isdigit()):
        raise ValueError(f"{where}: {usage}")
    port = int(port_text) if port_text else info.default_port_for(host)
    if not 0 < port < 65536:
        raise ValueError(f"{where}: bad port {port}")
    if not azure_host(protocol, host) and host not in routed_hosts:
        raise ValueError(
            f"{where}: {host} is not an Azure {protocol} host ({', '.join(info.suffixes)}); "
            f"name it in a [[route]] with protocol = \"{protocol}\" to allow it")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    if unknown := sorted(set(options) - OPTIONS):
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(OPTIONS))}")
    client_id = options.get("client-id", "").strip() or None
    if client_id and not _GUID.fullmatch(client_id):
        raise ValueError(f"{where}: client-id must be a GUID")
    if protocol == "redis" and "client-tls" in options:
        raise ValueError(f"{where}: client-tls is for PostgreSQL and MySQL (Redis apps that "
                         "speak TLS connect to keyless in transparent mode)")
    client_tls = _bool(options.get("client-tls", "false"), where)
    user = options.get("user", "").strip() or None
    return ListenerSpec(protocol, listen, (host, port), Identity(client_id), user, client_tls)


def parse_protocol_routes(routes: list[object]) -> tuple[list[object], dict[str, frozenset[str]]]:
    """Split `[[route]]` tables with a `protocol` key (hosts a listener may dial) from the
    HTTP routes. Returns (HTTP routes, {protocol: hosts})."""
    http_routes: list[object] = []
    hosts: dict[str, set[str]] = {name: set() for name in PROTOCOLS}
    for index, raw in enumerate(routes):
        if not isinstance(raw, dict) or "protocol" not in raw:
            http_routes.append(raw)
            continue
        where = f"route {index + 1}"
        protocol, host = raw.get("protocol"), raw.get("host")
        if protocol not in PROTOCOLS:
            raise ValueError(f"{where}: protocol must be one of {', '.join(PROTOCOLS)}")
        if unknown := sorted(set(raw) - {"protocol", "host"}):
            raise ValueError(f"{where}: a protocol route takes only host and protocol, not "
                             f"{', '.join(unknown)}")
        if not isinstance(host, str) or not _HOST.fullmatch(host.lower()):
            raise ValueError(f"{where}: host must be a DNS name (no wildcards)")
        hosts[protocol].add(host.lower())
    return http_routes, {name: frozenset(names) for name, names in hosts.items()}
