"""What any relay between a plain client and a TLS server reaches on this machine, in one run.

    python -m bench.relay_ceiling [--requests N] [--rounds R]

redis-benchmark GET against a real redis-server with TLS (the database listeners'
benchmarks' server), directly and through relays that only copy bytes: socat (C, OpenSSL),
an asyncio-streams relay, an asyncio-protocols relay and, when uvloop is installed (it is not
a keyless dependency), the protocols relay on uvloop. Rounds alternate the setups; the
medians' ratios to direct are printed side by side. It bounds what keyless' listeners (plain
app -> keyless -> TLS server) can reach on a loopback benchmark: see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.redis_bench import benchmark
from bench.redis_bench import relay as streams_relay  # copies bytes on asyncio streams
from tests.redis.conftest import HOST  # the name redis_bench's relay verifies
from tests.support.azurite import TestPKI, free_port
from tests.support.redis_server import ADMIN_USER, RedisServer


class _Side(asyncio.Protocol):
    """One side of a protocol-level relay: data_received writes to the peer's transport;
    the peer's write buffer filling pauses this side's reading."""

    def __init__(self) -> None:
        self.peer: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.pending.append(data)
        else:
            self.peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def protocol_relay(listen: int, upstream: int, cafile: str) -> None:
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context(cafile=cafile)

    class App(_Side):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            transport.pause_reading()  # type: ignore[attr-defined]
            self.dialling = loop.create_task(self.dial())

        async def dial(self) -> None:
            _, server = await loop.create_connection(_Side, "127.0.0.1", upstream,
                                                     ssl=context, server_hostname=HOST)
            server.peer, self.peer = self, server
            for data in self.pending:
                server.transport.write(data)  # type: ignore[union-attr]
            self.transport.resume_reading()  # type: ignore[union-attr]

    server = await loop.create_server(App, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def _serve(kind: str, listen: int, upstream: int, cafile: str) -> None:
    main = (streams_relay if kind == "streams" else protocol_relay)(listen, upstream, cafile)
    if kind == "uvloop":
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(main)
    else:
        asyncio.run(main)


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("a relay did not start")


def start(kind: str, server: RedisServer) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if kind == "socat":
        command = ["socat", f"TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1",
                   f"OPENSSL:127.0.0.1:{server.port},cafile={server.pki.ca_pem_path},"
                   f"commonname={HOST},nodelay"]
    else:
        command = [sys.executable, "-m", "bench.relay_ceiling", "--serve", kind, str(port),
                   str(server.port), server.pki.ca_pem_path]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    _wait_listening(port, process)
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", nargs=4, metavar=("KIND", "LISTEN", "UPSTREAM", "CAFILE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, listen, upstream, cafile = args.serve
        _serve(kind, int(listen), int(upstream), cafile)
        return
    kinds = ["socat", "streams", "protocols"]
    if shutil.which("socat") is None:
        print("socat not found (apt-get install socat): its row is left out")
        kinds.remove("socat")
    if importlib.util.find_spec("uvloop") is not None:
        kinds.append("uvloop")
    else:
        print("uvloop not installed (pip install uvloop): its row is left out")
    with tempfile.TemporaryDirectory(prefix="keyless-ceiling-") as tmp:
        pki = TestPKI(Path(tmp) / "pki")
        with RedisServer(Path(tmp) / "redis", pki, HOST) as server:
            direct_args = ["-p", str(server.port), "--tls", "--cacert", pki.ca_pem_path,
                           "--sni", HOST, "--user", ADMIN_USER, "-a", server.admin_password]
            relays = {kind: start(kind, server) for kind in kinds}
            try:
                rates: dict[tuple[str, int], list[float]] = {}
                for _ in range(args.rounds):
                    for pipeline in (1, 16):
                        for name in ("direct", *kinds):
                            argv = direct_args if name == "direct" else [
                                "-p", str(relays[name][1]), "--user", ADMIN_USER,
                                "-a", server.admin_password]
                            got = benchmark(argv, args.requests * (4 if pipeline > 1 else 1),
                                            args.clients, pipeline)
                            rates.setdefault((name, pipeline), []).append(got["GET"])
            finally:
                for process, _ in relays.values():
                    process.kill()
                    process.wait(10)
    print(f"\nredis-benchmark GET, {args.clients} clients, medians of {args.rounds} rounds "
          "(requests/s; ratio to direct)")
    print(f"{'setup':<12} {'-P 1':>12} {'ratio':>7} {'-P 16':>12} {'ratio':>7}")
    for name in ("direct", *kinds):
        row = [statistics.median(rates[(name, p)]) for p in (1, 16)]
        base = [statistics.median(rates[("direct", p)]) for p in (1, 16)]
        print(f"{name:<12} {row[0]:>12.0f} {row[0] / base[0]:>6.2f}x "
              f"{row[1]:>12.0f} {row[1] / base[1]:>6.2f}x")


if __name__ == "__main__":
    main()
