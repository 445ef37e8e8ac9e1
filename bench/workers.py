"""--workers 2 ÷ --workers 1 throughput, measured side by side in one run.

    python -m bench.workers [--seconds S] [--rounds N] [--generator python|wrk] [--memory]
                            [--out FILE]

Reverse mode (plain HTTP in, verified TLS out) against a local HTTPS upstream that demands a
Bearer token (so every counted answer was converted); keep-alive c=10 and a new connection per
request c=10. `--generator python` (default) is the project's aiohttp client against the aiohttp
fast upstream; `--generator wrk` is Debian's wrk (C) against Debian's nginx as the TLS upstream,
so the load generator and the upstream cost little and keyless is the bottleneck (the issue's
setup; `apt-get install wrk nginx-light`). A new connection per request under wrk is
`Connection: close` on every request. Both keyless instances run for the whole benchmark and
the rounds alternate between them, so the machine's drift hits both alike. Prints the ratios
and the CPU seconds the load generator, the upstream and each keyless took. Every loop is
bounded in count and time; only the ratios of one run mean anything (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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


def memory_kib(pid: int) -> dict[str, dict[str, int]]:
    """VmRSS and Pss (KiB) of a keyless process and of each live child (its workers): RSS
    counts the shared libraries in every process, Pss splits them among the sharers."""
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    found = {}
    for one in pids:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{one}/status").read_text()
            rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))
            rollup = Path(f"/proc/{one}/smaps_rollup").read_text()
            pss = int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1))
            found["supervisor" if one == pid and len(pids) > 1 else
                  "process" if one == pid else f"worker pid {one}"] = {"rss": rss, "pss": pss}
    return found


def memory_bound(memory: dict[int, dict[str, dict[str, dict[str, int]]]]) -> dict[str, Any]:
    """The issue's bound, per moment: total RSS of --workers 2 <= 2 x one worker's + 20 MB."""
    checks = {}
    for moment in memory[1]:
        single = sum(p["rss"] for p in memory[1][moment].values())
        total = sum(p["rss"] for p in memory[2][moment].values())
        limit = 2 * single + 20_000_000 / 1024  # 20 MB in KiB
        checks[moment] = {"one_process_kib": single, "two_workers_total_kib": total,
                          "limit_kib": int(limit), "holds": total <= limit}
    return checks


def machine_jiffies() -> tuple[int, int, int]:
    """(busy, idle, steal) jiffies of all CPUs, from /proc/stat: what else took the machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    return sum(fields[:8]) - idle - steal, idle, steal


def favour(pid: int) -> None:
    """Give the process tree of `pid` the machine before other work (best effort, root only).
    Linux schedules by session (autogroup) first: a plain nice does not beat another
    session's processes, and keyless and each of its workers run in sessions of their own;
    so each process's autogroup gets nice -19, and the process itself nice -10."""
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for one in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{one}/autogroup").write_text("-19")
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, one, -10)


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


NGINX_CONF = """\
daemon off;
worker_processes 1;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            # Like the service: no Bearer token, no answer (every 200 counted was converted).
            if ($http_authorization !~ "^Bearer ") {{ return 401; }}
            default_type application/json;
            return 200 '{{"ok": true}}';
        }}
    }}
}}
"""


def need(program: str) -> str:
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")
    if not found:
        raise SystemExit(f"{program} is missing: apt-get install -y wrk nginx-light")
    return found


def start_nginx(workdir: Path, cert: str, key: str) -> tuple[subprocess.Popen[bytes], int]:
    """nginx as the TLS upstream on a free loopback port, one worker process."""
    prefix = workdir / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, cert=cert, key=key))
    process = subprocess.Popen([need("nginx"), "-p", str(prefix), "-c", str(conf)])
    for _ in range(100):  # bounded: 10 s
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"nginx did not listen: {(prefix / 'error.log').read_text()[-2000:]}")


