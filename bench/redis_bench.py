"""The Redis listener's cost: redis-benchmark GET/SET through keyless vs direct, in one run.

    python -m bench.redis_bench [--requests N] [--clients C] [--rounds R]

Real processes on 127.0.0.1: Debian's redis-server with TLS for the Azure name (the token's
ACL user), a fake managed-identity endpoint and keyless with a --redis listener. Direct runs
speak TLS to the server with the token (`--tls --cacert --user -a`); through keyless,
redis-benchmark connects plain to the listener with a wrong `-a`, and keyless speaks TLS
upstream, as an app's sidecar does. Pipelining -P 1 and -P 16; rounds alternate direct and
keyless so that both see the same machine load, and the ratio of the medians is reported.
Bounded: -n requests per run, a timeout per run. Nothing asserts an absolute timing.

A third column is the ceiling for any relay written on asyncio streams: a relay process that
copies bytes between the app and the server's TLS port and parses nothing (`--relay`). What
keyless costs beyond it is the protocol awareness (finding commands and replies).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.redis.conftest import HOST, RESOURCE, WRONG_KEY, keyless_args
from tests.support.azurite import TestPKI, free_port
from tests.support.entra import OBJECT_ID
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.keyless import KeylessProcess
from tests.support.redis_server import RedisServer

TESTS = ("SET", "GET")
RUN_TIMEOUT = 300.0


def benchmark(args: list[str], requests: int, clients: int, pipeline: int) -> dict[str, float]:
    """requests per second by test name (redis-benchmark --csv)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise SystemExit("redis-benchmark not found: apt-get install redis-tools")
    done = subprocess.run(
        [binary, "-h", "127.0.0.1", *args, "-t", ",".join(t.lower() for t in TESTS),
         "-n", str(requests), "-c", str(clients), "-P", str(pipeline), "-r", "10000", "--csv"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=True)
    rows = list(csv.reader(io.StringIO(done.stdout)))
    rates = {row[0]: float(row[1]) for row in rows[1:] if row and row[0] in TESTS}
    if set(rates) != set(TESTS):
        raise RuntimeError(f"redis-benchmark said: {done.stdout}{done.stderr}")
    return rates


async def relay(listen_port: int, upstream_port: int, cafile: str) -> None:
    """Copy bytes app <-> server (TLS, verified for HOST); nothing else."""
    context = ssl.create_default_context(cafile=cafile)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(64 * 1024):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await asyncio.open_connection("127.0.0.1", upstream_port, ssl=context,
                                                 server_hostname=HOST)
        await asyncio.gather(pipe(reader, upstream[1]), pipe(upstream[0], writer),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def start_relay(server: RedisServer) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.redis_bench", "--relay",
                                str(port), str(server.port), server.pki.ca_pem_path],
                               stderr=subprocess.DEVNULL)  # its tasks are cut at kill
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the relay did not start")


def main() -> None:
    if sys.argv[1:2] == ["--relay"]:
        listen, upstream, cafile = sys.argv[2:5]
        asyncio.run(relay(int(listen), int(upstream), cafile))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keyless-redis-bench-") as tmp:
        root = Path(tmp)
        pki = TestPKI(root / "pki")
        with RedisServer(root / "redis", pki, HOST) as server, FakeIdentityEndpoint() as identity:
            token = make_token(RESOURCE, lifetime=3600)
            identity.queue_tokens(RESOURCE, token)
            server.add_token_user(OBJECT_ID, token)
            port = free_port()
            keyless = KeylessProcess(root / "keyless", keyless_args(port, server),
                                     identity.env()).start()
            relay_process, relay_port = start_relay(server)
            try:
                auth = ["--user", OBJECT_ID, "-a", token]
                setups = {
                    "direct": ["-p", str(server.port), "--tls", "--cacert", pki.ca_pem_path,
                               "--sni", HOST, *auth],
                    "relay": ["-p", str(relay_port), *auth],
                    "keyless": ["-p", str(port), "-a", WRONG_KEY],
                }
                print(f"redis-benchmark -n {options.requests} -c {options.clients}, "
                      f"{options.rounds} rounds, median requests/s")
                print(f"{'test':<6}{'-P':>4}{'direct':>10}{'relay':>10}{'keyless':>10}"
                      f"{'keyless/direct':>16}{'relay/direct':>14}")
                for pipeline in (1, 16):
                    runs: dict[str, dict[str, list[float]]] = {name: {} for name in setups}
                    for _ in range(options.rounds):
                        for name, args in setups.items():
                            rates = benchmark(args, options.requests, options.clients, pipeline)
                            for test, rate in rates.items():
                                runs[name].setdefault(test, []).append(rate)
                    for test in TESTS:
                        d, r, k = (statistics.median(runs[name][test]) for name in setups)
                        print(f"{test:<6}{pipeline:>4}{d:>10.0f}{r:>10.0f}{k:>10.0f}"
                              f"{k / d:>16.2f}{r / d:>14.2f}")
                converted = keyless.metric("keyless_listener_logins_total", result="converted")
                print(f"(keyless logged in {converted:.0f} connections with the token; the "
                      f"app's key went nowhere)")
            finally:
                relay_process.kill()
                relay_process.wait(10)
                keyless.stop()


if __name__ == "__main__":
    main()
