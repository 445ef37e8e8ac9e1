"""Server-side TLS for the app's hop over streams that may already hold the app's ClientHello
(MySQL's `client-tls=true`, transparent Redis).

A MySQL client sends its SSLRequest and its TLS ClientHello back to back, without waiting for
an answer, so both often arrive in one read and the ClientHello sits in the StreamReader's
buffer. `StreamWriter.start_tls` hands the socket to a new TLS protocol and never sees those
buffered bytes: the handshake then hangs. (A transparent Redis app sends its ClientHello the
moment it connects, so it may be buffered before the session starts.) Here TLS runs on memory
BIOs fed from the same StreamReader, so no byte is lost. Reads pull from the socket only when
the reader asks (the relay's back-pressure holds), and the writer is the small part of
StreamWriter the session and the relay use.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

CHUNK = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0


class TLSStream:
    """One TLS connection over a plain (reader, writer) pair: the reader and writer halves."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 context: ssl.SSLContext) -> None:
        self.raw_reader, self.raw_writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def flush(self) -> None:
        if pending := self.outgoing.read():
            self.raw_writer.write(pending)

    async def pull(self) -> bool:
        """More ciphertext from the socket; False at its end."""
        self.flush()
        await self.raw_writer.drain()
        data = await self.raw_reader.read(CHUNK)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        async def run() -> None:
            while True:
                try:
                    self.sslobj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if not await self.pull():
                        raise ConnectionError("the app closed during the TLS handshake") from None
            self.flush()
            await self.raw_writer.drain()

        try:
            await asyncio.wait_for(run(), HANDSHAKE_TIMEOUT)
        except ssl.SSLError as exc:
            # the alert (e.g. unrecognized_name from transparent mode's choice) tells the app why
            with contextlib.suppress(OSError, RuntimeError):
                self.flush()
                await self.raw_writer.drain()
            raise ConnectionError(f"TLS with the app failed: {exc.reason}") from None


class TLSReader:
    def __init__(self, stream: TLSStream) -> None:
        self.stream = stream

    async def read(self, n: int = -1) -> bytes:
        size = n if n > 0 else CHUNK
        while True:
            try:
                return self.stream.sslobj.read(size)
            except ssl.SSLWantReadError:
                if not await self.stream.pull():
                    continue  # the BIO's EOF now makes read() end or fail below
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError as exc:
                raise ConnectionError(f"TLS with the app failed: {exc.reason}") from None

    async def readexactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = await self.read(n - len(data))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(data), n)
            data += chunk
        return bytes(data)


class TLSWriter:
    def __init__(self, stream: TLSStream) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.sslobj.write(data)
        self.stream.flush()

    async def drain(self) -> None:
        await self.stream.raw_writer.drain()

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close; the relay closes both sides instead

    def write_eof(self) -> None:
        raise NotImplementedError

    def is_closing(self) -> bool:
        return self.stream.raw_writer.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.stream.sslobj
        return self.stream.raw_writer.get_extra_info(name, default)

    def close(self) -> None:
        if not self.stream.raw_writer.is_closing():
            with contextlib.suppress(ssl.SSLError, OSError):
                self.stream.sslobj.unwrap()  # our close_notify; the app's is not awaited
            with contextlib.suppress(OSError, RuntimeError):
                self.stream.flush()
        self.stream.raw_writer.close()

    async def wait_closed(self) -> None:
        await self.stream.raw_writer.wait_closed()


async def accept_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     context: ssl.SSLContext) -> tuple[TLSReader, TLSWriter]:
    stream = TLSStream(reader, writer, context)
    await stream.handshake()
    return TLSReader(stream), TLSWriter(stream)


class UpgradableWriter:
    """The app's writer before TLS, for `Connection.start_client_tls`, which calls
    `start_tls(context)` and then reads `get_extra_info("ssl_object")`: the TLS here is the
    memory-BIO one above, so it works with the framework's contexts (a leaf for the listener's
    host, or transparent mode's choice by server name)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.raw = reader, writer
        self.tls: tuple[TLSReader, TLSWriter] | None = None

    async def start_tls(self, sslcontext: ssl.SSLContext, **_ignored: Any) -> None:
        self.tls = await accept_tls(*self.raw, sslcontext)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        writer = self.tls[1] if self.tls else self.raw[1]
        return writer.get_extra_info(name, default)