def start_upstream(workdir: Path, pki: TestPKI,
                   kind: str) -> tuple[subprocess.Popen[Any], int]:
    """The HTTPS upstream for BENCH_HOST that answers only Bearer requests: Debian's nginx
    (cheap: the proxy is what a run measures) or the project's aiohttp fast upstream."""
    cert, key = pki.issue_server_cert(BENCH_HOST)
    if kind == "nginx":
        return start_nginx(workdir, cert, key)
    return spawn_with_port([sys.executable, "-m", "tests.support.fast_upstream", "--cert", cert,
                            "--key", key, "--require-bearer"])


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_wrk(url: str, mode: str, concurrency: int, seconds: float) -> dict[str, float]:
    """One timed wrk run (one thread: the generator's own CPU stays small and is reported)."""
    command = [need("wrk"), "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
               "--timeout", "10s"]
    for name, value in SHARED_KEY_HEADERS.items():
        command += ["-H", f"{name}: {value}"]
    if mode == "new-conn":
        command += ["-H", "Connection: close"]
    done = subprocess.run([*command, url], capture_output=True, text=True,
                          timeout=seconds + 60, check=True)
    text = done.stdout
    errors = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    connect, read, write, timed_out = (int(n) for n in errors.groups()) if errors else (0,) * 4
    # Under `Connection: close` wrk counts every server-side close as a read error; a failed
    # request is still never counted as a request, and any non-2xx answer fails the run.
    if "Non-2xx" in text or connect or write or timed_out or (read and mode != "new-conn"):
        raise RuntimeError(f"{url}: wrk saw failures:\n{text}")
    found = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)\b", text)
    if found is None:
        raise RuntimeError(f"{url}: no request count in wrk's output:\n{text}")
    requests, value, unit = int(found.group(1)), float(found.group(2)), found.group(3)
    elapsed = value / 1000 if unit == "ms" else value * 60 if unit == "m" else value
    return {"requests": requests, "seconds": elapsed}


