"""--connect-to parsing and routing; the dialer for app traffic and its pinned addresses;
the 'all names agree' rule for attaching tokens."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from proxy.authority import Destination
from proxy.connect_to import ConnectTo, ConnectToTable
from proxy.dial import AppDialer, CheckedDialLoop, DestinationDenied, pin


def test_parse_like_curl():
    assert ConnectTo.parse("a.blob.core.windows.net:443:127.0.0.1:10000") == ConnectTo(
        "a.blob.core.windows.net", 443, "127.0.0.1", 10000
    )
    assert ConnectTo.parse("::[::1]:8443") == ConnectTo(None, None, "::1", 8443)
    assert ConnectTo.parse("A.Example:443::") == ConnectTo("a.example", 443, None, None)


def test_table_routes_first_match_and_leaves_others():
    table = ConnectToTable([
        ConnectTo.parse("a.example:443:127.0.0.1:1"),
        ConnectTo.parse(":443:127.0.0.2:"),
    ])
    assert table.route("A.EXAMPLE", 443) == ("127.0.0.1", 1)
    assert table.route("b.example", 443) == ("127.0.0.2", 443)
    assert table.route("a.example", 80) == ("a.example", 80)


async def hello_server() -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(
        lambda r, w: (w.write(b"hello"), w.close()), "127.0.0.1", 0
    )
    return server, server.sockets[0].getsockname()[1]


def run_on_checked_loop(scenario: Any) -> Any:
    with asyncio.Runner(loop_factory=CheckedDialLoop) as runner:
        return runner.run(scenario())


def test_dialer_applies_connect_to_to_names_only():
    dialer = AppDialer(ConnectToTable([ConnectTo.parse("::127.0.0.1:1234")]))
    assert dialer.route("nowhere.blob.core.windows.net", 443) == ("127.0.0.1", 1234)
    # IP literals (keyless' own relay on 127.0.0.1 among them) are dialled as given
    assert dialer.route("127.0.0.1", 5678) == ("127.0.0.1", 5678)
    infos = asyncio.run(dialer.resolve("nowhere.blob.core.windows.net", 443))
    assert {info[4][:2] for info in infos} == {("127.0.0.1", 1234)}


def test_dialer_refuses_denied_addresses_and_keyless_own_admin_port():
    dialer = AppDialer(ConnectToTable([ConnectTo.parse("denied.example:443:127.0.0.2:443")]),
                       denied=lambda address: address == "127.0.0.2", own_port=9180)
    with pytest.raises(DestinationDenied):
        asyncio.run(dialer.resolve("denied.example", 443))
    with pytest.raises(DestinationDenied):  # the admin server trusts loopback peers
        asyncio.run(dialer.resolve("localhost", 9180))
    assert asyncio.run(dialer.resolve("localhost", 9181))


def test_a_pinned_name_connects_to_the_checked_address_without_asking_dns():
    async def scenario() -> bytes:
        server, port = await hello_server()
        infos = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        pin("no-such-name.invalid", 443, infos)  # DNS would not know it
        reader, writer = await asyncio.open_connection("no-such-name.invalid", 443)
        data = await reader.read()
        writer.close()
        server.close()
        return data

    assert run_on_checked_loop(scenario) == b"hello"


def test_a_pin_serves_one_connection_and_only_its_own_name():
    async def scenario() -> None:
        infos = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 9))]
        loop = asyncio.get_running_loop()
        pin("checked.example", 443, infos)
        assert await loop.getaddrinfo("checked.example", 443) == infos
        with pytest.raises(socket.gaierror):  # used once: the next lookup asks DNS
            await loop.getaddrinfo("checked.example", 443)
        pin("checked.example", 443, infos)
        with pytest.raises(OSError, match=r"keyless checked checked\.example:443"):
            await loop.getaddrinfo("other.example", 443)

    run_on_checked_loop(scenario)


def test_unpinned_names_resolve_normally():
    async def scenario():
        return await asyncio.get_running_loop().getaddrinfo(
            "localhost", 80, type=socket.SOCK_STREAM
        )

    assert any(info[4][1] == 80 for info in run_on_checked_loop(scenario))


HOST = "acct.blob.core.windows.net"


@pytest.mark.parametrize(
    ("destination", "agreed"),
    [
        (Destination(HOST, 443, HOST, HOST, True), HOST),
        (Destination(HOST, 443, "ACCT.blob.core.windows.net", f"{HOST}:443", True), HOST),
        (Destination(HOST, 443, HOST, HOST, False), None),  # plain HTTP from the app
        (Destination(HOST, 443, "evil.test", HOST, True), None),  # SNI differs
        (Destination(HOST, 443, HOST, "evil.test", True), None),  # Host differs
        (Destination(HOST, 443, HOST, f"{HOST}:8443", True), None),  # port differs
        (Destination(HOST, 8443, HOST, HOST, True), None),  # Host implies 443
        (Destination(HOST, 8443, HOST, f"{HOST}:8443", True), None),  # tokens only on 443
        (Destination(HOST, 443, None, HOST, True), None),  # no SNI
        (Destination(HOST, 443, HOST, None, True), None),  # no Host
        (Destination(None, None, HOST, HOST, True), None),  # no CONNECT target
        (Destination(HOST, 443, HOST, f"user@{HOST}", True), None),
        (Destination(HOST, 443, HOST, f"{HOST}:443:1", True), None),
    ],
)
def test_token_only_when_every_name_agrees(destination, agreed):
    assert destination.agreed_host() == agreed
