"""curl's --connect-to for keyless: dial another address, keep the name.

`HOST:PORT:ADDR:PORT` — when keyless would connect to HOST:PORT, it connects to ADDR:PORT
instead; TLS server name, certificate checks and the Host header still use HOST. An empty
HOST or PORT on the left matches any; an empty ADDR or PORT on the right keeps the original.
The rewrite happens in the event loop's name resolution, so it applies to every outgoing
connection keyless makes for the app: intercepted and tunnelled alike.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


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


class ConnectToEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose name resolution applies the --connect-to table."""

    connect_to: ConnectToTable = ConnectToTable()

    async def getaddrinfo(  # type: ignore[override]
        self, host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:
        if self.connect_to.rules and host is not None and port is not None:
            name = host.decode("idna") if isinstance(host, bytes) else str(host)
            try:
                number = port if isinstance(port, int) else socket.getservbyname(port) \
                    if not str(port).isdigit() else int(port)
            except OSError:
                number = None
            if number is not None:
                host, port = self.connect_to.route(name, number)
        return await super().getaddrinfo(
            host, port, family=family, type=type, proto=proto, flags=flags
        )
