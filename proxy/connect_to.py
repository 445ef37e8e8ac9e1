"""curl's --connect-to for keyless: dial another address, keep the name.

`HOST:PORT:ADDR:PORT` — when keyless would connect to HOST:PORT, it connects to ADDR:PORT
instead; TLS server name, certificate checks and the Host header still use HOST. An empty
HOST or PORT on the left matches any; an empty ADDR or PORT on the right keeps the original.
Rules match host names; an IP-literal target is dialled as given. The table is applied by
the dialer for app traffic (proxy/dial.py): every connection keyless makes for the app,
intercepted, tunnelled and pooled alike, and none of keyless' own (Entra token requests).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def _split(spec: str) -> list[str]:
    """Split on ':' outside [brackets], so IPv6 literals can be written [::1]."""
    parts, current, depth = [], "", 0
    for char in spec:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == ":" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p[1:-1] if p.startswith("[") and p.endswith("]") else p for p in parts]


def _port(text: str, spec: str) -> int | None:
    if not text:
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"invalid port {text!r} in --connect-to {spec!r}")
    return int(text)


@dataclass(frozen=True, slots=True)
class ConnectTo:
    host: str | None
    port: int | None
    to_host: str | None
    to_port: int | None

    @classmethod
    def parse(cls, spec: str) -> ConnectTo:
        parts = _split(spec.strip())
        if len(parts) != 4:
            raise ValueError(
                f"--connect-to {spec!r}: expected HOST:PORT:ADDR:PORT "
                "(write IPv6 addresses in brackets)"
            )
        host, port, to_host, to_port = parts
        return cls(host.lower() or None, _port(port, spec), to_host or None, _port(to_port, spec))

    def applies(self, host: str, port: int) -> bool:
        return (self.host is None or self.host == host.lower()) and (
            self.port is None or self.port == port
        )


class ConnectToTable:
    def __init__(self, rules: Iterable[ConnectTo] = ()) -> None:
        self.rules = tuple(rules)

    def route(self, host: str, port: int) -> tuple[str, int]:
        """Where to dial for host:port: the first matching rule wins, else unchanged."""
        for rule in self.rules:
            if rule.applies(host, port):
                return rule.to_host or host, rule.to_port or port
        return host, port
