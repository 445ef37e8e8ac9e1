"""The app's bytes after the login, as the relay reads them: COM_CHANGE_USER never goes up.

COM_CHANGE_USER carries a new login: the app's auth response for its own password (with
mysql_clear_password, the password itself). Forwarding it would send the server what keyless
promises never leaves the pod, and it could not succeed anyway (its scramble is for keyless'
nonce, not the server's). So it is answered here with an error, and the connection stays as
it was. Pools reset sessions with COM_RESET_CONNECTION, which passes.

A command is the first packet of an exchange: sequence id 0 from the client (MySQL clients
never pipeline commands). Packets are otherwise passed on unexamined, in the reads they came
in, so the relay's back-pressure and chunking are unchanged.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.mysql import codec

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
COM_CHANGE_USER = 0x11
CHANGE_USER_REFUSED = codec.Err(
    1235, "42000", "keyless: COM_CHANGE_USER (a new login on this connection) is not "
    "supported through keyless; open a new connection, or reset it with COM_RESET_CONNECTION")


class AppCommands:
    """`read` for the relay, over the app's reader; `reply` writes keyless' own answers."""

    def __init__(self, reader: asyncio.StreamReader, reply: asyncio.StreamWriter,
                 peer: str) -> None:
        self.reader, self.reply, self.peer = reader, reply, peer
        self.pending = bytearray()
        self.passing = 0  # bytes of the current packet still to pass unexamined
        self.continued = False  # the last packet was 0xFFFFFF bytes: the next continues it

    async def read(self, n: int = -1) -> bytes:
        while True:
            out = self.scan()
            if out:
                return out
            data = await self.reader.read(CHUNK)
            if not data:
                rest, self.pending = bytes(self.pending), bytearray()
                return rest  # the app's last, partial bytes; then EOF
            if not self.pending and self.clean(data):
                return data  # the usual case: whole packets, no COM_CHANGE_USER; no copy
            self.pending += data

    def clean(self, data: bytes) -> bool:
        """Whether `data` (read at a clean state) can pass as it is: every header in it is
        whole, and none starts a COM_CHANGE_USER. Then the state moves past it."""
        pos, continued, end = self.passing, self.continued, len(data)
        while pos < end:
            if pos + codec.HEADER_SIZE + 1 > end:
                return False  # a header or command byte cut off: the careful path
            length = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
            if (data[pos + 3] == 0 and not continued and length > 0
                    and data[pos + 4] == COM_CHANGE_USER):
                return False
            continued = length == codec.MAX_PAYLOAD
            pos += codec.HEADER_SIZE + length
        self.passing, self.continued = pos - end, continued
        return True

    def scan(self) -> bytes:
        out = bytearray()
        while self.pending:
            if self.passing:
                take = min(self.passing, len(self.pending))
                out += self.pending[:take]
                del self.pending[:take]
                self.passing -= take
                continue
            if len(self.pending) < codec.HEADER_SIZE + 1:
                if len(self.pending) == codec.HEADER_SIZE and self.pending[:3] == b"\0\0\0":
                    self.passing = codec.HEADER_SIZE  # an empty packet
                    continue
                break  # a header (and a command byte) still to come
            length = int.from_bytes(self.pending[:3], "little")
            # an empty packet has no command byte (pending[4] is the next packet's)
            command = self.pending[3] == 0 and not self.continued and length > 0
            self.continued = length == codec.MAX_PAYLOAD
            if command and self.pending[4] == COM_CHANGE_USER:
                if length > codec.MAX_AUTH_PACKET:
                    raise ConnectionError("a COM_CHANGE_USER larger than a login may be")
                if len(self.pending) < codec.HEADER_SIZE + length:
                    break  # drop it whole: wait for the rest of it
                del self.pending[:codec.HEADER_SIZE + length]
                self.refuse_change_user()
                continue
            self.passing = codec.HEADER_SIZE + length
        return bytes(out)

    def refuse_change_user(self) -> None:
        # the server is idle (a command boundary), so this answer cannot interleave with its
        logger.warning("mysql client %s sent COM_CHANGE_USER: refused (never forwarded)",
                       self.peer)
        self.reply.write(codec.encode_packet(1, codec.encode_err(CHANGE_USER_REFUSED)))
