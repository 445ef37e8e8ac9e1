"""The dialer for app traffic: where keyless connects when it connects for the app.

One place decides it, for mitmproxy's upstream connections and for the upstream pool alike:
`--connect-to` is applied, the name is resolved **once**, every address is checked against
the deny list, and the connection is made to exactly the addresses that were checked. Nothing
else keyless connects to (its own Entra token requests, above all) goes through here, so a
wildcard `--connect-to` rule cannot divert them.

Why "exactly the checked addresses" needs care: a check that resolves the name and a connect
that resolves it again can get two different answers (DNS rebinding: first an allowed address,
then a metadata address). The pool hands aiohttp the checked addresses directly (proxy/
upstream.py). mitmproxy's `open_connection` (proxy/server.py) only takes `server.address`,
which it resolves itself after the `server_connect` hook; and that address must keep naming
the CONNECT target (the token agreement check reads it, and mitmproxy derives the TLS server
name from it), even while the connect is under way, because other HTTP/2 streams of the same
connection read it meanwhile. So the address is left alone and the hook *pins* the checked
answer instead: `pin()` stores it in the connecting task's context (mitmproxy awaits the
`server_connect` hook and the connect in one task), and `CheckedDialLoop.getaddrinfo`, which
asyncio's `create_connection` calls for that very name, returns the pinned answer instead of
asking DNS again, once. Without a pin the loop resolves as any loop does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from proxy.connect_to import ConnectToTable

AddrInfo = tuple[Any, ...]  # (family, type, proto, canonname, sockaddr), as getaddrinfo gives
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DestinationDenied(OSError):
    """The destination is, or resolves to, an address keyless never connects to for the app."""


def ip_address(text: str) -> IPAddress | None:
    """The address an IP literal names (IPv4-mapped IPv6 as IPv4, zone dropped), else None."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class AppDialer:
    """--connect-to, one resolution, the deny list. `denied(address)` is the deny list;
    `own_port` is keyless' admin port: no client may reach it through keyless on loopback
    (the admin server trusts loopback peers)."""

    def __init__(self, connect_to: ConnectToTable | None = None,
                 denied: Callable[[str], bool] = lambda address: False,
                 own_port: int | None = None) -> None:
        self.connect_to = connect_to or ConnectToTable()
        self.denied, self.own_port = denied, own_port

    def route(self, host: str, port: int) -> tuple[str, int]:
        """Where to dial: --connect-to rules match host names; an IP literal is dialled as
        given (keyless' own relay on 127.0.0.1 is one, and no wildcard may move it)."""
        if ip_address(host) is not None:
            return host, port
        return self.connect_to.route(host, port)

    def refused(self, address: str, port: int) -> bool:
        ip = ip_address(address)
        if ip is not None and ip.is_loopback and port == self.own_port:
            return True
        return self.denied(address)

    async def resolve(self, host: str, port: int, family: int = 0,
                      flags: int = 0) -> list[AddrInfo]:
        """The addresses to connect to for host:port, all checked; raises DestinationDenied
        (any address denied) or OSError (no address)."""
        to_host, to_port = self.route(host, port)
        # Straight to the resolver, never through a pin (see the module docstring).
        infos = await asyncio.get_running_loop().run_in_executor(
            None, socket.getaddrinfo, to_host, to_port, family, socket.SOCK_STREAM, 0, flags)
        if not infos:
            raise OSError(f"{to_host} has no address")
        if any(self.refused(str(info[4][0]), int(info[4][1])) for info in infos):
            raise DestinationDenied(f"{host}:{port} resolves to a denied destination")
        return infos


@dataclass(frozen=True, slots=True)
class Checked:
    host: str
    port: int
    infos: tuple[AddrInfo, ...]


_CHECKED: ContextVar[Checked | None] = ContextVar("keyless_checked_addresses", default=None)


def pin(host: str, port: int, infos: Sequence[AddrInfo]) -> None:
    """The next resolution of host:port in this task returns `infos` (checked), not DNS."""
    _CHECKED.set(Checked(host, port, tuple(infos)))


def unpin() -> None:
    _CHECKED.set(None)


class CheckedDialLoop(asyncio.SelectorEventLoop):
    """An event loop whose getaddrinfo answers a pinned name with its checked addresses."""

    async def getaddrinfo(  # type: ignore[override]
        self, host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:
        checked = _CHECKED.get()
        if checked is None:
            return await super().getaddrinfo(
                host, port, family=family, type=type, proto=proto, flags=flags)
        unpin()  # one connection per check
        name = host.decode("idna") if isinstance(host, bytes) else host
        if (name, port) != (checked.host, checked.port):
            # Something changed the destination after the check: fail closed.
            raise OSError(f"keyless checked {checked.host}:{checked.port}, not {name}:{port}")
        return [info for info in checked.infos if family in (0, info[0])]
