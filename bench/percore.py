"""Per core: keyless ÷ plain mitmdump, forward mode (HTTPS through the proxy), one run.

    python -m bench.percore [--seconds S] [--rounds N] [--generator go|python]
                            [--upstream nginx|aiohttp] [--out FILE]

Both proxies run for the whole benchmark against one local HTTPS upstream that demands a Bearer
token (nginx from Debian with `--generator go`, the aiohttp fast upstream with `python`);
mitmdump gets requests that already carry a Bearer token, keyless gets the legacy app's
SharedKey and converts it. The rounds alternate between the two proxies. Two ratios per case:
- throughput: keyless req/s ÷ mitmdump req/s (at c=1 this includes the client's and the
  upstream's share of each round trip, which is why a cheap generator matters);
- per CPU second: requests per CPU second of keyless ÷ the same of mitmdump, the proxy's own
  cost whatever the rest of the machine does.
`--generator go` is tests/apps/go/cmd/loadgen (Go standard library, GOMAXPROCS=1), far cheaper
per request than the Python client. Every loop is bounded in count and time; only the ratios of
one run mean anything (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.run import (
    BEARER_HEADERS,
    BENCH_HOST,
    DEAD_PROXY_ENV,
    PATH,
    SHARED_KEY_HEADERS,
    Mitmdump,
    Target,
    keyless_args,
    load,
    stop_process,
)
from bench.workers import cpu_seconds, favour, machine_jiffies, start_upstream
from tests.support.azurite import TestPKI
from tests.support.golang import go_app
from tests.support.identity_endpoint import FakeIdentityEndpoint
from tests.support.keyless import KeylessProcess

CASES = (("keep-alive", 1), ("keep-alive", 10), ("new-conn", 1))
CAP = 500_000  # requests per timed run: a bound, the run stops after --seconds first


def run_go(target: Target, mode: str, concurrency: int, seconds: float) -> dict[str, float]:
    command = [str(go_app("loadgen")), "-url", target.url, "-ca", target.ca_file,
               "-c", str(concurrency), "-seconds", str(seconds), "-cap", str(CAP)]
    if target.proxy:
        command += ["-proxy", target.proxy]
    if mode == "new-conn":
        command.append("-new-conn")
    for name, value in target.headers.items():
        command += ["-H", f"{name}: {value}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60,
                          env={**os.environ, "GOMAXPROCS": "1", **DEAD_PROXY_ENV}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout)
    if result["failures"]:
        raise RuntimeError(f"{target.name}: {result['failures']} failures "
                           f"({result.get('first_error')})")
    return {"requests": result["requests"], "seconds": result["seconds"],
            "generator_cpu": result["cpu_seconds"]}


def run_python(target: Target, mode: str, concurrency: int, seconds: float) -> dict[str, float]:
    result = asyncio.run(load(target, concurrency=concurrency, new_conn=(mode == "new-conn"),
                              total=CAP, seconds=seconds))
    if result.failures:
        raise RuntimeError(f"{target.name}: {dict(result.statuses)} {dict(result.errors)}")
    return {"requests": result.requests, "seconds": result.seconds, "generator_cpu": 0.0}


def run(seconds: float, rounds: int, workdir: Path, generator: str,
        upstream_kind: str | None = None) -> dict[str, Any]:
    pki = TestPKI(workdir / "pki")
    measure = run_go if generator == "go" else run_python
    upstream_kind = upstream_kind or ("nginx" if generator == "go" else "aiohttp")
    with contextlib.ExitStack() as stack:
        upstream, upstream_port = start_upstream(workdir, pki, upstream_kind)
        stack.callback(stop_process, upstream)
        identity = stack.enter_context(FakeIdentityEndpoint())
        mitm = Mitmdump(workdir, pki.ca_pem_path).start()
        stack.callback(mitm.stop)
        keyless = KeylessProcess(workdir / "keyless", keyless_args(
            pki, f"{BENCH_HOST}:443:127.0.0.1:{upstream_port}"),
            {**identity.env(), **DEAD_PROXY_ENV}).start()
        stack.callback(keyless.stop)
        assert mitm.process is not None and keyless.process is not None
        pids = {"mitmdump": mitm.process.pid, "keyless": keyless.process.pid}
        for pid in (os.getpid(), upstream.pid, *pids.values()):
            favour(pid)  # a shared machine: these first (the go generator is our child)
        targets = {
            "mitmdump": Target("mitmdump", f"https://127.0.0.1:{upstream_port}{PATH}",
                               mitm.proxy_url, mitm.ca_path, BEARER_HEADERS),
            "keyless": Target("keyless", f"https://{BENCH_HOST}{PATH}", keyless.proxy_url,
                              keyless.ca_path, SHARED_KEY_HEADERS),
        }
        for target in targets.values():  # certificates, the token, imports: not timed
            measure(target, "keep-alive", 4, 2.0)
        totals = {(mode, c, name): {"requests": 0.0, "seconds": 0.0, "cpu": 0.0, "busy": 0.0}
                  for mode, c in CASES for name in targets}
        for r in range(rounds):
            for mode, c in CASES:
                for name in (("mitmdump", "keyless") if r % 2 == 0 else ("keyless", "mitmdump")):
                    jiffies, cpu = machine_jiffies(), cpu_seconds(pids[name])
                    got = measure(targets[name], mode, c, seconds)
                    tally = totals[(mode, c, name)]
                    tally["cpu"] += cpu_seconds(pids[name]) - cpu
                    tally["busy"] += ((machine_jiffies()[0] - jiffies[0])
                                      / os.sysconf("SC_CLK_TCK"))
                    tally["requests"] += got["requests"]
                    tally["seconds"] += got["seconds"]
        rows = []
        for mode, c in CASES:
            m, k = totals[(mode, c, "mitmdump")], totals[(mode, c, "keyless")]
            rate = {n: t["requests"] / t["seconds"] for n, t in (("mitmdump", m), ("keyless", k))}
            per_cpu = {n: t["requests"] / t["cpu"] for n, t in (("mitmdump", m), ("keyless", k))}
            rows.append({
                "mode": mode, "concurrency": c,
                "mitmdump_rps": round(rate["mitmdump"]), "keyless_rps": round(rate["keyless"]),
                "throughput_ratio": round(rate["keyless"] / rate["mitmdump"], 3),
                "mitmdump_requests_per_cpu_s": round(per_cpu["mitmdump"]),
                "keyless_requests_per_cpu_s": round(per_cpu["keyless"]),
                "per_cpu_ratio": round(per_cpu["keyless"] / per_cpu["mitmdump"], 3),
                "machine_busy_cores": {n: round(t["busy"] / t["seconds"], 2)
                                       for n, t in (("mitmdump", m), ("keyless", k))},
            })
        return {"generator": generator, "upstream": upstream_kind, "rows": rows,
                "seconds_per_run": seconds,
                "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--generator", choices=("go", "python"), default="go")
    parser.add_argument("--upstream", choices=("nginx", "aiohttp"),
                        help="default: nginx with the go generator, aiohttp with python")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="keyless-bench-percore-") as workdir:
        results = run(args.seconds, args.rounds, Path(workdir), args.generator, args.upstream)
    print(f"{results['generator']} -> {results['upstream']:<7}; {'mode':<11}{'c':>3}"
          f"{'mitmdump':>10}{'keyless':>9}{'ratio':>8}{'mitmdump req/cpu-s':>20}"
          f"{'keyless req/cpu-s':>19}{'ratio':>8}")
    for row in results["rows"]:
        print(f"{'':<20}{row['mode']:<11}{row['concurrency']:>3}{row['mitmdump_rps']:>10}"
              f"{row['keyless_rps']:>9}{row['throughput_ratio']:>8}"
              f"{row['mitmdump_requests_per_cpu_s']:>20}{row['keyless_requests_per_cpu_s']:>19}"
              f"{row['per_cpu_ratio']:>8}   machine busy cores {row['machine_busy_cores']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
