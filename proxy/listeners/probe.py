"""Minimal app-side logins for `keyless check`: connect to a listener as an app would and
report whether the upstream login succeeded. Each returns None (logged in) or the reason."""

from __future__ import annotations

import asyncio
import struct

PROBE_TIMEOUT = 20.0
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def postgres(streams: Streams, user: str, database: str = "postgres") -> str | None:
    reader, writer = streams
    params = b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                      for k, v in (("user", user), ("database", database))) + b"\0"
    writer.write(struct.pack("!ii", 8 + len(params), 196608) + params)
    await writer.drain()
    while True:
        kind = await reader.readexactly(1)
        length = struct.unpack("!i", await reader.readexactly(4))[0]
        if not 4 <= length <= 1 << 20:
            return "the listener sent a malformed message"
        body = await reader.readexactly(length - 4)
        if kind == b"Z":  # ReadyForQuery: logged in
            writer.write(b"X\0\0\0\4")  # Terminate
            await writer.drain()
            return None
        if kind == b"E":
            fields = dict((part[:1], part[1:]) for part in body.split(b"\0") if part)
            return fields.get(b"M", b"login refused").decode("utf-8", "replace")
        if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
            return "the listener asked the app for a password (it should not)"


def _mysql_packet(payload: bytes, seq: int) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


async def _mysql_read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await reader.readexactly(4)
    length = int.from_bytes(header[:3], "little")
    return header[3], await reader.readexactly(length)


async def mysql(streams: Streams, user: str, database: str = "") -> str | None:
    reader, writer = streams
    seq, greeting = await _mysql_read(reader)
    if greeting[:1] == b"\xff":
        return greeting[9:].decode("utf-8", "replace")
    # CLIENT_PROTOCOL_41 | SECURE_CONNECTION | PLUGIN_AUTH (| CONNECT_WITH_DB)
    flags = 0x00000200 | 0x00008000 | 0x00080000 | (0x00000008 if database else 0)
    payload = (struct.pack("<IIB", flags, 1 << 24, 45) + b"\0" * 23 + user.encode() + b"\0"
               + b"\0" + (database.encode() + b"\0" if database else b"")
               + b"mysql_native_password\0")
    writer.write(_mysql_packet(payload, seq + 1))
    await writer.drain()
    _, answer = await _mysql_read(reader)
    if answer[:1] == b"\x00":
        writer.write(_mysql_packet(b"\x01", 0))  # COM_QUIT
        await writer.drain()
        return None
    if answer[:1] == b"\xff":
        message = answer[3:]
        if message[:1] == b"#":
            message = message[6:]
        return message.decode("utf-8", "replace")
    return "the listener asked the app for more authentication (it should not)"


async def redis(streams: Streams) -> str | None:
    reader, writer = streams
    writer.write(b"*1\r\n$4\r\nPING\r\n")
    await writer.drain()
    line = await reader.readline()
    if line.startswith(b"+PONG"):
        writer.write(b"*1\r\n$4\r\nQUIT\r\n")
        await writer.drain()
        return None
    return line.decode("utf-8", "replace").strip().lstrip("-") or "no answer"
