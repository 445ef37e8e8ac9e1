"""--connect-to parsing and routing; the 'all names agree' rule for attaching tokens."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.authority import Destination
from proxy.connect_to import ConnectTo, ConnectToEventLoop, ConnectToTable


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


def test_event_loop_dials_the_mapped_address():
    async def scenario() -> bytes:
        server = await asyncio.start_server(
            lambda r, w: (w.write(b"hello"), w.close()), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        assert isinstance(loop, ConnectToEventLoop)
        loop.connect_to = ConnectToTable([
            ConnectTo.parse(f"nowhere.blob.core.windows.net:443:127.0.0.1:{port}")
        ])
        reader, writer = await asyncio.open_connection("nowhere.blob.core.windows.net", 443)
        data = await reader.read()
        writer.close()
        server.close()
        return data

    with asyncio.Runner(loop_factory=ConnectToEventLoop) as runner:
        assert runner.run(scenario()) == b"hello"


def test_unmapped_names_resolve_normally():
    async def scenario():
        return await asyncio.get_running_loop().getaddrinfo(
            "localhost", 80, type=socket.SOCK_STREAM
        )

    with asyncio.Runner(loop_factory=ConnectToEventLoop) as runner:
        assert any(info[4][1] == 80 for info in runner.run(scenario()))


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
