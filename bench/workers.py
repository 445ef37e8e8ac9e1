"""--workers 2 ÷ --workers 1 throughput, measured side by side in one run.

    python -m bench.workers [--seconds S] [--rounds N] [--out FILE]

Reverse mode (plain HTTP in, verified TLS out) against the local fast HTTPS upstream, which
demands a Bearer token (so every counted answer was converted); keep-alive c=10 and a new
connection per request c=10. Both keyless instances run for the whole benchmark and the rounds
alternate between them, so the machine's drift hits both alike. Prints the ratios and the CPU
seconds the load generator (this process), the upstream and each keyless took. Every loop is
bounded in count and time; only the ratios of one run mean anything (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.run import (
    BENCH_HOST,
    DEAD_PROXY_ENV,
    PATH,
    SHARED_KEY_HEADERS,
    keyless_args,
    spawn_with_port,
    stop_process,
)
from tests.support.azurite import TestPKI, free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess
from tests.support.load import run_load

CASES = (("keep-alive", 10), ("new-conn", 10))
CAP = 500_000  # requests per timed run: a bound, the run stops after --seconds first


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live children (keyless' workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for one in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(url: str, mode: str, concurrency: int, seconds: float,
                  ca_file: str) -> dict[str, float]:
    result = await run_load(url, proxy=None, ca_file=ca_file, total=CAP, concurrency=concurrency,
                            max_seconds=seconds, headers=SHARED_KEY_HEADERS,
                            new_connection_each_time=(mode == "new-conn"))
    if result.failures:
        raise RuntimeError(f"{url}: {dict(result.statuses)} {dict(result.errors)}")
    return {"requests": result.requests, "seconds": result.seconds}


def run(seconds: float, rounds: int, workdir: Path) -> dict[str, Any]:
    pki = TestPKI(workdir / "pki")
    with contextlib.ExitStack() as stack:
        cert, key = pki.issue_server_cert(BENCH_HOST)
        upstream, upstream_port = spawn_with_port(
            [sys.executable, "-m", "tests.support.fast_upstream", "--cert", cert, "--key", key,
             "--require-bearer"])
        stack.callback(stop_process, upstream)
        identity = stack.enter_context(FakeIdentityEndpoint())
        instances: dict[int, tuple[KeylessProcess, str]] = {}
        for workers in (1, 2):
            port = free_port()
            keyless = KeylessProcess(workdir / f"keyless-{workers}", [
                *keyless_args(pki, f"{BENCH_HOST}:443:127.0.0.1:{upstream_port}"),
                "--reverse", f"{port}=https://{BENCH_HOST}", "--workers", str(workers),
            ], {**identity.env(), **DEAD_PROXY_ENV}).start(timeout=60)
            stack.callback(keyless.stop)
            instances[workers] = (keyless, f"http://127.0.0.1:{port}{PATH}")
        for _, url in instances.values():  # tokens, imports, pools: not part of a timed run
            asyncio.run(measure(url, "keep-alive", 4, 2.0, pki.ca_pem_path))
        totals = {(mode, c, w): {"requests": 0.0, "seconds": 0.0}
                  for mode, c in CASES for w in instances}
        cpu = {"load generator": 0.0, "upstream": 0.0, "keyless 1 worker": 0.0,
               "keyless 2 workers": 0.0}
        for r in range(rounds):
            for mode, c in CASES:
                for w in ((1, 2) if r % 2 == 0 else (2, 1)):
                    keyless, url = instances[w]
                    assert keyless.process is not None
                    before = (own_cpu(), cpu_seconds(upstream.pid),
                              cpu_seconds(keyless.process.pid))
                    got = asyncio.run(measure(url, mode, c, seconds, pki.ca_pem_path))
                    after = (own_cpu(), cpu_seconds(upstream.pid),
                             cpu_seconds(keyless.process.pid))
                    for k in ("requests", "seconds"):
                        totals[(mode, c, w)][k] += got[k]
                    cpu["load generator"] += after[0] - before[0]
                    cpu["upstream"] += after[1] - before[1]
                    cpu[f"keyless {w} worker{'s' if w > 1 else ''}"] += after[2] - before[2]
        rows = []
        for mode, c in CASES:
            rate = {w: totals[(mode, c, w)]["requests"] / totals[(mode, c, w)]["seconds"]
                    for w in instances}
            rows.append({"mode": mode, "concurrency": c, "one_worker_rps": round(rate[1]),
                         "two_workers_rps": round(rate[2]), "ratio": round(rate[2] / rate[1], 2)})
        return {"rows": rows, "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
                "seconds_per_run": seconds, "rounds": rounds, "cpus": len(os.sched_getaffinity(0))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="keyless-bench-workers-") as workdir:
        results = run(args.seconds, args.rounds, Path(workdir))
    print(f"{'mode':<12}{'c':>4}{'1 worker req/s':>16}{'2 workers req/s':>17}{'ratio':>8}")
    for row in results["rows"]:
        print(f"{row['mode']:<12}{row['concurrency']:>4}{row['one_worker_rps']:>16}"
              f"{row['two_workers_rps']:>17}{row['ratio']:>8}")
    print("CPU seconds over the timed runs: " + ", ".join(
        f"{name} {value}" for name, value in results["cpu_seconds"].items()))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
