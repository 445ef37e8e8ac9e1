"""A scripted PostgreSQL upstream for what a real server will not do on demand.

It answers the SSLRequest (with 'S' and TLS for the Azure name from the test CA, or with
`tls_answer` such as b'N'), reads the StartupMessage, asks for the authentication `auth_code`
(3 cleartext, 5 MD5, 10 SASL), records every byte it received after TLS, and, for a cleartext
password that is `expected_password`, completes the login. After the login, a simple Query
makes it reset the TCP connection (SO_LINGER 0): an upstream dying mid-query.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field

from proxy.postgres import codec


@dataclass
class Attempt:
    startup: codec.StartupMessage | None = None
    received: bytearray = field(default_factory=bytearray)  # everything after the startup
    tls: bool = False


class FakePostgres:
    def __init__(self, cert_and_key: tuple[str, str], expected_password: str) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(*cert_and_key)
        self.expected_password = expected_password
        self.auth_code = codec.AUTH_CLEARTEXT_PASSWORD
        self.tls_answer = b"S"
        self.attempts: list[Attempt] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fake-postgres")
        self._server: asyncio.Server | None = None

    def __enter__(self) -> FakePostgres:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempt = Attempt()
        self.attempts.append(attempt)
        try:
            async with asyncio.timeout(30):
                await self._session(attempt, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _session(self, attempt: Attempt, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(8) == codec.encode_ssl_request()
        writer.write(self.tls_answer)
        await writer.drain()
        if self.tls_answer != b"S":
            attempt.received += await reader.read(65536)  # whatever comes next, in clear
            return
        await writer.start_tls(self.context)
        attempt.tls = True
        header = await reader.readexactly(4)
        packet = codec.decode_startup(header + await reader.readexactly(
            codec.startup_length(header) - 4))
        assert isinstance(packet, codec.StartupMessage)
        attempt.startup = packet
        data = b""
        if self.auth_code == codec.AUTH_MD5_PASSWORD:
            data = b"salt"
        elif self.auth_code == codec.AUTH_SASL:
            data = b"SCRAM-SHA-256\0\0"
        writer.write(codec.encode_authentication(self.auth_code, data))
        await writer.drain()
        kind_header = await reader.read(65536)  # the answer, if any, until the peer gives up
        attempt.received += kind_header
        if self.auth_code != codec.AUTH_CLEARTEXT_PASSWORD:
            while chunk := await reader.read(65536):
                attempt.received += chunk
            return
        if kind_header != codec.encode_password(self.expected_password):
            writer.write(codec.encode_error("28P01", "password authentication failed for user "
                                            f"\"{packet.get('user')}\""))
            await writer.drain()
            return
        writer.write(codec.encode_authentication(codec.AUTH_OK)
                     + codec.encode_parameter_status("server_version", "15.99")
                     + codec.encode_backend_key(codec.BackendKeyData(4242, b"k3y!"))
                     + codec.encode_ready())
        await writer.drain()
        message = await reader.readexactly(5)
        attempt.received += message
        if message[:1] == b"Q":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST, mid-query
