"""PostgreSQL through keyless ÷ direct with a token, measured side by side in one run.

    python -m bench.postgres_bench [--smoke] [--seconds N] [--clients N] [--out DIR]

A real PostgreSQL server (tests/support/postgres_server.py: TLS for the Azure name, a role
whose password is the token) and the real keyless process with a --postgres listener. pgbench
runs the same workload twice per round, interleaved:
- direct: libpq to the server over verified TLS with the token as the password (what an app
  that fetched its own token would do);
- keyless: libpq to the local listener with a wrong password; keyless logs in with the token.
Workloads: `pgbench -S` (select-only on kept connections) and `pgbench -S -C` (a new
connection per transaction: keyless' login path and its upstream TLS handshake each time).
Targets (issue 13): keyless ÷ direct ≥ 0.9× for -S, ≥ 0.8× for -C, and one token fetch for
the whole run. Every run is bounded by -T; only ratios of the same run mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.azurite import TestPKI, free_port
from tests.support.identity_endpoint import FakeIdentityEndpoint, make_token
from tests.support.keyless import KeylessProcess
from tests.support.postgres_server import AZURE_HOST, PostgresServer, find_pg_bin

RESOURCE = "https://ossrdbms-aad.database.windows.net"
ROLE = "bench_identity"
WRONG_PASSWORD = "legacy-Passw0rd-from-the-config"
TARGETS = {"select-only (-S)": 0.9, "new connection per transaction (-S -C)": 0.8}
WORKLOADS = {"select-only (-S)": ["-S"], "new connection per transaction (-S -C)": ["-S", "-C"]}
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int
    seconds: int
    clients: int


FULL = Profile("full", rounds=3, seconds=10, clients=4)
SMOKE = Profile("smoke", rounds=1, seconds=2, clients=2)


def pgbench(pg_bin: Path, env: dict[str, str], args: list[str], timeout: float) -> str:
    completed = subprocess.run([str(pg_bin / "pgbench"), *args], env=env, capture_output=True,
                               text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"pgbench {' '.join(args)} failed ({completed.returncode}):\n"
                           f"{completed.stdout[-2000:]}{completed.stderr[-2000:]}")
    return completed.stdout


def tps(output: str) -> float:
    match = _TPS.search(output)
    if match is None:
        raise RuntimeError(f"no tps in pgbench's output:\n{output[-2000:]}")
    failed = _FAILED.search(output)
    if failed is not None and int(failed.group(1)) != 0:
        raise RuntimeError(f"pgbench had failed transactions:\n{output[-2000:]}")
    return float(match.group(1))


def libpq_env(**values: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {**base, **values}


def run(profile: Profile, workdir: Path) -> dict[str, object]:
    pki = TestPKI(workdir / "pki")
    pg_bin = find_pg_bin()
    token = make_token(RESOURCE, lifetime=24 * 3600)
    with PostgresServer(pki, settings={"max_connections": "200"}) as server, \
            FakeIdentityEndpoint() as identity:
        server.create_role(ROLE, token)
        identity.queue_tokens(RESOURCE, token)
        port = free_port()
        keyless = KeylessProcess(workdir / "keyless", [
            "--postgres", f"{port}={AZURE_HOST}",
            "--connect-to", f"{AZURE_HOST}:5432:127.0.0.1:{server.port}",
            "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_pem_path}",
            "--log-level", "warning",
        ], identity.env()).start()
        try:
            direct = libpq_env(PGHOST=AZURE_HOST, PGHOSTADDR="127.0.0.1", PGPORT=str(server.port),
                               PGUSER=ROLE, PGPASSWORD=token, PGDATABASE=ROLE,
                               PGSSLMODE="verify-full", PGSSLROOTCERT=pki.ca_pem_path)
            through = libpq_env(PGHOST="127.0.0.1", PGPORT=str(port), PGUSER=ROLE,
                                PGPASSWORD=WRONG_PASSWORD, PGDATABASE=ROLE)
            pgbench(pg_bin, direct, ["-i", "-s", "1", "-q"], timeout=300)
            configs = {"direct (token, TLS)": direct, "keyless (wrong password)": through}
            samples: dict[str, dict[str, list[float]]] = {
                w: {c: [] for c in configs} for w in WORKLOADS}
            common = ["-n", "-T", str(profile.seconds), "-c", str(profile.clients),
                      "-j", str(min(profile.clients, 2))]
            for _ in range(profile.rounds):
                for workload, flags in WORKLOADS.items():
                    for config, env in configs.items():
                        output = pgbench(pg_bin, env, [*common, *flags],
                                         timeout=profile.seconds * 3 + 60)
                        samples[workload][config].append(tps(output))
            logins = keyless.metric("keyless_listener_logins_total", result="converted")
        finally:
            keyless.stop()
        fetches = len(identity.calls_for(RESOURCE))
    results: dict[str, object] = {"profile": profile.name, "seconds": profile.seconds,
                                  "clients": profile.clients, "rounds": profile.rounds,
                                  "workloads": {}, "token_fetches": fetches,
                                  "keyless_logins": logins}
    for workload, by_config in samples.items():
        medians = {config: statistics.median(values) for config, values in by_config.items()}
        direct_tps, keyless_tps = medians.values()
        results["workloads"][workload] = {  # type: ignore[index]
            "tps": medians, "samples": by_config, "ratio": keyless_tps / direct_tps,
            "target": TARGETS[workload]}
    return results


def table(results: dict[str, object]) -> str:
    lines = [f"PostgreSQL, pgbench -c {results['clients']} -T {results['seconds']}, "
             f"{results['rounds']} interleaved round(s), median tps",
             f"{'workload':42} {'direct':>10} {'keyless':>10} {'ratio':>7} {'target':>7}"]
    for workload, row in results["workloads"].items():  # type: ignore[attr-defined]
        direct_tps, keyless_tps = row["tps"].values()
        verdict = "ok" if row["ratio"] >= row["target"] else "BELOW"
        lines.append(f"{workload:42} {direct_tps:10.0f} {keyless_tps:10.0f} "
                     f"{row['ratio']:6.2f}× {row['target']:6.1f}× {verdict}")
    lines.append(f"token fetches for the whole run: {results['token_fetches']} "
                 f"(target 1), logins through keyless: {results['keyless_logins']:.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one short round (~15 s)")
    parser.add_argument("--seconds", type=int, help="length of one pgbench run")
    parser.add_argument("--clients", type=int, help="pgbench clients (-c)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument("--out", type=Path, help="write postgres-benchmarks.json here")
    args = parser.parse_args(argv)
    base = SMOKE if args.smoke else FULL
    profile = Profile(base.name, args.rounds or base.rounds, args.seconds or base.seconds,
                      args.clients or base.clients)
    workdir = Path(tempfile.mkdtemp(prefix="keyless-pg-bench-"))
    try:
        results = run(profile, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "postgres-benchmarks.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
