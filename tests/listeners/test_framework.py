"""The listener framework with a stand-in session: verified upstream TLS, --connect-to, the
deny list, the relay (both directions, back-pressure, byte counts), one bad connection not
stopping the others, and the client-TLS leaf from keyless' CA."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import trustme

from proxy import metrics
from proxy.audit import CallLog
from proxy.ca import CA_CERT, CA_KEY_AND_CERT, prepare_ca
from proxy.connect_to import ConnectTo, ConnectToTable
from proxy.dial import AppDialer
from proxy.listeners.connection import ClientTLS, Connection, Shared
from proxy.listeners.relay import relay
from proxy.listeners.server import Listener
from proxy.listeners.spec import ListenerSpec
from proxy.listeners.upstream import UpstreamDialer, UpstreamError, upstream_tls_context
from proxy.tokens import TokenCache

HOST = "db1.postgres.database.azure.com"


async def echo_server(tls: ssl.SSLContext | None) -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=tls)
    return server, server.sockets[0].getsockname()[1]


def dialer_to(port: int, cafile: Path, denied=lambda address: False) -> UpstreamDialer:
    table = ConnectToTable((ConnectTo.parse(f"{HOST}:5432:127.0.0.1:{port}"),))
    return UpstreamDialer(AppDialer(table, denied),
                          upstream_tls_context([("ssl_verify_upstream_trusted_ca", str(cafile))]))


@pytest.fixture()
def server_ca(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST).configure_cert(context)
    cafile = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    return context, cafile


def test_upstream_tls_is_verified_for_the_azure_name(server_ca, tmp_path: Path) -> None:
    context, cafile = server_ca
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))

    async def scenario() -> None:
        server, port = await echo_server(context)
        async with server:
            reader, writer = await dialer_to(port, cafile).open(HOST, 5432, tls=True)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            with pytest.raises(UpstreamError, match="failed TLS verification"):
                await dialer_to(port, other).open(HOST, 5432, tls=True)
            # in-band upgrade (PostgreSQL/MySQL): plain first, then TLS, verified as well
            with pytest.raises(UpstreamError, match="failed TLS verification"):
                _, writer = await dialer_to(port, other).open(HOST, 5432, tls=False)
                await dialer_to(port, other).start_tls(writer, HOST)

    asyncio.run(scenario())


def test_denied_destinations_are_never_dialled(server_ca) -> None:
    context, cafile = server_ca

    async def scenario() -> None:
        server, port = await echo_server(context)
        async with server:
            dialer = dialer_to(port, cafile, denied=lambda address: address == "127.0.0.1")
            with pytest.raises(UpstreamError, match="denied destination"):
                await dialer.open(HOST, 5432, tls=True)

    asyncio.run(scenario())


def shared_for(dialer: UpstreamDialer, tmp_path: Path) -> Shared:
    async def no_token(identity, scope):  # the stand-in session asks for none
        raise AssertionError("no token expected")

    return Shared(TokenCache(no_token), dialer, CallLog(None), ClientTLS(tmp_path / "none"))


def test_listener_relays_both_ways_and_survives_a_failing_session(server_ca,
                                                                   tmp_path: Path) -> None:
    context, cafile = server_ca
    spec = ListenerSpec("postgres", ("127.0.0.1", 0), (HOST, 5432))

    async def session(conn: Connection, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(1)
        if first == b"!":
            raise RuntimeError("this session fails")
        upstream = await conn.open_upstream(tls=True)
        upstream[1].write(first)
        await relay(conn, (reader, writer), upstream)

    async def scenario() -> None:
        server, port = await echo_server(context)
        async with server:
            listener = Listener(spec, shared_for(dialer_to(port, cafile), tmp_path),
                                session=session)
            await listener.start()
            assert listener._server is not None
            local = listener._server.sockets[0].getsockname()[1]
            bad_reader, bad_writer = await asyncio.open_connection("127.0.0.1", local)
            bad_writer.write(b"!")
            assert await bad_reader.read() == b""  # closed, and the listener goes on
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            payload = bytes(range(256)) * 8192  # 2 MiB: more than any buffer holds
            sent = asyncio.create_task(_send(writer, payload))
            assert await reader.readexactly(len(payload)) == payload
            await sent
            writer.close()
            await listener.stop()

    before = metrics.LISTENER_BYTES.labels(listener=spec.name, direction="to_client")._value.get()
    asyncio.run(scenario())
    after = metrics.LISTENER_BYTES.labels(listener=spec.name, direction="to_client")._value.get()
    assert after - before >= 2 * 1024 * 1024


async def _send(writer: asyncio.StreamWriter, payload: bytes) -> None:
    for start in range(0, len(payload), 100_000):
        writer.write(payload[start:start + 100_000])
        await writer.drain()


def test_allowlist_is_loopback_plus_the_configured_networks(server_ca, tmp_path: Path) -> None:
    import ipaddress

    spec = ListenerSpec("redis", ("0.0.0.0", 0), ("c.redis.cache.windows.net", 6380))
    listener = Listener(spec, shared_for(dialer_to(1, server_ca[1]), tmp_path),
                        allow=[ipaddress.ip_network("10.1.0.0/16")], session=lambda *a: None)
    assert listener.allowed("127.0.0.1") and listener.allowed("::1")
    assert listener.allowed("10.1.2.3")
    assert not listener.allowed("10.2.0.1") and not listener.allowed("192.168.1.1")


def test_client_tls_leaf_chains_to_keyless_ca(tmp_path: Path) -> None:
    confdir = tmp_path / "confdir"
    prepare_ca(confdir, zones=("postgres.database.azure.com",), validity_days=30)
    server_context = ClientTLS(confdir / CA_KEY_AND_CERT).context(HOST)
    client_context = ssl.create_default_context(cafile=str(confdir / CA_CERT))

    async def scenario() -> None:
        async def hello(reader, writer) -> None:
            writer.write(b"hi")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context, server_hostname=HOST)
            assert await reader.read(2) == b"hi"
            writer.close()
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection("127.0.0.1", port, ssl=client_context,
                                              server_hostname="other.postgres.database.azure.com")

    asyncio.run(scenario())
