"""The listeners' servers: accept, check the client, run the protocol session, count, drain."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable

from proxy import metrics
from proxy.listeners.connection import Connection, Shared
from proxy.listeners.spec import ListenerSpec
from proxy.redact import redact
from proxy.tokens import Identity

logger = logging.getLogger("proxy.listeners")
# --workers: every worker binds the same ports and the kernel spreads the connections
REUSE_PORT = False
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Session = Callable[[Connection, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ListenerStartError(Exception):
    pass


def session_for(protocol: str) -> Session:
    """`proxy/<protocol>/session.py serve`: each protocol's code lives in its own package."""
    module = importlib.import_module(f"proxy.{protocol}.session")
    serve: Session = module.serve
    return serve


class Listener:
    def __init__(self, spec: ListenerSpec, shared: Shared, allow: Iterable[Network] = (),
                 session: Session | None = None) -> None:
        self.spec, self.shared = spec, shared
        self.allow = tuple(allow)
        self.session = session or session_for(spec.protocol)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.open_gauge = metrics.LISTENER_OPEN.labels(listener=spec.name,
                                                       protocol=spec.protocol)
        self.accepted = metrics.LISTENER_CONNECTIONS.labels(listener=spec.name,
                                                            protocol=spec.protocol)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        host, port = self.spec.listen
        try:
            self._server = await asyncio.start_server(self._accept, host, port,
                                                      limit=256 * 1024, reuse_address=True,
                                                      reuse_port=REUSE_PORT or None)
        except OSError as exc:
            raise ListenerStartError(
                f"--{self.spec.protocol}: cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
        logger.info("%s listener on %s:%s for %s:%s (identity %s)", self.spec.protocol, host,
                    port, *self.spec.upstream, self.spec.identity.label)

    def allowed(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return address.is_loopback or any(address in network for network in self.allow)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername") or ("?", 0)
        if not self.allowed(str(peername[0])):
            logger.warning("%s listener refused client %s: not in --allow-clients",
                           self.spec.name, peername[0])
            writer.close()
            return
        await self._run(Connection(self.spec, "", self.shared), reader, writer, self.session)

    async def _run(self, conn: Connection, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter, session: Session) -> None:
        peername = writer.get_extra_info("peername") or ("?", 0)
        conn.peer = f"{peername[0]}:{peername[1]}"
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        accepted, open_gauge = self.accepted, self.open_gauge
        if conn.spec.protocol != self.spec.protocol:  # transparent: counted per protocol
            accepted = metrics.LISTENER_CONNECTIONS.labels(listener=conn.spec.name,
                                                           protocol=conn.spec.protocol)
            open_gauge = metrics.LISTENER_OPEN.labels(listener=conn.spec.name,
                                                      protocol=conn.spec.protocol)
        accepted.inc()
        open_gauge.inc()
        try:
            if conn.transparent and conn.spec.protocol in TLS_FIRST:
                # TLS from the first byte: the session sees the plain stream
                tls_reader, tls_writer = await conn.accept_client_tls(reader, writer)
                try:
                    await session(conn, tls_reader, tls_writer)  # type: ignore[arg-type]
                finally:
                    tls_writer.close()
                return
            await session(conn, reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # one bad connection never stops the listener
            logger.warning("%s connection from %s ended with an error: %s", self.spec.name,
                           conn.peer, redact(f"{type(exc).__name__}: {exc}", limit=300))
        finally:
            self._tasks.discard(task)
            open_gauge.dec()
            writer.close()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def stop(self) -> None:
        self.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)


class Listeners:
    """All configured listeners, started and drained together."""

    def __init__(self, listeners: list[Listener]) -> None:
        self.listeners = listeners

    @property
    def in_flight(self) -> int:
        return sum(listener.in_flight for listener in self.listeners)

    async def start(self) -> None:
        for listener in self.listeners:
            await listener.start()

    def stop_accepting(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()

    async def drain(self, deadline: float) -> None:
        """Refuse new connections; let open ones finish until `deadline` (monotonic)."""
        self.stop_accepting()
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        for listener in self.listeners:
            await listener.stop()


SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number
PROTOCOL_BY_PORT = {5671: "amqp", 5432: "postgres", 3306: "mysql", 6380: "redis",
                    10000: "redis"}
TLS_FIRST = {"amqp", "redis"}  # AMQPS and Redis speak TLS from the first byte


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where a connection redirected by iptables REDIRECT was going (None: not redirected)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")
    except OSError:
        return None


class TransparentListener(Listener):
    """--transparent-listen: connections iptables redirected from AMQPS (5671) and, with
    --transparent-databases, the Azure database and cache ports. The original port picks
    the protocol; the app's TLS server name picks the server (an Azure host of that protocol,
    or one a protocol route names), dialled at the address the app dialled. Every such app
    uses TLS (Azure requires it), so the name is always there; a connection without it is
    refused before anything goes upstream. There is no client check: REDIRECT keeps the pod's
    own source address, and only the pod's own connections reach a loopback listener
    (--transparent-listen must be loopback)."""

    def __init__(self, listen: tuple[str, int], shared: Shared,
                 allowed: Callable[[str, str], bool], identity: Identity,
                 sessions: dict[str, Session] | None = None,
                 protocols: set[str] | None = None) -> None:
        spec = ListenerSpec("transparent", listen, ("", 0))
        super().__init__(spec, shared, session=lambda *args: asyncio.sleep(0))
        self.allowed_host = allowed
        self.identity = identity
        self.protocols = protocols if protocols is not None else set(PROTOCOL_BY_PORT.values())
        self.sessions = sessions or {}
        self.contexts = {
            protocol: shared.client_tls.by_server_name(lambda host, p=protocol: allowed(p, host))
            for protocol in set(PROTOCOL_BY_PORT.values())}

    def session_of(self, protocol: str) -> Session:
        if protocol not in self.sessions:
            self.sessions[protocol] = session_for(protocol)
        return self.sessions[protocol]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        destination = original_destination(sock) if sock is not None else None
        protocol = PROTOCOL_BY_PORT.get(destination[1]) if destination else None
        if destination is None or protocol is None or protocol not in self.protocols:
            logger.warning("transparent listener: a connection that was not redirected from "
                           "a port it takes (original destination %s); closed", destination)
            writer.close()
            return
        spec = ListenerSpec(protocol, self.spec.listen, ("", destination[1]),
                            identity=self.identity, client_tls=True)
        conn = Connection(spec, "", self.shared, original_destination=destination,
                          server_name_context=self.contexts[protocol])
        await self._run(conn, reader, writer, self.session_of(protocol))
