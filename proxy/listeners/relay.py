"""The byte relay once a login is done: both directions, bounded, counted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from proxy import metrics
from proxy.listeners.connection import Connection

CHUNK = 64 * 1024
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               count: Callable[[int], None]) -> None:
    """Copy until EOF. At most CHUNK bytes are held: each write drains before the next read,
    so a slow reader on one side slows the other side's sender (TCP back-pressure)."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            count(len(data))
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: let the other side finish its answer
    except (ConnectionError, OSError):
        pass


async def relay(conn: Connection, client: Streams, upstream: Streams) -> None:
    """Relay until either side has closed and the other is done, then close both."""
    to_upstream = metrics.LISTENER_BYTES.labels(listener=conn.spec.name, direction="to_upstream")
    to_client = metrics.LISTENER_BYTES.labels(listener=conn.spec.name, direction="to_client")
    from_app = asyncio.ensure_future(pipe(client[0], upstream[1], to_upstream.inc))
    from_server = asyncio.ensure_future(pipe(upstream[0], client[1], to_client.inc))
    tasks = [from_app, from_server]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # The server closing ends the session at once; the app closing lets the server's
        # last bytes through for a moment (e.g. its answer to a Terminate/QUIT).
        if not from_server.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(from_server), timeout=5.0)
    finally:
        for task in tasks:
            task.cancel()
        for _, writer in (client, upstream):
            writer.close()
