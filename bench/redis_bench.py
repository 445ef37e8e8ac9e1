"""The Redis listener's cost: redis-benchmark GET/SET through keyless vs direct, in one run.

    python -m bench.redis_bench [--requests N] [--clients C] [--rounds R]

Real processes on 127.0.0.1: Debian's redis-server with TLS for the Azure name (the token's
ACL user), a fake managed-identity endpoint and keyless with a --redis listener. Direct runs
speak TLS to the server with the token (`--tls --cacert --user -a`); through keyless,
redis-benchmark connects plain to the listener with a wrong `-a`, and keyless speaks TLS
upstream, as an app's sidecar does. Pipelining -P 1 and -P 16; rounds alternate direct and
keyless so that both see the same machine load, and the ratio of the medians is reported.
Bounded: -n requests per run, a timeout per run. Nothing asserts an absolute timing.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import statistics
import subprocess
import tempfile
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


def main() -> None:
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
            try:
                direct = ["-p", str(server.port), "--tls", "--cacert", pki.ca_pem_path,
                          "--sni", HOST, "--user", OBJECT_ID, "-a", token]
                through = ["-p", str(port), "-a", WRONG_KEY]
                print(f"redis-benchmark -n {options.requests} -c {options.clients}, "
                      f"{options.rounds} rounds, median requests/s")
                print(f"{'test':<6}{'-P':>4}{'direct':>12}{'keyless':>12}{'ratio':>8}")
                for pipeline in (1, 16):
                    runs: dict[str, dict[str, list[float]]] = {"direct": {}, "keyless": {}}
                    for _ in range(options.rounds):
                        for name, args in (("direct", direct), ("keyless", through)):
                            rates = benchmark(args, options.requests, options.clients, pipeline)
                            for test, rate in rates.items():
                                runs[name].setdefault(test, []).append(rate)
                    for test in TESTS:
                        d = statistics.median(runs["direct"][test])
                        k = statistics.median(runs["keyless"][test])
                        print(f"{test:<6}{pipeline:>4}{d:>12.0f}{k:>12.0f}{k / d:>8.2f}")
                converted = keyless.metric("keyless_listener_logins_total", result="converted")
                print(f"(keyless logged in {converted:.0f} connections with the token; the "
                      f"app's key went nowhere)")
            finally:
                keyless.stop()


if __name__ == "__main__":
    main()