def run(seconds: float, rounds: int, workdir: Path, generator: str = "python",
        memory: bool = False) -> dict[str, Any]:
    pki = TestPKI(workdir / "pki")
    with contextlib.ExitStack() as stack:
        upstream, upstream_port = start_upstream(
            workdir, pki, "nginx" if generator == "wrk" else "aiohttp")
        stack.callback(stop_process, upstream)
        identity = stack.enter_context(FakeIdentityEndpoint())
        favour(os.getpid())
        favour(upstream.pid)
        instances: dict[int, tuple[KeylessProcess, str]] = {}
        for workers in (1, 2):
            port = free_port()
            keyless = KeylessProcess(workdir / f"keyless-{workers}", [
                *keyless_args(pki, f"{BENCH_HOST}:443:127.0.0.1:{upstream_port}"),
                "--reverse", f"{port}=https://{BENCH_HOST}", "--workers", str(workers),
            ], {**identity.env(), **DEAD_PROXY_ENV}).start(timeout=60)
            stack.callback(keyless.stop)
            instances[workers] = (keyless, f"http://127.0.0.1:{port}{PATH}")
        rss: dict[int, dict[str, dict[str, dict[str, int]]]] = {1: {}, 2: {}}
        if memory:
            time.sleep(2.0)  # the workers' imports settle (readiness comes before that ends)
            for w, (keyless, _) in instances.items():
                assert keyless.process is not None
                rss[w]["idle"] = memory_kib(keyless.process.pid)
        for keyless, url in instances.values():  # tokens, imports, pools: not timed
            asyncio.run(measure(url, "keep-alive", 4, 2.0, pki.ca_pem_path))
            assert keyless.process is not None
            favour(keyless.process.pid)  # the supervisor and its workers, all started now
        totals = {(mode, c, w): {"requests": 0.0, "seconds": 0.0, "keyless_cpu": 0.0,
                                 "busy": 0.0, "idle": 0.0, "steal": 0.0}
                  for mode, c in CASES for w in instances}
        cpu = {"load generator": 0.0, "upstream": 0.0, "keyless 1 worker": 0.0,
               "keyless 2 workers": 0.0}
        for r in range(rounds):
            for mode, c in CASES:
                for w in ((1, 2) if r % 2 == 0 else (2, 1)):
                    keyless, url = instances[w]
                    assert keyless.process is not None
                    jiffies = machine_jiffies()
                    before = (own_cpu() + children_cpu(), cpu_seconds(upstream.pid),
                              cpu_seconds(keyless.process.pid))
                    got = (measure_wrk(url, mode, c, seconds) if generator == "wrk" else
                           asyncio.run(measure(url, mode, c, seconds, pki.ca_pem_path)))
                    after = (own_cpu() + children_cpu(), cpu_seconds(upstream.pid),
                             cpu_seconds(keyless.process.pid))
                    for k in ("requests", "seconds"):
                        totals[(mode, c, w)][k] += got[k]
                    totals[(mode, c, w)]["keyless_cpu"] += after[2] - before[2]
                    for name, start, end in zip(("busy", "idle", "steal"), jiffies,
                                                machine_jiffies(), strict=True):
                        totals[(mode, c, w)][name] += (end - start) / os.sysconf("SC_CLK_TCK")
                    cpu["load generator"] += after[0] - before[0]
                    cpu["upstream"] += after[1] - before[1]
                    cpu[f"keyless {w} worker{'s' if w > 1 else ''}"] += after[2] - before[2]
        if memory:
            for w, (keyless, _) in instances.items():
                assert keyless.process is not None
                rss[w]["after_load"] = memory_kib(keyless.process.pid)
        rows = []
        for mode, c in CASES:
            rate = {w: totals[(mode, c, w)]["requests"] / totals[(mode, c, w)]["seconds"]
                    for w in instances}
            # keyless' CPU per request and the cores it kept busy: a ratio below 2 with both
            # cores busy is the machine's ceiling, with ms/request rising it is contention.
            cost = {w: 1000 * totals[(mode, c, w)]["keyless_cpu"] / totals[(mode, c, w)]["requests"]
                    for w in instances}
            cores = {w: totals[(mode, c, w)]["keyless_cpu"] / totals[(mode, c, w)]["seconds"]
                     for w in instances}
            rows.append({"mode": mode, "concurrency": c, "one_worker_rps": round(rate[1]),
                         "two_workers_rps": round(rate[2]), "ratio": round(rate[2] / rate[1], 2),
                         "cpu_ms_per_request": {w: round(v, 2) for w, v in cost.items()},
                         "cores_busy": {w: round(v, 2) for w, v in cores.items()},
                         # the whole machine over the same runs: other work and idle CPU
                         "machine_cores": {w: {k: round(totals[(mode, c, w)][k]
                                                        / totals[(mode, c, w)]["seconds"], 2)
                                               for k in ("busy", "idle", "steal")}
                                           for w in instances}})
        extra = {"memory_kib": rss, "memory_bound": memory_bound(rss)} if memory else {}
        return {**extra, "generator": generator, "rows": rows,
                "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
                "seconds_per_run": seconds, "rounds": rounds, "cpus": len(os.sched_getaffinity(0))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--generator", choices=("python", "wrk"), default="python")
    parser.add_argument("--memory", action="store_true",
                        help="also read VmRSS/Pss of every keyless process, idle and after load")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="keyless-bench-workers-") as workdir:
        results = run(args.seconds, args.rounds, Path(workdir), args.generator, args.memory)
    print(f"{'mode':<12}{'c':>4}{'1 worker req/s':>16}{'2 workers req/s':>17}{'ratio':>8}")
    for row in results["rows"]:
        print(f"{row['mode']:<12}{row['concurrency']:>4}{row['one_worker_rps']:>16}"
              f"{row['two_workers_rps']:>17}{row['ratio']:>8}   keyless CPU ms/request "
              f"{row['cpu_ms_per_request'][1]} vs {row['cpu_ms_per_request'][2]}, cores busy "
              f"{row['cores_busy'][1]} vs {row['cores_busy'][2]}; machine (busy/idle/steal "
              f"cores) {row['machine_cores'][1]} vs {row['machine_cores'][2]}")
    print("CPU seconds over the timed runs: " + ", ".join(
        f"{name} {value}" for name, value in results["cpu_seconds"].items()))
    for moment, check in results.get("memory_bound", {}).items():
        print(f"memory {moment}: --workers 1 {check['one_process_kib'] / 1024:.1f} MiB, "
              f"--workers 2 total {check['two_workers_total_kib'] / 1024:.1f} MiB "
              f"(bound 2 x one + 20 MB = {check['limit_kib'] / 1024:.1f} MiB: "
              f"{'holds' if check['holds'] else 'EXCEEDED'}); per process "
              + ", ".join(f"{name} {v['rss'] / 1024:.1f}/{v['pss'] / 1024:.1f}"
                          for name, v in results["memory_kib"][2][moment].items())
              + " MiB RSS/Pss")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
